"""pytest-benchmark suite of the low-level ops, torch backend, against the naive ways.

    pytest benchmarks/test_bench_ops.py                       # all groups, ~1 min on 2 cores
    pytest benchmarks/test_bench_ops.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Not collected by the main test run (pyproject's testpaths is ["tests"]). Each group times,
on the same inputs, the package's op (``backend="torch"``) and the naive alternatives, and
every benchmarked function's result is first checked against a float64 reference, so a
fast wrong answer fails instead of winning. pytest-benchmark prints each group's table with
the fastest marked; compare rows within a group only.

- ``projected-*``: ``ops.projected_energy(D, P)`` (the probe's trick: ``||D_b^T P_b||^2``
  with ``P = X A^T``) against ``naive-gradient`` (form each ``G_b = D_b^T X_b`` with a bmm,
  then ``||G_b A^T||^2``: what autograd-per-sample does) and ``loop`` (one sample at a time).
- ``gradient-*``: ``ops.weight_grad_energy(D, X)`` (Gram "ghost norm" or direct form, chosen by
  cost) against ``naive-bmm`` (always the direct ``[B, m, n]`` gradient) and ``loop``.
"""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import ops

# (B, T, m, n, r): SmolLM2-135M's up_proj (m=1536, n=576) and down_proj, at short and
# calibration-length sequences.
SHAPES = [
    pytest.param(8, 128, 1536, 576, 8, id="B8-T128-M1536-N576-R8"),
    pytest.param(8, 32, 576, 1536, 8, id="B8-T32-M576-N1536-R8"),
]


def _inputs(b, t, m, n, r):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(b, t, m, generator=g)
    x = torch.randn(b, t, n, generator=g)
    a = torch.randn(r, n, generator=g) / n**0.5
    return d, x, a


def _close(out, ref):
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-5, f"relative error {err:.2e} against the float64 reference"


# ----------------------------------------------------------------------------- projected energy


def _proj_naive_gradient(d, x, a):
    g = torch.bmm(d.transpose(1, 2), x)  # [B, m, n]: the per-sample weight gradients
    return (g @ a.T).square().sum(dim=(1, 2))


def _proj_loop(d, p):
    return torch.stack([(d[i].T @ p[i]).square().sum() for i in range(d.shape[0])])


@pytest.mark.parametrize("b,t,m,n,r", SHAPES)
@pytest.mark.parametrize("impl", ["ops-torch", "naive-gradient", "loop"])
def test_projected_energy(benchmark, impl, b, t, m, n, r):
    d, x, a = _inputs(b, t, m, n, r)
    p = x @ a.T  # [B, T, r], what the probe keeps from the forward pass
    ref = (torch.bmm(d.double().transpose(1, 2), x.double()) @ a.double().T).square().sum(dim=(1, 2))
    fn = {
        "ops-torch": lambda: ops.projected_energy(d, p, backend="torch"),
        "naive-gradient": lambda: _proj_naive_gradient(d, x, a),
        "loop": lambda: _proj_loop(d, p),
    }[impl]
    _close(fn(), ref)
    benchmark.group = f"projected-B{b}-T{t}-M{m}-N{n}-R{r}"
    benchmark(fn)


# ----------------------------------------------------------------------------- gradient energy


def _grad_naive_bmm(d, x):
    return torch.bmm(d.transpose(1, 2), x).square().sum(dim=(1, 2))


def _grad_loop(d, x):
    return torch.stack([(d[i].T @ x[i]).square().sum() for i in range(d.shape[0])])


@pytest.mark.parametrize("b,t,m,n,r", SHAPES)
@pytest.mark.parametrize("impl", ["ops-torch", "naive-bmm", "loop"])
def test_weight_grad_energy(benchmark, impl, b, t, m, n, r):
    d, x, _ = _inputs(b, t, m, n, r)
    ref = torch.bmm(d.double().transpose(1, 2), x.double()).square().sum(dim=(1, 2))
    fn = {
        "ops-torch": lambda: ops.weight_grad_energy(d, x, backend="torch"),
        "naive-bmm": lambda: _grad_naive_bmm(d, x),
        "loop": lambda: _grad_loop(d, x),
    }[impl]
    _close(fn(), ref)
    benchmark.group = f"gradient-B{b}-T{t}-M{m}-N{n}"
    benchmark(fn)
