"""The benchmark's decision providers (peft's EVA and KappaTune) and the harness paths they
add: rounds capped for slow providers, the agreement checks they skip, the passes column.
A tiny random Llama, no timing assertions."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
import statistics

import peft
import pytest
import torch
from peft.tuners.lora.eva import _Hook

from benchmarks import bench_probe as B
from benchmarks import providers as P
from domlora_kernels import page_scores
from domlora_kernels.probe.candidates import find_candidates

SPEC = B.llama(64, 96, 2, 4, 2, vocab=101)
RANK = 4
# KappaTune came with peft 0.21; the package supports peft >= 0.17 (EVA: 0.14)
needs_kappatune = pytest.mark.skipif(not hasattr(peft, "find_kappa_target_modules"),
                                     reason=f"peft {peft.__version__} has no KappaTune (peft >= 0.21)")


@pytest.fixture(scope="module")
def model():
    return B.build_model(SPEC)


@pytest.fixture(scope="module")
def ids(model):
    return B.make_ids(model, 2, 16)


def _state(model):
    """What a provider must leave as found: mode, grad flags, weights, hooks."""
    return (model.training, [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def _same_state(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_eva_allocates_the_rank_budget_and_counts_its_forwards(model, ids):
    before = _state(model)
    calls = []
    h = model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))  # an independent count
    p = P.Eva(model, ids, RANK)
    p.prepare()
    assert p.run() is None
    p.teardown()
    h.remove()
    o = p.outcome()
    names = [c.name for c in find_candidates(model)]
    assert sorted(o["ranks"]) == sorted(names)
    assert o["rank_budget"] == RANK * len(names) == o["rank_total"] == sum(o["ranks"].values())
    assert 0 <= o["rank_min"] <= o["rank_max"] <= round(RANK * P.EVA_RHO)
    assert o["forwards"] == len(calls) and o["forwards"] >= 2
    assert o["passes"] == (len(calls) - 1) / o["batches"] and o["batches"] == 1
    assert _same_state(before, _state(model))


def test_eva_that_does_not_converge_leaves_no_hooks(model, ids):
    before = _state(model)
    p = P.Eva(model, ids, RANK)
    p.max_passes = 0
    p.prepare()
    with pytest.raises(RuntimeError, match="did not converge within 0 passes"):
        p.run()
    assert not any(isinstance(h, _Hook) for m in model.modules() for h in m._forward_hooks.values())
    assert _same_state(before, _state(model))


@needs_kappatune
def test_kappatune_picks_the_lowest_condition_numbers(model, ids):
    before = _state(model)
    p = P.KappaTune(model, ids, RANK)
    p.prepare()
    assert p.run() is None
    p.teardown()
    o = p.outcome()
    # independent: float64 condition number of every linear weight, the lowest fifth
    lin = {n: torch.linalg.cond(m.weight.double()).item() for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear)}
    want = sorted(lin, key=lin.get)[: max(1, int(len(lin) * P.KappaTune.top_p))]
    assert set(o["modules"]) == set(want) and o["modules_picked"] == len(want)
    assert o["candidates_picked"] == len(set(want) & {c.name for c in find_candidates(model)})
    assert _same_state(before, _state(model))


def test_slow_schedule_spreads_the_capped_rounds():
    assert B.slow_schedule(1, 7, 3) == [1, 3, 5]
    assert B.slow_schedule(0, 2, 3) == [0, 1]
    assert B.slow_schedule(2, 5, 1) == [2]


def test_decision_skip_reasons(model, monkeypatch):
    tiny = torch.zeros(1, 7, dtype=torch.long)
    assert "below the 8 components" in B.skip_reason("eva", model, tiny, RANK)
    assert B.skip_reason("eva", model, torch.zeros(1, 8, dtype=torch.long), RANK) is None
    monkeypatch.delattr(peft, "get_eva_state_dict")
    assert "has no get_eva_state_dict (eva)" in B.skip_reason("eva", None, None)
    monkeypatch.delattr(peft, "find_kappa_target_modules", raising=False)
    assert "has no find_kappa_target_modules (kappatune)" in B.skip_reason("kappatune", None, None)


@needs_kappatune
def test_harness_caps_rounds_skips_checks_and_writes_passes(model, tmp_path, monkeypatch):
    point = {"label": "tiny", "spec": SPEC, "batch": 2, "tokens": 16, "rank": RANK,
             "providers": ["probe", "autograd-per-sample", "eva", "kappatune"], "memory": False}
    res = B.run_point(point, warmup=1, repeats=3, mem={}, log=lambda *a, **k: None, slow_rounds=2)
    rows = res["providers"]
    assert [len(rows[n]["times_s"]) for n in point["providers"]] == [3, 3, 2, 2]
    assert [c["a"] for c in res["checks"]] == ["probe"] and res["checks"][0]["ok"]
    assert set(res["not_checked"]) == {"eva", "kappatune"}
    assert len(rows["eva"]["passes"]) == 2 and rows["eva"]["outcome"]["passes"] == rows["eva"]["passes"][0]
    assert "passes" not in rows["kappatune"] and rows["kappatune"]["outcome"]["modules"]
    text = B.table(res)
    assert "2 of 3 rounds: slow-provider cap" in text and "not of computing the same number" in text
    assert "check eva: not applicable" in B.checks_text(res)

    monkeypatch.setattr(B, "RESULTS", tmp_path)
    B.write("width", {"machine": B.machine(), "machine_line": "test", "points": [res]})
    with open(tmp_path / "width.csv") as f:
        got = {r["provider"]: r for r in csv.DictReader(f)}
    assert float(got["eva"]["passes"]) == statistics.median(rows["eva"]["passes"])
    assert got["probe"]["passes"] == "" and got["kappatune"]["decision"] == P.KappaTune.decision
    assert json.loads((tmp_path / "width.json").read_text())["points"][0]["not_checked"]
    assert [p.name for p in B.plot()] == ["width.png"]


@pytest.mark.parametrize("name", ["strategy-adam", "strategy-heldout", "strategy-pilot", "lora-step"])
def test_strategy_providers_run_and_leave_the_model_as_found(model, ids, name):
    before = _state(model)
    p = P.PROVIDERS[name](model, ids, RANK)
    p.prepare()
    assert p.run() is None
    p.teardown()
    out = p.outcome()
    assert _same_state(before, _state(model)) and not hasattr(model, "peft_config")
    if name != "lora-step":
        assert out["top_module"] in {c.name for c in find_candidates(model)}


def test_the_stopped_set_probe_reads_a_prefix_of_the_full_one_with_its_scores(model):
    ids = B.make_ids(model, 4, 16)  # 6 batches of 4: the rule checks from 16 samples on
    full, stopped = P.PROVIDERS["probe-set"](model, ids, RANK), P.PROVIDERS["probe-stopped"](model, ids, RANK)
    before = _state(model)
    for p in (full, stopped):
        p.prepare()
        p.run()
    assert _same_state(before, _state(model))
    f, s = full.outcome(), stopped.outcome()
    assert f["samples"] == f["of"] == P.ProbeSet.SET_BATCHES * ids.shape[0] and "stability" not in f
    # on these 24 random-id samples the top-1 is stable at the first check (16 samples)
    assert s["samples"] < f["samples"] and s["samples"] % ids.shape[0] == 0 and s["stability"] >= 0.95
    # the stopped probe's scores are those of a probe given only the batches it read
    read = stopped._batches[: s["samples"] // ids.shape[0]]
    ref = page_scores(model, read, rank=RANK, estimator="fisher", progress=False)
    assert stopped._s.scores.keys() == ref.scores.keys()
    assert all(math.isclose(stopped._s.scores[n], ref.scores[n], rel_tol=1e-9) for n in ref.scores)


def test_strategies_workload_names_known_providers():
    (point,) = B.workloads()["strategies"]
    assert set(point["providers"]) <= set(P.PROVIDERS)


def test_the_strategies_table_gives_costs_in_probes_and_training_steps():
    def row(s, decision=None, outcome=None):
        return {"median_s": s, "times_s": [s] * 3, "memory": None, "decision": decision, "outcome": outcome or {}}

    res = {"label": "t", "num_candidates": 2, "candidate_params": 1e6, "repeats": 3, "skipped": {},
           "providers": {"probe": row(4.0), "lora-step": row(2.0, "(reference) step", {}),
                         "strategy-pilot": row(120.0, "pilot", {"top_module": "m.0.v_proj", "steps": 30})}}
    text = B.table(res)
    assert "x step" in text
    pilot = next(x for x in text.splitlines() if x.startswith("strategy-pilot"))
    assert pilot.split()[1:4] == ["120.000", "30.00", "60.0"]
    assert "ranks m.0.v_proj first, after 30 pilot steps" in text and "lora-step ((reference) step): -" in text


def test_memory_children_run_with_the_allocator_fixed_unless_told(monkeypatch):
    seen = []

    class Done:
        returncode, stderr = 0, ""
        stdout = 'CHILD_RESULT {"provider": "floor", "peak_bytes": 1, "delta_bytes": 1}'

    def fake_run(cmd, **kw):
        seen.append(kw["env"])
        return Done()

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    point = {"spec": B.SMOLLM2, "batch": 1, "tokens": 8, "rank": 2}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # a tunable of the caller's
    B.measure_memory(point, "floor")
    B.measure_memory(point, "floor", malloc={})
    assert seen[0]["MALLOC_MMAP_THRESHOLD_"] == B.FIXED_MALLOC["MALLOC_MMAP_THRESHOLD_"]
    assert not any(k.startswith("MALLOC_") for k in seen[1])  # glibc's defaults


def test_memory_floor_table_gives_ratios_to_the_floor():
    from benchmarks import memory_floor as M

    def runs(*peaks):
        return [{"peak_mib": p, "delta_mib": p - 500} for p in peaks]

    text = M.table({"fixed": {"floor": runs(2000, 2000, 2002), "probe": runs(2020, 2021, 2020)}})
    row = next(line for line in text.splitlines() if " probe " in line)
    assert row.split()[-2:] == ["1.010", "1.013"]


def test_projection_layout_times_both_layouts_of_every_shape():
    from benchmarks import projection_layout as L

    res = L.run(rows=16, rounds=1, calls=1)
    assert [(r["n"], r["c"]) for r in res] == L.SHAPES
    assert all(set(r["median_ms"]) == {"X A^T", "(A X^T)^T"} and r["ratio"] > 0 for r in res)


def test_benchmarks_is_this_repository_folder_even_beside_opacus():
    # Opacus 1.6 installs a top-level `benchmarks` package; only a regular package here wins over it
    import benchmarks

    assert Path(benchmarks.__file__).resolve() == Path(B.__file__).resolve().parent / "__init__.py"


def test_providers_option_keeps_only_the_named_providers(monkeypatch, capsys):
    monkeypatch.setattr(B, "ONLY_PROVIDERS", ["probe", "floor"])
    (point,) = B.workloads()["headline"]
    assert point["providers"] == ["probe", "floor"]
    for bad in ("floor", "probe,bogus"):
        with pytest.raises(SystemExit):
            B.main(["--providers", bad])
    assert "must include probe" in capsys.readouterr().err


def test_the_plain_layout_probe_gives_the_probe_energies_and_restores_the_layout(model, ids):
    from domlora_kernels.probe import energies

    got = P.PROVIDERS["probe-xat"](model, ids, RANK).run()
    assert energies.CPU_TRANSPOSED_PROJECTION is True
    assert P.rel_err(got, P.PROVIDERS["probe"](model, ids, RANK).run()) < 1e-5
