"""Checks of what the user gives :func:`~domlora_kernels.probe.page_scores`, before and while it runs."""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import ops

PROJECTIONS = ("A", "B", "AB", "expected")
ESTIMATORS = ("fisher", "gradient")

# transformers model types whose attention is bidirectional unless ``config.is_decoder`` is True
BIDIRECTIONAL_TYPES = frozenset({
    "albert", "bert", "bert-generation", "big_bird", "camembert", "canine", "convbert", "data2vec-text", "deberta",
    "deberta-v2", "distilbert", "electra", "ernie", "esm", "flaubert", "funnel", "ibert", "layoutlm", "longformer",
    "luke", "megatron-bert", "mobilebert", "modernbert", "mpnet", "mra", "nezha", "nystromformer", "rembert",
    "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "splinter", "squeezebert", "xlm", "xlm-roberta",
    "xlm-roberta-xl", "xmod", "yoso",
})
# names of learned absolute position embeddings (one row per position: a hard length limit)
_POSITION_EMBEDDINGS = ("wpe", "position_embeddings", "embed_positions", "pos_embed", "positional_embedding")


class PaddingTargetsWarning(UserWarning):
    """A batch without ``attention_mask`` and ``labels`` looks padded: its padding tokens are loss targets."""


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



def check_autograd(model: nn.Module) -> None:
    """The probe needs autograd: refuse ``torch.inference_mode`` and weights made under it."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "page_scores was called inside torch.inference_mode(), but the probe needs autograd (it runs one "
            "backward pass per batch); call it outside inference_mode (torch.no_grad() around it is fine)"
        )
    bad = next((n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.is_inference()), None)
    if bad is not None:
        raise RuntimeError(
            f"the model's tensor {bad} was created under torch.inference_mode() (an inference tensor), which the "
            f"probe's backward pass cannot use (inference_mode needs no autograd); load or build the model outside "
            f"inference_mode"
        )


def check_causal(model: nn.Module, loss_fn: Any) -> None:
    """Refuse a model that is no causal LM when the probe's default (next-token) loss would be used.

    A model is refused when its config says it is an encoder-decoder (``is_encoder_decoder``),
    when ``config.is_decoder`` is False and none of its attention modules is causal, when every
    attention module that declares ``is_causal`` says False, or when it is of a model type whose
    attention is bidirectional (BERT, RoBERTa, ...) and ``config.is_decoder`` is not True. A
    ``loss_fn`` makes the loss the user's: nothing is checked then.
    """
    if loss_fn is not None:
        return
    cfg = getattr(model, "config", None)
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    is_decoder = getattr(cfg, "is_decoder", None)
    what = f"{type(model).__name__}"
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False) is True:
        why = "it is an encoder-decoder model (config.is_encoder_decoder is True)"
    elif is_decoder is False and not any(flags) and _declares_is_decoder():
        why = "its config says it is not a decoder (config.is_decoder is False): its attention is bidirectional"
    elif flags and not any(flags):
        why = "none of its attention modules is causal (is_causal is False): its attention is bidirectional"
    elif getattr(cfg, "model_type", None) in BIDIRECTIONAL_TYPES and is_decoder is not True:
        why = f"its model type {cfg.model_type!r} attends in both directions unless config.is_decoder is True"
    elif type(model).__name__.endswith("ForMaskedLM"):
        why = "it is a masked language model"
    else:
        return
    raise ValueError(
        f"{what} is not a causal language model: {why}. The probe's default loss is next-token prediction under "
        f"causal attention, which such a model does not compute (every token would see the one it predicts); "
        f"pass loss_fn=callable(model, batch) -> per-sample losses [B] for other objectives (a masked-LM loss, "
        f"a seq2seq loss), or load the model as a decoder (e.g. is_decoder=True for BertLMHeadModel)"
    )


def _declares_is_decoder() -> bool:
    """Whether ``config.is_decoder`` means something: in transformers 5 only the configs of models
    that use it have it; in transformers 4 every config has it, False by default (Llama's too)."""
    pc = getattr(sys.modules.get("transformers"), "PretrainedConfig", None)
    if pc is None:
        return True
    try:
        return "is_decoder" not in vars(pc())
    except Exception:  # a config class that cannot be built bare: trust the attribute
        return True


def embedding_limits(model: nn.Module) -> tuple[int | None, tuple[int, str] | None]:
    """``(vocabulary size, (position limit, where it comes from) or None)`` of the model's input.

    The vocabulary is the rows of the input embedding; the position limit exists only for a
    learned absolute position embedding (GPT-2's ``wpe``), not for rotary positions.
    """
    get = getattr(model, "get_input_embeddings", None)
    vocab = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            vocab = emb.num_embeddings
    cfg = getattr(model, "config", None)
    limit = None
    learned = any(isinstance(m, nn.Embedding) and n.rsplit(".", 1)[-1] in _POSITION_EMBEDDINGS
                  for n, m in model.named_modules())
    if learned:
        for key in ("n_positions", "max_position_embeddings"):
            val = getattr(cfg, key, None)
            if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                limit = (val, f"config.{key}")
                break
    return vocab, limit


def check_ids(batch: Mapping[str, Any], index: int, limits: tuple[int | None, tuple[int, str] | None]) -> None:
    """Token ids the model can embed and sequences it can place, checked before the forward
    (one host copy of four numbers); otherwise the embedding fails with a bare IndexError."""
    vocab, limit = limits
    ids = batch["input_ids"]
    pos = batch.get("position_ids")
    pos = pos if isinstance(pos, torch.Tensor) and pos.numel() and not pos.is_floating_point() else None
    stats = torch.stack([ids.min(), ids.max()] + ([pos.max().to(ids.device, ids.dtype)] if pos is not None else [])).tolist()
    lo, hi = stats[0], stats[1]

    def where(value):
        row, col = (ids == value).nonzero()[0].tolist()
        return f"row {row}, position {col}"

    if lo < 0:
        raise ValueError(
            f"batch {index}: negative token id {lo} ({where(lo)}) in input_ids: ids index the embedding; -100 "
            f"belongs in labels, not input_ids (pad input_ids with the tokenizer's pad id)"
        )
    if vocab is not None and hi >= vocab:
        raise ValueError(
            f"batch {index}: token id {hi} ({where(hi)}) is outside the model's vocabulary of {vocab} ids "
            f"(0..{vocab - 1}): the tokenizer does not match the model; load both from the same checkpoint "
            f"(or resize the model's token embeddings after adding tokens)"
        )
    if limit is not None:
        n, key = limit
        if pos is not None and stats[2] >= n:
            raise ValueError(
                f"batch {index}: position id {stats[2]} is beyond the model's limit of {n} positions ({key}): it "
                f"learns one embedding per position; cut the samples to {n} tokens (make_batches(max_length={n}), "
                f"--max-length {n})"
            )
        if pos is None and ids.shape[1] > n:
            raise ValueError(
                f"batch {index}: sequences of {ids.shape[1]} tokens, longer than the model's limit of {n} positions "
                f"({key}): it learns one embedding per position; cut the samples to {n} tokens "
                f"(make_batches(max_length={n}), --max-length {n})"
            )


def warn_padding_targets(targets: torch.Tensor, model: nn.Module, index: int) -> None:
    """Warn when a batch with neither ``attention_mask`` nor ``labels`` looks padded.

    ``page_scores`` does not know the tokenizer, so it reads ``model.config.pad_token_id``: a row
    that starts or ends with a run of that id looks padded. The pad id is not a real token, so one
    is enough, except when it is also the BOS or EOS id (a tokenizer whose pad token is its EOS):
    then a run of two.
    """
    cfg = getattr(model, "config", None)
    pad = getattr(cfg, "pad_token_id", None)
    if not isinstance(pad, int) or isinstance(pad, bool):
        return
    special = set()
    for key in ("bos_token_id", "eos_token_id"):
        val = getattr(cfg, key, None)
        special.update(val if isinstance(val, (list, tuple)) else [val])
    is_pad = (targets == pad).to(torch.int32)
    lead, trail = is_pad.cumprod(dim=1).sum(dim=1), is_pad.flip(1).cumprod(dim=1).sum(dim=1)
    run = int(torch.maximum(lead, trail).max())
    if run >= (2 if pad in special else 1):
        warnings.warn(
            f"batch {index}: rows start or end with runs of the pad token id {pad} (model.config.pad_token_id) and the batch "
            f"has no attention_mask or labels, so its padding tokens are targets of the loss (up to {run} per row); "
            f"pass attention_mask (0 on padding) or labels (-100 on padding), as make_batches does",
            PaddingTargetsWarning, stacklevel=7,
        )


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
    if ids.numel() == 0:
        raise ValueError(
            f"batch {index}: input_ids has shape {tuple(ids.shape)}: no {'samples' if ids.shape[0] == 0 else 'tokens'}; "
            f"drop the empty batch (or the empty samples) from the calibration data"
        )
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


def check_loss_count(losses: torch.Tensor, batch: Any, index: int) -> None:
    """A ``loss_fn``'s losses are one per sample: as many as the batch's ``input_ids`` rows.

    Where the batch is no dict with an ``input_ids`` tensor (a custom batch type), the number
    of samples is unknown: the losses returned are taken as the samples.
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and losses.numel() != ids.shape[0]:
        raise ValueError(
            f"batch {index}: loss_fn returned {losses.numel()} loss(es) for {ids.shape[0]} samples (input_ids rows); "
            f"return one unreduced loss per sample, shape [B] (e.g. reduction='none' and a mean over each row's "
            f"tokens), not a mean over the batch"
        )
