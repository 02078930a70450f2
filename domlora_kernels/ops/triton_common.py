"""What both Triton kernel modules share: the segment bounds helper, the scratch buffers,
the dot-precision rule and the launch :class:`Variant`.

Importing this module applies ``@triton.jit`` to :func:`segment_rows`; ``INTERPRETED`` says
whether ``TRITON_INTERPRET=1`` was set at that moment (see ``domlora_kernels.ops``).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

# Tiles are addressed as an int64 scalar base plus int32 offsets (2-D tiles of int64
# offsets or pointers cost registers). A tile's offsets reach (tile rows) x (row stride):
# the launchers copy an input whose strides would pass this (a view with a stride above
# ~16 M elements) rather than overflow.
INT32_OFFSETS = 2**31


@triton.jit
def segment_rows(i_s, cu_ptr, ids_ptr, T, IS_VARLEN: tl.constexpr, HAS_IDS: tl.constexpr):
    """(first row, number of rows) of the segment that program row ``i_s`` handles.

    Padded (``IS_VARLEN`` false): batch row ``i_s``, rows ``[0, T)`` of it. Varlen: rows
    ``cu[k] .. cu[k + 1]`` of the packed input, ``k = ids[i_s]`` when ``HAS_IDS`` (a launch
    over a subset of the segments), else ``k = i_s``. cu_ptr, ids_ptr: int32.
    """
    if IS_VARLEN:
        if HAS_IDS:
            i_seg = tl.load(ids_ptr + i_s)
        else:
            i_seg = i_s
        bos = tl.load(cu_ptr + i_seg)
        n_t = tl.load(cu_ptr + i_seg + 1) - bos
    else:
        bos = 0
        n_t = T
    return bos, n_t


@triton.jit
def dot_acc(b_acc, b_a, b_b, CAST_F32: tl.constexpr):
    """``b_acc + b_a @ b_b`` accumulated in float32; with ``CAST_F32`` the operands are
    cast to float32 and multiplied in "ieee" precision (see :func:`dot_in_f32`)."""
    # One return after the branch: Triton type-checks every return of a @jit function, so a
    # return inside the constexpr branch would still compile the mixed-dtype tl.dot below.
    if CAST_F32:
        b_d = tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision="ieee")
    else:
        b_d = tl.dot(b_a, b_b)
    return b_acc + b_d


# True when TRITON_INTERPRET=1 was set as this module was imported (read by @triton.jit).
INTERPRETED = not isinstance(segment_rows, triton.runtime.JITFunction)


def partials(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """float32 scratch for the kernels to write. ``DOMLORA_KERNELS_POISON=1`` (tests) fills
    it with NaN, so an element no program wrote shows up in the result instead of hiding as
    whatever the allocator returned."""
    if os.environ.get("DOMLORA_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def dot_in_f32(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether the kernels compute ``tl.dot`` in float32 "ieee" (TF32 would cost ~1e-3
    relative error): float32 or mixed inputs, and bfloat16 under the interpreter, whose
    ``tl.dot`` multiplies bfloat16 bit patterns (triton-lang/triton#11584)."""
    return a != b or a == torch.float32 or (INTERPRETED and a == torch.bfloat16)


def fits_int32_offsets(t: torch.Tensor, tile_rows: int, tile_cols: int) -> bool:
    """Whether a ``[tile_rows, tile_cols]`` tile of ``t`` (rows along dim -2, columns along
    dim -1) has offsets below 2^31 from its first element."""
    return tile_rows * abs(t.stride(-2)) + tile_cols * abs(t.stride(-1)) < INT32_OFFSETS


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launch configuration of one kernel, as its launcher produces it (``compile_variants()``
    of each kernel module; benchmarks/compile_check.py compiles each for real GPU targets).

    kernel: ``"module:attribute"`` of the ``@triton.jit`` function, module relative to
        ``domlora_kernels.ops``.
    label: what the launcher serves with it (op, tiles, varlen), for the table.
    dtypes: ``(a, b)``, the dtypes of the two input pointers (``"f32"``, ``"bf16"``,
        ``"f16"``).
    constexprs: every ``tl.constexpr`` parameter's value, as the launcher passes it.
    inner: names of the two inputs' innermost-stride parameters (1 in the ``contig`` layout).
    num_warps: as launched.
    """

    kernel: str
    label: str
    dtypes: tuple[str, str]
    constexprs: tuple[tuple[str, object], ...]
    inner: tuple[str, str]
    num_warps: int

    def name(self, layout: str) -> str:
        return f"{self.label} {'+'.join(dict.fromkeys(self.dtypes))} {layout}"
