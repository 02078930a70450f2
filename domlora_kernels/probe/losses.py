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
    return mask_padding_targets(input_ids, attention_mask)


def mask_padding_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``labels`` with ``-100`` wherever the token or the position predicting it is not attended.

    The probe applies this to the labels a batch brings too: a target at a padding position,
    or one predicted from a padding position (the first real token after left padding), is no
    target of the sample without padding. A new tensor (``labels`` itself without a mask): the
    user's tensor is never changed.
    """
    if attention_mask is None:
        return labels
    attended = attention_mask.to(labels.device) != 0
    keep = attended.clone()
    keep[:, 1:] &= attended[:, :-1]
    return labels.masked_fill(~keep, IGNORE_INDEX)


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
        ValueError: logits that are not ``[B, T, V]`` (the model is no causal LM); a row with no
            target token (all labels after the first are -100); a label outside ``0..V-1``
            other than -100.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the model returned logits of shape {shape}, not [B, T, vocab]: the probe's default loss is next-token "
            f"prediction of a causal language model; pass loss_fn=callable(model, batch) -> per-sample losses [B] "
            f"for other heads"
        )
    b, t, v = logits.shape
    if tuple(labels.shape) != (b, t):
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of the logits' first two dimensions {(b, t)}")
    targets = labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    counts = is_target.sum(dim=1)
    bad = is_target & ((targets < 0) | (targets >= v))
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"sample {first_sample + empty[0]} has no target token (every label after the first is -100 "
            f"or the sequence has one token); drop it or give it labels to predict"
        )
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(
            f"label {int(targets[row, col])} (sample {first_sample + row}) is outside the model's {v} output classes "
            f"(0..{v - 1}; -100 is ignored): the labels do not come from this model's tokenizer"
        )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shift_labels = labels[:, 1:].to(logits.device)
    tok = F.cross_entropy(
        logits[:, :-1, :].reshape(-1, v).to(acc), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(b, t - 1)
    return tok.sum(dim=1) / counts.to(device=logits.device, dtype=acc)
