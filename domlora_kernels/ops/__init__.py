"""Low-level ops of the probe. The backend is chosen here and nowhere else."""

from __future__ import annotations

import torch

from .naive import gradient_energy_ref, projected_energy_ref

__all__ = ["projected_energy", "gradient_energy", "BACKENDS"]

BACKENDS = ("auto", "torch")


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


def _resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return "torch"


def projected_energy(u: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample ``|| u_s^T v_s ||_F^2`` without a weight gradient.

    Args:
        u: ``[B, T, M]`` or packed ``[N, M]`` (projection A: the output gradient ``D``).
        v: ``[B, T, R]`` or packed ``[N, R]`` (projection A: ``P = X A^T``).
        cu_seqlens: ``None`` for padded inputs, else int32 ``[S + 1]`` segment offsets.
        backend: ``"auto"`` or ``"torch"``.

    Returns:
        float32 ``[B]`` (``[S]``); float64 for float64 inputs.

    Example:
        >>> u, v = torch.randn(2, 5, 7), torch.randn(2, 5, 3)
        >>> projected_energy(u, v).shape
        torch.Size([2])
    """
    _check_rows("u", u, "v", v, cu_seqlens)
    _resolve(backend)
    return projected_energy_ref(u, v, cu_seqlens)


def gradient_energy(d: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample squared norm of the full weight gradient ``|| d_s^T x_s ||_F^2``.

    Args mirror :func:`projected_energy` with ``d`` the output gradient ``[.., M]`` and ``x``
    the module input ``[.., N]``. Returns float32 ``[B]`` (float64 for float64 inputs).
    """
    _check_rows("d", d, "x", x, cu_seqlens)
    _resolve(backend)
    return gradient_energy_ref(d, x, cu_seqlens)
