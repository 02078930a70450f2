"""apply_domlora on mixture-of-experts models whose targets peft rewrites, and the model restored on failure."""

from __future__ import annotations

import warnings

import pytest
import torch

from domlora_kernels import apply_domlora, page_scores
from domlora_kernels.placement import wiring
from domlora_kernels.testing import sample_batch, tiny_moe

pytest.importorskip("peft")


def _state(model):
    return ({n: type(m).__name__ for n, m in model.named_modules()}, [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()])


def _same(model, before):
    now = _state(model)
    assert now[0] == before[0] and now[1] == before[1] and all(torch.equal(a, b) for a, b in zip(now[2], before[2]))
    assert "peft_config" not in model.__dict__


@pytest.fixture()
def mixtral():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_moe("mixtral")
        scores = page_scores(model, [sample_batch([6, 5], seed=1)], rank=2, progress=False)
    return model, scores


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_mixtral_gets_exactly_its_targets(mixtral, top_k):
    """peft 0.21 turns an exact-name regex into every layer's leaf names on Mixtral; the fallback keeps the targets."""
    model, scores = mixtral
    pm = apply_domlora(model, scores, r=2, top_k=top_k, verbose=False)
    assert sorted(wiring.adapted_layers(pm.get_base_model(), "default")) == sorted(pm.domlora_placement.targets)
    assert len(pm.domlora_placement.targets) == top_k


def test_a_failure_after_wrapping_leaves_the_model_as_found(mixtral, monkeypatch):
    model, scores = mixtral
    before = _state(model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wiring, "_init_lora_A", boom)
    with pytest.raises(RuntimeError, match="boom"):
        apply_domlora(model, scores, r=2, top_k=2, verbose=False)
    _same(model, before)
    monkeypatch.undo()
    pm = apply_domlora(model, scores, r=2, top_k=1, verbose=False)  # a retry works
    assert pm.domlora_placement.targets


def test_targets_peft_will_not_match_exactly_are_an_error_and_nothing_changes(mixtral, monkeypatch):
    model, scores = mixtral
    before = _state(model)
    monkeypatch.setattr(wiring, "adapted_layers", lambda model, name: {"some.other.module": None})
    with pytest.raises(RuntimeError, match="left as it was"):
        apply_domlora(model, scores, r=2, top_k=1, verbose=False)
    _same(model, before)
