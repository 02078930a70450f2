"""Parameter budgets: which modules get an adapter, and at which rank, for a number of trainable parameters.

The rule (used by :func:`~domlora_kernels.placement.domlora_config` with ``budget=`` or ``top_p=``):

- Hold each module's LoRA scaling at the base one (``alpha / r``, or ``alpha / sqrt(r)`` for
  rsLoRA, with the user's ``r`` and ``alpha``); the config's ``alpha_pattern`` does that for
  modules given another rank. At a fixed scaling, the expected first-step energy of an
  adapter of rank ``k`` is linear in ``k`` (``E ||s G A^T||^2 = s^2 k / (3n) ||G||^2`` for
  peft's random ``A``), and so is its parameter count ``k (n + m)``. So a module's PAGE per
  parameter, ``PAGE / (r_probe (n + m))``, does not depend on the rank it gets: it is the
  module's energy density.
- Maximising the total first-step energy under the budget is then a fractional knapsack, whose
  optimum fills modules in decreasing density. Linear energy alone would give every parameter
  to the densest module, up to full rank; but a rank-``k`` adapter can only ever learn ``k``
  directions of update, so, as vanilla LoRA does, each module is capped at the user's ``r``.
- The plan is the longest prefix of one fixed sequence of rank units that fits: the densest
  module's ranks 1..r, then the next module's, and so on (modules with zero PAGE never enter).
  A prefix makes plans nested: a larger budget keeps every module and rank of a smaller one.
  It leaves unused less than one rank unit (``n + m`` parameters) of the next module.
- ``top_p``: the shortest prefix of the same sequence whose adapters carry at least that
  fraction of the candidates' PAGE mass (a module at rank ``k`` carries ``k / r`` of its own).

DoRA adds a magnitude vector of ``m`` parameters per adapted module: it is counted in the
budget (with the module's first rank unit) but not in the order.

An expert weight of ``E`` experts takes one rank unit per expert: peft's ``target_parameters``
adapter of rank ``k`` on it has ``k E (n + m)`` parameters (:func:`rank_unit`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..scores import ModuleInfo, PageScores

_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")


@dataclass(frozen=True)
class BudgetPlan:
    """The modules and ranks a budget buys, in the order the rule took them (densest first).

    Attributes:
        ranks: name -> rank, densest module first.
        params: trainable parameters of the plan (``sum k (n + m)``, plus ``m`` per module for DoRA).
        budget: the budget in parameters (None for a ``top_p`` plan).
        top_p: the PAGE mass asked for (None for a parameter budget).
        covered: fraction of the candidates' PAGE mass the plan carries at rank ``r``.
    """

    ranks: dict[str, int]
    params: int
    budget: int | None
    top_p: float | None
    covered: float


def rank_unit(info: ModuleInfo) -> int:
    """Parameters of one rank of an adapter on the module: ``n + m``, ``E (n + m)`` for an expert weight."""
    return info.num_experts * (info.in_features + info.out_features)


def vanilla_lora_params(scores: PageScores, r: int) -> int:
    """``sum r (n + m)`` over every probed module (``r E (n + m)`` for an expert weight):
    vanilla LoRA on all of them at rank ``r``."""
    return sum(r * rank_unit(i) for i in scores.modules.values())


def budget_params(budget: Any, vanilla: int) -> int:
    """The budget in trainable parameters.

    ``budget`` is an int >= 1 (parameters), a float in (0, 1] (a fraction of ``vanilla``) or a
    string "P%" with 0 < P <= 100 (a percentage of ``vanilla``); fractions round down.

    >>> budget_params(20000, 2_442_240), budget_params("1%", 2_442_240), budget_params(0.5, 10)
    (20000, 24422, 5)
    """
    if isinstance(budget, str):
        m = _PERCENT.fullmatch(budget)
        if m is None:
            raise ValueError(f"budget string must be a percentage such as '1%', got {budget!r}")
        budget = float(m.group(1)) / 100
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int (parameters), a float in (0, 1] or a string like '1%', got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget in parameters must be >= 1, got {budget}")
        return budget
    if not (math.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"a fractional budget must be in (0, 1] (or '0.1%'..'100%'), got {budget!r}")
    return math.floor(budget * vanilla + 1e-9)  # 1e-9: 0.01 * 2442240 is 24422.399999999998


def density_order(scores: PageScores, candidates: list[str]) -> list[str]:
    """``candidates`` with positive PAGE, by PAGE per parameter ``PAGE / rank_unit``, densest first (ties keep model order)."""
    def density(name: str) -> float:
        return scores.scores[name] / rank_unit(scores.modules[name])

    return sorted((n for n in candidates if scores.scores[n] > 0), key=lambda n: -density(n))


def plan_budget(scores: PageScores, candidates: list[str], r: int, budget: int | None = None,
                top_p: float | None = None, dora: bool = False) -> BudgetPlan:
    """The plan of the module docstring's rule for ``budget`` parameters or a ``top_p`` of the PAGE mass.

    Args:
        scores: the probe.
        candidates: the module names the plan may use.
        r: the rank cap (the user's rank); scaling is assumed held at the base one.
        budget: parameters (from :func:`budget_params`); give it or ``top_p``.
        top_p: fraction in (0, 1] of the candidates' PAGE mass to carry.
        dora: count DoRA's magnitude vector (``m`` per module).

    Returns:
        :class:`BudgetPlan`; ``ranks`` is empty when the budget is below one rank unit of the
        densest module (the caller says so).
    """
    if (budget is None) == (top_p is None):
        raise ValueError("give exactly one of budget and top_p")
    mass = sum(max(scores.scores[n], 0.0) for n in candidates)
    ranks: dict[str, int] = {}
    params, carried = 0, 0.0
    for name in density_order(scores, candidates):
        info = scores.modules[name]
        for k in range(1, r + 1):
            unit = rank_unit(info) + (info.out_features if dora and k == 1 else 0)
            reached = top_p is not None and carried >= top_p * mass * (1 - 1e-12)  # 1e-12: float sums at top_p=1
            if reached or (budget is not None and params + unit > budget):
                return BudgetPlan(ranks, params, budget, top_p, carried / mass)
            ranks[name], params, carried = k, params + unit, carried + scores.scores[name] / r
    return BudgetPlan(ranks, params, budget, top_p, carried / mass if mass > 0 else 0.0)


def kept_scaling_alpha(lora_alpha: float, r: int, k: int, use_rslora: bool) -> float:
    """The alpha that gives a rank-``k`` adapter the scaling of rank ``r`` with ``lora_alpha``:
    ``alpha k / r`` (scaling ``alpha / r``) or ``alpha sqrt(k / r)`` (rsLoRA, ``alpha / sqrt(r)``)."""
    return lora_alpha * (math.sqrt(k / r) if use_rslora else k / r)


def parse_budget(text: str) -> int | float | str:
    """A budget as a user types it: ``"1%"`` stays a percentage string, ``"20000"`` becomes a
    parameter count, ``"0.01"`` a fraction of vanilla LoRA (:func:`budget_params` checks the range).

    >>> parse_budget("1%"), parse_budget("20000"), parse_budget("0.01")
    ('1%', 20000, 0.01)

    Raises:
        ValueError: ``text`` is none of the three forms.
    """
    text = str(text).strip()
    if text.endswith("%"):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"expected a parameter count (20000), a fraction (0.01) or a percentage (1%), got {text!r}")
