"""Worst relative error of both ops against float64, per input dtype and backend.

    python -m benchmarks.kernel_accuracy        # from the repository root; writes benchmarks/results/kernel_accuracy.txt

For each dtype (float32, bfloat16, float16), each op (``projected_energy``,
``weight_grad_energy``) and each backend (``torch``; ``triton``, and for the projected op
``triton`` split over tokens), over a fixed set of shapes (padded and packed, both Gram and
direct forms) and seeds 0-2: the worst ``||out - ref|| / ||ref||`` over the whole result
vector, where ``ref`` is the torch reference in float64 on the same rounded inputs, so the
figure is the op's own error, not the inputs' rounding. On a machine without CUDA the
Triton kernels run through Triton's interpreter (set here, before anything imports
triton), whose ``tl.dot`` multiplies in float32; on a GPU they run natively.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from domlora_kernels import ops  # noqa: E402  (after TRITON_INTERPRET is settled)
from domlora_kernels.ops.naive import projected_energy_ref, weight_grad_energy_ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = (0, 1, 2)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# (rows, M, K): padded [B, T] or packed segment lengths; K is R (projected) or N (gradient).
PROJECTED = [((3, 63), 1000, 3), ((2, 130), 257, 17), ((1, 200), 96, 64), ([0, 1, 17, 64, 130], 300, 8)]
GRADIENT = [((3, 63), 100, 70), ((2, 130), 600, 600), ((2, 1), 1000, 3), ([0, 1, 5, 40, 31, 33, 100], 64, 64)]
SPLIT_CHUNK = 32


def _inputs(rows, m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    packed = isinstance(rows, list)
    lead = (sum(rows),) if packed else rows
    a = torch.randn(*lead, m, generator=g).to(dtype=dtype, device=DEVICE)
    b = torch.randn(*lead, k, generator=g).to(dtype=dtype, device=DEVICE)
    cu = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE) if packed else None
    return a, b, cu


def _rel(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _split(u, v, cu):
    from domlora_kernels.ops.projected_energy_triton import projected_energy_triton

    return projected_energy_triton(u, v, cu, chunk=SPLIT_CHUNK)


def worst(op: str, provider: str, dtype) -> float:
    fn, ref_fn, cases = {
        "projected": (ops.projected_energy, projected_energy_ref, PROJECTED),
        "gradient": (ops.weight_grad_energy, weight_grad_energy_ref, GRADIENT),
    }[op]
    errs = []
    for rows, m, k in cases:
        for seed in SEEDS:
            a, b, cu = _inputs(rows, m, k, dtype, seed)
            ref = ref_fn(a.double(), b.double(), cu)
            out = _split(a, b, cu) if provider == "triton-split" else fn(a, b, cu, backend=provider)
            errs.append(_rel(out, ref))
    return max(errs)


def machine_line() -> str:
    import triton

    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU {platform.processor() or platform.machine()}, Triton interpreter"
    return f"machine: {platform.node()} {dev}; python {platform.python_version()} torch {torch.__version__} triton {triton.__version__}"


def main() -> int:
    lines = [machine_line(), f"worst relative L2 error vs float64 over {len(SEEDS)} seeds; shapes: "
             f"projected {PROJECTED}, gradient {GRADIENT} ((B, T) padded, [lengths] packed)",
             f"{'op':<10} {'backend':<13} " + " ".join(f"{d:>9}" for d in DTYPES)]
    for op, providers in (("projected", ("torch", "triton", "triton-split")), ("gradient", ("torch", "triton"))):
        for p in providers:
            cells = " ".join(f"{worst(op, p, dt):>9.1e}" for dt in DTYPES.values())
            lines.append(f"{op:<10} {p:<13} {cells}")
            print(lines[-1], flush=True)
    out = os.path.join(ROOT, "benchmarks", "results", "kernel_accuracy.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
