"""Per-sample ``|| d_s^T x_s ||_F^2``, the full weight-gradient energy, in Triton.

For projection "expected" (docs/design.md). ``naive.weight_grad_energy_ref`` is the
oracle. Two forms, chosen per segment by the package's one cost rule
(:func:`naive.uses_gram`: Gram when ``T^2 (M + N) < T M N``):

- direct: ``|| d_s^T x_s ||^2`` is ``projected_energy`` with ``u = d``, ``v = x``; it runs
  ``projected_energy_kernel`` (with segment ids for a packed launch). ``T M N`` multiply-adds.
- Gram ("ghost norm"): ``|| d^T x ||^2 = < d d^T, x x^T >``. A program owns a ``[BT, BT]``
  tile (i, j) of both ``T x T`` Grams, accumulates each over its feature dim, multiplies
  them elementwise and sums. Both Grams are symmetric, so only tiles ``j >= i`` do the
  work and off-diagonal ones count twice. ``T^2 (M + N) / 2`` multiply-adds.

Neither form stores its ``[M, N]`` or ``[T, T]`` tiles: each program writes one float32
partial, and the partials are summed in a fixed order (no atomics, reproducible).

Importing this module applies ``@triton.jit`` (interpreted or compiled: see
``domlora_kernels.ops``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import projected_energy_triton as pe
from .naive import uses_gram
from .triton_common import INTERPRETED, Variant, dot_acc, dot_in_f32, fits_int32_offsets, partials, segment_rows

__all__ = ["weight_grad_energy_gram_kernel", "weight_grad_energy_triton", "num_programs", "uses_gram", "INTERPRETED"]


@triton.jit
def _gram_block(p_i, p_j, s_t, s_k, K, m_i, m_j, CAST_F32: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """``a_i a_j^T``, ``[BT, BT]`` float32, of two token tiles of ``a`` over ``K`` features.

    p_i, p_j: int64 pointers to feature 0 of the first token of tiles i and j; s_t, s_k:
    token and feature strides; m_i, m_j: ``[BT]`` masks of the tiles' live tokens.
    """
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    b_g = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, K, BK):
        m_k = o_k < K - i_k
        b_i = tl.load(p_i + o_t[:, None] * s_t + o_k[None, :] * s_k, mask=m_i[:, None] & m_k[None, :], other=0.0)
        b_j = tl.load(p_j + o_k[:, None] * s_k + o_t[None, :] * s_t, mask=m_k[:, None] & m_j[None, :], other=0.0)
        b_g = dot_acc(b_g, b_i, b_j, CAST_F32)  # [BT, BK] @ [BK, BT] -> [BT, BT]
        p_i += BK * s_k
        p_j += BK * s_k
    return b_g


@triton.jit
def weight_grad_energy_gram_kernel(
    d_ptr, x_ptr, cu_ptr, ids_ptr, part_ptr,
    T, M, N,
    s_db, s_dt, s_dm,
    s_xb, s_xt, s_xn,
    IS_VARLEN: tl.constexpr,
    CAST_F32: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    """Partial energy of one (segment, token tile i, token tile j) by the Gram form:
    ``w * sum( (d_i d_j^T) * (x_i x_j^T) )`` with ``w = 2`` above the diagonal, 1 on it,
    0 below it (and 0 for tiles past the segment's end, which skip their loops).

    d_ptr: output gradient ``d``, ``[B, T, M]`` (strides ``s_db, s_dt, s_dm``) or packed
        ``[rows, M]`` (``s_db`` 0). x_ptr: module input ``x``, ``[B, T, N]`` or packed
        ``[rows, N]`` (``s_xb, s_xt, s_xn``).
    cu_ptr, ids_ptr: int32 segment offsets ``[S + 1]`` and the ids of the segments this
        launch handles (``triton_common.segment_rows``); unused when padded.
    part_ptr: float32 ``[S_launch, n_T * n_T]``, contiguous, where ``n_T`` covers the
        longest segment of the launch.
    """
    i_s = tl.program_id(0)
    i_i = tl.program_id(1)
    i_j = tl.program_id(2)
    bos, n_t = segment_rows(i_s, cu_ptr, ids_ptr, T, IS_VARLEN, True)
    m_i = tl.arange(0, BT) < n_t - i_i * BT
    m_j = tl.arange(0, BT) < n_t - i_j * BT
    # Lower-triangle tiles and tiles past the end run empty loops: their Gram blocks stay 0.
    live = (i_j >= i_i) & (i_j * BT < n_t)
    # int64 scalar bases of token tiles i and j, int32 offsets within a tile.
    t_i = (bos + i_i * BT).to(tl.int64)
    t_j = (bos + i_j * BT).to(tl.int64)
    p_d = d_ptr + i_s.to(tl.int64) * s_db
    p_x = x_ptr + i_s.to(tl.int64) * s_xb
    b_gd = _gram_block(p_d + t_i * s_dt, p_d + t_j * s_dt, s_dt, s_dm, tl.where(live, M, 0), m_i, m_j, CAST_F32, BT, BK)
    b_gx = _gram_block(p_x + t_i * s_xt, p_x + t_j * s_xt, s_xt, s_xn, tl.where(live, N, 0), m_i, m_j, CAST_F32, BT, BK)

    w = tl.where(i_j > i_i, 2.0, 1.0)
    b_e = w * tl.sum(tl.sum(b_gd * b_gx, axis=1), axis=0)
    n_j = tl.num_programs(2)
    tl.store(part_ptr + i_s.to(tl.int64) * (tl.num_programs(1) * n_j) + i_i * n_j + i_j, b_e)


# Gram tiles: a plain heuristic, no per-GPU cache. Two [BT, BT] float32 accumulators (both
# Grams are live at the end) over BK-wide feature steps: BT = BK = 32 compiles to at most
# 128 registers without spills for every dtype (BT=64 measured 165-255 registers and spilled
# in float32; a float32 BK=16 spilled 8 bytes on sm_100; benchmarks/results/kernel_resources.txt).
_GRAM_TILES = dict(BT=32, BK=32)


def num_programs(t: int, m: int, n: int, n_segments: int) -> int:
    """Programs of a padded launch (``ops`` compares it with ``AUTO_MIN_PROGRAMS``)."""
    if uses_gram(t, m, n):
        n_t = triton.cdiv(t, _GRAM_TILES["BT"])
        return n_segments * n_t * (n_t + 1) // 2  # lower-triangle programs exit at once
    return pe.num_programs((t, m), n, n_segments)


def _gram(d, x, cu, ids, n_launch: int, t_max: int, T: int) -> torch.Tensor:
    """One Gram launch over ``n_launch`` segments; their float32 energies."""
    bt, bk = _GRAM_TILES["BT"], _GRAM_TILES["BK"]
    if not fits_int32_offsets(d, bt, bk):
        d = d.contiguous()
    if not fits_int32_offsets(x, bt, bk):
        x = x.contiguous()
    n_t = triton.cdiv(t_max, bt)
    part = partials((n_launch, n_t * n_t), d.device)
    strides = (*d.stride(), *x.stride()) if cu is None else (0, *d.stride(), 0, *x.stride())
    weight_grad_energy_gram_kernel[(n_launch, n_t, n_t)](
        d, x, d if cu is None else cu, d if ids is None else ids, part,
        T, d.shape[-1], x.shape[-1],
        *strides,
        IS_VARLEN=cu is not None,
        CAST_F32=dot_in_f32(d.dtype, x.dtype),
        **_GRAM_TILES,
        num_warps=4,
    )
    return part.sum(dim=1)


def weight_grad_energy_triton(d: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher. Inputs already checked by ``ops.weight_grad_energy``. Any strides; nothing
    is copied unless a stride passes int32 tile offsets. Returns float32 ``[S]``.

    Padded inputs: one launch of the form the cost rule picks for ``T``. Packed inputs: the
    segments are split by the same rule on their own lengths (one host read of
    ``cu_seqlens``) and each group gets one launch, over its segment ids.
    """
    M, N = d.shape[-1], x.shape[-1]
    S = d.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if S == 0 or M == 0 or N == 0 or d.shape[-2] == 0:
        return torch.zeros(S, dtype=torch.float32, device=d.device)
    if cu_seqlens is None:
        T = d.shape[1]
        if uses_gram(T, M, N):
            return _gram(d, x, None, None, S, T, T)
        return pe.launch(d, x, None, None, S, T, T, None)

    offs = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(offs, offs[1:])]
    out = partials((S,), d.device)
    for gram in (True, False):
        ids = [i for i, t in enumerate(lens) if uses_gram(t, M, N) == gram]
        if not ids:
            continue
        t_max = max(lens[i] for i in ids)
        ids_t = torch.tensor(ids, dtype=torch.int32, device=d.device)
        if gram:
            out[ids_t.long()] = _gram(d, x, cu_seqlens, ids_t, len(ids), t_max, 0)
        else:
            out[ids_t.long()] = pe.launch(d, x, cu_seqlens, ids_t, len(ids), 0, t_max, None)
    return out


def compile_variants():
    """Every launch configuration of the Gram kernel, for ``compile_check`` (the direct form
    is ``projected_energy_kernel``'s, listed there)."""

    out = []
    for a, b in pe.DTYPE_PAIRS:
        for varlen in (False, True):
            cx = (("IS_VARLEN", varlen), ("CAST_F32", a != b or a == "f32"), *_GRAM_TILES.items())
            label = f"gram BT{_GRAM_TILES['BT']} BK{_GRAM_TILES['BK']} {'varlen ids' if varlen else 'padded'}"
            out.append(Variant("weight_grad_energy_triton:weight_grad_energy_gram_kernel", label, (a, b), cx, ("s_dm", "s_xn"), 4))
    return out
