"""Fused Triton kernel: per-sample ``|| u_s^T v_s ||_F^2`` without storing ``u_s^T v_s``.

Serves projection "A" (``u = D``, ``v = X A^T``) and "B" (``u = X``, ``v = D B``) of the
probe, and the direct form of the full weight-gradient energy (``u = d``, ``v = x``, with
segment ids: ``weight_grad_energy_triton``) (docs/design.md). ``naive.projected_energy_ref``
is the oracle.

One pass: a program owns one segment ``s``, one tile of ``BM`` columns of ``u`` and one tile
of ``BR`` columns of ``v``. It walks the segment's tokens ``BT`` at a time, accumulates the
``[BM, BR]`` block of ``u_s^T v_s`` in float32 registers, squares it, sums it and writes
one float32 partial. The partials are summed in a fixed order (no atomics), so the result
is bitwise reproducible run to run. The launch has ``S * M-tiles * R-tiles`` programs.

Split over tokens: when that is too few to fill the GPU (B=1, T=8192, M=576: 5 programs),
each program takes one chunk of ``CHUNK`` tokens of its segment and stores its float32
``[BM, BR]`` block of ``u^T v`` instead; a second step sums the chunks' blocks in a fixed
order, then squares (still bitwise reproducible). The energy is the square of a sum over
tokens, so the blocks, not their energies, are what can be added.

Importing this module applies ``@triton.jit``: for Triton's CPU interpreter when
``TRITON_INTERPRET=1`` was in the environment then and at the process's first ``import
triton`` (which binds ``tl.zeros``, ``tl.sum``, ...; see ``domlora_kernels.ops``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRETED, Variant, dot_acc, dot_in_f32, fits_int32_offsets, partials, segment_rows

__all__ = ["projected_energy_kernel", "projected_energy_triton", "num_programs", "split_chunk", "INTERPRETED"]


@triton.jit
def projected_energy_kernel(
    u_ptr, v_ptr, cu_ptr, ids_ptr, out_ptr,
    T, M, R, CHUNK,
    s_ub, s_ut, s_um,
    s_vb, s_vt, s_vr,
    IS_VARLEN: tl.constexpr,
    HAS_IDS: tl.constexpr,
    SPLIT: tl.constexpr,
    CAST_F32: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BR: tl.constexpr,
):
    """One (segment, M tile x R tile, token chunk) program; grid ``(S, n_M * n_R, n_chunks)``.

    u_ptr: ``u``, ``[B, T, M]`` (strides ``s_ub, s_ut, s_um``) or packed ``[N, M]``
        (``s_ub`` 0), float32 / bfloat16 / float16.
    v_ptr: ``v``, ``[B, T, R]`` or packed ``[N, R]`` (strides ``s_vb, s_vt, s_vr``).
    cu_ptr, ids_ptr: int32 segment offsets ``[S + 1]`` and segment ids (see
        :func:`triton_common.segment_rows`); unused for padded inputs.
    out_ptr: float32. One pass (``SPLIT`` false, one chunk): ``[S, n_M * n_R]`` partial
        energies, this program's at ``[i_s, i_mr]``. ``SPLIT``: ``[S, n_chunks, M, R]``
        blocks of ``u^T v`` over tokens ``[i_c * CHUNK, (i_c + 1) * CHUNK)`` of the segment;
        a chunk past the segment's end writes zeros.
    CAST_F32: dot in float32 "ieee" (``triton_common.dot_in_f32``).
    """
    i_s = tl.program_id(0)
    i_mr = tl.program_id(1)
    i_c = tl.program_id(2)
    n_r = tl.cdiv(R, BR)
    i_m = i_mr // n_r
    i_r = i_mr % n_r
    bos, n_t = segment_rows(i_s, cu_ptr, ids_ptr, T, IS_VARLEN, HAS_IDS)
    if SPLIT:
        t0 = i_c * CHUNK
        n_t = tl.minimum(n_t - t0, CHUNK)
    else:
        t0 = 0
    # int64 scalar bases, int32 offsets within a tile (checked by the launcher).
    row0 = i_s.to(tl.int64) * s_ub + (bos + t0).to(tl.int64) * s_ut
    p_u = u_ptr + row0 + (i_m * BM).to(tl.int64) * s_um
    p_v = v_ptr + (i_s.to(tl.int64) * s_vb + (bos + t0).to(tl.int64) * s_vt) + (i_r * BR).to(tl.int64) * s_vr
    o_t = tl.arange(0, BT)
    m_m = tl.arange(0, BM) < M - i_m * BM
    m_r = tl.arange(0, BR) < R - i_r * BR
    o_u = tl.arange(0, BM)[:, None] * s_um + o_t[None, :] * s_ut  # u loaded transposed: [BM, BT]
    o_v = o_t[:, None] * s_vt + tl.arange(0, BR)[None, :] * s_vr  # [BT, BR]

    b_g = tl.zeros([BM, BR], dtype=tl.float32)
    for i_t in range(0, n_t, BT):
        m_t = o_t < n_t - i_t
        b_u = tl.load(p_u + o_u, mask=m_m[:, None] & m_t[None, :], other=0.0)
        b_v = tl.load(p_v + o_v, mask=m_t[:, None] & m_r[None, :], other=0.0)
        b_g = dot_acc(b_g, b_u, b_v, CAST_F32)  # [BM, BT] @ [BT, BR] -> [BM, BR]
        p_u += BT * s_ut
        p_v += BT * s_vt

    if SPLIT:
        blk = (i_s.to(tl.int64) * tl.num_programs(2) + i_c) * M * R + (i_m * BM).to(tl.int64) * R + i_r * BR
        o_o = tl.arange(0, BM)[:, None] * R + tl.arange(0, BR)[None, :]
        tl.store(out_ptr + blk + o_o, b_g, mask=m_m[:, None] & m_r[None, :])
    else:
        b_e = tl.sum(tl.sum(b_g * b_g, axis=1), axis=0)
        tl.store(out_ptr + i_s.to(tl.int64) * tl.num_programs(1) + i_mr, b_e)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _tiles(R: int, f32_dot: bool) -> tuple[int, int, int]:
    """(BT, BM, BR) for ``R`` columns of ``v``: a plain heuristic, no per-GPU cache.

    ``tl.dot`` needs every tile dim >= 16, so ``R`` pads to 16 at least; above 64 the launch
    takes more programs along R (each re-reads its u tile) rather than a bigger
    accumulator. The float32 accumulator ``BM x BR`` is at most 2048 elements (16 registers
    a thread at 4 warps), and a float32 dot takes 16-token steps instead of 32: every
    variant then compiles to at most 128 registers on sm_80/90/100 without spills, i.e. 4
    or more programs of 4 warps per SM (benchmarks/results/kernel_resources.txt; bigger
    tiles measured 165-255 registers). The kernel is memory-bound at these tiles (the
    roofline in benchmarks/kernel_resources.py), so a bigger tile buys no speed.
    """
    br = min(max(_next_pow2(R), 16), 64)
    return (16 if f32_dot else 32), (64 if br <= 32 else 32), br


# The split launch gives each program at least this many tokens: a program reads
# CHUNK * (BM + BR) inputs and writes BM * BR float32, so at 512 tokens of 16-bit inputs the
# writes are 2 * BM * BR / (512 * (BM + BR)) <= 1/8 of the reads for every tile of _tiles.
MIN_CHUNK_TOKENS = 512


def num_programs(u_shape: tuple[int, ...], R: int, n_segments: int) -> int:
    """Programs of a one-pass launch; ``ops`` compares it with ``AUTO_MIN_PROGRAMS``."""
    _, bm, br = _tiles(R, False)
    return n_segments * triton.cdiv(u_shape[-1], bm) * triton.cdiv(R, br)


def split_chunk(t_max: int, programs: int, min_programs: int) -> int | None:
    """Tokens per program of the split launch, or ``None`` for one pass.

    ``t_max``: the longest segment; ``programs``: the one-pass launch's (:func:`num_programs`).
    Splits only when one pass has fewer than ``min_programs`` programs, into as many chunks
    as reach ``min_programs`` with at least :data:`MIN_CHUNK_TOKENS` tokens each.
    """
    if programs >= min_programs or programs == 0:
        return None
    n_c = min(triton.cdiv(min_programs, programs), t_max // MIN_CHUNK_TOKENS)
    if n_c < 2:
        return None
    return triton.cdiv(triton.cdiv(t_max, n_c), 32) * 32  # whole BT steps for every tile


def _addressable(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # A view whose tile offsets would pass int32 is copied (a stride above ~16 M elements).
    return t if fits_int32_offsets(t, rows, cols) else t.contiguous()


def launch(u, v, cu, ids, n_launch: int, T: int, t_max: int, chunk: int | None) -> torch.Tensor:
    """One launch over ``n_launch`` segments; their float32 energies ``[n_launch]``.

    ``cu``: int32 offsets (varlen) or ``None`` (padded, ``T`` tokens a row); ``ids``: int32
    segment ids of a subset launch, or ``None``; ``t_max``: the longest segment;
    ``chunk``: tokens per program to split over tokens, or ``None`` for one pass.
    """
    M, R = u.shape[-1], v.shape[-1]
    f32_dot = dot_in_f32(u.dtype, v.dtype)
    bt, bm, br = _tiles(R, f32_dot)
    u, v = _addressable(u, bt, bm), _addressable(v, bt, br)
    n_c = triton.cdiv(t_max, chunk) if chunk else 1
    grid = (n_launch, triton.cdiv(M, bm) * triton.cdiv(R, br), n_c)
    out = partials((n_launch, n_c, M, R) if chunk else (n_launch, grid[1]), u.device)
    strides = (*u.stride(), *v.stride()) if cu is None else (0, *u.stride(), 0, *v.stride())
    projected_energy_kernel[grid](
        u, v, u if cu is None else cu, u if ids is None else ids, out,
        T, M, R, chunk or 0,
        *strides,
        IS_VARLEN=cu is not None,
        HAS_IDS=ids is not None,
        SPLIT=chunk is not None,
        CAST_F32=f32_dot,
        BT=bt, BM=bm, BR=br,
        num_warps=4,
    )
    if chunk:
        # Chunks summed in index order by one reduction (deterministic: no atomics), then squared.
        return out.sum(dim=1).square().sum(dim=(1, 2))
    return out.sum(dim=1)


def projected_energy_triton(u: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, t_max: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """Launcher. Inputs already checked by ``ops.projected_energy`` (shapes, dtypes,
    devices, ``cu_seqlens`` int32 on the inputs' device). Any strides; nothing is copied
    unless a stride passes int32 tile offsets. Returns float32 ``[S]``.

    ``t_max``: the longest segment, or any bound above it (default: ``T`` padded, the number
    of rows packed); sets the number of chunks. ``chunk``: ``None`` for one pass, else split
    each segment's tokens into chunks of this many (``ops`` picks it with :func:`split_chunk`).
    """
    M, R = u.shape[-1], v.shape[-1]
    S = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    T = u.shape[1] if cu_seqlens is None else 0
    t_max = u.shape[-2] if t_max is None else t_max
    if S == 0 or M == 0 or R == 0 or t_max == 0:
        return torch.zeros(S, dtype=torch.float32, device=u.device)
    return launch(u, v, cu_seqlens, None, S, T, t_max, chunk)


# (a, b) input dtypes the launchers pass: each kernel dtype alone, and the probe's mix of a
# 16-bit output gradient with a float32 projection.
DTYPE_PAIRS = (("f32", "f32"), ("bf16", "bf16"), ("f16", "f16"), ("bf16", "f32"))

# (IS_VARLEN, HAS_IDS, SPLIT) of the launches: padded and packed one pass, padded and packed
# split over tokens, and the packed direct form of weight_grad_energy (segment ids).
_MODES = {
    "padded": (False, False, False),
    "varlen": (True, False, False),
    "split padded": (False, False, True),
    "split varlen": (True, False, True),
    "varlen ids": (True, True, False),
}


def compile_variants():
    """Every launch configuration of :func:`launch`, for ``compile_check``: each tile set
    :func:`_tiles` returns, each dtype pairing, each mode."""

    out = []
    for a, b in DTYPE_PAIRS:
        cast = a != b or a == "f32"
        for bt, bm, br in dict.fromkeys(_tiles(r, cast) for r in range(1, 513)):
            for mode, (varlen, ids, split) in _MODES.items():
                cx = (("IS_VARLEN", varlen), ("HAS_IDS", ids), ("SPLIT", split),
                      ("CAST_F32", cast), ("BT", bt), ("BM", bm), ("BR", br))
                label = f"projected BM{bm} BR{br} BT{bt} {mode}"
                out.append(Variant("projected_energy_triton:projected_energy_kernel", label, (a, b), cx, ("s_um", "s_vr"), 4))
    return out
