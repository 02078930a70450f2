"""The probe's arithmetic for one module: what a forward call keeps, and what its backward adds.

Pure functions of tensors, no hooks and no state; :mod:`domlora_kernels.probe` wires them into
a model. The formulas are those of docs/design.md, with ``k`` seeds probed at once:

- the forward keeps :class:`Kept`: ``P = X A^T`` (``[B, T, k*r]``, all seeds' ``A`` stacked)
  for projections "A" and "AB", and ``X`` (``[B, T, n]``) for "B", "AB" and "expected";
- estimator "fisher": :func:`sample_energies` gives each sample's energy ``[k, B]``;
- estimator "gradient": :func:`gradient_sums` gives the batch's summed projected gradients,
  whose shapes :func:`grad_sum_shapes` defines;
- :func:`page_values` turns either into PAGE, applying the LoRA scaling ``s^2`` (the one place
  it is applied).

Everything here is unscaled until :func:`page_values`. The probe's own float32 matmuls run
at full precision (:func:`ieee_fp32`), as the Triton kernels do, whatever
``torch.set_float32_matmul_precision`` the caller chose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import ops


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """float32 matmuls at full precision inside (no TF32 on CUDA), the caller's setting after.

    Under ``torch.set_float32_matmul_precision("high")`` CUDA float32 matmuls use TF32 (10-bit
    mantissa), which would make the torch path's energies differ from the Triton kernels'
    (IEEE float32) by ~1e-3 relative. The model's own matmuls keep the caller's setting.
    """
    prev = torch.get_float32_matmul_precision()
    if prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


@dataclass
class Kept:
    """What one forward call of a module keeps for its backward; rows are samples.

    ``proj``: ``P = X A^T`` ``[B, T, k*r]`` (projections "A", "AB"), else None.
    ``x``: the input ``X`` ``[B, T, n]`` (projections "B", "AB", "expected"), else None.
    """

    proj: torch.Tensor | None
    x: torch.Tensor | None

    def regroup(self, batch: int) -> "Kept":
        """The same rows as ``batch`` samples of consecutive rows, ``[batch, -1, *]``: a module
        on a flat view ``[B*T, n]`` of a ``[B, T, n]`` activation, or any rows of one sample."""
        def group(t):
            return None if t is None else t.reshape(batch, -1, t.shape[-1])

        return Kept(group(self.proj), group(self.x))


# On the CPU, P = X A^T is computed as (A X^T)^T (see project); False: as X A^T, for the
# side-by-side comparison of the two in benchmarks/projection_layout.py.
CPU_TRANSPOSED_PROJECTION = True


def project(x3: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``P = X A^T``: ``x3`` ``[B, T, n]`` @ ``a`` ``[c, n]`` -> ``[B, T, c]``, no graph, full fp32
    precision. ``a`` may stack every seed's ``A`` (and several modules' ``A``s): one matmul."""
    with torch.no_grad(), ieee_fp32():
        if CPU_TRANSPOSED_PROJECTION and x3.device.type == "cpu" and x3.is_contiguous():
            # On the CPU, MKL runs the skinny product faster as (A X^T)^T, a [c, N] result read
            # back transposed, than as X A^T: 0.14 against 0.21 ms at N=1024, n=576, c=8
            # (python -m benchmarks.projection_layout). P is then a transposed view; its
            # consumers (bmm with P^T, reshape) read it without a copy.
            return (a @ x3.reshape(-1, x3.shape[-1]).T).T.view(*x3.shape[:-1], a.shape[0])
        return x3 @ a.T


def keep(x3: torch.Tensor, projection: str, proj: torch.Tensor | None) -> Kept:
    """What the backward of projection ``projection`` needs from the input ``x3`` ``[B, T, n]``,
    given ``proj``, its :func:`project` onto every seed's ``A`` (projections "A", "AB")."""
    return Kept(proj if projection in ("A", "AB") else None, x3 if projection != "A" else None)


def sample_energies(kept: Kept, d3: torch.Tensor, projection: str, b_cat: torch.Tensor | None,
                    rank: int, k: int, backend: str) -> torch.Tensor:
    """Unscaled per-sample energies ``[k, B]`` (float64) of one call, from ``D`` ``[B, T, m]``.

    ``b_cat``: every seed's probe ``B`` side by side, ``[m, k*r]`` in ``d3``'s dtype (projections
    "B", "AB"). Projection "A": ``||D_b^T P_b||^2``; "B": ``||(D_b B)^T X_b||^2``; "AB": both;
    "expected": ``r / (3n) ||D_b^T X_b||^2``, the mean over ``A ~ U(-1/sqrt(n), 1/sqrt(n))``.
    """
    e = torch.zeros(k, d3.shape[0], dtype=torch.float64, device=d3.device)
    with ieee_fp32():
        if kept.proj is not None:  # every seed's P at once: D read once ([k, B])
            e += ops.projected_energy(d3, kept.proj, backend=backend, groups=k).view(k, -1)
        if projection in ("B", "AB"):
            v = d3 @ b_cat  # [B, T, m] @ [m, k*r] -> [B, T, k*r]: D read once for every seed
            e += ops.projected_energy(kept.x, v, backend=backend, groups=k).view(k, -1)
        if projection == "expected":
            n = kept.x.shape[-1]
            e += ops.weight_grad_energy(d3, kept.x, backend=backend).to(torch.float64) * (rank / (3.0 * n))
    return e


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 models (the exact oracles), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_sum_shapes(projection: str, k: int, m: int, rank: int, n: int) -> dict[str, tuple[int, int, int]]:
    """The summed projected gradients of estimator "gradient": ``"A"`` (``dL/dB``, ``[k, m, r]``)
    for projections "A" and "AB", ``"B"`` (``dL/dA``, ``[k, r, n]``) for "B" and "AB"."""
    shapes = {}
    if projection in ("A", "AB"):
        shapes["A"] = (k, m, rank)
    if projection in ("B", "AB"):
        shapes["B"] = (k, rank, n)
    return shapes


def gradient_sums(kept: Kept, d3: torch.Tensor, projection: str, b_cat: torch.Tensor | None,
                  rank: int, k: int) -> dict[str, torch.Tensor]:
    """This call's unscaled summed projected gradients, shaped as :func:`grad_sum_shapes` says,
    in :func:`accumulation_dtype` (``b_cat`` already in it)."""
    acc = accumulation_dtype(d3.dtype)
    m = d3.shape[-1]
    d2 = d3.reshape(-1, m).to(acc)
    out = {}
    with ieee_fp32():
        if projection in ("A", "AB"):
            # [m, N] @ [N, k*r] -> [m, k*r] -> [k, m, r]
            out["A"] = (d2.T @ kept.proj.reshape(-1, k * rank).to(acc)).view(m, k, rank).permute(1, 0, 2)
        if projection in ("B", "AB"):
            x2 = kept.x.reshape(-1, kept.x.shape[-1]).to(acc)
            # ([N, m] @ [m, k*r])^T @ [N, n] -> [k*r, n] -> [k, r, n]
            out["B"] = ((d2 @ b_cat).T @ x2).view(k, rank, -1)
    return out


def page_values(estimator: str, parts: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                num_samples: int, scaling: float, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PAGE of one module: ``([k] per seed, [k, N] per-sample energies or None)``, float64 CPU.

    ``parts``: "fisher": the unscaled ``[k, B]`` energies of every batch, in order; "gradient":
    the unscaled gradient sums over all samples (:func:`gradient_sums`; none for a module that
    got no gradient). ``k``: the number of seeds. Both are scaled here by
    ``scaling^2``, the LoRA scaling ``s`` entering each gradient once.
    """
    s2 = scaling**2
    if estimator == "fisher":
        per = torch.cat([e.to("cpu", torch.float64) for e in parts], dim=1) * s2
        return per.mean(dim=1), per
    val = torch.zeros(k, dtype=torch.float64)
    for g in parts.values():
        val += (g.to("cpu", torch.float64) / num_samples).square().sum(dim=(1, 2))
    return val * s2, None
