"""Every Triton kernel variant compiles for real GPU targets, without spills, within a
register budget: checked on any machine, no GPU needed.

The interpreter that runs the other kernel tests on the CPU accepts what a real compile
rejects (``tl.dot`` shape and dtype rules, shared-memory limits) and cannot see registers
or spills. ``benchmarks.compile_check`` compiles each launch configuration the
launchers can produce (every tile set, f32 / bf16 / f16 / mixed inputs, padded, varlen,
segment ids, split over tokens) to a cubin with Triton's bundled ``ptxas`` and reads its
resources with the bundled ``cuobjdump``. conftest.py sets ``TRITON_INTERPRET=1`` for this
process on CPU-only machines, and interpreted kernels cannot be compiled, so the compiles
run once per pytest run in a subprocess without it (in parallel; Triton's on-disk cache
makes later runs fast). benchmarks/kernel_resources.py prints the same data as a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Registers per thread. The kernels are memory-bound at every tile (the roofline in
# benchmarks/kernel_resources.py), so what they need is enough resident programs to hide
# memory latency: at <= 128 registers, 4 programs of 4 warps fit in an SM's 64 Ki
# registers (65536 / (128 * 32 * 4) = 4) on sm_80, sm_90 and sm_100. Before this budget
# the kernels used 241-255 (two programs per SM) and some spilled.
REGISTER_BUDGET = 128
MIN_PROGRAMS_PER_SM = 4

TARGETS = (80, 90, 100)


@pytest.fixture(scope="module")
def resources():
    """One row per (variant, layout, target), compiled once for this module."""
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"the compile API used here is that of triton >= 3.9; this is triton {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", *map(str, TARGETS)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_every_target_and_variant_was_compiled(resources):
    from benchmarks import compile_check

    n_variants = len(compile_check.all_variants())
    assert n_variants >= 60
    # sm_80 and sm_90 always; sm_100 where the bundled ptxas supports it (triton 3.9's does).
    targets = compile_check.supported_targets(TARGETS)
    assert {80, 90} <= set(targets)
    for cap in targets:
        rows = [r for r in resources if r["target"] == f"sm_{cap}"]
        layouts = 2 if cap in compile_check.STRIDED_TARGETS else 1
        assert len(rows) == n_variants * layouts, f"sm_{cap}: {len(rows)} rows for {n_variants} variants"
    kinds = {r["variant"].split()[0] for r in resources}
    assert kinds == {"projected", "gram"}
    assert any("split varlen" in r["variant"] for r in resources)
    assert any("varlen ids" in r["variant"] for r in resources)


def test_no_compile_errors(resources):
    errors = [f"{r['variant']} {r['target']}: {r['error']}" for r in resources if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_spills(resources):
    # ptxas puts spilled registers in the stack frame (STACK), not only in LOCAL.
    spills = [f"{r['variant']} {r['target']}: stack {r['stack']} B, local {r['local']} B"
              for r in resources if "error" not in r and r["stack"] + r["local"]]
    assert not spills, "\n".join(spills)


def test_registers_within_budget(resources):
    over = [f"{r['variant']} {r['target']}: {r['regs']} registers"
            for r in resources if "error" not in r and r["regs"] > REGISTER_BUDGET]
    assert not over, f"over the budget of {REGISTER_BUDGET}:\n" + "\n".join(over)


def test_common_configs_fit_four_programs_per_sm(resources):
    # The occupancy goal: bf16 and f16, R <= 64 (every projected tile), 4 warps, sm_90.
    rows = [r for r in resources if "error" not in r and r["target"] == "sm_90"
            and r["variant"].split()[-2] in ("bf16", "f16")]
    assert rows
    low = [f"{r['variant']}: {r['programs_per_sm']}" for r in rows
           if r["num_warps"] != 4 or r["programs_per_sm"] < MIN_PROGRAMS_PER_SM]
    assert not low, "\n".join(low)


def test_occupancy_arithmetic():
    from benchmarks.compile_check import programs_per_sm

    assert programs_per_sm(128, 4, 10_000, 90) == 4
    assert programs_per_sm(129, 4, 10_000, 90) == 3  # 136 allocated: 65536 // (136 * 128)
    assert programs_per_sm(255, 4, 10_000, 90) == 2
    assert programs_per_sm(32, 4, 10_000, 90) == 16  # threads: 2048 / 128
    assert programs_per_sm(32, 4, 60_000, 90) == 3  # shared memory: 228 KiB / 61 KB
