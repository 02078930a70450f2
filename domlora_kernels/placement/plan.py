"""Placement: peft adapters where a strategy puts them, started from the probe's A where the ranks agree.

:func:`domlora_config` turns a :class:`~domlora_kernels.scores.PageScores` into a peft config
that targets the modules and ranks a placement strategy chooses within a parameter ``budget``
(:mod:`~domlora_kernels.placement.strategies`; the default ``"plop+types"``), or the ``top_k``
modules of highest PAGE (the paper's rule, :mod:`~domlora_kernels.placement.budget` for its
budget plans), and nothing else; given a user's own
``LoraConfig``, it restricts that config's targets instead. :func:`apply_domlora` takes the
same arguments, wraps a model with the config and copies the probe's ``A`` into each
``lora_A``, so that the first gradient of every ``lora_B`` is exactly the one the probe
measured (docs/design.md, oracle 2). One planning step (:func:`make_plan`, this module) validates the
arguments and chooses targets and ranks for both; :mod:`.wiring` turns the plan into peft.

Exact names. peft matches a *list* of target names as "equal, or a dotted suffix": the name
``model.layers.1.mlp.down_proj`` would also select ``encoder.model.layers.1.mlp.down_proj`` in
a model that nests a second one. A *string* is a regular expression peft matches against the
whole name (``re.fullmatch``), so the config carries one alternation of the escaped full names:
nothing but those modules can match. ``rank_pattern`` keys are regexes too, matched by peft as
``(.*\\.)?(key)$``; a leading ``^`` there keeps the optional prefix empty, so each key selects
exactly its own module as well.

Expert weights. The 3D expert parameters of a mixture-of-experts block (``...mlp.experts.down_proj``,
:mod:`~domlora_kernels.probe.experts`) are no modules: peft adapts them through
``LoraConfig(target_parameters=[full names])``, which it matches exactly, with plain LoRA or rsLoRA
(its ``ParamWrapper`` takes no DoRA, and AdaLoRA has no such path). Their ``lora_A`` is
``[r * E, n]``, which the probe's A of the weight is drawn as.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..scores import PageScores
from .budget import budget_params, density_order, kept_scaling_alpha, plan_budget, rank_unit, vanilla_lora_params
from .strategies import (BUDGET_ONLY, SIGNAL_OF, plan_strategy, plop_then_types_rule, resolve, signal_values,
                         top_by_signal)

VARIANTS = ("lora", "dora", "rslora", "adalora")

# set by DomLoRA itself from the scores and the arguments; passing them in **peft_kwargs is an error
_OWNED_KWARGS = ("target_modules", "r", "lora_alpha", "use_dora", "use_rslora", "rank_pattern", "target_r")


@dataclass
class Placement:
    """What :func:`apply_domlora` placed, and what it costs against vanilla LoRA.

    Attributes:
        variant: "lora", "dora", "rslora" or "adalora".
        targets: the adapted modules, highest value of the strategy's signal (PAGE for "page") first.
        ranks: name -> adapter rank (AdaLoRA: its ``init_r``; it prunes towards ``r`` in training).
        shares: name -> PAGE share of the module in the whole probe.
        r: the rank argument; vanilla LoRA is counted at this rank.
        trainable_params: parameters with ``requires_grad`` in the wrapped model (includes
            DoRA's magnitude vectors and AdaLoRA's ``lora_E``).
        vanilla_lora_params: ``sum r * (n + m)`` over every probed candidate module: vanilla
            LoRA on all linear modules at the same rank, counted arithmetically.
        num_candidates: modules the probe measured.
        copied_A: targets whose ``lora_A`` now holds the probe's A.
        kept_peft_init: target -> why its ``lora_A`` kept peft's initialisation.
        probe_scaling / adapter_scaling: the LoRA scaling the probe measured with and the
            adapter's; the first ``||lora_B.grad||^2`` equals the probe's energy times
            ``(adapter_scaling / probe_scaling) ** 2`` (1 when both use the same alpha).
        rule: how the targets were chosen: "top-k", "budget" or "top-p" (:mod:`~domlora_kernels.placement.budget`).
        strategy: what the modules were ranked by (:mod:`~domlora_kernels.placement.strategies`):
            "page" (PAGE, the paper's rule), "adam", "heldout", "pilot", "types", "plop" or "plop+types".
        budget: the parameter budget of a "budget" plan; top_p: the PAGE mass of a "top-p" plan.
        alphas: name -> alpha of the targets whose rank differs from ``r`` in a budget plan
            (their ``alpha_pattern``: it keeps their scaling at the base one).
    """

    variant: str
    targets: list[str]
    ranks: dict[str, int]
    shares: dict[str, float]
    r: int
    trainable_params: int
    vanilla_lora_params: int
    num_candidates: int
    copied_A: list[str] = field(default_factory=list)
    kept_peft_init: dict[str, str] = field(default_factory=dict)
    probe_scaling: float | None = None
    adapter_scaling: float | None = None
    rule: str = "top-k"
    budget: int | None = None
    top_p: float | None = None
    alphas: dict[str, float] = field(default_factory=dict)
    strategy: str = "page"
    # strategy "plop+types" only: the rule that planned ("plop" or "types") and PLoP's threshold,
    # the parameters v/o/down at rank 1 on every layer need (None: the model has none of them)
    planned_by: str | None = None
    plop_threshold: int | None = None

    SHOWN = 12  # summary() lists this many modules of a wider plan, after a count by type and rank

    @property
    def ratio(self) -> float:
        """``trainable_params / vanilla_lora_params``."""
        return self.trainable_params / self.vanilla_lora_params

    def summary(self) -> str:
        """Two or more lines: where the adapters sit and the trainable parameter count."""
        k = len(self.targets)
        adapters = f"DomLoRA ({self.variant}): {k} adapter{'s' if k > 1 else ''}"
        if self.rule == "budget" and self.strategy != "page":
            head = f"{adapters}, by strategy {self.strategy!r} within a budget of {self.budget:,} parameters"
            if self.planned_by == "plop":
                head += (f": PLoP's types (v/o/down on every layer; they need {self.plop_threshold:,} at rank 1, "
                         f"the budget covers that)")
            elif self.planned_by == "types":
                need = ("the model has no v_proj, o_proj or down_proj" if self.plop_threshold is None else
                        f"below the {self.plop_threshold:,} PLoP's types need at rank 1 on every layer")
                head += f": by type, on Adam's first-step gain ({need})"
        elif self.rule == "top-k" and self.strategy != "page":
            head = f"{adapters} on the top-{k} module{'s' if k > 1 else ''} of strategy {self.strategy!r}"
        elif self.rule == "budget":
            head = f"{adapters}, by PAGE per parameter within a budget of {self.budget:,} parameters"
        elif self.rule == "top-p":
            head = f"{adapters}, by PAGE per parameter until {100 * self.top_p:g}% of the PAGE mass"
        else:
            head = f"{adapters} on the top-{k} PAGE module{'s' if k > 1 else ''}"
        lines = [head]
        shown = self.targets if k <= self.SHOWN else self.targets[: self.SHOWN]
        if k > self.SHOWN:  # a wide plan: what it holds by type and rank, then its first modules
            counts: dict[tuple[str, int], int] = {}
            for name in self.targets:
                key = (name.rsplit(".", 1)[-1], self.ranks[name])
                counts[key] = counts.get(key, 0) + 1
            lines.append("  by type: " + ", ".join(f"{t} x{c} at rank {r}" for (t, r), c in sorted(counts.items())))
        for name in shown:
            init = "probe A" if name in self.copied_A else "peft init"
            alpha = f" (alpha {self.alphas[name]:g}: same scaling)" if name in self.alphas else ""
            lines.append(f"  {name}: rank {self.ranks[name]}{alpha}, PAGE share {100 * self.shares[name]:.1f}%, "
                         f"lora_A from {init}")
        if k > self.SHOWN:
            lines.append(f"  ... and {k - self.SHOWN} more (to_dict() / domlora_placement.json list every one)")
        lines.append(
            f"trainable parameters: {self.trainable_params:,} = {100 * self.ratio:.2f}% of vanilla LoRA on all "
            f"{self.num_candidates} linear modules at r={self.r} ({self.vanilla_lora_params:,})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def exact_names_regex(names: list[str]) -> str:
    """A regex that ``re.fullmatch`` (peft's rule for a string ``target_modules``) matches
    against exactly the given full module names and nothing else.

    >>> exact_names_regex(["model.layers.1.mlp.down_proj"])
    '(?:model\\\\.layers\\\\.1\\\\.mlp\\\\.down_proj)'
    """
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _check_int(value: Any, what: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{what} must be an integer {rng}, got {value!r}")
    return value


def top_modules(scores: PageScores, top_k: int = 1) -> list[str]:
    """The ``top_k`` module names of highest PAGE, highest first (ties keep model order).

    Raises:
        ValueError: ``top_k`` outside ``1 .. number of probed modules``.
    """
    _check_scores(scores)
    return _top(scores, list(scores.scores), top_k)


def _check_scores(scores: Any) -> None:
    if not isinstance(scores, PageScores):
        raise TypeError(f"scores must be a PageScores (from page_scores or PageScores.from_json), got {type(scores).__name__}")


def _top(scores: PageScores, candidates: list[str], top_k: int) -> list[str]:
    _check_int(top_k, "top_k", 1, len(candidates))
    return sorted(candidates, key=lambda n: -scores.scores[n])[:top_k]


def _by_page(scores: PageScores, names) -> list[str]:
    return sorted(names, key=lambda n: -scores.scores[n])


def page_rank_pattern(scores: PageScores, targets: list[str], r: int) -> dict[str, int]:
    """Ranks proportional to PAGE within ``targets``, each at least 1, summing to ``len(targets) * r``.

    The rule: every target gets 1, and the remaining ``len(targets) * (r - 1)`` ranks are
    apportioned by largest remainder in proportion to the targets' PAGE (a remainder tie goes
    to the higher PAGE). If the targets' PAGE sums to zero the split is even.

    >>> page_rank_pattern(scores, ["a", "b"], r=8)   # PAGE 3:1  # doctest: +SKIP
    {'a': 12, 'b': 4}
    """
    k = len(targets)
    extra = k * (r - 1)
    vals = [max(scores.scores[n], 0.0) for n in targets]
    tot = sum(vals)
    weights = [v / tot for v in vals] if tot > 0 else [1.0 / k] * k
    quotas = [extra * w for w in weights]
    ranks = [math.floor(q) for q in quotas]
    left = extra - sum(ranks)
    # targets are sorted by PAGE, so a stable sort on the remainder breaks ties towards higher PAGE
    order = sorted(range(k), key=lambda i: -(quotas[i] - ranks[i]))
    for i in order[:left]:
        ranks[i] += 1
    return {n: 1 + ri for n, ri in zip(targets, ranks)}


def _resolve_ranks(scores: PageScores, targets: list[str], r: int, rank_pattern: Any) -> dict[str, int]:
    if rank_pattern is None:
        return {n: r for n in targets}
    if isinstance(rank_pattern, str):
        if rank_pattern != "page":
            raise ValueError(f"rank_pattern must be None, 'page' or a dict name -> rank, got {rank_pattern!r}")
        return page_rank_pattern(scores, targets, r)
    if isinstance(rank_pattern, dict):
        unknown = [k for k in rank_pattern if k not in targets]
        if unknown:
            raise ValueError(
                f"rank_pattern names modules that are not among the top-{len(targets)} targets: {unknown}; "
                f"the targets are {targets}"
            )
        for k, v in rank_pattern.items():
            _check_int(v, f"rank_pattern[{k!r}]", 1)
        return {n: rank_pattern.get(n, r) for n in targets}
    raise ValueError(f"rank_pattern must be None, 'page' or a dict name -> rank, got {type(rank_pattern).__name__}")


# ------------------------------------------------------------------ planning
@dataclass
class Plan:
    """What :func:`domlora_config` and :func:`apply_domlora` place, validated once."""

    targets: list[str]  # highest value of the strategy's signal first
    ranks: dict[str, int]
    r: int
    lora_alpha: float
    variant: str
    use_rslora: bool
    init_lora_weights: Any  # True (peft's default, the probe's A distribution) or another init
    config: Any  # the user's peft config, or None
    peft_kwargs: dict[str, Any]
    rule: str = "top-k"
    budget: int | None = None
    top_p: float | None = None
    alphas: dict[str, float] = field(default_factory=dict)
    expert_weights: frozenset[str] = frozenset()  # targets peft adapts through target_parameters
    strategy: str = "page"
    planned_by: str | None = None  # as Placement's
    plop_threshold: int | None = None


def _settings_from_config(config: Any, r, lora_alpha, variant, peft_kwargs) -> tuple[int, float, str, bool]:
    """``(r, lora_alpha, variant, use_rslora)`` of a user's peft config, which owns these settings."""
    import peft

    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig (or AdaLoraConfig), got {type(config).__name__}")
    given = [k for k, v in (("r", r), ("lora_alpha", lora_alpha), ("variant", variant)) if v is not None]
    given += list(peft_kwargs)
    if given:
        raise ValueError(f"with config=..., the config holds the settings; set {', '.join(given)} in the LoraConfig "
                         f"instead of passing {'it' if len(given) == 1 else 'them'} here")
    if isinstance(config, peft.AdaLoraConfig):
        return config.target_r, config.lora_alpha, "adalora", False
    variant = "dora" if config.use_dora else "rslora" if config.use_rslora else "lora"
    return config.r, config.lora_alpha, variant, bool(config.use_rslora)


def _config_candidates(scores: PageScores, config: Any) -> list[str]:
    """The probed modules that ``config``'s own targets (and exclusions) select, by peft's matching rule."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = copy.copy(config)  # shallow: only target_modules is replaced, on the copy
    if probe.target_modules is None or probe.target_modules == "all-linear":
        probe.target_modules = exact_names_regex(list(scores.scores))
    chosen = [n for n in scores.scores if check_target_module_exists(probe, n)]
    if not chosen:
        raise ValueError(
            f"config.target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) selects "
            f"none of the {len(scores.scores)} probed modules (e.g. {next(iter(scores.scores))}); probe the modules "
            f"the config targets, or widen its target_modules"
        )
    return chosen


def _check_settings(r, lora_alpha, variant, rank_pattern, peft_kwargs, config) -> None:
    _check_int(r, "r", 1)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    owned = [k for k in _OWNED_KWARGS if k in peft_kwargs]
    if owned:
        raise ValueError(
            f"{', '.join(owned)} {'is' if len(owned) == 1 else 'are'} set by DomLoRA from the scores and the arguments "
            f"r, lora_alpha, top_k, variant, rank_pattern; remove {'it' if len(owned) == 1 else 'them'} from the keyword arguments"
        )
    if variant == "adalora":
        if rank_pattern is not None:
            raise ValueError("variant='adalora' allocates ranks itself during training; drop rank_pattern")
        if config is None and peft_kwargs.get("total_step") is None:
            raise ValueError(
                "variant='adalora' needs total_step=<number of training steps> (AdaLoRA prunes ranks on a schedule "
                "over the run), e.g. domlora_config(scores, variant='adalora', total_step=1000)"
            )


def _budget_plan(plan: Plan, scores: PageScores, candidates: list[str], rank_pattern, budget, top_p) -> Plan:
    if rank_pattern is not None:
        raise ValueError("budget and top_p choose the ranks themselves; drop rank_pattern")
    if plan.variant == "adalora":
        raise ValueError("variant 'adalora' allocates its ranks itself during training; use top_k with it, not a budget")
    if "alpha_pattern" in plan.peft_kwargs:
        raise ValueError("a budget plan sets alpha_pattern itself (it keeps each module's scaling); remove alpha_pattern")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], the fraction of the PAGE mass to cover, got {top_p!r}")
    params = None if budget is None else budget_params(budget, vanilla_lora_params(scores, plan.r))
    bp = plan_budget(scores, candidates, plan.r, budget=params, top_p=top_p, dora=plan.variant == "dora")
    if not bp.ranks:
        order = density_order(scores, candidates)
        if not order:
            raise ValueError("every candidate module has zero PAGE: there is nothing to plan a budget by")
        info = scores.modules[order[0]]
        need = rank_unit(info) + (info.out_features if plan.variant == "dora" else 0)
        raise ValueError(f"a budget of {params:,} parameters buys no adapter: rank 1 of the densest module, "
                         f"{order[0]}, needs {need:,}; raise the budget")
    plan.targets = _by_page(scores, bp.ranks)
    plan.ranks = {n: bp.ranks[n] for n in plan.targets}
    plan.alphas = {n: kept_scaling_alpha(plan.lora_alpha, plan.r, k, plan.use_rslora)
                   for n, k in plan.ranks.items() if k != plan.r}
    plan.rule, plan.budget, plan.top_p = ("budget", params, None) if budget is not None else ("top-p", None, top_p)
    return plan


def _strategy_plan(plan: Plan, scores: PageScores, candidates: list[str], rank_pattern, top_k, budget, top_p) -> Plan:
    """A plan by a strategy other than PAGE (:mod:`~domlora_kernels.placement.strategies`)."""
    s = plan.strategy
    if rank_pattern is not None:
        raise ValueError(f"strategy {s!r} chooses the ranks itself; drop rank_pattern")
    if top_p is not None:
        raise ValueError(f"top_p is a fraction of the PAGE mass, strategy 'page' only; give strategy {s!r} a budget")
    if plan.variant == "adalora":
        raise ValueError("variant 'adalora' allocates its ranks itself during training; use strategy 'page' with top_k")
    if budget is None:
        if s in BUDGET_ONLY:  # resolve() gave them the default budget unless top_k was given
            raise ValueError(f"strategy {s!r} spreads a budget over every layer of its module types, so it takes "
                             f"budget= (e.g. '1%'), not top_k={top_k}")
        plan.targets = top_by_signal(scores, s, candidates, _check_int(1 if top_k is None else top_k, "top_k", 1,
                                                                       len(candidates)))
        plan.ranks = {n: plan.r for n in plan.targets}
        return plan
    if "alpha_pattern" in plan.peft_kwargs:
        raise ValueError("a budget plan sets alpha_pattern itself (it keeps each module's scaling); remove alpha_pattern")
    params = budget_params(budget, vanilla_lora_params(scores, plan.r))
    ranks = plan_strategy(scores, s, candidates, plan.r, params, dora=plan.variant == "dora")
    if s == "plop+types":
        plan.planned_by, plan.plop_threshold = plop_then_types_rule(scores, candidates, params, plan.variant == "dora")
    if not ranks:
        raise ValueError(f"a budget of {params:,} parameters buys no adapter by strategy {s!r} (see "
                         f"domlora_kernels.placement.strategies for its rule); raise the budget or choose another strategy")
    # the order of the targets: by the strategy's signal where it has one and the scores carry it
    # (plop+types reads its signal only below PLoP's threshold, so it may be absent above)
    key = SIGNAL_OF.get(s)
    has = key is not None and (key == "page" or key in scores.signals)
    values = signal_values(scores, s) if has else {n: 0.0 for n in ranks}
    plan.targets = sorted(ranks, key=lambda n: -values[n])  # highest value first; model order on ties
    plan.ranks = {n: ranks[n] for n in plan.targets}
    plan.alphas = {n: kept_scaling_alpha(plan.lora_alpha, plan.r, k, plan.use_rslora)
                   for n, k in plan.ranks.items() if k != plan.r}
    plan.rule, plan.budget = "budget", params
    return plan


def make_plan(scores, r, lora_alpha, top_k, variant, rank_pattern, budget, top_p, config, peft_kwargs,
              strategy=None) -> Plan:
    """Validate the arguments once and choose the targets, their ranks and, for budget plans, alphas."""
    _check_scores(scores)
    if config is not None:
        r, lora_alpha, variant, rslora = _settings_from_config(config, r, lora_alpha, variant, peft_kwargs)
        candidates, init = _config_candidates(scores, config), config.init_lora_weights
    else:
        r, lora_alpha, variant = 8 if r is None else r, 16 if lora_alpha is None else lora_alpha, variant or "lora"
        rslora, candidates, init = variant == "rslora", list(scores.scores), peft_kwargs.get("init_lora_weights", True)
    # after the config's settings: an AdaLoraConfig resolves like variant="adalora"
    strategy, budget = resolve(strategy, top_k, top_p, rank_pattern, variant, budget)
    _check_settings(r, lora_alpha, variant, rank_pattern, peft_kwargs, config)
    if sum(x is not None for x in (top_k, budget, top_p)) > 1:
        raise ValueError("give one of top_k (a number of modules), budget (parameters or a fraction) and top_p "
                         "(a fraction of the PAGE mass)")
    plan = Plan([], {}, r, lora_alpha, variant, rslora, init, config, dict(peft_kwargs), strategy=strategy)
    if strategy != "page":
        plan = _strategy_plan(plan, scores, candidates, rank_pattern, top_k, budget, top_p)
    elif budget is not None or top_p is not None:
        plan = _budget_plan(plan, scores, candidates, rank_pattern, budget, top_p)
    else:
        plan.targets = _top(scores, candidates, 1 if top_k is None else top_k)
        plan.ranks = _resolve_ranks(scores, plan.targets, r, rank_pattern)
    plan.expert_weights = frozenset(n for n in plan.targets if scores.modules[n].expert_weight)
    if plan.expert_weights and variant in ("dora", "adalora"):
        names = sorted(plan.expert_weights)
        raise ValueError(
            f"variant {variant!r} cannot adapt the expert weights {names}: peft adapts them through target_parameters, "
            f"with plain LoRA or rsLoRA only. Use variant 'lora' or 'rslora', or leave them out (probe with "
            f"exclude_modules={names!r})"
        )
    # a budget plan counts every module at its planned rank: a pattern of the user's would change the count
    patterns = config is not None and (config.rank_pattern or config.alpha_pattern)
    if patterns and (plan.rule != "top-k" or any(k != r for k in plan.ranks.values())):
        raise ValueError("config already has a rank_pattern or alpha_pattern, and this plan sets the ranks itself; "
                         "clear them in the config, or use top_k without rank_pattern to keep them")
    return plan
