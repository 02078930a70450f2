"""Per-sample losses: what the probe backpropagates, one scalar per row of the batch.

Their sum, not their mean, is backpropagated, so each row's output gradient is exactly its
own sample's (docs/design.md). The tests check them against transformers' own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def default_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``input_ids`` where attended, ``-100`` elsewhere (padding carries no loss).

    A token is a target only if the position before it is attended too: with left padding the
    first real token would otherwise be "predicted" from a pad position, a loss the same
    sample without padding does not have.
    """
    if attention_mask is None:
        return input_ids.clone()
    attended = attention_mask != 0
    after_pad = torch.zeros_like(attended)
    after_pad[:, 1:] = ~attended[:, :-1]
    return input_ids.masked_fill(~attended | after_pad, IGNORE_INDEX)


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor, first_sample: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of each row over its target tokens.

    Args:
        logits: ``[B, T, V]``; position ``t`` predicts token ``t + 1``.
        labels: ``[B, T]``; ``-100`` is ignored. Checked on their own device (labels on the CPU
            cost no device sync), then moved to the logits' device.
        first_sample: index of row 0 in the whole calibration set, for error messages.

    Returns:
        float32 ``[B]`` (float64 for float64 logits).

    Raises:
        ValueError: a row with no target token (all labels after the first are -100).
    """
    b, t, v = logits.shape
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"sample {first_sample + empty[0]} has no target token (every label after the first is -100 "
            f"or the sequence has one token); drop it or give it labels to predict"
        )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shift_labels = labels[:, 1:].to(logits.device)
    tok = F.cross_entropy(
        logits[:, :-1, :].reshape(-1, v).to(acc), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(b, t - 1)
    return tok.sum(dim=1) / counts.to(device=logits.device, dtype=acc)
