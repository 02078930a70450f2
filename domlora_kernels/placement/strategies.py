"""Placement strategies: which modules get an adapter, and at which rank, from which signal.

A strategy turns a probe (:class:`~domlora_kernels.scores.PageScores`, with the signals it
needs) and a parameter budget into ``{module: rank}``. Every plan stays within the budget
(DoRA's magnitude vectors included) and is a deterministic function of its inputs.

Signal strategies fill the budget by the fractional-knapsack rule of
:mod:`~domlora_kernels.placement.budget`, each with its own per-module value:

- ``"page"``: PAGE, the energy of the first ``lora_B`` gradient (the paper's rule).
- ``"adam"``: Adam's first-step decrease, ``lr * ||g_B||_1`` for the mean projected gradient
  ``g_B = s D^T X A^T / N`` of the calibration set. Adam's first update is
  ``-lr g / (|g| + eps) ~ -lr sign(g)`` (a sign step), so the first-order loss decrease is the
  L1 norm of the full-batch gradient, not the squared L2 norm of each sample's, and a module
  whose samples disagree in sign is worth less than its energy says.
- ``"heldout"``: the first-order decrease of a *held-out* split's loss under Adam's first step
  on the training split: ``lr <g_heldout, sign(g_train)>``. It can be negative: such a module
  never enters a plan.
- ``"pilot"``: what a short pilot run realised: an all-module LoRA at low rank trained for a
  few dozen steps, each module scored by ``||s B A x||`` on the calibration data (LoRA-drop).

Type strategies choose module *types* and spread the budget over all layers of the chosen
types at a low, uniform rank:

- ``"types"``: types in decreasing type density of the ``"adam"`` signal (the type's summed
  signal over its summed rank unit); every layer of a type at rank 1 while whole types fit;
  the rest raises the chosen types' rank uniformly, up to ``r``. When not even the densest type
  fits at rank 1 on every layer, its densest layers by the same signal take the budget.
- ``"plop"``: PLoP's types, the modules that write to the residual stream through values and
  the MLP (``v_proj``, ``o_proj``, ``down_proj``), on every layer at the largest uniform rank
  the budget buys (data-free).
- ``"plop+types"``: ``"plop"`` where the budget buys PLoP's types at rank 1 on every layer,
  ``"types"`` below that (its signal is needed only there).

Cost of each strategy, in probes (one forward and one backward over the calibration set) and
in training steps of the user's adapter, is :data:`COSTS`; ``benchmarks/bench_probe.py``
measures them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from ..scores import PageScores
from .budget import rank_unit

STRATEGIES = ("page", "adam", "heldout", "pilot", "types", "plop", "plop+types")

# The signal each strategy ranks modules by (a key of PageScores.signals; "page" is PAGE itself).
SIGNAL_OF = {"page": "page", "adam": "adam", "heldout": "heldout", "pilot": "pilot", "types": "adam",
             "plop+types": "adam"}

# PLoP's types: value, output and MLP down projections (Llama, Qwen, Gemma, Mistral names).
PLOP_TYPES = ("v_proj", "o_proj", "down_proj")


# The package's default placement (docs/placement_protocol.md has how it was chosen), and the
# budget it fills when none is given: 5% of vanilla LoRA at rank r on every probed module.
DEFAULT_STRATEGY = "plop+types"
DEFAULT_BUDGET = "5%"
BUDGET_ONLY = ("types", "plop", "plop+types")  # strategies that spread a budget over whole types


def resolve(strategy: str | None, top_k: Any, top_p: Any, rank_pattern: Any, variant: Any, budget: Any):
    """``(strategy, budget)`` as used: ``strategy=None`` is PAGE's rule where the selection is
    PAGE's (``top_k``, ``top_p``, ``rank_pattern``, or AdaLoRA, which ranks by PAGE's top-k), else
    :data:`DEFAULT_STRATEGY` at ``budget``. A strategy of :data:`BUDGET_ONLY` given no ``top_k``,
    ``top_p`` or ``budget`` fills :data:`DEFAULT_BUDGET` (a share of vanilla LoRA at the plan's
    rank ``r``: at a smaller ``r``, or with DoRA's magnitude vectors, PLoP's types need a larger
    share of it)."""
    unset = top_k is None and top_p is None and budget is None
    if strategy is not None:
        check_strategy(strategy)
        # the strategies that only fill a budget take the default one when no selection is given
        return strategy, DEFAULT_BUDGET if unset and strategy in BUDGET_ONLY else budget
    if top_k is not None or top_p is not None or rank_pattern is not None or variant == "adalora":
        return "page", budget
    return DEFAULT_STRATEGY, DEFAULT_BUDGET if budget is None else budget


@dataclass(frozen=True)
class Cost:
    """What a strategy runs before it can plan: probes over the calibration set, and training
    steps of an all-module low-rank adapter (the pilot)."""

    probes: float
    pilot_steps: int
    note: str


COSTS = {
    "page": Cost(1, 0, "one probe (fisher estimator)"),
    "adam": Cost(1, 0, "one probe (gradient estimator)"),
    "heldout": Cost(1, 0, "one probe split in two halves (gradient estimator on each)"),
    "pilot": Cost(0, 30, "a pilot: all-module LoRA at rank 1, 30 steps, then one forward to score it"),
    "types": Cost(1, 0, "one probe (gradient estimator), aggregated by type"),
    "plop": Cost(0, 0, "none: data-free"),
    "plop+types": Cost(1, 0, "one probe (gradient estimator), whose signal is used below PLoP's threshold"),
}


# One line of evidence per strategy, printed by `domlora apply`: the placement study's paired
# differences of held-out loss drop, copied into the package from its committed results by
# `python -m python.studies.placement.decide evidence` (a test checks the copy against them).
_EVIDENCE_FILE = json.loads(files(__package__).joinpath("evidence.json").read_text())
EVIDENCE_UNITS = _EVIDENCE_FILE["units"]
EVIDENCE = {s: _EVIDENCE_FILE["strategies"].get(s, "not measured by the placement study") for s in STRATEGIES}
# The default's confirmation where it was not designed (absent until that confirmation is complete).
CONFIRMATION = _EVIDENCE_FILE.get("confirmation", {})


def check_strategy(strategy: object) -> str:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


def signal_values(scores: PageScores, strategy: str) -> dict[str, float]:
    """The per-module values ``strategy`` ranks by, from ``scores`` (PAGE, or one of its signals).

    Raises:
        ValueError: the scores do not carry that signal; the message says how to measure it.
    """
    key = SIGNAL_OF[strategy]
    if key == "page":
        return dict(scores.scores)
    got = scores.signals.get(key)
    if got is None:
        how = {
            "adam": "page_scores(model, batches, estimator='gradient') (or domlora_kernels.measure_signals(model, batches, 'adam'))",
            "heldout": "domlora_kernels.measure_signals(model, batches, 'heldout')",
            "pilot": "domlora_kernels.measure_signals(model, batches, 'pilot')",
        }[key]
        have = ", ".join(sorted(scores.signals)) or "none"
        raise ValueError(f"strategy {strategy!r} needs the {key!r} signal, which these scores do not carry (they "
                         f"carry: {have}); measure it with {how}, or choose strategy='page' (PAGE, the paper's rule)")
    missing = [n for n in scores.scores if n not in got]
    if missing:
        raise ValueError(f"the {key!r} signal has no value for {len(missing)} probed module(s), e.g. {missing[0]}")
    return {n: float(got[n]) for n in scores.scores}


def _unit(scores: PageScores, name: str, k: int, dora: bool) -> int:
    """Parameters of rank ``k`` on ``name`` (DoRA's magnitude vector included)."""
    info = scores.modules[name]
    return k * rank_unit(info) + (info.out_features if dora else 0)


def knapsack(scores: PageScores, values: Mapping[str, float], candidates: list[str], r: int, budget: int,
             dora: bool = False) -> dict[str, int]:
    """Modules by decreasing value per parameter, each up to rank ``r``, while they fit.

    The longest prefix of the sequence (densest module's ranks 1..r, then the next module's, ...)
    that fits ``budget``, as :func:`~domlora_kernels.placement.budget.plan_budget` does for PAGE.
    Modules whose value is not positive never enter.
    """
    order = sorted((n for n in candidates if values[n] > 0),
                   key=lambda n: -values[n] / rank_unit(scores.modules[n]))
    ranks: dict[str, int] = {}
    used = 0
    for name in order:
        for k in range(1, r + 1):
            extra = _unit(scores, name, k, dora) - (_unit(scores, name, k - 1, dora) if k > 1 else 0)
            if used + extra > budget:
                return ranks
            ranks[name], used = k, used + extra
    return ranks


def by_type(scores: PageScores, candidates: list[str]) -> dict[str, list[str]]:
    """type -> its candidate modules, in model order."""
    out: dict[str, list[str]] = {}
    for n in candidates:
        out.setdefault(scores.modules[n].type, []).append(n)
    return out


def uniform_rank(scores: PageScores, names: list[str], r: int, budget: int, dora: bool) -> int:
    """The largest rank ``k <= r`` at which every module of ``names`` fits ``budget`` (0: none)."""
    fixed = sum(scores.modules[n].out_features for n in names) if dora else 0
    per_rank = sum(rank_unit(scores.modules[n]) for n in names)
    return max(0, min(r, (budget - fixed) // per_rank)) if per_rank else 0


def plan_types(scores: PageScores, values: Mapping[str, float], candidates: list[str], r: int, budget: int,
               dora: bool = False) -> dict[str, int]:
    """The ``"types"`` rule of the module docstring."""
    groups = by_type(scores, candidates)

    def density(t: str) -> float:
        return sum(max(values[n], 0.0) for n in groups[t]) / sum(rank_unit(scores.modules[n]) for n in groups[t])

    order = [t for t in sorted(groups, key=lambda t: -density(t)) if density(t) > 0]
    if not order:
        return {}
    chosen: list[str] = []
    for t in order:
        if uniform_rank(scores, chosen + groups[t], r, budget, dora) < 1:
            break
        chosen += groups[t]
    if not chosen:  # not even the densest type fits whole at rank 1: its densest layers do
        return knapsack(scores, values, groups[order[0]], 1, budget, dora)
    k = uniform_rank(scores, chosen, r, budget, dora)
    return {n: k for n in chosen}


def plan_plop(scores: PageScores, candidates: list[str], r: int, budget: int, dora: bool = False) -> dict[str, int]:
    """The ``"plop"`` rule: every v/o/down module at the largest uniform rank that fits (empty if none)."""
    names = [n for n in candidates if scores.modules[n].type in PLOP_TYPES]
    if not names:
        types = sorted({scores.modules[n].type for n in candidates})
        raise ValueError(f"strategy 'plop' adapts {', '.join(PLOP_TYPES)}, and this model has none of them "
                         f"(its module types: {', '.join(types)}); choose another strategy")
    k = uniform_rank(scores, names, r, budget, dora)
    return {n: k for n in names} if k >= 1 else {}


def plop_threshold(scores: PageScores, candidates: list[str], dora: bool = False) -> int | None:
    """Parameters of PLoP's types at rank 1 on every layer among ``candidates`` (None: none of them)."""
    names = [n for n in candidates if scores.modules[n].type in PLOP_TYPES]
    return sum(_unit(scores, n, 1, dora) for n in names) if names else None


def plop_then_types_rule(scores: PageScores, candidates: list[str], budget: int,
                         dora: bool = False) -> tuple[str, int | None]:
    """Which rule ``"plop+types"`` plans ``budget`` by, ``"plop"`` or ``"types"``, and PLoP's threshold."""
    need = plop_threshold(scores, candidates, dora)
    return ("plop" if need is not None and need <= budget else "types"), need


def _plop_then_types(scores: PageScores, candidates: list[str], r: int, budget: int, dora: bool) -> dict[str, int]:
    """The ``"plop+types"`` rule; below PLoP's threshold its error says what the threshold is."""
    rule, need = plop_then_types_rule(scores, candidates, budget, dora)
    if rule == "plop":
        return plan_plop(scores, candidates, r, budget, dora)
    if SIGNAL_OF["types"] not in scores.signals:
        why = (f"PLoP's types (v/o/down on every layer at rank 1) need {need:,} parameters and the budget is "
               f"{budget:,}" if need is not None else "the candidates have no v_proj, o_proj or down_proj")
        raise ValueError(f"strategy 'plop+types' plans by 'types' here ({why}), which needs the 'adam' signal these "
                         f"scores do not carry: probe with page_scores(..., estimator='gradient') or "
                         f"measure_signals(model, batches, 'plop+types')"
                         + (f", raise the budget to {need:,}" if need is not None else "")
                         + ", or choose strategy='page' (PAGE, the paper's rule)")
    return plan_types(scores, signal_values(scores, "types"), candidates, r, budget, dora)


def plan_strategy(scores: PageScores, strategy: str, candidates: list[str], r: int, budget: int,
                  dora: bool = False) -> dict[str, int]:
    """``{module: rank}`` of ``strategy`` within ``budget`` parameters (module order: model order).

    Empty when the budget buys nothing (the caller says so).
    """
    check_strategy(strategy)
    if strategy == "plop":
        ranks = plan_plop(scores, candidates, r, budget, dora)
    elif strategy == "plop+types":
        ranks = _plop_then_types(scores, candidates, r, budget, dora)
    elif strategy == "types":
        ranks = plan_types(scores, signal_values(scores, strategy), candidates, r, budget, dora)
    else:
        ranks = knapsack(scores, signal_values(scores, strategy), candidates, r, budget, dora)
    used = sum(_unit(scores, n, k, dora) for n, k in ranks.items())
    if used > budget:  # the rules above cannot exceed it; a plan over budget is a bug
        raise AssertionError(f"strategy {strategy!r} planned {used} parameters for a budget of {budget}")
    return {n: ranks[n] for n in scores.scores if n in ranks}


def top_by_signal(scores: PageScores, strategy: str, candidates: list[str], top_k: int) -> list[str]:
    """The ``top_k`` candidates of highest value under ``strategy``'s signal (ties keep model order)."""
    values = signal_values(scores, strategy)
    return sorted(candidates, key=lambda n: -values[n])[:top_k]


def describe(strategy: str) -> str:
    """One line: what the strategy ranks by and what it costs."""
    c = COSTS[strategy]
    return f"strategy {strategy!r}: {c.note}"


def finite(values: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())
