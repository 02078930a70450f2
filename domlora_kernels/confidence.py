"""How stable is the dominant module? Seed and bootstrap statistics from per-sample energies.

A probe with ``seed=[0, ..., k-1]`` keeps, per module, the per-sample energies of every A
draw (``per_sample[name]``, ``[k, N]``). From them, without probing again:

- across seeds: each seed's PAGE (mean over samples) and its argmax; the mean pairwise
  Spearman correlation of the seeds' module rankings;
- across the calibration set: bootstrap resamples of the sample indices (with replacement,
  the same indices for every module, so resampled PAGEs stay comparable), each giving a
  PAGE per module (mean over seeds, as in ``scores.scores``) and an argmax;
- concentration: the top-1 share and the normalised entropy of the PAGE distribution.

The rank correlations (:func:`spearman`, :func:`kendall_tau`) are implemented here in torch
so that scipy stays a test-only dependency; both average ties (Spearman) or correct for them
(Kendall's tau-b), as scipy does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .scores import PageScores, entropy_concentration


# ------------------------------------------------------------------ rank statistics
def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share the mean of their ranks) along the last dim, float64.

    ``[..., M] -> [..., M]``. Pairwise counting, ``O(M^2)``: for the few hundred modules of a
    model this is one small broadcast and exact for ties, with no sort-and-scan.

    >>> rankdata(torch.tensor([3.0, 1.0, 3.0]))
    tensor([2.5000, 1.0000, 2.5000], dtype=torch.float64)
    """
    x = x.to(torch.float64)
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)  # how many are smaller than each
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)  # including itself
    return less.to(torch.float64) + (equal.to(torch.float64) + 1) / 2


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a.square().sum()) * float(b.square().sum()))
    return None if den == 0 else float((a * b).sum()) / den


def spearman(x, y) -> float | None:
    """Spearman rank correlation of two equal-length vectors (ties averaged); None if either is constant.

    >>> spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    -1.0
    """
    x, y = _as_pair(x, y)
    return _pearson(rankdata(x), rankdata(y))


def kendall_tau(x, y) -> float | None:
    """Kendall's tau-b of two equal-length vectors (tie-corrected); None if either is constant.

    ``tau_b = (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y))`` over the
    ``n0 = M (M - 1) / 2`` pairs; ``O(M^2)`` memory and time.

    >>> kendall_tau([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    0.3333333333333333
    """
    x, y = _as_pair(x, y)
    sx = torch.sign(x.unsqueeze(0) - x.unsqueeze(1))
    sy = torch.sign(y.unsqueeze(0) - y.unsqueeze(1))
    m = x.numel()
    n0 = m * (m - 1) / 2
    ties_x = (float((sx == 0).sum()) - m) / 2  # off-diagonal tied pairs, each counted twice
    ties_y = (float((sy == 0).sum()) - m) / 2
    den = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return None if den == 0 else float((sx * sy).sum()) / 2 / den


def _as_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"rank correlation needs two vectors of the same length >= 2, got {x.numel()} and {y.numel()}")
    return x, y


# ------------------------------------------------------------------ confidence
@dataclass
class Confidence:
    """Stability of the dominant module of one probe (see :func:`confidence`).

    Attributes:
        dominant: the probe's dominant module (argmax of ``scores.scores``).
        share: its PAGE share.
        top1_share: the largest share (same as ``share``; kept for the concentration pair).
        entropy: normalised entropy of the PAGE distribution (0 all on one, 1 flat).
        num_seeds: A seeds probed.
        seed_top1: name -> number of seeds whose PAGE argmax it is.
        seed_spearman: mean pairwise Spearman correlation between the seeds' PAGE vectors
            (None with one seed).
        num_resamples: bootstrap resamples (None when there are no per-sample energies).
        bootstrap_top1: name -> fraction of resamples where it is the argmax (non-zero ones).
        share_interval: name -> (5th, 95th) percentile of its bootstrap PAGE share.
        seed: the bootstrap generator's seed.
        estimator: the probe's estimator.
    """

    dominant: str
    share: float
    top1_share: float
    entropy: float
    num_seeds: int
    seed_top1: dict[str, int]
    seed_spearman: float | None
    num_resamples: int | None
    bootstrap_top1: dict[str, float] | None
    share_interval: dict[str, tuple[float, float]] | None
    seed: int
    estimator: str
    notes: list[str] = field(default_factory=list)

    @property
    def dominant_bootstrap(self) -> float | None:
        """Fraction of resamples in which the dominant module stays the argmax."""
        return None if self.bootstrap_top1 is None else self.bootstrap_top1.get(self.dominant, 0.0)

    def sentence(self) -> str:
        """e.g. ``dominant: model.layers.11.mlp.down_proj (share 16%, top-1 in 97% of 200 resamples and 8/8 seeds)``.

        The resample percentage is floored, so 100% means every resample.
        """
        seeds = f"{self.seed_top1.get(self.dominant, 0)}/{self.num_seeds} seeds"
        if self.num_resamples is None:
            return (f"dominant: {self.dominant} (share {100 * self.share:.0f}%, top-1 in {seeds}; no bootstrap: "
                    f"estimator {self.estimator!r} keeps no per-sample energies)")
        pct = floor_percent(self.dominant_bootstrap)
        return (f"dominant: {self.dominant} (share {100 * self.share:.0f}%, top-1 in {pct}% of "
                f"{self.num_resamples} resamples and {seeds})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the report stores it under ``meta["confidence"]``)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if self.share_interval is not None:
            d["share_interval"] = {k: list(v) for k, v in self.share_interval.items()}
        d["sentence"] = self.sentence()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Confidence":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if d.get("share_interval") is not None:
            d["share_interval"] = {k: (float(v[0]), float(v[1])) for k, v in d["share_interval"].items()}
        return cls(**d)


def floor_percent(fraction: float) -> int:
    """``fraction`` in whole percent, rounded down, so that 100 means all (199/200 reads 99)."""
    return math.floor(100 * fraction + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996


def _check(scores: PageScores, num_resamples: int, seed: int) -> None:
    if not isinstance(scores, PageScores):
        raise TypeError(f"scores must be a PageScores, got {type(scores).__name__}")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ValueError(f"num_resamples must be an integer >= 1, got {num_resamples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if len(scores.scores) < 2:
        raise ValueError("confidence needs at least two modules to compare")


def confidence(scores: PageScores, num_resamples: int = 200, seed: int = 0) -> Confidence:
    """Seed and bootstrap stability of the dominant module, from the probe's per-sample energies.

    Args:
        scores: a probe result. With estimator "fisher" it carries ``per_sample[name]`` of
            shape ``[k seeds, N samples]``; probe several seeds at once with
            ``page_scores(..., seed=[0, 1, ..., 7])``.
        num_resamples: bootstrap resamples of the N calibration samples (default 200).
        seed: seed of the bootstrap's generator; the same seed gives the same result.

    Returns:
        :class:`Confidence`; ``.sentence()`` reads
        "dominant: NAME (share 16%, top-1 in 97% of 200 resamples and 8/8 seeds)".

    Estimator "gradient" keeps no per-sample energies (it squares the mean gradient), so only
    the seed statistics (from ``by_seed``) and the concentration are computed; the bootstrap
    fields are None and the sentence says so.

    Cost: one ``[R, N] x [N, M]`` matmul for all resamples (resample counts times per-sample
    energies), no loop over resamples or modules.

    Example:
        >>> scores = page_scores(model, batches, seed=list(range(8)))   # doctest: +SKIP
        >>> print(confidence(scores).sentence())                        # doctest: +SKIP
    """
    _check(scores, num_resamples, seed)
    names = list(scores.scores)
    seeds = scores.seeds
    dominant = scores.dominant_module
    shares = scores.shares
    vals = [scores.scores[n] for n in names]

    # seeds: [M, k] PAGE per seed
    per_seed = torch.tensor([[scores.by_seed[s][n] for s in seeds] for n in names], dtype=torch.float64)
    seed_arg = per_seed.argmax(dim=0)
    counts = torch.bincount(seed_arg, minlength=len(names))
    seed_top1 = {names[i]: int(c) for i, c in enumerate(counts.tolist()) if c}
    seed_rho = None
    if len(seeds) > 1:
        ranks = rankdata(per_seed.T)  # [k, M]
        rhos = [_pearson(ranks[i], ranks[j]) for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
        rhos = [r for r in rhos if r is not None]
        seed_rho = sum(rhos) / len(rhos) if rhos else None

    boot = interval = None
    notes = []
    if scores.per_sample is None:
        notes.append(f"estimator {scores.config.get('estimator')!r}: no per-sample energies, no bootstrap")
        n_res = None
    else:
        want = (len(seeds), scores.num_samples)
        for n in names:
            got = tuple(scores.per_sample[n].shape) if n in scores.per_sample else None
            if got != want:
                raise ValueError(
                    f"per_sample[{n!r}] has shape {got}, expected [{want[0]} seeds, {want[1]} samples]; "
                    f"the report is inconsistent (was it edited by hand?)"
                )
        energies = torch.stack([scores.per_sample[n].to(torch.float64) for n in names])  # [M, k, N]
        ebar = energies.mean(dim=1)  # [M, N]: PAGE is the mean over seeds
        n = ebar.shape[1]
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(n, (num_resamples, n), generator=gen)  # same indices for every module
        weights = torch.zeros(num_resamples, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(num_resamples, n, dtype=torch.float64))
        means = ebar @ weights.T / n  # [M, N] @ [N, R] -> [M, R]
        arg = means.argmax(dim=0)
        frac = torch.bincount(arg, minlength=len(names)).to(torch.float64) / num_resamples
        boot = {names[i]: float(f) for i, f in enumerate(frac.tolist()) if f > 0}
        tot = means.sum(dim=0, keepdim=True)
        share_r = torch.where(tot > 0, means / tot.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(means))
        q = torch.quantile(share_r, torch.tensor([0.05, 0.95], dtype=torch.float64), dim=1)  # [2, M]
        interval = {names[i]: (float(q[0, i]), float(q[1, i])) for i in range(len(names))}
        n_res = num_resamples
    return Confidence(
        dominant=dominant, share=shares[dominant], top1_share=max(shares.values()),
        entropy=entropy_concentration(vals), num_seeds=len(seeds), seed_top1=seed_top1, seed_spearman=seed_rho,
        num_resamples=n_res, bootstrap_top1=boot, share_interval=interval, seed=seed,
        estimator=str(scores.config.get("estimator")), notes=notes,
    )
