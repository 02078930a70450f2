"""The early-stopping rule: the decision's bootstrap stability."""

from __future__ import annotations

import pytest
import torch

from domlora_kernels.probe.stopping import StopRule, should_stop, stability
from domlora_kernels.scores import ModuleInfo


def test_a_clear_winner_is_stable_and_a_tie_is_not():
    g = torch.Generator().manual_seed(0)
    clear = torch.rand(5, 40, generator=g, dtype=torch.float64)
    clear[2] += 10.0
    assert stability(clear, StopRule()) == 1.0
    tie = torch.rand(5, 40, generator=g, dtype=torch.float64)  # five modules of the same law
    assert stability(tie, StopRule()) < 0.95


def test_stability_is_deterministic_for_a_seed_and_min_samples_holds():
    e = torch.rand(6, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert stability(e, StopRule(top_k=2)) == stability(e.clone(), StopRule(top_k=2))
    stop, s = should_stop(e[:, :5], StopRule(min_samples=16))
    assert not stop and s != s  # nan: not checked before min_samples


def test_budget_decision_uses_the_modules_shapes():
    mods = [ModuleInfo(0, "q_proj", 10, 10), ModuleInfo(0, "v_proj", 10, 2), ModuleInfo(1, "down_proj", 30, 10)]
    e = torch.tensor([[1.0] * 20, [0.9] * 20, [0.1] * 20], dtype=torch.float64)
    assert stability(e, StopRule(budget=100, r=2), mods) == 1.0  # constant columns: every resample agrees
    with pytest.raises(ValueError, match="shapes"):
        stability(e, StopRule(budget=100))


@pytest.mark.parametrize("kwargs", [{"top_k": 0}, {"level": 1.5}, {"resamples": 3}, {"budget": -1}, {"min_samples": 1.0}])
def test_bad_rules_are_refused(kwargs):
    with pytest.raises(ValueError, match="StopRule"):
        StopRule(**kwargs)


def _batches():
    from domlora_kernels.testing import sample_batch

    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2), sample_batch([8, 6, 4], seed=3),
            sample_batch([5, 9], seed=4)]


def test_a_stopped_probe_equals_a_full_probe_on_the_batches_it_read():
    from domlora_kernels import page_scores
    from domlora_kernels.testing import tiny_model

    model = tiny_model("llama")
    n = len(list(model.named_modules()))
    # the decision "every module" is stable at once: the probe stops at the first batch end with >= 4 samples
    rule = StopRule(top_k=n, min_samples=4, resamples=20)
    got = page_scores(model, _batches(), rank=3, seed=[0, 1], stop=rule, progress=False)
    assert got.meta["stopped_early"] and got.num_samples == 5 and got.meta["num_batches"] == 2
    trace = got.meta["stability_trace"]
    assert [tuple(x) for x in trace] == [(3, None), (5, 1.0)]  # none before min_samples
    want = page_scores(model, _batches()[:2], rank=3, seed=[0, 1], progress=False)
    assert got.scores == want.scores
    assert all(torch.equal(got.per_sample[k], want.per_sample[k]) for k in want.per_sample)


def test_batches_are_the_cap_when_the_rule_is_never_met(tmp_path):
    from domlora_kernels import page_scores
    from domlora_kernels.testing import tiny_model

    got = page_scores(tiny_model("llama"), _batches(), rank=3, progress=False,
                      stop=StopRule(min_samples=100, resamples=50))
    assert got.num_samples == 10 and got.meta["num_batches"] == 4 and not got.meta["stopped_early"]
    assert len(got.meta["stability_trace"]) == 4 and got.meta["stability"] is None
    got.to_json(tmp_path / "r.json")  # the report stays valid JSON


def test_stop_is_refused_where_it_cannot_work():
    from domlora_kernels import page_scores
    from domlora_kernels.testing import tiny_model

    with pytest.raises(ValueError, match="estimator='gradient'"):
        page_scores(tiny_model("llama"), _batches(), estimator="gradient", stop=StopRule(), progress=False)
    with pytest.raises(TypeError, match="StopRule"):
        page_scores(tiny_model("llama"), _batches(), stop=0.95, progress=False)
