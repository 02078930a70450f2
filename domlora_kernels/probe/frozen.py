"""The model's mode during a probe: frozen and in eval mode, and exactly as found afterwards.

Frozen weights are what let the probe skip every weight gradient (docs/design.md).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter frozen and every module in eval mode inside; both restored on exit.

    Restores each parameter's ``requires_grad`` and each module's ``training`` flag one by one
    (not ``model.train(previous)``), since a model may mix modes, e.g. a frozen backbone in
    eval under a head in training. ``.grad`` is never touched: frozen parameters accumulate none.
    Layers that transformers checkpoints keep their own ``training`` flag (see
    :func:`_keep_checkpointing`).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        _keep_checkpointing(model)
        yield model
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.training = tr


def _keep_checkpointing(model: nn.Module) -> None:
    """Put transformers' checkpointed layers back in training mode (their own flag only).

    transformers checkpoints a layer only while ``layer.training`` is True, and eval mode would
    silently drop the activation memory savings that a big model needs. Only the layer's own
    flag is set: its submodules (attention, dropout) stay in eval, so no dropout runs.
    """
    layers = sys.modules.get("transformers.modeling_layers")  # never import transformers here
    cls = getattr(layers, "GradientCheckpointingLayer", None)
    if cls is None:
        return
    for m in model.modules():
        if isinstance(m, cls) and getattr(m, "gradient_checkpointing", False) is True:
            m.training = True


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """peft adapters already in ``model`` switched off inside; each layer's own flag restored on exit.

    The probe measures the base model (:mod:`.candidates`): every peft wrapper (LoRA layers,
    ``ModulesToSaveWrapper``) runs its base module alone. Merged adapters are refused before
    this (:func:`~.candidates.peft_base_model`), since turning them off would unmerge them.
    """
    from .candidates import is_peft_wrapper

    layers = [(m, m._disable_adapters) for m in model.modules() if is_peft_wrapper(m)]
    try:
        for m, _ in layers:
            m._disable_adapters = True
        yield model
    finally:
        for m, flag in layers:
            m._disable_adapters = flag


# bitsandbytes' Linear4bit repacks its weight for an AVX512-BF16 CPU kernel (and switches its
# absmax to bfloat16) the first time it runs in eval mode on an input that does not require grad;
# the probe runs the first layers exactly so, and the logits afterwards would drift by ~1e-3.
_BNB_CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


@contextlib.contextmanager
def quantised_state_kept(model: nn.Module) -> Iterator[nn.Module]:
    """bitsandbytes 4-bit layers exactly as found after the probe, also on error.

    Inside, the CPU repacking is not triggered (the layer's ``support_avx512bf16_for_cpu`` is
    False: it computes through the path it used before, also on widths that are no multiple of
    32, where the repacking would fail an assertion). On exit each layer's weight tensor, its
    quant state's fields (absmax, nesting, dtype, packing flag), its compute dtype and that flag
    are put back, whatever ran inside.
    """
    saved = []
    for m in model.modules():
        weight = getattr(m, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is None or not hasattr(m, "compute_dtype"):
            continue
        own = {k: vars(m)[k] for k in _BNB_MODULE_STATE + (_BNB_CPU_REPACK_FLAG,) if k in vars(m)}
        saved.append((m, weight, weight.data, qs, dict(vars(qs)), own))
    try:
        for m, *_ in saved:
            if hasattr(m, _BNB_CPU_REPACK_FLAG):
                setattr(m, _BNB_CPU_REPACK_FLAG, False)
        yield model
    finally:
        for m, weight, data, qs, fields, own in saved:
            if m.weight is not weight:
                m.weight = weight
            weight.data = data  # the repacking assigns a new tensor; the one found is intact
            weight.quant_state = qs
            vars(qs).clear()  # the repacking rewrites the quant state's fields in place
            vars(qs).update(fields)
            for k in _BNB_MODULE_STATE + (_BNB_CPU_REPACK_FLAG,):
                if k in own:
                    setattr(m, k, own[k])
                else:
                    vars(m).pop(k, None)


_BNB_MODULE_STATE = ("quant_state", "compute_dtype", "compute_type_is_set")
