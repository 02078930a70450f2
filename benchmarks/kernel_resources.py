"""Registers, spills and shared memory of every Triton kernel variant, compiled on the CPU.

From the repository root:
    python -m benchmarks.kernel_resources                 # sm_80, sm_90, sm_100
    python -m benchmarks.kernel_resources --targets 90 --out /tmp/r.txt

Compiles each launch configuration the launchers can produce
(``benchmarks.compile_check``) for each target with Triton's bundled ``ptxas``
(inputs with unit inner strides on every target, any strides on sm_90: the set
tests/ops/test_kernel_compile.py checks, so each warms the other's cache),
and prints one row per (variant, target): registers per thread, spill bytes per thread
(``STACK`` + ``LOCAL``: ``ptxas`` puts spilled registers in the stack frame), shared memory
per program, and how many programs of that many warps fit on one SM. Writes the table to
benchmarks/results/kernel_resources.txt with the machine line. No GPU needed; run without
``TRITON_INTERPRET``. Triton's on-disk cache makes a second run fast.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'variant':<58} {'target':<6} {'warps':>5} {'regs':>4} {'spill B':>7} {'smem B':>7} {'progs/SM':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<58} {r['target']:<6} COMPILE ERROR {r['error']}")
            continue
        lines.append(
            f"{r['variant']:<58} {r['target']:<6} {r['num_warps']:>5} {r['regs']:>4} "
            f"{r['stack'] + r['local']:>7} {r['shared']:>7} {r['programs_per_sm']:>8}"
        )
    return lines


def summary(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    spilled = [r for r in ok if r["stack"] + r["local"]]
    out = [f"{len(rows)} compiles, {len(rows) - len(ok)} errors, {len(spilled)} with spills"]
    for tgt in sorted({r["target"] for r in ok}):
        sub = [r for r in ok if r["target"] == tgt]
        out.append(
            f"{tgt}: registers {min(r['regs'] for r in sub)}-{max(r['regs'] for r in sub)}, "
            f"programs/SM {min(r['programs_per_sm'] for r in sub)}-{max(r['programs_per_sm'] for r in sub)}"
        )
    return out


def machine_line() -> str:
    import triton
    import torch

    return (f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} "
            f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__}; "
            f"compiled on the CPU with Triton's bundled ptxas, no GPU involved")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, nargs="+", default=None, help="compute capabilities (default 80 90 100)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kernel_resources.txt"))
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    args = ap.parse_args()
    from benchmarks import compile_check

    if compile_check.main_refuses_interpreter():
        return 2
    t0 = time.perf_counter()
    targets = compile_check.supported_targets(tuple(args.targets or compile_check.TARGETS))
    strided = tuple(t for t in compile_check.STRIDED_TARGETS if t in targets)
    rows = compile_check.compile_all(targets, strided_targets=strided, jobs=args.jobs)
    lines = [machine_line(), *summary(rows), "", *table(rows), *roofline_lines()]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


# Peak rates (vendor datasheets): HBM bandwidth, dense bf16/f16 tensor-core FLOP/s, and
# float32 FMA FLOP/s (a float32 "ieee" dot runs on the FMA units, not the tensor cores).
CARDS = {
    "H100 SXM": dict(bw=3.35e12, tensor=989e12, fma32=67e12),
    "H200": dict(bw=4.8e12, tensor=989e12, fma32=67e12),
}


def _bound(intensity: float, f32_dot: bool) -> str:
    cells = []
    for card, c in CARDS.items():
        ridge = (c["fma32"] if f32_dot else c["tensor"]) / c["bw"]
        cells.append(f"{card} ridge {ridge:5.0f}: {'memory' if intensity < ridge else 'compute'}")
    return "; ".join(cells)


def roofline_lines(T: int = 4096, K: int = 4096) -> list[str]:
    """Per program: bytes it reads against the FLOPs of its dots, at the tiles the launchers
    use, over a segment of ``T`` tokens (Gram: over ``K`` = M + N features)."""
    from domlora_kernels.ops import projected_energy_triton as pe
    from domlora_kernels.ops import weight_grad_energy_triton as ge

    out = ["", f"roofline per program (T={T} tokens; Gram over M+N={K} features); FLOP/B vs each card's ridge point",
           f"{'program':<44} {'bytes read':>11} {'FLOPs':>11} {'FLOP/B':>6}  bound"]
    for r in (8, 16, 32, 64, 128):
        for name, e, f32 in (("bf16/f16", 2, False), ("f32", 4, True)):
            bt, bm, br = pe._tiles(r, f32)
            nbytes, flops = T * (bm + br) * e, 2 * T * bm * br
            out.append(f"{f'projected/direct R={r} {name} BM{bm} BR{br}':<44} {nbytes:>11,} {flops:>11,} "
                       f"{flops / nbytes:>6.1f}  {_bound(flops / nbytes, f32)}")
    for name, e, f32 in (("bf16/f16", 2, False), ("f32", 4, True)):
        bt = ge._GRAM_TILES["BT"]
        nbytes, flops = 2 * bt * K * e, 2 * bt * bt * K
        out.append(f"{f'gram {name} BT{bt}':<44} {nbytes:>11,} {flops:>11,} {flops / nbytes:>6.1f}  {_bound(flops / nbytes, f32)}")
    out.append("Per program, without reuse through L2. A launch's programs share inputs through L2 (the "
               "direct form over M x N tiles re-reads d and x), so a big direct or Gram launch can be "
               "compute-bound as a whole; gpu_check.py measures that.")
    out.append("Every program is memory-bound on both cards: a bigger tile would raise FLOP/B but not "
               "reach a ridge, so tiles are sized for occupancy (programs resident per SM to hide "
               "memory latency), not for reuse. Split over tokens adds BM*BR*4 bytes written per "
               "chunk of >= 512 tokens (<= 1/8 of its reads).")
    return out


if __name__ == "__main__":
    sys.exit(main())
