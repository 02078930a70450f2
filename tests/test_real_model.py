"""The oracles once on the real pretrained SmolLM2-135M-Instruct, on a few calibration samples."""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.data import load_calibration, make_batches
from domlora_kernels.testing import peft_lora_energies as _peft_energies, rel_err_dict as _rel
from domlora_kernels.testing import naive_page

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from domlora_kernels.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def batches(smol):
    _, tok = smol
    records = load_calibration()[:4]  # one sample of each task
    return make_batches(records, tok, batch_size=2, max_length=96)


def test_real_model_shape(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.chat_template is not None


def test_real_model_loss_equals_transformers_loss(smol, batches):
    """causal_lm_losses against transformers' own loss, one unpadded sample at a time (B=1),
    with the calibration labels (prompt tokens are -100)."""
    from domlora_kernels.probe.losses import causal_lm_losses, default_labels

    model, _ = smol
    checked = 0
    for batch in batches:
        labels = batch.get("labels", default_labels(batch["input_ids"], batch["attention_mask"]))
        for b in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][b].sum())
            ids, lab = batch["input_ids"][b:b + 1, :length], labels[b:b + 1, :length]
            with torch.no_grad():
                out = model(input_ids=ids, labels=lab, use_cache=False)
            assert float(causal_lm_losses(out.logits, lab)[0]) == pytest.approx(float(out.loss), rel=1e-6)
            checked += 1
    assert checked == 4


def test_real_model_matches_naive_autograd(smol, batches):
    model, _ = smol
    got = page_scores(model, batches, rank=8, progress=False)
    assert len(got.scores) == 30 * 7
    want, want_per = naive_page(model, batches, list(got.scores), rank=8)
    assert _rel(got.scores, want) < 1e-5
    for name in want:
        torch.testing.assert_close(got.per_sample[name][0], want_per[name], rtol=1e-3, atol=1e-7 * float(want_per[name].max()))


def test_real_model_matches_peft(smol, batches):
    import copy

    model, _ = smol
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 5, 11, 29)] + ["model.layers.3.self_attn.v_proj"]
    got = page_scores(model, batches, rank=8, lora_alpha=16, target_modules=names, progress=False)
    per = _peft_energies(copy.deepcopy(model), batches, got, "A", rank=8, alpha=16)
    assert _rel(got.scores, {n: float(v.mean()) for n, v in per.items()}) < 1e-5
