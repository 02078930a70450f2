"""page_scores through the Triton kernels (Triton's CPU interpreter here) equals the torch backend."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first jitted

pytest.importorskip("triton", reason="triton is a dev dependency; `pip install -e .[dev]`")

from domlora_kernels import page_scores  # noqa: E402
from tiny_models import sample_batch, tiny_model  # noqa: E402


@pytest.mark.parametrize("projection", ["A", "B", "AB", "expected"])
def test_triton_backend_equals_torch(projection):
    model = tiny_model("llama", torch.float32)
    batches = [sample_batch([9, 5, 12], seed=1)]
    ref = page_scores(model, batches, rank=3, projection=projection, backend="torch", progress=False)
    got = page_scores(model, batches, rank=3, projection=projection, backend="triton", progress=False)
    for n in ref.scores:
        torch.testing.assert_close(got.per_sample[n], ref.per_sample[n], rtol=1e-5, atol=1e-12)
