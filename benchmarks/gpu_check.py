"""One command for a CUDA machine: kernel tests, then timings of the fused kernels.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--quick]

1. Runs ``pytest -m "gpu or not gpu" tests/test_ops_triton.py`` (compiled kernels on the GPU).
2. Times, on bfloat16 inputs of real model sizes (M, N from 576 to 14336, T up to 8192,
   R 8 to 64), three providers on the same inputs:
   ``triton`` (backend="triton"), ``torch`` (backend="torch", the bmm reference, the
   baseline of the ratios) and ``read`` (``a.sum() + b.sum()``: a plain read of the same
   bytes, the floor a memory-bound kernel can approach).
   Median of ``--reps`` runs after ``--warmup``, each bracketed by CUDA events, with the
   L2 cache flushed before each run. Bandwidth = bytes of the two inputs / time.
3. Measures the kernels' relative error ``||out - ref|| / ||ref||`` against the float64
   reference per dtype (float32, bfloat16, float16), to set the tolerances in
   tests/test_ops_triton.py from GPU numbers.
4. Reports, per size, the programs of the launch, which backend was faster and what
   ``backend="auto"`` picks, and suggests ``ops.AUTO_MIN_PROGRAMS`` from that.
5. Writes everything, with the GPU name and torch / triton versions, as JSON to ``--out``.

Exits 2 without CUDA, 1 if the tests failed (the timings still run and are written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Peak HBM bandwidth, bytes/s, from the vendors' datasheets. First row whose substrings
# all occur in torch.cuda.get_device_name() wins, so specific rows come first.
PEAK_BANDWIDTH = [
    (("B200",), 8.0e12),
    (("H200",), 4.8e12),
    (("H100", "NVL"), 3.9e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100",), 3.35e12),  # SXM
    (("A100", "PCIE", "80GB"), 1.935e12),
    (("A100", "80GB"), 2.039e12),  # SXM
    (("A100",), 1.555e12),  # 40GB
    (("L40",), 0.864e12),  # L40 and L40S
    (("A10G",), 0.6e12),
    (("RTX 4090",), 1.008e12),
    (("L4",), 0.3e12),
]

# (B, T, M, R): M is the module's output width (projection A reads D [B, T, M] and
# P [B, T, R]); widths of SmolLM2-135M (576, 1536), Qwen2.5-0.5B (896, 4864),
# Llama-3.2-1B (2048, 8192) and Llama-3-8B (4096, 14336); 8192 tokens per batch.
PROJECTED_SIZES = [
    (b, t, m, r)
    for m in (576, 1536, 4096, 8192, 14336)
    for (b, t) in ((1, 8192), (8, 1024))
    for r in (8, 16, 64)
] + [(32, 256, 4096, 16), (2, 4096, 896, 8), (4, 2048, 4864, 16)]
PROJECTED_QUICK = [(1, 8192, 576, 8), (8, 1024, 4096, 16), (1, 8192, 14336, 64), (32, 256, 4096, 16)]

# Packed: (segment lengths, M, R); uneven lengths as a varlen batch has them.
PACKED_SIZES = [
    ([3000, 17, 1, 0, 2048, 900, 2226], 4096, 16),
    ([512] * 16, 14336, 8),
]

# (B, T, M, N) for the full-gradient energy: both forms (Gram when T < M N / (M + N)).
GRADIENT_SIZES = [
    (8, 256, 4096, 4096),  # Gram
    (2, 1024, 4096, 14336),  # Gram
    (16, 128, 576, 1536),  # Gram
    (1, 4096, 4096, 4096),  # direct
    (1, 8192, 576, 1536),  # direct
    (2, 2048, 896, 4864),  # direct
]
GRADIENT_QUICK = [(8, 256, 4096, 4096), (1, 4096, 4096, 4096)]

ACCURACY_DTYPES = ("float32", "bfloat16", "float16")


def peak_bandwidth(name: str) -> float | None:
    for keys, peak in PEAK_BANDWIDTH:
        if all(k.lower() in name.lower() for k in keys):
            return peak
    return None


def bench(fn, warmup: int, reps: int, flush: torch.Tensor) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()  # evict the inputs from L2 so each run reads them from HBM
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_extra_memory(fn) -> int:
    """Bytes ``fn()`` allocates above what was already allocated."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def run_tests() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "tests/test_ops_triton.py", "-m", "gpu or not gpu", "-q", "-rs"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(res.stdout[-6000:], res.stderr[-3000:], sep="\n", flush=True)
    return {"returncode": res.returncode, "seconds": round(time.perf_counter() - t0, 1), "tail": res.stdout[-3000:]}


def time_case(kind: str, a, b, cu, args, flush, peak) -> dict:
    from domlora_kernels import ops

    fn = ops.projected_energy if kind == "projected" else ops.weight_grad_energy
    providers = {
        "triton": lambda: fn(a, b, cu, backend="triton"),
        "torch": lambda: fn(a, b, cu, backend="torch"),
        "read": lambda: a.sum() + b.sum(),
    }
    nbytes = a.numel() * a.element_size() + b.numel() * b.element_size()
    row = {"bytes": nbytes}
    for name, f in providers.items():
        try:
            s = bench(f, args.warmup, args.reps, flush)
            row[name] = {
                "seconds": s,
                "GB_per_s": nbytes / s / 1e9,
                "fraction_of_peak": (nbytes / s / peak) if peak else None,
                "peak_extra_bytes": peak_extra_memory(f),
            }
        except torch.OutOfMemoryError:
            row[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
    if "seconds" in row["triton"] and "seconds" in row["torch"]:
        row["speedup_vs_torch"] = row["torch"]["seconds"] / row["triton"]["seconds"]
    row["rel_err_vs_torch"] = rel_err(providers["triton"](), providers["torch"]())
    row["auto_picks_triton"] = ops._auto_uses_triton(kind, a, b, cu)
    pe, ge = ops._kernels()
    n_seg = a.shape[0] if cu is None else cu.numel() - 1
    if kind == "projected":
        row["programs"] = pe.num_programs(tuple(a.shape), b.shape[-1], n_seg)
    else:
        t = a.shape[1] if cu is None else a.shape[0] // max(n_seg, 1)
        row["programs"] = ge.num_programs(t, a.shape[-1], b.shape[-1], n_seg)
        row["form"] = "gram" if ge.uses_gram(t, a.shape[-1], b.shape[-1]) else "direct"
    return row


def print_row(label: str, row: dict) -> None:
    def cell(p):
        r = row[p]
        if "error" in r:
            return f"{p} {r['error']:>10}"
        frac = f" {100 * r['fraction_of_peak']:5.1f}%" if r["fraction_of_peak"] is not None else ""
        return f"{p} {1e6 * r['seconds']:9.1f} us {r['GB_per_s']:7.0f} GB/s{frac}"

    speed = f"x{row['speedup_vs_torch']:6.2f}" if "speedup_vs_torch" in row else "   n/a "
    auto = "triton" if row["auto_picks_triton"] else "torch"
    print(f"{label:<34} {cell('triton')} | {cell('torch')} | {cell('read')} | {speed} "
          f"progs {row['programs']:6d} auto {auto:<6} err {row['rel_err_vs_torch']:.1e}", flush=True)


def accuracy(kind: str, sizes, device) -> dict:
    """Worst relative error against the float64 reference, per input dtype."""
    from domlora_kernels import ops
    from domlora_kernels.ops.naive import weight_grad_energy_ref, projected_energy_ref

    fn, ref_fn = (ops.projected_energy, projected_energy_ref) if kind == "projected" else (ops.weight_grad_energy, weight_grad_energy_ref)
    worst = {}
    for dt_name in ACCURACY_DTYPES:
        dt = getattr(torch, dt_name)
        errs = []
        for i, (bsz, t, m, k) in enumerate(sizes):
            g = torch.Generator(device=device).manual_seed(i)
            a = torch.randn(bsz, t, m, device=device, generator=g).to(dt)
            b = torch.randn(bsz, t, k, device=device, generator=g).to(dt)
            errs.append(rel_err(fn(a, b, backend="triton"), ref_fn(a.double(), b.double())))
            del a, b
        worst[dt_name] = max(errs)
    return worst


def suggest_threshold(rows: list[dict]) -> dict:
    """The AUTO_MIN_PROGRAMS that misroutes the fewest measured sizes."""
    pts = [(r["programs"], r["speedup_vs_torch"] > 1.0) for r in rows if "speedup_vs_torch" in r]
    best = None
    for cand in sorted({p for p, _ in pts} | {0, 10**12}):
        wrong = sum((p >= cand) != faster for p, faster in pts)
        if best is None or wrong < best[1]:
            best = (cand, wrong)
    return {"AUTO_MIN_PROGRAMS": best[0], "misrouted": best[1], "of": len(pts)} if best else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"),
                    help="where to write the JSON results (default: benchmarks/results/gpu_check.json)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs before timing (default 5)")
    ap.add_argument("--reps", type=int, default=20, help="timed runs; the median is kept (default 20)")
    ap.add_argument("--quick", action="store_true", help="a few sizes only (a smoke run, ~1 minute)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the pytest part")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "run this on a machine with an NVIDIA GPU. The CPU tests run with plain pytest.", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile them
    import triton

    from domlora_kernels import ops

    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    result = {
        "gpu": name,
        "peak_bandwidth_bytes_per_s": peak,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "timing": {"warmup": args.warmup, "reps": args.reps, "statistic": "median", "l2_flushed": True},
        "auto_min_programs_in_use": ops.AUTO_MIN_PROGRAMS,
    }
    print(f"GPU: {name}; peak {peak / 1e12 if peak else float('nan'):.2f} TB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)

    rc = 0
    if not args.skip_tests:
        result["tests"] = run_tests()
        rc = 1 if result["tests"]["returncode"] != 0 else 0

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # > L2 of any card listed
    dt = torch.bfloat16
    rows_by_kind = {"projected": [], "gradient": []}

    print("\n== projected_energy, bfloat16 (u [B,T,M], v [B,T,R]); speedup = torch time / triton time", flush=True)
    for bsz, t, m, r in PROJECTED_QUICK if args.quick else PROJECTED_SIZES:
        u = torch.randn(bsz, t, m, device=device, dtype=dt)
        v = torch.randn(bsz, t, r, device=device, dtype=dt)
        row = {"B": bsz, "T": t, "M": m, "R": r, **time_case("projected", u, v, None, args, flush, peak)}
        print_row(f"B{bsz}-T{t}-M{m}-R{r}", row)
        rows_by_kind["projected"].append(row)
        del u, v
    for lens, m, r in [] if args.quick else PACKED_SIZES:
        n = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        u = torch.randn(n, m, device=device, dtype=dt)
        v = torch.randn(n, r, device=device, dtype=dt)
        row = {"lens": lens, "M": m, "R": r, **time_case("projected", u, v, cu, args, flush, peak)}
        print_row(f"packed{len(lens)}-N{n}-M{m}-R{r}", row)
        rows_by_kind["projected"].append(row)
        del u, v

    print("\n== weight_grad_energy, bfloat16 (d [B,T,M], x [B,T,N])", flush=True)
    for bsz, t, m, n in GRADIENT_QUICK if args.quick else GRADIENT_SIZES:
        d = torch.randn(bsz, t, m, device=device, dtype=dt)
        x = torch.randn(bsz, t, n, device=device, dtype=dt)
        row = {"B": bsz, "T": t, "M": m, "N": n, **time_case("gradient", d, x, None, args, flush, peak)}
        print_row(f"B{bsz}-T{t}-M{m}-N{n}-{row['form']}", row)
        rows_by_kind["gradient"].append(row)
        del d, x
    result["projected_energy"] = rows_by_kind["projected"]
    result["weight_grad_energy"] = rows_by_kind["gradient"]

    print("\n== worst relative error vs the float64 reference, per input dtype", flush=True)
    result["accuracy"] = {
        "projected_energy": accuracy("projected", [(2, 2048, 4096, 16), (1, 8192, 576, 64), (3, 333, 1000, 3)], device),
        "weight_grad_energy": accuracy("gradient", [(2, 256, 2048, 2048), (1, 2048, 576, 1536), (2, 63, 1000, 700)], device),
    }
    for k, v in result["accuracy"].items():
        print(f"{k}: " + ", ".join(f"{dt_name} {e:.1e}" for dt_name, e in v.items()), flush=True)

    result["auto_suggestion"] = {k: suggest_threshold(v) for k, v in rows_by_kind.items()}
    print(f"\nauto: AUTO_MIN_PROGRAMS in use {ops.AUTO_MIN_PROGRAMS}; best fit to these timings: "
          f"{result['auto_suggestion']}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
