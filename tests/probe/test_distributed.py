"""torch.distributed: 2 ranks on the CPU (gloo) must give what one process gives on all batches.

One torchrun launch (tests/dist_worker.py) runs every set-up and every projection x
estimator on each rank and writes JSON; the single-process references are computed here on
the same tiny float64 Llama and batches. Agreement: rel 1e-6 on scores, by_seed and every
per-sample energy (per_sample columns rank-major, equal to the unsharded order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_worker import COMBOS, all_batches, seeds_for
from domlora_kernels import PageScores, page_scores
from domlora_kernels.distributed import rank_and_world, shard
from domlora_kernels.testing import tiny_model

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "probe" / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


_REF: dict = {}


def _reference(n_batches, projection, estimator):
    key = (n_batches, projection, estimator)
    if key not in _REF:
        _REF[key] = page_scores(tiny_model("llama", torch.float64), all_batches()[:n_batches], rank=3,
                                projection=projection, estimator=estimator, seed=seeds_for(projection),
                                progress=False)
    return _REF[key]


def _worst_rel(got: PageScores, ref: PageScores) -> float:
    assert list(got.scores) == list(ref.scores)  # same names (DDP's "module." prefix is gone)
    assert got.num_samples == ref.num_samples
    worst = 0.0
    for n, v in ref.scores.items():
        assert v > 0, n
        worst = max(worst, abs(got.scores[n] - v) / v)
        for s in ref.by_seed:
            worst = max(worst, abs(got.by_seed[s][n] - ref.by_seed[s][n]) / ref.by_seed[s][n])
        if ref.per_sample is not None:
            t = ref.per_sample[n]
            assert got.per_sample[n].shape == t.shape
            worst = max(worst, float(((got.per_sample[n] - t).abs() / t.abs()).max()))
    return worst


def _check_setup(ranks, setup, n_batches):
    for rk in ranks:
        assert rk.get("fsdp_error") is None, rk.get("fsdp_error")
        for projection, estimator in COMBOS:
            got = PageScores.from_dict(rk[setup][f"{projection}-{estimator}"])
            ref = _reference(n_batches, projection, estimator)
            assert got.meta["world_size"] == WORLD and got.meta["sample_order"] == "rank-major"
            assert got.meta["num_batches"] == n_batches
            rel = _worst_rel(got, ref)
            assert rel < TOL, (setup, rk["rank"], projection, estimator, rel)


@pytest.mark.parametrize("setup,n_batches", [("plain", 5), ("ddp", 5), ("fsdp", 4), ("fsdp_ckpt", 4), ("fsdp_meta", 4)])
def test_two_ranks_equal_one_process(ranks, setup, n_batches):
    _check_setup(ranks, setup, n_batches)


def test_two_ranks_equal_one_process_moe(ranks):
    """Expert weights: the parameter's scores and every expert's, merged over the ranks."""
    from domlora_kernels.testing import tiny_moe

    for projection, estimator in COMBOS:
        model = tiny_moe("mixtral", torch.float64, experts_implementation="eager")  # grouped_mm takes no float64
        ref = page_scores(model, all_batches(), rank=3, projection=projection, estimator=estimator,
                          seed=seeds_for(projection), progress=False)
        assert len(ref.by_expert) == 4
        for rk in ranks:
            got = PageScores.from_dict(rk["moe"][f"{projection}-{estimator}"])
            assert _worst_rel(got, ref) < TOL, (rk["rank"], projection, estimator)
            for name, vals in ref.by_expert.items():
                torch.testing.assert_close(torch.tensor(got.by_expert[name]), torch.tensor(vals), rtol=TOL, atol=0)


def test_fsdp_checkpointing_really_recomputed(ranks):
    assert all(rk["fsdp_ckpt_calls_per_batch"] == 2 for rk in ranks)


def test_ddp_model_still_trains_after_probe(ranks):
    for rk in ranks:
        assert rk["ddp_requires_grad"] and rk["ddp_grad_none"]
    # each rank stepped on its own shard: equal gradients mean DDP's all-reduce still ran
    assert ranks[0]["ddp_grad_after_step"] == ranks[1]["ddp_grad_after_step"]
    assert all(g > 0 for g in ranks[0]["ddp_grad_after_step"])


def test_fsdp_refuses_unequal_batch_counts(ranks):
    for rk in ranks:
        assert "same number of batches" in rk["fsdp_uneven_error"] and "[3, 2]" in rk["fsdp_uneven_error"]


def test_error_on_one_rank_stops_all(ranks):
    assert ranks[1]["error"].startswith("ValueError: batch 2 has no 'input_ids'")
    assert ranks[0]["error"] == "RuntimeError: rank(s) [1] failed during the probe (see their error); stopping this rank too"


def test_keyboard_interrupt_on_one_rank_stops_all(ranks):
    """Ctrl-C on rank 1 mid-probe: rank 1 re-raises it, rank 0 raises instead of hanging (a
    hang would run into the fixture's subprocess timeout)."""
    assert ranks[1]["interrupt"] == "KeyboardInterrupt: "
    assert ranks[0]["interrupt"] == "RuntimeError: rank(s) [1] failed during the probe (see their error); stopping this rank too"


# ------------------------------------------------------------- no torchrun needed
@pytest.mark.parametrize("n,world", [(0, 2), (1, 3), (5, 2), (7, 3), (12, 4)])
def test_shard_is_contiguous_balanced_and_complete(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert sum(parts, []) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True)


def test_init_from_env_binds_the_local_gpu_for_nccl(monkeypatch):
    """Under torchrun, NCCL needs each rank on its own GPU: LOCAL_RANK, not cuda:0 for all."""
    import domlora_kernels.distributed as dd

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    assert dd.init_from_env("nccl") is True
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    assert dd.init_from_env("gloo") is True
    assert calls == [("init", "gloo")]


def test_shard_defaults_and_errors():
    assert not torch.distributed.is_initialized() and rank_and_world() == (0, 1)
    assert shard((1, 2, 3)) == [1, 2, 3]
    with pytest.raises(ValueError, match="both rank and world_size"):
        shard([1], rank=0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard([1], rank=2, world_size=2)
    with pytest.raises(TypeError, match="wrap an iterable in list"):
        shard(iter([1, 2]), 0, 1)



# ------------------------------------------------- one process, model spread over devices
def _spread(devices):
    from accelerate import dispatch_model

    first, second = devices
    device_map = {"model.embed_tokens": first, "model.layers.0": first, "model.layers.1": second,
                  "model.norm": second, "model.rotary_emb": second, "lm_head": second}
    return dispatch_model(tiny_model("llama", torch.float64), device_map=device_map)


def _check_spread(devices):
    model = _spread(devices)
    assert {str(p.device) for p in model.parameters()} == {str(torch.device(d)) for d in set(devices)}
    for projection, estimator in COMBOS:
        got = page_scores(model, all_batches()[:2], rank=3, projection=projection, estimator=estimator,
                          seed=seeds_for(projection), progress=False)
        assert _worst_rel(got, _reference(2, projection, estimator)) < TOL, (projection, estimator)


def test_device_map_dispatched_model_on_cpu():
    """accelerate's dispatch hooks around every layer (CPU only here: all devices are "cpu")."""
    pytest.importorskip("accelerate")
    _check_spread(["cpu", "cpu"])


@pytest.mark.gpu
def test_device_map_split_between_cpu_and_gpu():
    """Layer 0 on the CPU, layer 1 on CUDA: A and B drawn once, cached per device."""
    pytest.importorskip("accelerate")
    _check_spread(["cpu", "cuda:0"])
