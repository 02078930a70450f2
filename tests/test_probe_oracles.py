"""PAGE against the oracles of docs/design.md on tiny models of four families.

Oracle 1: naive autograd, one unpadded sample at a time, full weight gradient, float64.
Oracle 2: peft itself: a real LoraConfig with the probe's A copied in; ||lora_B.grad||^2.
Batches are right-padded with uneven lengths, so padding must carry no gradient.
"""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from tiny_models import naive_page, sample_batch, tiny_model
from helpers import COMBOS

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]
# float32 model, energies compared in float64 (issue: relative error < 1e-5)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _batches():
    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]


def _rel(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]) ** 2 for k in b) ** 0.5
    den = sum(b[k] ** 2 for k in b) ** 0.5
    return num / den


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection,estimator", COMBOS, ids=[f"{p}-{e}" for p, e in COMBOS])
def test_matches_naive_autograd(arch, projection, estimator):
    model = tiny_model(arch, torch.float32)
    batches = _batches()
    got = page_scores(model, batches, rank=3, projection=projection, estimator=estimator, seed=5, lora_alpha=6,
                      progress=False)
    want, want_per = naive_page(model, batches, list(got.scores), rank=3, projection=projection,
                                estimator=estimator, seed=5, lora_alpha=6)
    assert got.num_samples == 5
    assert _rel(got.scores, want) < RTOL[torch.float32]
    # every module, not only the big ones, within tolerance
    for name, val in want.items():
        assert got.scores[name] == pytest.approx(val, rel=1e-4, abs=1e-12 * max(want.values())), name
    if estimator == "fisher":
        for name in want:
            torch.testing.assert_close(got.per_sample[name][0], want_per[name], rtol=1e-4, atol=1e-9 * float(want_per[name].max()))


@pytest.mark.parametrize("projection", ["A", "B", "AB", "expected"])
def test_float64_is_exact(projection):
    model = tiny_model("llama", torch.float64)
    batches = _batches()
    got = page_scores(model, batches, rank=4, projection=projection, progress=False)
    want, _ = naive_page(model, batches, list(got.scores), rank=4, projection=projection)
    assert _rel(got.scores, want) < RTOL[torch.float64]


def _peft_energies(model, batches, scores, projection, rank, alpha):
    """Oracle 2: per-sample squared norm of the gradient of the trainable LoRA factor in peft."""
    from peft import LoraConfig, get_peft_model

    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(scores.scores),
                     fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(model, cfg)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(layers) == set(scores.scores)
    with torch.no_grad():
        for name, layer in layers.items():
            if projection == "A":  # peft's default init: B = 0, A = the probe's A
                layer.lora_A["default"].weight.copy_(scores.lora_A[name])
            else:  # nonzero B with A = 0 keeps the forward unchanged; then dL/dA = s B^T G
                layer.lora_A["default"].weight.zero_()
                layer.lora_B["default"].weight.copy_(scores.lora_B[name])
    from domlora_kernels.losses import causal_lm_losses

    per = {n: [] for n in layers}
    peft_model.eval()
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b : b + 1, :length]
            labels = batch["labels"][b : b + 1, :length] if "labels" in batch else ids
            peft_model.zero_grad(set_to_none=True)
            causal_lm_losses(peft_model(input_ids=ids, use_cache=False).logits, labels)[0].backward()
            for name, layer in layers.items():
                factor = layer.lora_B if projection == "A" else layer.lora_A
                per[name].append(float(factor["default"].weight.grad.double().square().sum()))
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", ["A", "B"])
def test_matches_peft_adapter_gradients(arch, projection):
    model = tiny_model(arch, torch.float32)
    batches = _batches()
    scores = page_scores(model, batches, rank=4, lora_alpha=8, projection=projection, progress=False)
    per = _peft_energies(model, batches, scores, projection, rank=4, alpha=8)
    for name, want in per.items():
        torch.testing.assert_close(scores.per_sample[name][0], want, rtol=1e-4, atol=1e-9 * float(want.max()))
    rel = _rel(scores.scores, {n: float(v.mean()) for n, v in per.items()})
    assert rel < 1e-5


def test_rslora_scaling():
    model = tiny_model("llama", torch.float64)
    batches = _batches()
    plain = page_scores(model, batches, rank=4, lora_alpha=8, progress=False)
    rs = page_scores(model, batches, rank=4, lora_alpha=8, use_rslora=True, progress=False)
    # scaling alpha/r = 2 against alpha/sqrt(r) = 4: energies scale by (4/2)^2
    for n in plain.scores:
        assert rs.scores[n] == pytest.approx(4 * plain.scores[n], rel=1e-12)


def test_several_seeds_in_one_pass_equal_separate_runs():
    model = tiny_model("llama", torch.float64)
    batches = _batches()
    multi = page_scores(model, batches, rank=3, seed=[0, 7, 9], progress=False)
    for j, s in enumerate([0, 7, 9]):
        one = page_scores(model, batches, rank=3, seed=s, progress=False)
        assert multi.by_seed[s] == pytest.approx(one.scores, rel=1e-12)
        torch.testing.assert_close(multi.per_sample[multi.dominant_module][j], one.per_sample[multi.dominant_module][0])
    mean = {n: sum(multi.by_seed[s][n] for s in (0, 7, 9)) / 3 for n in multi.scores}
    assert multi.scores == pytest.approx(mean, rel=1e-12)


def test_expected_projection_is_the_mean_over_A_draws():
    """projection "expected" is E_A of projection "A": the average of many seeds approaches it."""
    model = tiny_model("llama", torch.float64)
    batches = _batches()
    exp = page_scores(model, batches, rank=2, projection="expected", progress=False)
    many = page_scores(model, batches, rank=2, seed=list(range(64)), progress=False)
    rel = _rel(many.scores, exp.scores)
    assert rel < 0.15  # Monte Carlo over 64 draws; a wrong r/(3n) factor gives >= 0.3
