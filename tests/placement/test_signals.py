"""The placement signals that come from the probe, against naive autograd in float64."""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.testing import naive_mean_gradient, sample_batch, tiny_model


def _batches():
    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mean_gradient_and_adam_signal_match_naive_autograd(arch):
    model = tiny_model(arch, torch.float64)
    got = page_scores(model, _batches(), rank=3, estimator="gradient", seed=4, lora_alpha=6, progress=False)
    want = naive_mean_gradient(model, _batches(), list(got.scores), rank=3, seed=4, lora_alpha=6)
    for name, g in want.items():
        mean = got.mean_gradient[name]
        assert mean.shape == (1, g.numel())
        assert torch.allclose(mean[0].view_as(g), g, rtol=1e-9, atol=1e-14), name
        assert got.signals["adam"][name] == pytest.approx(float(g.abs().sum()), rel=1e-9)
        # the gradient estimator's PAGE is the squared L2 norm of the same mean gradient
        assert got.scores[name] == pytest.approx(float(g.square().sum()), rel=1e-9)


def test_signals_survive_json(tmp_path):
    from domlora_kernels import PageScores

    got = page_scores(tiny_model("llama"), _batches(), rank=2, estimator="gradient", progress=False)
    back = PageScores.from_json(got.to_json(tmp_path / "s.json"))
    assert back.signals == got.signals and set(back.signals) == {"adam"}
    assert back.mean_gradient is None  # in memory only


def test_fisher_probe_carries_no_signal():
    got = page_scores(tiny_model("llama"), _batches(), rank=2, progress=False)
    assert got.signals == {} and got.mean_gradient is None


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m).__name__ for n, m in model.named_modules()}, model.training)


def _same(model, before):
    params, flags, types, training = _state(model)
    assert flags == before[1] and types == before[2] and training == before[3]
    assert params.keys() == before[0].keys()
    assert all(torch.equal(params[n], before[0][n]) for n in params)
    assert not hasattr(model, "peft_config")


def test_pilot_scores_every_module_and_leaves_the_model_as_found():
    from domlora_kernels.placement.signals import measure_signals

    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)  # a mixed state, kept
    model.train()
    before = _state(model)
    got = measure_signals(model, _batches(), "pilot", rank=2, progress=False, pilot={"steps": 3})
    _same(model, before)
    pilot = got.signals["pilot"]
    assert set(pilot) == set(got.scores) and all(v > 0 for v in pilot.values())
    again = measure_signals(model, _batches(), "pilot", rank=2, progress=False, pilot={"steps": 3})
    assert again.signals["pilot"] == pilot  # deterministic for a seed


def test_pilot_failure_leaves_the_model_as_found():
    from domlora_kernels.placement.signals import pilot_signal

    model = tiny_model("llama")
    before = _state(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with pytest.raises(FloatingPointError, match="pilot loss"):
        pilot_signal(model, _batches(), names, steps=50, lr=1e30)
    _same(model, before)


def test_heldout_signal_is_the_held_out_gradient_against_the_training_sign():
    from domlora_kernels.placement.signals import measure_signals

    model = tiny_model("llama", torch.float64)
    batches = _batches()
    got = measure_signals(model, batches, "heldout", rank=3, seed=1, progress=False)
    names = list(got.scores)
    train = naive_mean_gradient(model, batches[0::2], names, rank=3, seed=1)
    held = naive_mean_gradient(model, batches[1::2], names, rank=3, seed=1)
    for n in names:
        want = float((held[n] * torch.sign(train[n])).sum())
        assert got.signals["heldout"][n] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert got.num_samples == 3 and got.meta["heldout_samples"] == 2


@pytest.mark.parametrize("bad, match", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"rank": 1.5}, "rank"),
                                        ({"epochs": 2}, "unknown pilot setting")])
def test_bad_pilot_settings_are_refused(bad, match):
    from domlora_kernels.placement.signals import measure_signals

    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        measure_signals(model, _batches(), "pilot", rank=2, progress=False, pilot=bad)


def test_heldout_needs_two_batches_and_bad_strategy_is_refused():
    from domlora_kernels.placement.signals import measure_signals

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2 of them, got 1"):
        measure_signals(model, [sample_batch([5], seed=1)], "heldout", progress=False)
    one = measure_signals(model, _batches()[:1], "heldout", progress=False)  # one batch: its rows alternate
    assert one.num_samples == 2 and one.meta["heldout_samples"] == 1
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        measure_signals(model, _batches(), "best", progress=False)
    with pytest.raises(ValueError, match="for strategy 'pilot'"):
        measure_signals(model, _batches(), "adam", progress=False, pilot={"steps": 2})
