"""Merging the probe's sums across the ranks of a process group, after the last batch.

Three collectives in all, whatever the number of modules (:mod:`domlora_kernels.distributed`).
"""

from __future__ import annotations

import math

import torch

from .. import distributed as dd

# Each rank's status row for merge_ranks: these four columns, then one got-gradient flag per site.
_FAILED, _SAMPLES, _BATCHES, _MICROSECONDS = range(4)


def status_row(sites, num_samples: int = 0, num_batches: int = 0, elapsed: float = 0.0,
               failed: bool = False) -> list[int]:
    """The row a rank sends to the others after its last batch, or on failure (``failed``)."""
    flags = [0 if failed else int(s.got_grad) for s in sites]
    return [int(failed), num_samples, num_batches, int(elapsed * 1e6)] + flags


def merge_ranks(sites, probe, num_samples, num_batches, elapsed, group) -> tuple[int, int, float]:
    """Replace each site's sums by those of all ranks (see :mod:`domlora_kernels.distributed`).

    Returns ``(samples, batches, seconds of the slowest rank)`` over the group. Three
    collectives in all, whatever the number of modules: the counts, then one gather or one
    all-reduce of every module's energies packed in one buffer.
    """
    table = dd.gather_ints(status_row(sites, num_samples, num_batches, elapsed), group)  # [world, 4 + S]
    failed = table[:, _FAILED].nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed during the probe (see their error); stopping this rank too")
    counts = table[:, _SAMPLES].tolist()
    for i, s in enumerate(sites):
        s.got_grad = bool(table[:, 4 + i].any())
    if probe.estimator == "fisher":
        _merge_sample_energies(sites, probe, num_samples, counts, group)
    else:
        _merge_grad_sums(sites, probe, group)
    return sum(counts), int(table[:, _BATCHES].sum()), float(table[:, _MICROSECONDS].max()) / 1e6


def _merge_sample_energies(sites, probe, num_samples, counts, group) -> None:
    sizes = [s.energy_rows for s in sites]
    local = torch.zeros(sum(sizes), num_samples, dtype=torch.float64)
    for s, rows in zip(sites, local.split(sizes)):
        if s.sample_energies:
            rows.copy_(torch.cat(s.sample_energies, dim=1))
    merged = dd.gather_columns(local, counts, group)  # [sum of rows, N], rank-major
    for s, rows in zip(sites, merged.split(sizes)):
        s.sample_energies = [rows]


def _merge_grad_sums(sites, probe, group) -> None:
    shapes = [s.grad_shapes() for s in sites]
    parts = []
    for s, sh in zip(sites, shapes):  # a module this rank never reached contributes zeros
        for key, shape in sh.items():
            g = s.grad_sum.get(key)
            parts.append(torch.zeros(shape, dtype=torch.float64) if g is None else g.detach().to("cpu", torch.float64))
    total = dd.all_reduce_sum(torch.cat([t.flatten() for t in parts]), group)
    offset = 0
    for s, sh in zip(sites, shapes):
        for key, shape in sh.items():
            n = math.prod(shape)
            s.grad_sum[key] = total[offset:offset + n].view(shape)
            offset += n
