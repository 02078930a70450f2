"""Small helpers that several test modules share (one definition each)."""

from __future__ import annotations

import pytest
import torch

# Every (projection, estimator) pair page_scores accepts; ("expected", "gradient") is refused.
COMBOS = [(p, e) for p in ("A", "B", "AB", "expected") for e in ("fisher", "gradient") if (p, e) != ("expected", "gradient")]

# The dtypes the Triton kernels take; the torch reference also takes float64.
KERNEL_DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``out`` against ``ref`` (in float64)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def uses_gram(t: int, m: int, n: int) -> bool:
    """The tests' own statement of the ops' cost rule: the Gram form ``||X X^T . D D^T||``
    costs ``t^2 (m + n)`` against ``t m n`` for the direct ``||D^T X||^2``."""
    return t * t * (m + n) < t * m * n
