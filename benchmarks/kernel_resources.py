"""Registers, spills and shared memory of every Triton kernel variant, compiled on the CPU.

    python benchmarks/kernel_resources.py                 # sm_80, sm_90, sm_100
    python benchmarks/kernel_resources.py --targets 90 --out /tmp/r.txt

Compiles each launch configuration the launchers can produce
(``domlora_kernels.ops.compile_check``) for each target with Triton's bundled ``ptxas`` (inputs
with unit inner strides, and any strides, on every target),
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
sys.path.insert(0, ROOT)


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
    from domlora_kernels.ops import compile_check

    if compile_check.main_refuses_interpreter():
        return 2
    t0 = time.perf_counter()
    targets = compile_check.supported_targets(tuple(args.targets or compile_check.TARGETS))
    rows = compile_check.compile_all(targets, strided_targets=targets, jobs=args.jobs)
    lines = [machine_line(), *summary(rows), "", *table(rows), *roofline_lines()]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


def roofline_lines() -> list[str]:
    return []


if __name__ == "__main__":
    sys.exit(main())
