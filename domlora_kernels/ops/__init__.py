"""Low-level ops of the probe. The backend is chosen here and nowhere else.

Backends:
- ``"torch"``: the pure-torch reference (``naive.py``); any device, any float dtype.
- ``"triton"``: the fused kernels (``projected_energy_triton.py``,
  ``weight_grad_energy_triton.py``; not ``projected_energy.py``: importing a submodule sets
  the package attribute of its name, which would replace the public function); CUDA
  tensors, or CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is in
  the environment. float32, bfloat16, float16 only.
- ``"auto"`` (default): Triton for CUDA tensors when triton imports and the launch is big
  enough to fill the GPU (:func:`_auto_uses_triton`), else torch. Never the interpreter.

The Triton path of ``projected_energy`` runs in one pass when that launch has at least
``AUTO_MIN_PROGRAMS`` programs, else split over tokens where the segments are long enough
(``projected_energy_triton.split_chunk``). Launches run on the inputs' CUDA device, whatever
the current one.

Triton is imported on first use only, so ``import domlora_kernels`` stays fast and works
without it. ``@triton.jit`` reads ``TRITON_INTERPRET`` each time it decorates a function:
for this package's kernels when the kernel modules are imported (the first triton-backend
call of the process), but for ``triton.language``'s own jitted helpers (``tl.zeros``,
``tl.sum``, ...) at the process's first ``import triton``, which other libraries may do
first: ``torch._dynamo`` imports triton when it is installed, and peft, transformers and
accelerate import ``torch._dynamo``. To run the kernels through the interpreter, set
``TRITON_INTERPRET=1`` before anything imports triton (in the shell, or at the top of a
test ``conftest.py``); a process where the two disagree gets a clear error
(:func:`_check_triton`), not a crash inside the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .naive import weight_grad_energy_ref, projected_energy_ref

__all__ = ["projected_energy", "weight_grad_energy", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A launch of fewer programs than this leaves most SMs idle. The projected kernel then splits
# each segment's tokens over more programs (projected_energy_triton.split_chunk); "auto"
# sends a launch to the torch path when even that stays below it. Above it the kernel reads
# the inputs once, where the torch path first writes a float32 copy of them (and, for
# weight_grad_energy's direct form, a [B, M, N] float32 gradient). 64, about half the SMs
# of an H100/H200, is a first guess, not a measurement: benchmarks/gpu_check.py prints, per
# size, the programs of the launch and which backend was faster, and the threshold that
# fits those timings best; set this from its output.
AUTO_MIN_PROGRAMS = 64


def _check_rows(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, cu_seqlens) -> None:
    want = 2 if cu_seqlens is not None else 3
    if a.dim() != want or b.dim() != want:
        layout = "packed [N, *] with cu_seqlens" if cu_seqlens is not None else "padded [B, T, *]"
        raise ValueError(
            f"{name_a} and {name_b} must both be {want}-D ({layout}); got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must agree on every dim but the last"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; put both on one device")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n_rows: int) -> list[int]:
    # One host read of S + 1 integers (a sync on CUDA): the kernels index memory with these
    # offsets, so they are checked before any launch.
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [S + 1] of segment offsets; got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    offs = cu_seqlens.tolist()
    if offs[0] != 0 or offs[-1] != n_rows or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at the number of rows "
            f"({n_rows}); got {offs[:4]}{'...' if len(offs) > 4 else ''} ending at {offs[-1]}"
        )
    return offs


def _interpret_requested() -> bool:
    # Read at call time; the truthy spellings Triton itself accepts for TRITON_INTERPRET.
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _language_interpreted() -> bool:
    """Whether ``triton.language``'s own ``@triton.jit`` helpers were built for the
    interpreter, i.e. ``TRITON_INTERPRET=1`` was set at the process's first ``import triton``.

    Fixed for the life of the process. An interpreted kernel that calls a compiled helper
    (``tl.zeros``) fails inside the launch with "Cannot call @triton.jit'd outside of the
    scope of a kernel"; a compiled kernel that calls an interpreted one fails to compile.
    """
    import triton
    import triton.language as tl

    return not isinstance(tl.zeros, triton.runtime.JITFunction)


def _kernels():
    """The kernel modules, imported on first use (this applies ``@triton.jit``)."""
    from . import projected_energy_triton as pe
    from . import weight_grad_energy_triton as ge

    return pe, ge


def _check_triton(a: torch.Tensor, b: torch.Tensor) -> None:
    if torch.float64 in (a.dtype, b.dtype):
        raise ValueError(
            "backend='triton' does not take float64 inputs (the kernels accumulate in float32); "
            "use backend='torch' for float64"
        )
    for t in (a, b):
        if t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 inputs; got {t.dtype}")
    if a.device.type != "cuda" and not _interpret_requested():
        raise ValueError(
            f"backend='triton' needs CUDA tensors; these are on {a.device}. Set TRITON_INTERPRET=1 "
            f"in the environment to run the kernels on the CPU through Triton's interpreter (slow, "
            f"for tests), or use backend='torch'"
        )
    if not _triton_importable():
        raise ModuleNotFoundError("backend='triton' needs the triton package: pip install triton")
    pe, ge = _kernels()
    if a.device.type != "cuda" and not (pe.INTERPRETED and ge.INTERPRETED):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after the Triton kernels were compiled for the GPU in "
            "this process (@triton.jit reads it at import); set it in the environment before "
            "the first backend='triton' call"
        )
    kernels_interpreted = pe.INTERPRETED and ge.INTERPRETED
    if _language_interpreted() != kernels_interpreted:
        if kernels_interpreted:
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton was first imported in this process, so "
                "triton.language's own @triton.jit helpers (tl.zeros, tl.sum, ...) were built for "
                "the GPU and the interpreted kernels cannot call them. Something imported triton "
                "before TRITON_INTERPRET=1 was set: torch._dynamo does when triton is installed, "
                "and peft, transformers and accelerate import torch._dynamo. Set TRITON_INTERPRET=1 "
                "in the environment before anything imports triton (in the shell, or at the top of "
                "a test conftest.py)"
            )
        raise RuntimeError(
            "TRITON_INTERPRET=1 was in the environment when triton was first imported in this "
            "process but not when the Triton kernels were, so the compiled kernels would call "
            "triton.language helpers built for the interpreter; keep TRITON_INTERPRET the same "
            "for the whole process"
        )


def _programs(op: str, a: torch.Tensor, b: torch.Tensor, n_seg: int, t_max: int) -> tuple[int, int | None]:
    """(programs, chunk) of the Triton launch: ``chunk`` is the projected kernel's tokens
    per program when it splits over tokens, else ``None``."""
    pe, ge = _kernels()
    if op == "gradient":
        # Packed: estimate with the mean segment length (the launcher splits by length).
        t = a.shape[1] if a.dim() == 3 else a.shape[0] // max(n_seg, 1)
        return ge.num_programs(t, a.shape[-1], b.shape[-1], n_seg), None
    one_pass = pe.num_programs(tuple(a.shape), b.shape[-1], n_seg)
    chunk = pe.split_chunk(t_max, one_pass, AUTO_MIN_PROGRAMS)
    return (one_pass if chunk is None else one_pass * -(-t_max // chunk)), chunk


def _n_segments(a: torch.Tensor, cu_seqlens) -> int:
    return a.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _auto_uses_triton(op: str, a: torch.Tensor, b: torch.Tensor, cu_seqlens, t_max: int | None = None) -> bool:
    """The "auto" rule: Triton for CUDA tensors of a kernel dtype whose launch (split over
    tokens where that helps) has at least ``AUTO_MIN_PROGRAMS`` programs; never the
    interpreter (if ``TRITON_INTERPRET=1`` built the kernels or ``triton.language``, torch).

    ``op`` is ``"projected"`` or ``"gradient"``; ``t_max`` the longest segment (read from
    ``cu_seqlens`` when not given). Exposed for benchmarks/gpu_check.py, which reports where
    it disagrees with measurements.
    """
    if a.device.type != "cuda" or a.dtype not in _KERNEL_DTYPES or b.dtype not in _KERNEL_DTYPES:
        return False
    if not _triton_importable():
        return False
    pe, ge = _kernels()
    if pe.INTERPRETED or ge.INTERPRETED or _language_interpreted():
        return False
    if t_max is None:
        t_max = _longest(a, None if cu_seqlens is None else cu_seqlens.tolist())
    return _programs(op, a, b, _n_segments(a, cu_seqlens), t_max)[0] >= AUTO_MIN_PROGRAMS


def _resolve(op: str, backend: str, a: torch.Tensor, b: torch.Tensor, cu_seqlens, t_max: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        _check_triton(a, b)
        return "triton"
    if backend == "auto" and _auto_uses_triton(op, a, b, cu_seqlens, t_max):
        return "triton"
    return "torch"


def _longest(a: torch.Tensor, offs: list[int] | None) -> int:
    if offs is None:
        return a.shape[1]
    return max((e - s for s, e in zip(offs, offs[1:])), default=0)


def _prepare(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, cu_seqlens) -> int:
    """Checks the inputs; returns the longest segment's length (``T`` when padded)."""
    _check_rows(name_a, a, name_b, b, cu_seqlens)
    offs = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, a.shape[0])
    return _longest(a, offs)


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device; inputs on another GPU must not run there.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _kernel_cu(cu_seqlens, device: torch.device):
    # The kernels read int32 offsets from the inputs' device; a no-op when already so.
    if cu_seqlens is None:
        return None
    return cu_seqlens.to(device=device, dtype=torch.int32).contiguous()


def projected_energy(u: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
                     backend: str = "auto", groups: int = 1) -> torch.Tensor:
    """Per-sample ``|| u_s^T v_s ||_F^2`` without a weight gradient.

    Args:
        u: ``[B, T, M]`` or packed ``[N, M]`` (projection A: the output gradient ``D``).
        v: ``[B, T, R]`` or packed ``[N, R]`` (projection A: ``P = X A^T``).
        cu_seqlens: ``None`` for padded inputs, else int32 ``[S + 1]`` segment offsets.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).
        groups: ``g`` dividing ``R``: the energy of each block of ``R / g`` columns of ``v``
            separately (the probe's seeds, stacked). The torch path reads ``u`` once; the
            Triton path launches once per block.

    Returns:
        float32 ``[B]`` (``[S]``), or ``[g, B]`` for ``groups=g > 1``; float64 for float64
        inputs (torch backend).

    Example:
        >>> u, v = torch.randn(2, 5, 7), torch.randn(2, 5, 3)
        >>> projected_energy(u, v).shape
        torch.Size([2])
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or v.shape[-1] % groups:
        raise ValueError(f"groups must be a positive integer dividing v's last dimension {v.shape[-1]}, got {groups!r}")
    t_max = _prepare("u", u, "v", v, cu_seqlens)
    if _resolve("projected", backend, u, v, cu_seqlens, t_max) == "triton":
        if groups > 1:  # one launch per block of columns
            w = v.shape[-1] // groups
            return torch.stack([projected_energy(u, v[..., j * w:(j + 1) * w], cu_seqlens, backend="triton")
                                for j in range(groups)])
        from .projected_energy_triton import projected_energy_triton

        _, chunk = _programs("projected", u, v, _n_segments(u, cu_seqlens), t_max)
        with _on_device(u):
            return projected_energy_triton(u, v, _kernel_cu(cu_seqlens, u.device), t_max=t_max, chunk=chunk)
    return projected_energy_ref(u, v, cu_seqlens, groups)


def weight_grad_energy(d: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample squared norm of the full weight gradient ``|| d_s^T x_s ||_F^2``.

    Args mirror :func:`projected_energy` with ``d`` the output gradient ``[.., M]`` and ``x``
    the module input ``[.., N]``. Returns float32 ``[B]`` (float64 for float64 inputs).
    """
    t_max = _prepare("d", d, "x", x, cu_seqlens)
    if _resolve("gradient", backend, d, x, cu_seqlens, t_max) == "triton":
        from .weight_grad_energy_triton import weight_grad_energy_triton

        with _on_device(d):
            return weight_grad_energy_triton(d, x, _kernel_cu(cu_seqlens, d.device))
    return weight_grad_energy_ref(d, x, cu_seqlens)
