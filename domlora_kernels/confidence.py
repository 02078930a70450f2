"""How stable is the dominant module? Seed and bootstrap statistics from per-sample energies.

A probe with ``seed=[0, ..., k-1]`` keeps, per module, the per-sample energies of every A
draw (``per_sample[name]``, ``[k, N]``). From them, without probing again:

- across seeds: each seed's PAGE (mean over samples) and its argmax; the mean pairwise
  Spearman correlation of the seeds' module rankings;
- across the calibration set: bootstrap resamples of the sample indices (with replacement,
  the same indices for every module, so resampled PAGEs stay comparable), each giving a
  PAGE per module (mean over seeds, as in ``scores.scores``) and an argmax;
- concentration: the top-1 share and the normalised entropy of the PAGE distribution.

The statistics themselves live in :mod:`~domlora_kernels.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .scores import PageScores
from .stats import (  # noqa: F401 - floor_percent, kendall_tau, rankdata, spearman: still importable from here
    argmax_counts, bootstrap_means, entropy_concentration, floor_percent, kendall_tau, mean_pairwise_spearman,
    rankdata, share_quantiles, spearman,
)


# ------------------------------------------------------------------ confidence
@dataclass
class Confidence:
    """Stability of the dominant module of one probe (see :func:`confidence`).

    Attributes:
        dominant: the probe's dominant module (argmax of ``scores.scores``).
        share: its PAGE share.
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
        """Read :meth:`to_dict`'s form; keys it does not know (``sentence``, the ``top1_share`` that
        reports written before it was dropped carry, equal to ``share``) are ignored."""
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if d.get("share_interval") is not None:
            d["share_interval"] = {k: (float(v[0]), float(v[1])) for k, v in d["share_interval"].items()}
        return cls(**d)


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
    # seeds: [M, k] PAGE per seed
    per_seed = torch.tensor([[scores.by_seed[s][n] for s in seeds] for n in names], dtype=torch.float64)
    counts = argmax_counts(per_seed).tolist()
    boot = interval = n_res = None
    notes = []
    if scores.per_sample is None:
        notes.append(f"estimator {scores.config.get('estimator')!r}: no per-sample energies, no bootstrap")
    else:
        boot, interval = _bootstrap(scores, names, num_resamples, seed)
        n_res = num_resamples
    return Confidence(
        dominant=dominant, share=scores.shares[dominant], entropy=entropy_concentration(list(scores.scores.values())),
        num_seeds=len(seeds), seed_top1={names[i]: int(c) for i, c in enumerate(counts) if c},
        seed_spearman=mean_pairwise_spearman(per_seed.T) if len(seeds) > 1 else None,
        num_resamples=n_res, bootstrap_top1=boot, share_interval=interval, seed=seed,
        estimator=str(scores.config.get("estimator")), notes=notes,
    )


def _bootstrap(scores: PageScores, names: list[str], num_resamples: int, seed: int):
    """``(name -> fraction of resamples it wins (non-zero ones), name -> (5th, 95th) percentile of its share))``."""
    want = (len(scores.seeds), scores.num_samples)
    for n in names:
        got = tuple(scores.per_sample[n].shape) if n in scores.per_sample else None
        if got != want:
            raise ValueError(
                f"per_sample[{n!r}] has shape {got}, expected [{want[0]} seeds, {want[1]} samples]; "
                f"the report is inconsistent (was it edited by hand?)"
            )
    energies = torch.stack([scores.per_sample[n].to(torch.float64) for n in names])  # [M, k, N]
    means = bootstrap_means(energies.mean(dim=1), num_resamples, seed)  # PAGE is the mean over seeds: [M, R]
    frac = (argmax_counts(means).to(torch.float64) / num_resamples).tolist()
    q = share_quantiles(means)  # [2, M]
    boot = {names[i]: float(f) for i, f in enumerate(frac) if f > 0}
    return boot, {names[i]: (float(q[0, i]), float(q[1, i])) for i in range(len(names))}
