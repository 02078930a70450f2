"""The probe's autograd tap: an identity on a module's output whose backward receives ``D = dL/dY``.

A frozen model has no tensor that requires grad, so each tap also takes ``anchor``, a scalar
leaf that requires grad: the outputs of the taps then carry the graph, and backward stops at
the first tapped modules instead of running to the embeddings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sites import Site

class Tap(torch.autograd.Function):
    """Identity on a module's output whose backward hands ``D`` to the site's reducer.

    The output is returned as the same tensor, marked dirty, rather than as a clone: a clone
    would copy every module output of the model (``T x m`` each), the largest cost the probe
    could add to a forward pass. Marking it dirty (instead of returning a view) keeps later
    in-place ops on the output legal, as they are without the probe.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor, call: "Call") -> torch.Tensor:
        ctx.call = call
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, d: torch.Tensor):
        if ctx.call is not None:  # None: a checkpoint recompute's tap, never reduced
            ctx.call.reduce(d)
        ctx.call = None  # free P / X as soon as the energy is known
        return d, None, None


# Layers whose output is a view made inside their own autograd Function, which autograd refuses
# to mark dirty (and after a refused attempt, to clone): the tap takes a clone of their output.
# bitsandbytes' 8-bit layer is one; only such layers pay for the copy.
VIEW_OUTPUT_LAYERS = ("Linear8bitLt",)


def tap(output: torch.Tensor, anchor: torch.Tensor, call: "Call | None", clone: bool) -> torch.Tensor:
    return Tap.apply(output.clone() if clone else output, anchor, call)


class Call:
    """One forward call of one candidate module: what it kept, and where its energy goes."""

    __slots__ = ("site", "kept", "rows")

    def __init__(self, site: "Site", kept, rows: int):
        self.site, self.kept, self.rows = site, kept, rows

    def reduce(self, d: torch.Tensor) -> None:
        self.site.reduce(self.kept, d, self.rows)
        self.kept = None


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (where checkpoints recompute)."""
    return torch._C._current_graph_task_id() != -1
