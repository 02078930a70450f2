"""Checks of what the user gives :func:`~domlora_kernels.probe.page_scores`, before and while it runs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import ops

PROJECTIONS = ("A", "B", "AB", "expected")
ESTIMATORS = ("fisher", "gradient")


def validate(rank, projection, estimator, backend, seed, lora_alpha, batches, loss_fn) -> list[int]:
    """The arguments of :func:`page_scores` that need no model; returns the seeds as a list."""
    if isinstance(batches, Mapping):
        raise TypeError("batches must be an iterable of batch dicts; wrap a single batch in a list: [batch]")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> losses [B], got {type(loss_fn).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(ops.BACKENDS)}")
    if projection == "expected" and estimator == "gradient":
        raise ValueError(
            "projection='expected' with estimator='gradient' would need the full m x n mean gradient "
            "(the weight gradient this probe exists to avoid); use estimator='fisher', or projection='A'"
        )
    seeds = [seed] if isinstance(seed, int) and not isinstance(seed, bool) else list(seed) if isinstance(seed, Sequence) else None
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a non-empty sequence of ints, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if projection == "expected" and len(seeds) > 1:
        raise ValueError("projection='expected' draws no A, so several seeds would give identical scores; pass one seed")
    if lora_alpha is not None and (not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0):
        raise ValueError(f"lora_alpha must be a positive number or None, got {lora_alpha!r}")
    return seeds


def input_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the batches go, and the model's activation dtype.

    The input embedding's device, not the first parameter's: a model offloaded with accelerate
    keeps offloaded weights on ``meta`` and its hooks name the device they compute on.
    Fallbacks: the embedding's (or the model's) accelerate execution device, then the first
    parameter or buffer that is not on ``meta``, then the CPU.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    weight = getattr(emb, "weight", None)
    floats = [t for t in model.parameters() if t.is_floating_point()]
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else floats[0].dtype if floats else torch.float32
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device, dtype
    for mod in (emb, model):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev), dtype
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device, dtype
    return torch.device("cpu"), dtype


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse backend='triton' before any forward pass when the kernels cannot take this
    model's tensors (a CPU model without TRITON_INTERPRET=1, float64, no triton): one launch
    on a 1-element input runs the op's own checks."""
    if backend == "triton":
        u = torch.zeros(1, 1, 1, device=device, dtype=dtype)
        ops.projected_energy(u, u, backend=backend)



def check_batch(batch: Any, index: int) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch {index} is a {type(batch).__name__}; each batch must be a dict with 'input_ids' [B, T] "
            f"(and optionally 'attention_mask', 'labels'), or pass loss_fn=callable(model, batch) -> losses [B]"
        )
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(
            f"batch {index} has no 'input_ids' tensor (keys: {sorted(batch)}); give input_ids [B, T] or "
            f"pass loss_fn=callable(model, batch) -> per-sample losses [B]"
        )
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch {index}: input_ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
    for key in ("attention_mask", "labels"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ids.shape):
            raise ValueError(
                f"batch {index}: {key} must be a tensor of the same shape as input_ids {tuple(ids.shape)}, "
                f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )


def check_losses(losses: Any, index: int) -> None:
    """Shape and graph of a batch's losses (no device sync; their values are checked after
    backward, in :func:`_end_batch`)."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"batch {index}: the loss must be a 1-D tensor with one loss per sample [B], got "
            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
        )
    if not losses.requires_grad:
        raise RuntimeError(
            "the loss does not depend on any probed module output (did loss_fn run the model "
            "under torch.no_grad, or detach its result?)"
        )
