"""Fused Triton kernel: per-sample ``|| u_s^T v_s ||_F^2`` without storing ``u_s^T v_s``.

Serves projection "A" (``u = D``, ``v = X A^T``) and "B" (``u = X``, ``v = D B``) of the
probe (docs/design.md). ``naive.projected_energy_ref`` is the oracle.

One program owns one segment ``s``, one tile of ``BM`` columns of ``u`` and one tile of
``BR`` columns of ``v``. It walks the segment's tokens ``BT`` at a time, accumulates the
``[BM, BR]`` block of ``u_s^T v_s`` in float32 registers, squares it, sums it and writes
one float32 partial. The partials ``[S, num_M_tiles * num_R_tiles]`` are then summed in a
fixed order (no atomics), so the result is bitwise reproducible run to run.

The energy is a square of a sum over tokens, so tokens cannot be split across programs
without storing the ``[BM, R]`` blocks; the parallelism is ``S * num_M_tiles``, and
``ops._auto_uses_triton`` sends launches with too few programs to the torch path.

Importing this module applies ``@triton.jit``; with ``TRITON_INTERPRET=1`` in the
environment at that moment the kernel runs through Triton's CPU interpreter, provided it was
also set at the process's first ``import triton`` (which binds ``tl.zeros``, ``tl.sum``,
...; see ``domlora_kernels.ops``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def projected_energy_kernel(
    u_ptr,
    v_ptr,
    cu_ptr,
    part_ptr,
    T,
    M,
    R,
    s_ub,
    s_ut,
    s_um,
    s_vb,
    s_vt,
    s_vr,
    IS_VARLEN: tl.constexpr,
    CAST_F32: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BR: tl.constexpr,
):
    """Partial energies of one (segment, M tile, R tile).

    u_ptr: ``u``, ``[B, T, M]`` (strides ``s_ub, s_ut, s_um``) or packed ``[N, M]``
        (``s_ub`` unused), float32 / bfloat16 / float16.
    v_ptr: ``v``, ``[B, T, R]`` or packed ``[N, R]`` (strides ``s_vb, s_vt, s_vr``).
    cu_ptr: int32 ``[S + 1]`` segment offsets into the rows when ``IS_VARLEN``; else unused
        and every segment is one batch row of length ``T``.
    part_ptr: float32 ``[S, num_M_tiles * num_R_tiles]``, contiguous; this program writes
        element ``[i_s, i_m * num_R_tiles + i_r]``.
    CAST_F32: compute the dot in float32, "ieee" precision (TF32 would cost ~1e-3 relative
        error): for float32 inputs, mixed dtypes, and bfloat16 under the interpreter, whose
        ``tl.dot`` multiplies bfloat16 bit patterns (triton-lang/triton#11584).
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    n_r = tl.num_programs(2)

    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_s).to(tl.int64)
        eos = tl.load(cu_ptr + i_s + 1).to(tl.int64)
        p_u0 = u_ptr
        p_v0 = v_ptr
    else:
        bos = 0
        eos = T
        p_u0 = u_ptr + i_s * s_ub
        p_v0 = v_ptr + i_s * s_vb

    o_m = i_m * BM + tl.arange(0, BM)
    o_r = i_r * BR + tl.arange(0, BR)
    m_m = o_m < M
    m_r = o_r < R

    b_g = tl.zeros([BM, BR], dtype=tl.float32)
    for i_t in range(bos, eos, BT):
        o_t = i_t + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < eos
        # u loaded already transposed: [BM, BT]
        p_u = p_u0 + o_m[:, None] * s_um + o_t[None, :] * s_ut
        p_v = p_v0 + o_t[:, None] * s_vt + o_r[None, :] * s_vr
        b_u = tl.load(p_u, mask=m_m[:, None] & m_t[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_t[:, None] & m_r[None, :], other=0.0)
        if CAST_F32:
            # [BM, BT] @ [BT, BR] -> [BM, BR]
            b_g += tl.dot(b_u.to(tl.float32), b_v.to(tl.float32), input_precision="ieee")
        else:
            # [BM, BT] @ [BT, BR] -> [BM, BR]
            b_g += tl.dot(b_u, b_v)

    b_e = tl.sum(tl.sum(b_g * b_g, axis=1), axis=0)
    tl.store(part_ptr + i_s * (tl.num_programs(1) * n_r) + i_m * n_r + i_r, b_e)


# True when TRITON_INTERPRET=1 was set as this module was imported (read by @triton.jit).
INTERPRETED = not isinstance(projected_energy_kernel, triton.runtime.JITFunction)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _tiles(R: int) -> tuple[int, int, int]:
    """(BT, BM, BR) for rank ``R``: a plain heuristic, no per-GPU cache.

    tl.dot needs every tile dim >= 16, so the rank pads to 16 at least; ranks above 128 go
    to more programs along R (each re-reads its u tile) rather than a bigger accumulator.
    The float32 accumulator is BM * BR: 128 x 32 or 64 x 64 (16 KiB), 64 x 128 (32 KiB).
    """
    br = min(max(_next_pow2(R), 16), 128)
    bm = 128 if br <= 32 else 64
    bt = 64 if br <= 64 else 32
    return bt, bm, br


def _partials(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # DOMLORA_KERNELS_POISON=1 (tests) fills scratch with NaN so an unwritten element
    # shows up in the result instead of hiding as whatever the allocator returned.
    if os.environ.get("DOMLORA_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _dot_in_f32(a: torch.dtype, b: torch.dtype) -> bool:
    return a != b or a == torch.float32 or (INTERPRETED and a == torch.bfloat16)


def num_programs(u_shape: tuple[int, ...], R: int, n_segments: int) -> int:
    """Programs one launch uses; ``ops._auto_uses_triton`` compares it with a threshold."""
    _, bm, br = _tiles(R)
    return n_segments * triton.cdiv(u_shape[-1], bm) * triton.cdiv(R, br)


def projected_energy_triton(u: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. Inputs already checked by ``ops.projected_energy`` (shapes, dtypes,
    devices, ``cu_seqlens``). Any strides; nothing is copied. Returns float32 ``[S]``."""
    M, R = u.shape[-1], v.shape[-1]
    if cu_seqlens is None:
        S, T = u.shape[0], u.shape[1]
        s_ub, s_ut, s_um = u.stride()
        s_vb, s_vt, s_vr = v.stride()
        cu = u  # unused by the kernel; any pointer will do
    else:
        S, T = cu_seqlens.numel() - 1, 0
        s_ub, (s_ut, s_um) = 0, u.stride()
        s_vb, (s_vt, s_vr) = 0, v.stride()
        cu = cu_seqlens
    if S == 0 or M == 0 or R == 0:
        return torch.zeros(S, dtype=torch.float32, device=u.device)

    bt, bm, br = _tiles(R)
    grid = (S, triton.cdiv(M, bm), triton.cdiv(R, br))
    part = _partials((S, grid[1] * grid[2]), u.device)
    projected_energy_kernel[grid](
        u, v, cu, part,
        T, M, R,
        s_ub, s_ut, s_um,
        s_vb, s_vt, s_vr,
        IS_VARLEN=cu_seqlens is not None,
        CAST_F32=_dot_in_f32(u.dtype, v.dtype),
        BT=bt, BM=bm, BR=br,
        num_warps=4,
    )
    return part.sum(dim=1)


def compile_variants():
    """Every launch configuration of :func:`projected_energy_triton`, for
    ``compile_check``: each tile set of :func:`_tiles`, each dtype pairing, padded and varlen."""
    from .compile_check import Variant

    out = []
    for bt, bm, br in dict.fromkeys(_tiles(r) for r in range(1, 257)):
        for a, b in (("f32", "f32"), ("bf16", "bf16"), ("f16", "f16"), ("bf16", "f32")):
            cast = a != b or a == "f32"
            for varlen in (False, True):
                label = f"projected BM{bm} BR{br} BT{bt} {'varlen' if varlen else 'padded'}"
                cx = (("IS_VARLEN", varlen), ("CAST_F32", cast), ("BT", bt), ("BM", bm), ("BR", br))
                out.append(Variant("projected_energy_triton:projected_energy_kernel", label, (a, b), cx, ("s_um", "s_vr"), 4))
    return out
