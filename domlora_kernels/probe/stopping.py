"""Stop the probe once its decision is stable: the rule and its check.

What a user acts on is a decision, not the scores: the top-k modules, or the modules and ranks
a parameter budget buys. After each batch the probe can ask whether more samples would still
change that decision. The rule (:class:`StopRule`): draw ``resamples`` bootstrap resamples of
the samples seen so far (multinomial weights over the samples, one seeded generator), take the
decision of each resample's mean per-sample energies, and call the decision **stable** when at
least ``level`` of the resamples agree with the decision of all the samples seen. The probe
stops at the first batch end with at least ``min_samples`` samples where it is stable.

The check reuses the per-sample energies the probe keeps anyway (estimator "fisher"): one
``[resamples, N] @ [N, modules]`` product and ``resamples`` decisions per batch, milliseconds
against the seconds of a batch. A stopped probe's scores are exactly those of a probe given only
the batches it read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..scores import ModuleInfo


@dataclass(frozen=True)
class StopRule:
    """When the probe may stop early.

    Attributes:
        top_k: the decision is the set of the ``top_k`` modules of highest PAGE (default 1) ...
        budget: ... or, when given, the plan a budget of this many parameters buys by PAGE per
            parameter at rank cap ``r`` (:func:`~domlora_kernels.placement.budget.plan_budget`'s rule).
        r: the rank cap of a budget plan.
        level: the fraction of bootstrap resamples that must agree (0.95).
        resamples: bootstrap resamples per check (200).
        min_samples: never stop before this many samples (16).
        seed: seed of the resampling.
    """

    top_k: int = 1
    budget: int | None = None
    r: int = 8
    level: float = 0.95
    resamples: int = 200
    min_samples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for what, v, lo in (("top_k", self.top_k, 1), ("r", self.r, 1), ("resamples", self.resamples, 10),
                            ("min_samples", self.min_samples, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"StopRule.{what} must be an integer >= {lo}, got {v!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"StopRule.budget must be a number of parameters >= 1 or None, got {self.budget!r}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0 < self.level <= 1:
            raise ValueError(f"StopRule.level must be in (0, 1], got {self.level!r}")


def _decide(values: torch.Tensor, rule: StopRule, units: torch.Tensor | None) -> frozenset:
    """The decision for one vector of module scores: a set of module indices, or of (index, rank)."""
    if rule.budget is None:
        k = min(rule.top_k, values.numel())
        return frozenset(torch.topk(values, k, sorted=False).indices.tolist())
    order = sorted((i for i in range(values.numel()) if values[i] > 0), key=lambda i: -float(values[i] / units[i]))
    plan, used = [], 0
    for i in order:
        u = int(units[i])
        k = min(rule.r, (rule.budget - used) // u)
        if k >= 1:
            plan.append((i, k))
            used += k * u
        if k < rule.r:
            break
    return frozenset(plan)


def stability(per_sample: torch.Tensor, rule: StopRule, modules: list[ModuleInfo] | None = None) -> float:
    """The fraction of bootstrap resamples whose decision equals that of all the samples.

    Args:
        per_sample: ``[modules, N]`` per-sample energies (float64), columns the samples seen.
        rule: the decision and the resampling.
        modules: the modules' shapes, in row order (needed for a budget decision).
    """
    n = per_sample.shape[1]
    if n == 0:
        return 0.0
    units = None
    if rule.budget is not None:
        if modules is None:
            raise ValueError("a budget decision needs the modules' shapes")
        # parameters of one rank of an adapter on the module (the budget rule's rank unit)
        units = torch.tensor([m.num_experts * (m.in_features + m.out_features) for m in modules], dtype=torch.float64)
    full = _decide(per_sample.mean(dim=1), rule, units)
    g = torch.Generator().manual_seed(rule.seed)
    weights = torch.multinomial(torch.full((n,), 1.0 / n, dtype=torch.float64), n * rule.resamples,
                                replacement=True, generator=g).view(rule.resamples, n)
    counts = torch.zeros(rule.resamples, n, dtype=torch.float64).scatter_add_(
        1, weights, torch.ones_like(weights, dtype=torch.float64))
    means = counts @ per_sample.T / n  # [resamples, modules]
    agree = sum(_decide(means[j], rule, units) == full for j in range(rule.resamples))
    return agree / rule.resamples


def should_stop(per_sample: torch.Tensor, rule: StopRule, modules: list[ModuleInfo] | None = None) -> tuple[bool, float]:
    """``(stop, stability)`` after a batch: stop when at least ``min_samples`` samples were seen
    and the decision is stable at ``level``."""
    if per_sample.shape[1] < rule.min_samples:
        return False, math.nan
    s = stability(per_sample, rule, modules)
    return s >= rule.level, s
