"""Fused Triton kernels: per-sample ``|| d_s^T x_s ||_F^2``, the full weight-gradient energy.

For projection "expected" (docs/design.md). ``naive.weight_grad_energy_ref`` is the
oracle. Two forms, chosen per segment by the same cost rule as the reference
(Gram when ``T^2 (M + N) < T M N``, i.e. ``T < M N / (M + N)``):

- direct: a program owns a ``[BM, BN]`` tile of ``d_s^T x_s``, accumulates it over the
  segment's tokens in float32 registers, squares and sums it. ``T M N`` multiply-adds.
- Gram ("ghost norm"): ``|| d^T x ||^2 = < d d^T, x x^T >``. A program owns a ``[BT, BT]``
  tile (i, j) of both ``T x T`` Grams, accumulates each over its feature dim, multiplies
  them elementwise and sums. Both Grams are symmetric, so only tiles ``j >= i`` do the
  work and off-diagonal ones count twice. ``T^2 (M + N) / 2`` multiply-adds.

Neither form stores its ``[M, N]`` or ``[T, T]`` tiles: each program writes one float32
partial, and the partials are summed in a fixed order (no atomics, reproducible).

Importing this module applies ``@triton.jit``; with ``TRITON_INTERPRET=1`` in the
environment at that moment the kernels run through Triton's CPU interpreter, provided it was
also set at the process's first ``import triton`` (which binds ``tl.zeros``, ``tl.sum``,
...; see ``domlora_kernels.ops``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def weight_grad_energy_direct_kernel(
    d_ptr,
    x_ptr,
    cu_ptr,
    ids_ptr,
    part_ptr,
    T,
    M,
    N,
    s_db,
    s_dt,
    s_dm,
    s_xb,
    s_xt,
    s_xn,
    IS_VARLEN: tl.constexpr,
    CAST_F32: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """Partial energy of one (segment, M tile, N tile) by the direct form.

    d_ptr: output gradient ``d``, ``[B, T, M]`` (strides ``s_db, s_dt, s_dm``) or packed
        ``[rows, M]`` (``s_db`` unused).
    x_ptr: module input ``x``, ``[B, T, N]`` or packed ``[rows, N]`` (``s_xb, s_xt, s_xn``).
    cu_ptr: int32 ``[S + 1]`` segment offsets when ``IS_VARLEN``; else unused.
    ids_ptr: int32 ``[S_launch]``: the segment each program row ``i_s`` handles when
        ``IS_VARLEN`` (the segments this form was chosen for); else unused and ``i_s`` is
        the batch row, of length ``T``.
    part_ptr: float32 ``[S_launch, num_M_tiles * num_N_tiles]``, contiguous.
    CAST_F32: dot in float32 "ieee" (float32 or mixed inputs; bfloat16 under the
        interpreter, triton-lang/triton#11584).
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_n = tl.program_id(2).to(tl.int64)

    if IS_VARLEN:
        i_seg = tl.load(ids_ptr + i_s).to(tl.int64)
        bos = tl.load(cu_ptr + i_seg).to(tl.int64)
        eos = tl.load(cu_ptr + i_seg + 1).to(tl.int64)
        p_d0 = d_ptr
        p_x0 = x_ptr
    else:
        bos = 0
        eos = T
        p_d0 = d_ptr + i_s * s_db
        p_x0 = x_ptr + i_s * s_xb

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N

    b_g = tl.zeros([BM, BN], dtype=tl.float32)
    for i_t in range(bos, eos, BT):
        o_t = i_t + tl.arange(0, BT).to(tl.int64)
        m_t = o_t < eos
        # d loaded already transposed: [BM, BT]
        p_d = p_d0 + o_m[:, None] * s_dm + o_t[None, :] * s_dt
        p_x = p_x0 + o_t[:, None] * s_xt + o_n[None, :] * s_xn
        b_d = tl.load(p_d, mask=m_m[:, None] & m_t[None, :], other=0.0)
        b_x = tl.load(p_x, mask=m_t[:, None] & m_n[None, :], other=0.0)
        if CAST_F32:
            # [BM, BT] @ [BT, BN] -> [BM, BN]
            b_g += tl.dot(b_d.to(tl.float32), b_x.to(tl.float32), input_precision="ieee")
        else:
            # [BM, BT] @ [BT, BN] -> [BM, BN]
            b_g += tl.dot(b_d, b_x)

    b_e = tl.sum(tl.sum(b_g * b_g, axis=1), axis=0)
    n_n = tl.num_programs(2)
    tl.store(part_ptr + i_s * (tl.num_programs(1) * n_n) + i_m * n_n + i_n, b_e)


@triton.jit
def weight_grad_energy_gram_kernel(
    d_ptr,
    x_ptr,
    cu_ptr,
    ids_ptr,
    part_ptr,
    T,
    M,
    N,
    s_db,
    s_dt,
    s_dm,
    s_xb,
    s_xt,
    s_xn,
    IS_VARLEN: tl.constexpr,
    CAST_F32: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    """Partial energy of one (segment, token tile i, token tile j) by the Gram form:
    ``w * sum( (d_i d_j^T) * (x_i x_j^T) )`` with ``w = 2`` above the diagonal, 1 on it,
    0 below it (and 0 for tiles past the segment's end, which skip their loops).

    Pointers as in :func:`weight_grad_energy_direct_kernel`; part_ptr: float32
    ``[S_launch, num_T_tiles * num_T_tiles]``, contiguous, where ``num_T_tiles`` covers the
    longest segment of the launch.
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_i = tl.program_id(1).to(tl.int64)
    i_j = tl.program_id(2).to(tl.int64)

    if IS_VARLEN:
        i_seg = tl.load(ids_ptr + i_s).to(tl.int64)
        bos = tl.load(cu_ptr + i_seg).to(tl.int64)
        eos = tl.load(cu_ptr + i_seg + 1).to(tl.int64)
        p_d0 = d_ptr
        p_x0 = x_ptr
    else:
        bos = 0
        eos = T
        p_d0 = d_ptr + i_s * s_db
        p_x0 = x_ptr + i_s * s_xb

    o_i = bos + i_i * BT + tl.arange(0, BT)
    o_j = bos + i_j * BT + tl.arange(0, BT)
    m_i = o_i < eos
    m_j = o_j < eos
    # Lower-triangle tiles and tiles past the end run empty loops: their Gram blocks stay 0.
    live = (i_j >= i_i) & (bos + i_j * BT < eos)
    k_m = tl.where(live, M, 0)
    k_n = tl.where(live, N, 0)

    b_gd = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, k_m, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < M
        p_di = p_d0 + o_i[:, None] * s_dt + o_k[None, :] * s_dm
        p_dj = p_d0 + o_k[:, None] * s_dm + o_j[None, :] * s_dt  # d_j loaded transposed
        b_di = tl.load(p_di, mask=m_i[:, None] & m_k[None, :], other=0.0)
        b_dj = tl.load(p_dj, mask=m_k[:, None] & m_j[None, :], other=0.0)
        if CAST_F32:
            # [BT, BK] @ [BK, BT] -> [BT, BT]
            b_gd += tl.dot(b_di.to(tl.float32), b_dj.to(tl.float32), input_precision="ieee")
        else:
            # [BT, BK] @ [BK, BT] -> [BT, BT]
            b_gd += tl.dot(b_di, b_dj)

    b_gx = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, k_n, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < N
        p_xi = p_x0 + o_i[:, None] * s_xt + o_k[None, :] * s_xn
        p_xj = p_x0 + o_k[:, None] * s_xn + o_j[None, :] * s_xt  # x_j loaded transposed
        b_xi = tl.load(p_xi, mask=m_i[:, None] & m_k[None, :], other=0.0)
        b_xj = tl.load(p_xj, mask=m_k[:, None] & m_j[None, :], other=0.0)
        if CAST_F32:
            # [BT, BK] @ [BK, BT] -> [BT, BT]
            b_gx += tl.dot(b_xi.to(tl.float32), b_xj.to(tl.float32), input_precision="ieee")
        else:
            # [BT, BK] @ [BK, BT] -> [BT, BT]
            b_gx += tl.dot(b_xi, b_xj)

    w = tl.where(i_j > i_i, 2.0, 1.0)
    b_e = w * tl.sum(tl.sum(b_gd * b_gx, axis=1), axis=0)
    n_j = tl.num_programs(2)
    tl.store(part_ptr + i_s * (tl.num_programs(1) * n_j) + i_i * n_j + i_j, b_e)


# True when TRITON_INTERPRET=1 was set as this module was imported (read by @triton.jit).
INTERPRETED = not isinstance(weight_grad_energy_direct_kernel, triton.runtime.JITFunction)

# Tiles: a plain heuristic, no per-GPU cache. Direct: a 64 x 64 float32 accumulator
# (16 KiB) over 32-token steps. Gram: two 64 x 64 float32 accumulators over 64-wide
# feature steps.
_DIRECT_TILES = dict(BT=32, BM=64, BN=64)
_GRAM_TILES = dict(BT=64, BK=64)


def uses_gram(t: int, m: int, n: int) -> bool:
    """The reference's cost rule: Gram form when ``T^2 (M + N) < T M N``."""
    return t * t * (m + n) < t * m * n


def _partials(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # DOMLORA_KERNELS_POISON=1 (tests) fills scratch and outputs with NaN so an unwritten
    # element shows up in the result instead of hiding as whatever the allocator returned.
    if os.environ.get("DOMLORA_KERNELS_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _dot_in_f32(a: torch.dtype, b: torch.dtype) -> bool:
    return a != b or a == torch.float32 or (INTERPRETED and a == torch.bfloat16)


def num_programs(t: int, m: int, n: int, n_segments: int) -> int:
    """Programs of a padded launch (``ops._auto_uses_triton`` compares it with a threshold)."""
    if uses_gram(t, m, n):
        n_t = triton.cdiv(t, _GRAM_TILES["BT"])
        return n_segments * n_t * (n_t + 1) // 2  # lower-triangle programs exit at once
    return n_segments * triton.cdiv(m, _DIRECT_TILES["BM"]) * triton.cdiv(n, _DIRECT_TILES["BN"])


def _launch(d, x, cu, ids, n_launch: int, t_max: int, T: int, strides, gram: bool, is_varlen: bool) -> torch.Tensor:
    """One launch of one form over ``n_launch`` segments; returns their float32 energies."""
    M, N = d.shape[-1], x.shape[-1]
    if gram:
        n_t = triton.cdiv(t_max, _GRAM_TILES["BT"])
        if n_t == 0:  # every segment of this launch is empty
            return torch.zeros(n_launch, dtype=torch.float32, device=d.device)
        grid = (n_launch, n_t, n_t)
        kernel, tiles = weight_grad_energy_gram_kernel, _GRAM_TILES
    else:
        grid = (n_launch, triton.cdiv(M, _DIRECT_TILES["BM"]), triton.cdiv(N, _DIRECT_TILES["BN"]))
        kernel, tiles = weight_grad_energy_direct_kernel, _DIRECT_TILES
    part = _partials((n_launch, grid[1] * grid[2]), d.device)
    kernel[grid](
        d, x, cu, ids, part,
        T, M, N,
        *strides,
        IS_VARLEN=is_varlen,
        CAST_F32=_dot_in_f32(d.dtype, x.dtype),
        **tiles,
        num_warps=4,
    )
    return part.sum(dim=1)


def weight_grad_energy_triton(d: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. Inputs already checked by ``ops.weight_grad_energy``. Any strides; nothing is
    copied. Returns float32 ``[S]``.

    Padded inputs: one launch of the form the cost rule picks for ``T``. Packed inputs: the
    segments are split by the same rule on their own lengths (one host read of
    ``cu_seqlens``) and each group gets one launch.
    """
    M, N = d.shape[-1], x.shape[-1]
    if cu_seqlens is None:
        B, T = d.shape[0], d.shape[1]
        if B == 0 or M == 0 or N == 0:
            return torch.zeros(B, dtype=torch.float32, device=d.device)
        strides = (*d.stride(), *x.stride())
        return _launch(d, x, d, d, B, T, T, strides, uses_gram(T, M, N), is_varlen=False)

    S = cu_seqlens.numel() - 1
    if S == 0 or M == 0 or N == 0:
        return torch.zeros(S, dtype=torch.float32, device=d.device)
    strides = (0, *d.stride(), 0, *x.stride())
    offs = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(offs, offs[1:])]
    out = _partials((S,), d.device)
    for gram in (True, False):
        ids = [i for i, t in enumerate(lens) if uses_gram(t, M, N) == gram]
        if not ids:
            continue
        t_max = max(lens[i] for i in ids)
        ids_t = torch.tensor(ids, dtype=torch.int32, device=d.device)
        out[ids_t.long()] = _launch(d, x, cu_seqlens, ids_t, len(ids), t_max, 0, strides, gram, is_varlen=True)
    return out


def compile_variants():
    """Every launch configuration of :func:`weight_grad_energy_triton`, for ``compile_check``."""
    from .compile_check import Variant

    out = []
    for name, tiles in (("direct", _DIRECT_TILES), ("gram", _GRAM_TILES)):
        for a, b in (("f32", "f32"), ("bf16", "bf16"), ("f16", "f16"), ("bf16", "f32")):
            cast = a != b or a == "f32"
            for varlen in (False, True):
                label = f"{name} " + " ".join(f"{k}{v}" for k, v in tiles.items()) + (" varlen" if varlen else " padded")
                cx = (("IS_VARLEN", varlen), ("CAST_F32", cast), *tiles.items())
                out.append(Variant(f"weight_grad_energy_triton:weight_grad_energy_{name}_kernel", label, (a, b), cx, ("s_dm", "s_xn"), 4))
    return out
