"""Compile the Triton kernels for real GPU targets on any machine, and read their resources.

The CPU interpreter accepts what a real compile rejects (``tl.dot`` shape and dtype rules,
shared-memory limits) and says nothing about registers or spills. Triton compiles to a
cubin without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``
runs the whole pipeline with the ``ptxas`` it bundles, and the bundled ``cuobjdump
--dump-resource-usage`` reads registers, stack (where ``ptxas`` spills), local memory and
static shared memory from the cubin.

The variants are the launch configurations the launchers can produce, as each kernel module
lists them (``compile_variants()``), in two layouts: ``contig`` (inner strides 1 and
16-byte-aligned pointers, which Triton specializes on at launch: what the probe passes) and
``strided`` (no specialization: any view).

Compiling needs ``@triton.jit`` kernels, not interpreted ones: run this in a process
without ``TRITON_INTERPRET`` (``python -m benchmarks.compile_check [CAP ...]``
prints JSON for the targets the bundled ``ptxas`` supports;
tests/ops/test_kernel_compile.py and ``python -m benchmarks.kernel_resources`` run it that way).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

from domlora_kernels.ops.triton_common import Variant

# Per-SM limits of the targets (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): 64 Ki 32-bit registers, at most 2048 resident threads and 32
# resident blocks, and the shared memory a block may use (1 KiB of each block's share is
# reserved by the system).
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024),
    90: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024),
    100: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024),
}
TARGETS = (80, 90, 100)
# The ``strided`` layout differs from ``contig`` only in address arithmetic; the test
# compiles it for sm_90, the target of the occupancy goal, benchmarks/kernel_resources.py
# for every target.
STRIDED_TARGETS = (90,)

_PTR_TYPES = {"f32": "*fp32", "bf16": "*bf16", "f16": "*fp16"}


def _jit_fn(kernel: str):
    import importlib

    mod, attr = kernel.split(":")
    return getattr(importlib.import_module(f"domlora_kernels.ops.{mod}"), attr)


def _signature(fn, v: Variant, layout: str):
    sig, consts, attrs = {}, dict(v.constexprs), {}
    pointers = iter(v.dtypes)
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ("cu_ptr", "ids_ptr"):
            sig[p.name] = "*i32"
        elif p.name in ("part_ptr", "out_ptr"):
            sig[p.name] = "*fp32"
        elif p.name.endswith("_ptr"):
            sig[p.name] = _PTR_TYPES[next(pointers)]
        elif layout == "contig" and p.name in v.inner:
            sig[p.name], consts[p.name] = "constexpr", 1
            continue
        else:
            sig[p.name] = "i32"
        if layout == "contig" and sig[p.name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(v: Variant, layout: str, cap: int) -> dict:
    """Compile ``v`` for ``sm_<cap>``; its resources, or ``{"error": ...}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(v.kernel)
    row = dict(variant=v.name(layout), kernel=v.kernel.split(":")[1], target=f"sm_{cap}", num_warps=v.num_warps)
    sig, consts, attrs = _signature(fn, v, layout)
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": v.num_warps})
    except Exception as e:  # a compile error is the finding: report it, do not stop
        return dict(row, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    regs, stack, shared, local = map(int, _USAGE.search(out).groups())
    shared += k.metadata.shared  # static (cuobjdump) + dynamic (Triton's buffers)
    return dict(row, regs=regs, stack=stack, local=local, shared=shared,
                programs_per_sm=programs_per_sm(regs, v.num_warps, shared, cap))


def programs_per_sm(regs: int, num_warps: int, shared: int, cap: int) -> int:
    """Resident programs (blocks) per SM: the tightest of registers, threads, blocks and
    shared memory. Registers are allocated per warp in units of 256 (8 per thread)."""
    lim = SM_LIMITS[cap]
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * num_warps) if regs else lim["blocks"]
    by_threads = lim["threads"] // (32 * num_warps)
    by_smem = lim["smem"] // (shared + 1024)
    return min(by_regs, by_threads, by_smem, lim["blocks"])


def all_variants() -> list[Variant]:
    """Every launch configuration of every kernel module, deduplicated."""
    from domlora_kernels.ops import projected_energy_triton as pe
    from domlora_kernels.ops import weight_grad_energy_triton as ge

    return list(dict.fromkeys([*pe.compile_variants(), *ge.compile_variants()]))


def supported_targets(wanted=TARGETS) -> tuple[int, ...]:
    """The targets of ``wanted`` that the bundled ``ptxas`` for each can compile for."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = []
    for cap in wanted:
        path = get_ptxas(cap).path
        help_text = subprocess.run([path, "--help"], capture_output=True, text=True).stdout if path else ""
        if f"sm_{cap}" in help_text:
            out.append(cap)
    return tuple(out)


def _job(args):
    v, layout, cap = args
    return compile_one(v, layout, cap)


def compile_all(targets=TARGETS, strided_targets=STRIDED_TARGETS, jobs: int | None = None) -> list[dict]:
    """Resources of every variant in the ``contig`` layout for each of ``targets`` and in
    the ``strided`` one for each of ``strided_targets``, in a fixed order. Uses Triton's
    on-disk cache, so a second run recompiles nothing."""
    work = [(v, "contig", cap) for v in all_variants() for cap in targets]
    work += [(v, "strided", cap) for v in all_variants() for cap in strided_targets]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    if jobs == 1:
        return [_job(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_job, work, chunksize=4))


def main_refuses_interpreter() -> bool:
    """True (with a message on stderr) when ``TRITON_INTERPRET`` is set: interpreted
    kernels cannot be compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled to cubins", file=sys.stderr)
    return True


def main(argv: list[str]) -> int:
    if main_refuses_interpreter():
        return 2
    targets = supported_targets(tuple(int(a) for a in argv) or TARGETS)
    json.dump(compile_all(targets, tuple(t for t in STRIDED_TARGETS if t in targets)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
