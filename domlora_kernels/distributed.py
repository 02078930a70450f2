"""Data-parallel probing: shard the calibration set by rank, merge what every rank measured.

Under ``torch.distributed`` each rank probes its own shard of the calibration samples and
:func:`domlora_kernels.page_scores` merges the ranks at the end, so that every rank returns
the :class:`PageScores` one process would get on all the batches:

- estimator ``"fisher"``: the per-sample energies ``[k, n_rank]`` of every module are
  gathered (uneven counts allowed) and concatenated **rank-major**: rank 0's samples in its
  batch order, then rank 1's, ... With :func:`shard` (contiguous blocks) that is exactly the
  order of the unsharded list.
- estimator ``"gradient"``: the summed projected gradients (``[k, m, r]`` for A, ``[k, r, n]``
  for B) are all-reduced, then squared once, on every rank.
- sample and batch counts are summed; a module counts as having a gradient if it got one on
  any rank.

The probe's own collectives run only after the last batch (two or three per probe, none per
batch), on the ``process_group`` given (default: the world group). Only a model that runs
collectives in its forward (FSDP) needs the same number of batches on every rank.

Usage with a ``DataLoader``: ``DistributedSampler(ds, shuffle=False, drop_last=False)`` deals
samples round-robin (rank ``r`` gets indices ``r, r + W, ...``) and **repeats** samples to make
the shards equal when ``W`` does not divide ``len(ds)``; the repeats would then be counted
twice. Prefer ``shard(records)`` (contiguous, no repeats), or use a dataset size divisible
by the world size. The merged ``per_sample`` columns are then in the order
``[indices of rank 0] + [indices of rank 1] + ...``.

A rank that fails (any exception, or Ctrl-C) still sends its status row, marked failed, so the
other ranks raise instead of waiting for it. The probe itself is described in docs/design.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist


def rank_and_world(process_group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``process_group``; ``(0, 1)`` when not distributed."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """The contiguous block of ``items`` that rank ``rank`` of ``world_size`` probes.

    Blocks differ in length by at most one (the first ``len % world_size`` ranks get one
    more), no item is repeated or dropped, and concatenating the blocks rank by rank gives
    ``items`` back, so a distributed probe's ``per_sample`` order equals the single-process
    order. Shard the records (then batch each shard) or a list of batches.

    Args:
        items: any sequence (records, batches).
        rank / world_size: default: this process's rank and the world size of the default
            process group, or ``(0, 1)`` when ``torch.distributed`` is not initialised.

    Returns:
        a list, possibly empty when there are more ranks than items.

    Example:
        >>> shard(list(range(5)), rank=0, world_size=2), shard(list(range(5)), rank=1, world_size=2)
        ([0, 1, 2], [3, 4])
    """
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(f"shard needs a sequence (list, tuple), got {type(items).__name__}; wrap an iterable in list()")
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (to use the default process group)")
    if rank is None:
        rank, world_size = rank_and_world()
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    q, extra = divmod(len(items), world_size)
    start = rank * q + min(rank, extra)
    return list(items[start:start + q + (rank < extra)])


def unwrap(model: nn.Module, process_group: Any = None) -> tuple[nn.Module, Any]:
    """``(module to probe, process group)``: a DDP wrapper is replaced by its ``.module``.

    DDP refuses to wrap a model without trainable parameters, but once built it runs the
    probe's frozen forward. Two things still make probing through it wrong: every candidate
    is named ``module.<name>`` (not the names peft needs on the inner model), and every DDP
    forward broadcasts the buffers from rank 0, a collective per batch, so ranks with unequal
    batch counts deadlock (seen: 3 and 2 batches on 2 ranks hung until killed). The probe
    merges the ranks itself, so it runs the wrapped module directly, on DDP's process group
    unless another one is given. FSDP2 (``fully_shard``) modules are not wrappers (names
    unchanged) and are probed as they are.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        if process_group is None:
            process_group = model.process_group
        return model.module, process_group
    return model, process_group


def has_fsdp(model: nn.Module) -> bool:
    """True if any submodule was sharded with FSDP2's ``fully_shard`` (collectives in forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_equal_batch_counts(model: nn.Module, batches: Any, process_group: Any = None) -> None:
    """Refuse unequal batch counts across the ranks when ``model`` runs collectives in its forward.

    FSDP all-gathers in every forward, so a rank with fewer batches would leave the others
    waiting forever. Checked with one collective when the model is FSDP-sharded and ``batches``
    has a length (a generator cannot be counted without consuming it).
    """
    if not (has_fsdp(model) and hasattr(batches, "__len__")):
        return
    counts = gather_ints([len(batches)], process_group)[:, 0].tolist()
    if len(set(counts)) > 1:
        raise ValueError(
            f"FSDP runs collectives in every forward, so every rank must probe the same number of batches; "
            f"got {counts} per rank. Give each rank an equal share (e.g. a calibration set whose size "
            f"divides by world_size x batch_size)"
        )


def _device(process_group: Any) -> torch.device:
    """Where the probe's collectives run: the current CUDA device for NCCL, else the CPU."""
    if _dist().get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(row: Sequence[int], process_group: Any = None) -> torch.Tensor:
    """Every rank's ``row`` (same length on all ranks): int64 ``[world, len(row)]`` on the CPU."""
    dist = _dist()
    dev = _device(process_group)
    mine = torch.tensor(list(row), dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(out, mine, group=process_group)
    return torch.stack(out).cpu()


def gather_columns(local: torch.Tensor, counts: Sequence[int], process_group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``[..., counts[rank]]`` along the last dim, rank-major.

    ``counts`` is every rank's column count (from :func:`gather_ints`). Columns are padded to
    the largest count for the all-gather (collectives need equal shapes) and cut back.
    Returns float64 on the CPU.
    """
    dist = _dist()
    dev = _device(process_group)
    width = max(max(counts), 1)
    mine = torch.zeros(*local.shape[:-1], width, dtype=torch.float64, device=dev)
    mine[..., : local.shape[-1]] = local.to(device=dev, dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in counts]
    dist.all_gather(out, mine, group=process_group)
    return torch.cat([t[..., :c].cpu() for t, c in zip(out, counts)], dim=-1)


def all_reduce_sum(t: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Sum of ``t`` over the ranks, float64 on the CPU (``t`` itself is left unchanged)."""
    buf = t.to(device=_device(process_group), dtype=torch.float64, copy=True)
    _dist().all_reduce(buf, group=process_group)
    return buf.cpu()


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment, if it asks for one.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, or a group already exists.
    Otherwise uses ``backend`` (default: ``"nccl"`` when CUDA is available, else ``"gloo"``),
    binds this process to GPU ``LOCAL_RANK`` for NCCL, and returns True: the caller then owns
    the group and calls :func:`destroy` at exit.

    Example:
        >>> owned = init_from_env()  # doctest: +SKIP  (under torchrun --nproc_per_node 2)
    """
    dist = _dist()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None
    if world <= 1 or dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def destroy() -> None:
    """Destroy the default process group if one exists."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
