"""Packed rows: several samples in one row, as TRL's packing and transformers'
``DataCollatorWithFlattening`` produce them (``position_ids`` restarting at 0 inside a row).

PAGE is per sample, so the probe measures a packed batch as the samples it holds: each
segment becomes one row of a right-padded batch. That is exactly what a model whose
attention respects the boundaries (flash-attention varlen, or transformers' packed-sequence
masks) computes on the packed row, and what the sample means everywhere else, so the result
does not depend on the attention implementation. Segments are numbered row by row, left to
right: ``per_sample`` has one column per segment, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .losses import IGNORE_INDEX

# batch-level descriptions of the packing (flash-attention kwargs): consumed by unpacking
_PACKING_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_TOKEN_KEYS = ("input_ids", "labels", "attention_mask")


def segment_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """For each row of ``position_ids`` ``[B, T]``, the positions where a sample starts: 0 and
    every attended ``t`` after an attended ``t - 1`` whose position id does not continue that
    one's (a restart). Padding never starts a sample, so left-padded rows, whose pads carry
    arbitrary position ids, are one sample each."""
    pos = position_ids.detach().cpu()
    restart = torch.zeros_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if attention_mask is not None:
        att = attention_mask.detach().cpu() != 0
        restart[:, 1:] &= att[:, 1:] & att[:, :-1]
    restart[:, 0] = True
    return [row.nonzero().flatten().tolist() for row in restart]


def is_packed(batch: Mapping[str, Any]) -> bool:
    """True when the batch carries ``position_ids`` ``[B, T]`` that restart inside a row."""
    pos = batch.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
        return False
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.shape == pos.shape else None
    return any(len(starts) > 1 for starts in segment_starts(pos, mask))


def unpack(batch: Mapping[str, Any], index: int) -> dict[str, torch.Tensor]:
    """The samples of a packed batch as a right-padded batch (one sample per row).

    Keeps ``input_ids``, ``labels`` (or none) and ``attention_mask`` (positions it masks out
    stay masked); drops ``position_ids`` and the flash-attention packing kwargs, which describe
    the layout being undone. Padding is id 0, masked out and never a target.

    Raises:
        ValueError: another per-token key, which the probe cannot split by sample.
    """
    other = sorted(k for k in batch if k not in _PACKING_KEYS + _TOKEN_KEYS)
    if other:
        raise ValueError(
            f"batch {index} is packed (position_ids restart inside a row) and also carries {other}, which the "
            f"probe cannot split by sample; give input_ids, labels, attention_mask and position_ids only, or one "
            f"sample per row"
        )
    ids = batch["input_ids"]
    if batch["position_ids"].shape != ids.shape:
        raise ValueError(
            f"batch {index}: position_ids {tuple(batch['position_ids'].shape)} must have the shape of input_ids "
            f"{tuple(ids.shape)}"
        )
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    pieces = []  # (ids, labels or None, mask or None) per segment
    for b, starts in enumerate(segment_starts(batch["position_ids"], mask)):
        ends = starts[1:] + [ids.shape[1]]
        for s, e in zip(starts, ends):
            pieces.append(tuple(None if t is None else t[b, s:e] for t in (ids, labels, mask)))
    width = max(p[0].numel() for p in pieces)
    out = {
        "input_ids": ids.new_zeros(len(pieces), width),
        "attention_mask": ids.new_zeros(len(pieces), width),
    }
    if labels is not None:
        out["labels"] = labels.new_full((len(pieces), width), IGNORE_INDEX)
    for i, (seg_ids, seg_labels, seg_mask) in enumerate(pieces):
        n = seg_ids.numel()
        out["input_ids"][i, :n] = seg_ids
        out["attention_mask"][i, :n] = 1 if seg_mask is None else seg_mask
        if labels is not None:
            out["labels"][i, :n] = seg_labels
    return out
