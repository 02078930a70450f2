"""The pure-torch reference (ops/naive.py) against a plain per-sample float64 loop.

The reference is the oracle of the kernels, so it gets its own oracle: one sample at a
time, the full matrix ``u_s^T v_s`` (``d_s^T x_s``) in float64, squared and summed. Both
branches of ``weight_grad_energy_ref`` (direct and Gram) are exercised, and each param says
which one its sizes select.
"""

from __future__ import annotations

import pytest
import torch

from domlora_kernels.ops import weight_grad_energy, projected_energy
from domlora_kernels.ops.naive import weight_grad_energy_ref, projected_energy_ref
from domlora_kernels.testing import KERNEL_DTYPES, rel_err, uses_gram

# float32 reference against a float64 loop: only summation order differs. Measured worst
# over 5 seeds of these sizes: float32 1.3e-7, bfloat16 2.6e-7, float16 1.8e-7 (the loop
# sees the same rounded inputs, and the reference accumulates in float32 whatever the input
# dtype), float64 5.8e-16.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6, torch.float64: 1e-12}


def loop_energy(a: torch.Tensor, b: torch.Tensor, segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``|| a_s^T b_s ||_F^2`` per sample, float64, one sample at a time."""
    if segments is None:
        rows = [(a[i], b[i]) for i in range(a.shape[0])]
    else:
        rows = [(a[s:e], b[s:e]) for s, e in segments]
    return torch.tensor([(x.double().T @ y.double()).square().sum().item() for x, y in rows], dtype=torch.float64)


DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (*KERNEL_DTYPES, torch.float64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,M,R",
    [
        pytest.param(3, 63, 1000, 3, id="B3-T63-M1000-R3"),
        pytest.param(2, 1, 17, 64, id="B2-T1-M17-R64"),
        pytest.param(1, 40, 5, 128, id="B1-T40-M5-R128"),
    ],
)
def test_projected_energy_ref_padded(B, T, M, R, dtype):
    g = torch.Generator().manual_seed(B * 1000 + T)
    u = torch.randn(B, T, M, generator=g).to(dtype)
    v = torch.randn(B, T, R, generator=g).to(dtype)
    out = projected_energy_ref(u, v)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (B,)
    assert rel_err(out, loop_energy(u, v)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_projected_energy_ref_packed(dtype):
    lens = [0, 1, 17, 0, 64, 3]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(7)
    u = torch.randn(n, 33, generator=g).to(dtype)
    v = torch.randn(n, 5, generator=g).to(dtype)
    out = projected_energy_ref(u, v, cu)
    ref = loop_energy(u, v, list(zip(cu.tolist(), cu.tolist()[1:])))
    assert out.shape == (len(lens),)
    assert (out[torch.tensor(lens) == 0] == 0).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,M,N,form",
    [
        pytest.param(3, 63, 100, 70, "direct", id="B3-T63-M100-N70-direct"),
        pytest.param(2, 5, 100, 70, "gram", id="B2-T5-M100-N70-gram"),
        pytest.param(2, 1, 1000, 3, "gram", id="B2-T1-M1000-N3-gram"),
    ],
)
def test_weight_grad_energy_ref_padded(B, T, M, N, form, dtype):
    assert uses_gram(T, M, N) == (form == "gram")  # the id says which branch runs
    g = torch.Generator().manual_seed(T * 7 + M)
    d = torch.randn(B, T, M, generator=g).to(dtype)
    x = torch.randn(B, T, N, generator=g).to(dtype)
    out = weight_grad_energy_ref(d, x)
    assert out.shape == (B,)
    assert rel_err(out, loop_energy(d, x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grad_energy_ref_packed_mixes_forms(dtype):
    # M = N = 64: Gram below T = 32, direct from 32 on; lengths on both sides, 0 and 1.
    lens = [0, 1, 5, 40, 31, 33]
    assert {uses_gram(t, 64, 64) for t in lens if t} == {True, False}
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    n = int(cu[-1])
    g = torch.Generator().manual_seed(11)
    d = torch.randn(n, 64, generator=g).to(dtype)
    x = torch.randn(n, 64, generator=g).to(dtype)
    out = weight_grad_energy_ref(d, x, cu)
    assert rel_err(out, loop_energy(d, x, list(zip(cu.tolist(), cu.tolist()[1:])))) < TOL[dtype]


def test_public_functions_default_to_reference_on_cpu():
    # "auto" on CPU tensors is the torch path, bit for bit.
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(2, 9, 13, generator=g), torch.randn(2, 9, 4, generator=g)
    assert torch.equal(projected_energy(u, v), projected_energy_ref(u, v))
    assert torch.equal(weight_grad_energy(u, v), weight_grad_energy_ref(u, v))
    assert torch.equal(projected_energy(u, v, backend="torch"), projected_energy_ref(u, v))


def test_reference_rejects_bad_cu_seqlens():
    u, v = torch.randn(10, 4), torch.randn(10, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        projected_energy_ref(u, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        weight_grad_energy_ref(u, v, torch.tensor([0, 4, 9], dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_projected_energy_groups_equal_one_call_per_block(dtype, varlen):
    """groups=g gives each block of R/g columns its own energy, as one call per block does."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(3, 11, 40, generator=g).to(dtype)
    v = torch.randn(3, 11, 12, generator=g).to(dtype)
    cu = None
    if varlen:
        u, v, cu = u.reshape(33, 40), v.reshape(33, 12), torch.tensor([0, 5, 5, 20, 33], dtype=torch.int32)
    got = projected_energy(u, v, cu, backend="torch", groups=3)
    want = torch.stack([projected_energy(u, v[..., 4 * j:4 * (j + 1)], cu, backend="torch") for j in range(3)])
    assert got.shape == want.shape == (3, 4 if varlen else 3)
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-6)
    assert rel_err(got.sum(dim=0), projected_energy(u, v, cu, backend="torch")) < (1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("groups", [0, 5, True])
def test_projected_energy_groups_must_divide_the_columns(groups):
    with pytest.raises(ValueError, match="groups"):
        projected_energy(torch.randn(2, 3, 4), torch.randn(2, 3, 6), groups=groups)
