"""benchmarks/gpu_check.py (``python -m benchmarks.gpu_check``) without a GPU.

The script gets one short run on a GPU machine, so what can go wrong there without a GPU is
tested here: the row writer (rows on disk as measured, strict JSON), the section runner (a
failure recorded, the rest run), the budget (sections skipped with a reason, loops stopped),
the interrupt path, the subprocess timeout, the threshold fit, the plan's sizes, and a
``--cpu-smoke`` run that walks every section on tiny sizes on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _ctx(tmp_path: Path, budget_s: float, clock: FakeClock):
    return gc.Ctx(gc.Rows(tmp_path / "rows.jsonl", clock), gc.Budget(budget_s, clock), gc.smoke_plan(), gc.Dev("cpu"), tmp_path)


def _rows(path: Path) -> list[dict]:
    def refuse(const):
        raise AssertionError(f"non-standard JSON constant {const} in {path.name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _noop(ctx):
    return None


# --------------------------------------------------------------------------- rows


def test_rows_are_on_disk_as_soon_as_written_and_strict_json(tmp_path):
    rows = gc.Rows(tmp_path / "r.jsonl", FakeClock())
    rows.write("s", "case", nan=float("nan"), inf=float("-inf"), dtype=torch.bfloat16, t=torch.tensor([1.5, 2.0]), nested={3: (1, 2)})
    got = _rows(tmp_path / "r.jsonl")  # read before close: a kill now loses nothing
    rows.close()
    assert got == [{"section": "s", "kind": "case", "t_s": 0.0, "nan": "nan", "inf": "-inf", "dtype": "torch.bfloat16",
                    "t": [1.5, 2.0], "nested": {"3": [1, 2]}}]


# --------------------------------------------------------------------------- the runner and the budget


def test_a_failing_section_is_recorded_and_the_next_ones_run(tmp_path):
    clock = FakeClock()
    ctx = _ctx(tmp_path, 100, clock)

    def fine(c):
        c.check("fine", "a check", True)
        return {"extra": 1}

    def boom(c):
        raise RuntimeError("kaput")

    def bad(c):
        c.check("bad", "a check", False, error="wrong")

    sections = [gc.Section("fine", fine, 10, 1, ""), gc.Section("boom", boom, 10, 1, ""), gc.Section("bad", bad, 10, 1, ""),
                gc.Section("after", _noop, 10, 1, "")]
    statuses = gc.run_sections(ctx, sections)
    assert [s["status"] for s in statuses] == ["ok", "error", "failed", "ok"]
    assert statuses[0]["extra"] == 1 and statuses[0]["checks_passed"] == 1
    assert "RuntimeError: kaput" in statuses[1]["error"] and "raise RuntimeError" in statuses[1]["traceback"]
    assert ctx.failures == ["bad: a check"]
    on_disk = [r for r in _rows(tmp_path / "rows.jsonl") if r["kind"] == "section"]
    assert [r["section"] for r in on_disk] == ["fine", "boom", "bad", "after"]


def test_budget_skips_a_section_with_the_reason_and_keeps_the_later_minimum(tmp_path):
    clock = FakeClock()
    ctx = _ctx(tmp_path, 100, clock)

    def slow(c):
        clock.t += 70

    sections = [gc.Section("a", slow, 100, 10, ""), gc.Section("b", slow, 100, 10, ""), gc.Section("last", _noop, 100, 25, "")]
    statuses = gc.run_sections(ctx, sections)
    assert [s["status"] for s in statuses] == ["ok", "skipped", "ok"]
    assert statuses[0]["window_s"] == 65  # 100 s less the 10 + 25 s the later sections keep
    assert "time budget: 30 s of 100 s left" in statuses[1]["reason"] and "needs at least 10 s" in statuses[1]["reason"]
    assert statuses[2]["window_s"] == 30  # the last section takes what is left


def test_a_section_stops_starting_cases_when_its_window_is_spent(tmp_path):
    clock = FakeClock()
    ctx = _ctx(tmp_path, 100, clock)
    ran = []

    def loop(c):
        for i in c.cases("loop", range(10)):
            ran.append(i)
            clock.t += 3

    (status,) = gc.run_sections(ctx, [gc.Section("loop", loop, 10, 1, "")])
    assert ran == [0, 1, 2, 3] and status["status"] == "truncated" and status["cases_not_run"] == 6
    notes = [r for r in _rows(tmp_path / "rows.jsonl") if r["kind"] == "note"]
    assert notes and "6 of 10 cases not run" in notes[0]["text"]


def test_a_case_that_raises_is_a_failed_check_and_the_next_case_runs(tmp_path):
    ctx = _ctx(tmp_path, 100, FakeClock())
    done = []

    def measure(i):
        if i == 1:
            raise ValueError("case one is broken")
        done.append(i)

    gc.each_case(ctx, "s", [0, 1, 2], measure)
    assert done == [0, 2] and ctx.failed == 1
    (check,) = [r for r in _rows(tmp_path / "rows.jsonl") if r["kind"] == "check"]
    assert check["passed"] is False and "case one is broken" in check["error"]


def test_sigterm_mid_section_still_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets it for --cpu-smoke; restored afterwards

    def killed(c):
        c.check("first", "measured before the signal", True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the section")

    monkeypatch.setattr(gc, "SECTIONS", (gc.Section("first", killed, 10, 1, "", on_device=False), gc.Section("second", _noop, 10, 1, "")))
    assert gc.main(["--cpu-smoke", "--out-dir", str(tmp_path)]) == 1
    rows = _rows(tmp_path / gc.ROWS_FILE)
    assert any(r["kind"] == "check" and r["passed"] for r in rows)  # what was measured survives
    summary = json.loads((tmp_path / gc.SUMMARY_FILE).read_text())
    assert rows[-1]["kind"] == "summary" and summary["interrupted"] == f"signal {signal.SIGTERM} during section first"
    assert not summary["ok"] and not summary["complete"]
    assert signal.getsignal(signal.SIGTERM) is not gc._on_sigterm


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main pops it (compiled kernels); restored afterwards
    assert gc.main(["--out-dir", str(tmp_path)]) == 2
    rows = _rows(tmp_path / gc.ROWS_FILE)
    assert [r["kind"] for r in rows] == ["run", "machine"] and rows[1]["error"] == "no CUDA device visible to torch"


def test_bad_arguments_are_refused():
    for argv in (["--only", "machine,nope"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            gc._parse(argv)


# --------------------------------------------------------------------------- pieces


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_subprocess_past_its_timeout_is_stopped_with_its_children(tmp_path):
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); " \
            "print('grandchild', p.pid, flush=True); time.sleep(120)"
    t0 = time.monotonic()
    res = gc.run_subprocess([sys.executable, "-c", child], 2.0, tmp_path / "log.txt", grace_s=2.0)
    assert res["timed_out"] and time.monotonic() - t0 < 30
    pid = int(re.search(r"grandchild (\d+)", res["tail"]).group(1))  # the log's first line is the command
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the grandchild outlived the timeout"


def test_subprocess_that_finishes_reports_its_status(tmp_path):
    res = gc.run_subprocess([sys.executable, "-c", "print('3 passed, 1 skipped in 0.1s'); raise SystemExit(1)"], 60, tmp_path / "log.txt")
    assert res["returncode"] == 1 and not res["timed_out"]
    assert gc.pytest_counts(res["tail"]) == {"passed": 3, "skipped": 1}
    assert gc.pytest_counts("2 failed, 10 passed, 1 error, 83 deselected in 3.2s") == {"failed": 2, "passed": 10, "error": 1, "deselected": 83}
    assert gc.pytest_counts("no summary") == {}


@pytest.mark.parametrize(
    "name,peak",
    [("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
     ("NVIDIA A100-SXM4-80GB", 2.0e12), ("NVIDIA A100 80GB PCIe", None), ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA L4", None)],
)
def test_peak_bandwidth_by_name(name, peak):
    assert gc.peak_bandwidth(name) == peak


def test_threshold_fit_finds_the_crossover():
    # Triton faster from 40 programs up.
    pts = [(p, 1.0 if p >= 40 else 2.0, 1.5) for p in (5, 10, 20, 40, 80, 160)]
    fit = gc.fit_threshold(pts, current=64)
    assert (fit["suggested"], fit["any_from"], fit["misrouted"], fit["mean_slowdown"]) == (40, 21, 0, 0.0)
    assert fit["current"]["value"] == 64 and fit["current"]["misrouted"] == 1 and fit["current"]["mean_slowdown"] > 0
    assert gc.fit_threshold([(p, 2.0, 1.0) for p in (5, 50)])["suggested"] is None  # torch always faster: never Triton
    always = gc.fit_threshold([(p, 1.0, 2.0) for p in (5, 50)])
    assert (always["suggested"], always["any_from"]) == (5, 0)
    assert gc.fit_threshold([])["suggested"] is None


def test_interleave_samples_every_list():
    assert gc.interleave([1, 2, 3], [4], []) == [1, 4, 2, 3]


def test_gradient_flops_follow_the_cost_rule():
    pytest.importorskip("triton")
    assert gc.gradient_form(128, 576, 1536) == "gram" and gc.gradient_flops(2, 128, 576, 1536) == 2 * 2 * 128 * 128 * (576 + 1536)
    assert gc.gradient_form(2048, 576, 1536) == "direct" and gc.gradient_flops(1, 2048, 576, 1536) == 2 * 2048 * 576 * 1536


# --------------------------------------------------------------------------- the plan


def test_both_plans_name_test_files_that_exist():
    for plan in (gc.full_plan(), gc.smoke_plan()):
        assert plan.pytest_files and all((ROOT / f).is_file() for f in plan.pytest_files), plan.pytest_files


def test_full_plan_fits_the_budget_and_the_card():
    plan = gc.full_plan()
    assert sum(s.min_s for s in gc.SECTIONS) <= gc.DEFAULT_BUDGET_S / 2
    assert gc.SECTIONS[-1].name == "native_tests" and not gc.SECTIONS[-1].on_device
    assert gc.DEFAULT_BUDGET_S + 100 < 600  # the hang watchdog fires inside a 10-minute device call
    sizes = list(plan.bandwidth_projected) + list(plan.sweep_projected)
    biggest = max(b * t * (m + r) for b, t, m, r in sizes) * 2  # bf16
    biggest = max(biggest, max(b * t * (m + n) for b, t, m, n in list(plan.tflops_gradient) + list(plan.sweep_gradient)) * 2)
    assert biggest <= 4 * 2**30  # the torch path's float32 copy doubles it; far inside 80 GB cards too


def test_full_plan_sweeps_launches_on_both_sides_of_the_threshold():
    pytest.importorskip("triton")
    from domlora_kernels import ops

    pe, ge = ops._kernels()
    plan = gc.full_plan()
    proj = [pe.num_programs((b, t, m), r, b) for b, t, m, r in plan.sweep_projected]
    grad = [ge.num_programs(t, m, n, b) for b, t, m, n in plan.sweep_gradient]
    for counts in (proj, grad):
        assert min(counts) < ops.AUTO_MIN_PROGRAMS / 4 and max(counts) > ops.AUTO_MIN_PROGRAMS * 4
    forms = {gc.gradient_form(t, m, n) for _, t, m, n in list(plan.tflops_gradient) + list(plan.sweep_gradient)}
    assert forms == {"gram", "direct"}


# --------------------------------------------------------------------------- every section on the CPU


def test_cpu_smoke_walks_every_section(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = _rows(tmp_path / gc.ROWS_FILE)
    assert [r["kind"] for r in rows[:2]] == ["run", "machine"] and rows[-1]["kind"] == "summary"
    status = {r["section"]: r["status"] for r in rows if r["kind"] == "section"}
    assert list(status) == [s.name for s in gc.SECTIONS]
    assert all(st == "ok" for st in status.values()), status
    checks = [r for r in rows if r["kind"] == "check"]
    assert checks and all(r["passed"] for r in checks)
    assert {r["section"] for r in checks} >= {"kernels_vs_bmm", "probe_tiny", "probe_smollm2", "native_tests"}
    cases = [r for r in rows if r["kind"] == "case"]
    assert {r["section"] for r in cases} == {"projected_bandwidth", "weight_grad_tflops", "auto_threshold"}
    assert all("us" in p for r in cases for p in r["providers"].values())
    assert {r["op"] for r in rows if r["kind"] == "fit"} == {"projected", "gradient", "both"}
    summary = json.loads((tmp_path / gc.SUMMARY_FILE).read_text())
    assert summary["ok"] and summary["complete"] and all(rows[-1][k] == v for k, v in summary.items())
    assert {k.split()[0] for k in summary["worst_rel_err_vs_float64"]} == {"projected", "gradient"}
    assert "1 passed" in (tmp_path / gc.PYTEST_LOG).read_text()
