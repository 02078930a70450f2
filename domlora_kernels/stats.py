"""The statistics of the package, in torch: rank correlations, concentration, bootstrap of an argmax.

Everything here works on plain tensors or lists; :mod:`~domlora_kernels.confidence` and
:mod:`~domlora_kernels.report` apply it to probe results.

The rank correlations (:func:`spearman`, :func:`kendall_tau`) are implemented here so that
scipy stays a test-only dependency; both average ties (Spearman) or correct for them
(Kendall's tau-b), as scipy does.
"""

from __future__ import annotations

import math

import torch


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


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two equal-length 1-d tensors; None if either is constant."""
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a.square().sum()) * float(b.square().sum()))
    return None if den == 0 else float((a * b).sum()) / den


def spearman(x, y) -> float | None:
    """Spearman rank correlation of two equal-length vectors (ties averaged); None if either is constant.

    >>> spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    -1.0
    """
    x, y = _as_pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def mean_pairwise_spearman(rows: torch.Tensor) -> float | None:
    """Mean Spearman correlation over all pairs of rows of ``[k, M]`` (pairs with a constant row
    are left out); None when ``k < 2`` or no pair is defined."""
    ranks = rankdata(rows)
    k = rows.shape[0]
    rhos = [pearson(ranks[i], ranks[j]) for i in range(k) for j in range(i + 1, k)]
    rhos = [r for r in rhos if r is not None]
    return sum(rhos) / len(rhos) if rhos else None


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


# ------------------------------------------------------------------ concentration
def entropy_concentration(values: list[float]) -> float:
    """Entropy of the normalised distribution divided by log(count): 0 = all on one, 1 = flat."""
    tot = sum(values)
    if tot <= 0 or len(values) < 2:
        return 0.0
    h = -sum((v / tot) * math.log(v / tot) for v in values if v > 0)
    return h / math.log(len(values))


def floor_percent(fraction: float) -> int:
    """``fraction`` in whole percent, rounded down, so that 100 means all (199/200 reads 99)."""
    return math.floor(100 * fraction + 1e-9)  # 1e-9: 0.29 * 100 is 28.999999999999996


# ------------------------------------------------------------------ bootstrap
def bootstrap_means(samples: torch.Tensor, num_resamples: int, seed: int) -> torch.Tensor:
    """Bootstrap means of each row of ``samples`` ``[M, N]``: ``[M, R]`` float64.

    Every resample draws N column indices with replacement, the same indices for all rows (so
    the rows' resampled means stay comparable). One ``[M, N] @ [N, R]`` matmul of the samples
    with the resamples' index counts, no loop over resamples.
    """
    samples = samples.to(torch.float64)
    n = samples.shape[1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (num_resamples, n), generator=gen)
    counts = torch.zeros(num_resamples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(num_resamples, n, dtype=torch.float64))
    return samples @ counts.T / n


def argmax_counts(values: torch.Tensor) -> torch.Tensor:
    """``[M, R] -> [M]`` int64: in how many of the R columns each row holds the maximum (ties: first row)."""
    return torch.bincount(values.argmax(dim=0), minlength=values.shape[0])


def share_quantiles(values: torch.Tensor, q: tuple[float, ...] = (0.05, 0.95)) -> torch.Tensor:
    """``[M, R] -> [len(q), M]``: quantiles over the R columns of each row's share of its column
    total (a column summing to zero gives shares of zero)."""
    tot = values.sum(dim=0, keepdim=True)
    shares = torch.where(tot > 0, values / tot.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(values))
    return torch.quantile(shares, torch.tensor(q, dtype=torch.float64), dim=1)
