"""Leave the model as it was found: the probe freezes and evaluates it only for its own run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter frozen and every module in eval mode inside; both restored on exit.

    Restores each parameter's ``requires_grad`` and each module's ``training`` flag one by one
    (not ``model.train(previous)``), since a model may mix modes, e.g. a frozen backbone in
    eval under a head in training. ``.grad`` is never touched: frozen parameters accumulate none.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.training = tr
