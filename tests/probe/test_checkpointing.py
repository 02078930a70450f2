"""Activation (gradient) checkpointing: recomputed forwards must not change a single energy.

A checkpointed layer runs its forward twice per batch: non-reentrant checkpointing reruns it
inside the backward pass only to rebuild saved tensors; reentrant checkpointing runs it first
under no_grad and builds the graph only in the rerun. Each test checks that the recompute
really happened (a module's forward ran twice per batch) and that the scores equal those
without checkpointing to rel 1e-6 in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from domlora_kernels import page_scores
from domlora_kernels.probe.losses import causal_lm_losses
from domlora_kernels.testing import sample_batch, tiny_model
from domlora_kernels.testing import COMBOS

BATCHES = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]
_REF: dict = {}


def _seeds(projection):
    return 0 if projection == "expected" else [0, 5]


def _reference(projection, estimator):
    key = (projection, estimator)
    if key not in _REF:
        model = tiny_model("llama", torch.float64)
        _REF[key] = page_scores(model, BATCHES, rank=3, projection=projection, estimator=estimator,
                                seed=_seeds(projection), progress=False)
    return _REF[key]


def _assert_same(got, ref, tol=1e-6):
    assert got.scores.keys() == ref.scores.keys()
    for n, v in ref.scores.items():
        assert v > 0, n
        assert abs(got.scores[n] - v) <= tol * abs(v), (n, got.scores[n], v)
    for s in ref.by_seed:
        for n, v in ref.by_seed[s].items():
            assert abs(got.by_seed[s][n] - v) <= tol * abs(v), (s, n)
    if ref.per_sample is not None:
        for n, t in ref.per_sample.items():
            assert got.per_sample[n].shape == t.shape
            assert torch.allclose(got.per_sample[n], t, rtol=tol, atol=0), n


def _checkpointed_llama(use_reentrant: bool):
    model = tiny_model("llama", torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed the method
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    # q_proj runs first in its layer, so even an early-stopped recompute runs it again
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    return model, calls


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "nonreentrant"])
@pytest.mark.parametrize("projection,estimator", COMBOS, ids=[f"{p}-{e}" for p, e in COMBOS])
def test_transformers_checkpointing_equals_none(use_reentrant, projection, estimator):
    ref = _reference(projection, estimator)
    model, calls = _checkpointed_llama(use_reentrant)
    got = page_scores(model, BATCHES, rank=3, projection=projection, estimator=estimator,
                      seed=_seeds(projection), progress=False)
    assert len(calls) == 2 * len(BATCHES), "the layer was not recomputed: checkpointing was not active"
    _assert_same(got, ref)


def test_checkpointed_model_left_as_found():
    model, _ = _checkpointed_llama(False)
    model.train()
    layer = model.model.layers[0]
    model.model.layers[1].eval()  # mixed modes must come back one by one
    page_scores(model, BATCHES, rank=2, progress=False)
    assert model.training and layer.training and layer.self_attn.training
    assert not model.model.layers[1].training
    assert layer.gradient_checkpointing is True
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


class _Block(nn.Module):
    def __init__(self, width: int, twice: bool = False):
        super().__init__()
        self.up, self.down, self.twice = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), twice

    def forward(self, x):
        h = self.down(torch.tanh(self.up(x)))
        return self.down(torch.tanh(self.up(x + h))) if self.twice else h


class _Net(nn.Module):
    """Embedding, two residual blocks, head; ``ckpt`` None, True (reentrant) or False."""

    def __init__(self, ckpt, twice: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList([_Block(16, twice), _Block(16)])
        self.head = nn.Linear(16, 50)
        self.ckpt = ckpt
        self.to(torch.float64)

    def forward(self, ids):
        x = self.emb(ids)
        if self.ckpt is True:
            x = x.detach().requires_grad_(True)  # reentrant checkpointing needs an input with grad
        for blk in self.blocks:
            x = x + (blk(x) if self.ckpt is None else checkpoint(blk, x, use_reentrant=self.ckpt))
        return self.head(x)


def _loss(model, batch):
    return causal_lm_losses(model(batch["input_ids"]), batch["input_ids"])


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "nonreentrant"])
@pytest.mark.parametrize("projection,estimator", [("AB", "fisher"), ("AB", "gradient")], ids=["fisher", "gradient"])
def test_torch_checkpoint_in_plain_module(use_reentrant, projection, estimator):
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 50, (3, 7), generator=g)} for _ in range(2)]
    kw = dict(rank=2, projection=projection, estimator=estimator, loss_fn=_loss, progress=False)
    ref = page_scores(_Net(None), batches, **kw)
    net = _Net(use_reentrant)
    calls = []
    net.blocks[0].up.register_forward_hook(lambda *a: calls.append(1))
    got = page_scores(net, batches, **kw)
    assert len(calls) == 2 * len(batches)
    _assert_same(got, ref)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "nonreentrant"])
def test_module_applied_twice_still_refused_under_checkpointing(use_reentrant):
    batches = [{"input_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))}]
    with pytest.raises(RuntimeError, match="blocks.0.up ran 2 times in one forward pass"):
        page_scores(_Net(use_reentrant, twice=True), batches, rank=2, loss_fn=_loss, progress=False)
