"""page_scores through the Triton kernels equals the torch backend.

On a CUDA machine the model runs on the GPU and the kernels compile natively; on a CPU-only
machine the model stays on the CPU and the kernels run through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before anything imports triton).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency; `pip install -e .[dev]`")

from domlora_kernels import page_scores  # noqa: E402
from domlora_kernels.testing import sample_batch, tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("projection", ["A", "B", "AB", "expected"])
def test_triton_backend_equals_torch(projection):
    model = tiny_model("llama", torch.float32).to(DEVICE)
    batches = [sample_batch([9, 5, 12], seed=1)]
    ref = page_scores(model, batches, rank=3, projection=projection, backend="torch", progress=False)
    got = page_scores(model, batches, rank=3, projection=projection, backend="triton", progress=False)
    assert ref.per_sample and set(got.per_sample) == set(ref.per_sample)
    for n in ref.scores:
        torch.testing.assert_close(got.per_sample[n], ref.per_sample[n], rtol=1e-5, atol=1e-12)
