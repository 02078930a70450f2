"""benchmarks/instructions.py: the parts that need no valgrind (arguments, callgrind's output
files, the ratio, the report, the client-request page run natively), and one real callgrind
run of a tiny model when valgrind is installed and DOMLORA_SLOW_TESTS=1."""

from __future__ import annotations

import json
import os
import platform
import shutil

import pytest

from benchmarks import instructions as I

SAMPLE = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 16490
cmd:  /work/main/.venv/bin/python t1.py
part: 1

desc: I1 cache:
desc: Timerange: Basic block 0 - 1234
desc: Trigger: Client Request: probe call 1

positions: line
events: Ir
summary: 0

ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ???
fn=(1) memcpy
0 12

totals: 805931
"""


def test_parse_totals_reads_the_totals_line():
    assert I.parse_totals(SAMPLE) == 805931


def test_parse_totals_falls_back_to_summary_and_checks_the_event():
    assert I.parse_totals("events: Ir\nsummary: 42\n") == 42
    with pytest.raises(ValueError, match="not Ir"):
        I.parse_totals("events: Dr Ir\ntotals: 5 6\n")
    with pytest.raises(ValueError, match="no totals"):
        I.parse_totals("events: Ir\n")


def test_collect_orders_the_dumps_numerically(tmp_path):
    base = tmp_path / "callgrind.probe.1.out"
    for part, n in ((1, 100), (2, 200), (10, 1000), (3, 300), (4, 400), (5, 500), (6, 600), (7, 700), (8, 800),
                    (9, 900)):
        (tmp_path / f"{base.name}.{part}").write_text(f"events: Ir\ntotals: {n}\n")
    base.write_text("events: Ir\ntotals: 7\n")
    (tmp_path / "callgrind.probe.10.out.1").write_text("events: Ir\ntotals: 99999\n")  # another run's dump
    (tmp_path / f"{base.name}.tmp").write_text("not a dump")
    res = I.collect(base)
    assert res["per_call"] == [100 * k for k in range(1, 11)]
    assert res["tail"] == 7 and res["total"] == 5507


def test_ratio_and_summary():
    assert I.ratio(111, 100) == pytest.approx(1.11)
    assert I.ratio(1, 0) != I.ratio(1, 0)  # nan
    runs = {"floor": [{"total": 100, "per_call": [50, 50]}, {"total": 102, "per_call": [51, 51]}],
            "probe": [{"total": 110, "per_call": [55, 55]}, {"total": 110, "per_call": [55, 55]}]}
    s = I.summarise(runs)
    assert s["floor"]["totals"] == [100, 102] and s["floor"]["spread"] == pytest.approx(0.02)
    assert s["probe"]["ratio_to_floor"] == pytest.approx([1.1, 110 / 102])
    assert s["probe"]["per_call_mean"] == 55


def test_arguments():
    a = I.parse_args([])
    assert (a.layer_list, a.batch, a.tokens, a.rank, a.calls, a.repeats, a.jobs) == ([1, 2], 4, 64, 8, 3, 2, 1)
    assert a.provider_list == ["floor", "probe"]
    assert a.vocab == I.default_vocab(1) == 1664  # SmolLM2's 49152 / 30, to a multiple of 64
    assert I.default_vocab(4) == 6528 and I.default_vocab(30) == 49152
    a = I.parse_args(["--layers", "4,2", "--providers", "floor,probe,probe-expected", "--out", "/tmp/x.txt"])
    assert a.layer_list == [2, 4] and a.vocab == I.default_vocab(2)  # one vocabulary for every point
    assert a.provider_list == ["floor", "probe", "probe-expected"] and a.out == "/tmp/x.txt"
    a = I.parse_args(["--layers", "2", "--vocab", "1000"])
    assert I.spec_of(a, 2) == {"model": "llama", "hidden": 576, "intermediate": 1536, "layers": 2, "heads": 9,
                               "kv_heads": 3, "vocab": 1000}
    for bad in (["--providers", "autograd"], ["--calls", "0"], ["--tokens", "1"], ["--warmup", "-1"],
                ["--layers", "0"], ["--layers", "1,1"], ["--layers", "a"]):
        with pytest.raises(SystemExit):
            I.parse_args(bad)


def test_valgrind_command_counts_nothing_before_the_switch(tmp_path):
    cmd = I.valgrind_cmd(tmp_path / "o", {"provider": "floor"})
    assert cmd[:3] == ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    assert cmd[3] == f"--callgrind-out-file={tmp_path / 'o'}"
    assert json.loads(cmd[-1]) == {"provider": "floor"}
    env = I.child_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONHASHSEED"] == "0"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the client-request page is x86-64 code")
def test_client_requests_are_no_ops_on_a_real_cpu():
    if os.environ.get("LD_PRELOAD", "").find("vgpreload") >= 0:
        pytest.skip("this test process runs under valgrind")
    cr = I.ClientRequests()
    assert cr.running_on_valgrind() == 0
    assert cr.request(I.REQ_RUNNING_ON_VALGRIND, default=17) == 17  # the default comes back untouched
    cr.zero(), cr.start(), cr.dump("x"), cr.stop()


def _point(layers, floor, probe):
    runs = {"floor": [{"total": 2 * f, "per_call": [f, f]} for f in floor],
            "probe": [{"total": 2 * p, "per_call": [p, p]} for p in probe]}
    w = {"spec": {"model": "llama", "layers": layers}, "batch": 4, "tokens": 64, "rank": 8, "candidates": 7 * layers,
         "candidate_params": 1, "params": 2, "warmup": 1, "calls": 2}
    return {"workload": w, "summary": I.summarise(runs), "native": None}


def test_marginal_cancels_what_every_point_shares():
    # floor = 100 (embedding, head, loss) + 1000 per layer; probe = 90 + 1050 per layer
    pts = [_point(1, [1100, 1100], [1140, 1140]), _point(3, [3100, 3100], [3240, 3240])]
    (m,) = I.marginal(pts)
    assert m["layers"] == [1, 3]
    assert m["per_layer"] == {"floor": 1000, "probe": 1050}
    assert m["ratio_to_floor"]["probe"] == pytest.approx(1.05)
    assert m["ratio_to_floor_per_repeat"]["probe"] == pytest.approx([1.05, 1.05])


def _payload(pts):
    return {"command": "python -m benchmarks.instructions", "date": "today", "torch": "2", "python": "3.11",
            "valgrind": "valgrind-3.19.0", "cpu_capability_under_valgrind": "AVX2", "cpu_capability_native": "AVX512",
            "lscpu": "Architecture: x86_64", "repeats": 2, "points": pts, "marginal": I.marginal(pts),
            "process_wall_s": {"L1.floor.1": 1.0}, "wall_s": 3.0, "loadavg_before": (1, 1, 1),
            "loadavg_after": (1, 1, 1)}


def test_render_writes_a_saved_run_again(tmp_path):
    pts = [_point(1, [500, 500], [550, 550]), _point(2, [900, 900], [1000, 1001])]
    saved = tmp_path / "saved.json"
    payload = _payload(pts)
    payload["marginal"] = []
    saved.write_text(json.dumps(payload))
    assert I.main(["--render", str(saved), "--out", str(tmp_path / "r.txt")]) == 0
    text = (tmp_path / "r.txt").read_text()
    assert text.startswith("command: python -m benchmarks.instructions\n")  # the counting run's command
    assert "per added decoder layer (1 -> 2 layers" in text
    assert "(repeat by repeat: 1.1250 / 1.1275)" in text
    assert json.loads((tmp_path / "r.json").read_text())["marginal"][0]["layers"] == [1, 2]


def test_text_report_renders():
    pts = [_point(1, [500, 500], [550, 550]), _point(2, [900, 900], [1000, 1001])]
    pts[0]["native"] = {"rounds": 2, "loadavg": (1.0, 1.0, 1.0), "times_s": {"floor": [1.0, 1.0], "probe": [1.2, 1.2]}}
    text = I.text_report(_payload(pts))
    assert text.startswith("command: python -m benchmarks.instructions\n")
    assert "probe / floor instructions: 1.1000 and 1.1000" in text
    assert "probe / floor instructions: 1.1111 and 1.1122" in text
    assert "1.200 x floor" in text
    assert "per added decoder layer (1 -> 2 layers" in text


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not installed")
@pytest.mark.skipif(os.environ.get("DOMLORA_SLOW_TESTS") != "1",
                    reason="a real callgrind run takes minutes: set DOMLORA_SLOW_TESTS=1")
def test_real_callgrind_run(tmp_path):
    out = tmp_path / "i.txt"
    rc = I.main(["--hidden", "64", "--intermediate", "128", "--layers", "1,2", "--heads", "4", "--kv-heads", "2",
                 "--vocab", "256", "--batch", "2", "--tokens", "16", "--calls", "2", "--repeats", "2",
                 "--providers", "floor,probe", "--jobs", "2", "--time-rounds", "0", "--out", str(out),
                 "--keep", str(tmp_path / "cg")])
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [p["workload"]["spec"]["layers"] for p in data["points"]] == [1, 2]
    for pt in data["points"]:
        s = pt["summary"]
        assert all(len(r["per_call"]) == 2 and min(r["per_call"]) > 0 for rs in pt["counts"].values() for r in rs)
        assert s["floor"]["spread"] < 1e-2 and s["probe"]["spread"] < 1e-2  # counts repeat, whatever the load
    (m,) = data["marginal"]
    assert m["per_layer"]["floor"] > 0 and m["ratio_to_floor"]["probe"] > 1  # a layer costs the probe more
    assert data["cpu_capability_under_valgrind"]
    assert "per added decoder layer (1 -> 2 layers" in out.read_text()
    kept = I.collect(tmp_path / "cg" / "callgrind.L2.probe.1.out")  # --keep: the files stay for callgrind_annotate
    assert kept["total"] == data["points"][1]["counts"]["probe"][0]["total"]
