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
