"""PAGE against the oracles of docs/design.md on tiny models of four families.

Oracle 1: naive autograd, one unpadded sample at a time, full weight gradient, float64.
Oracle 2: peft itself: a real LoraConfig with the probe's A copied in; ||lora_B.grad||^2.
Batches are right-padded with uneven lengths, so padding must carry no gradient.
"""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.testing import naive_page, peft_lora_energies, rel_err_dict, sample_batch, tiny_model
from domlora_kernels.testing import COMBOS

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]
# float32 model, energies compared in float64 (issue: relative error < 1e-5)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _batches():
    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]


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
    assert rel_err_dict(got.scores, want) < RTOL[torch.float32]
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
    assert rel_err_dict(got.scores, want) < RTOL[torch.float64]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", ["A", "B"])
def test_matches_peft_adapter_gradients(arch, projection):
    model = tiny_model(arch, torch.float32)
    batches = _batches()
    scores = page_scores(model, batches, rank=4, lora_alpha=8, projection=projection, progress=False)
    per = peft_lora_energies(model, batches, scores, projection, rank=4, alpha=8)
    for name, want in per.items():
        torch.testing.assert_close(scores.per_sample[name][0], want, rtol=1e-4, atol=1e-9 * float(want.max()))
    rel = rel_err_dict(scores.scores, {n: float(v.mean()) for n, v in per.items()})
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
    rel = rel_err_dict(many.scores, exp.scores)
    assert rel < 0.15  # Monte Carlo over 64 draws; a wrong r/(3n) factor gives >= 0.3
