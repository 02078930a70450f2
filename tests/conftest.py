"""Shared test setup: the one place that marks GPU-only tests, and fixtures several test folders use."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

# The only place that sets TRITON_INTERPRET. CPU-only machines run the Triton kernel tests
# through Triton's interpreter, and TRITON_INTERPRET=1 must be in the environment before
# anything in the process imports triton, not only before the kernel modules are: `import
# triton` builds triton.language's own @triton.jit helpers (tl.zeros, tl.sum, ...) for the
# interpreter or the GPU once, from the environment at that moment. Collecting
# test_cli_apply_compare.py imports peft -> torch._dynamo -> triton, so a test module that
# set it while being collected would come too late, and its interpreted kernels would call
# compiled helpers ("Cannot call @triton.jit'd outside of the scope of a kernel"). This
# conftest is imported before any test module; `import torch` does not import triton. With
# a GPU it stays unset and the kernels compile natively (tests then put their tensors and
# models on the GPU). tests/test_kernel_compile.py compiles real cubins in a subprocess
# without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason on CPU-only machines")
    config.addinivalue_line("markers", "slow: loads the real pretrained model (tens of seconds)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine; run benchmarks/gpu_check.py on a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama as a transformers folder, with SmolLM2's tokenizer files."""
    from domlora_kernels.models import _source
    from domlora_kernels.testing import tiny_model

    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(folder)
    smol = _source(None, True)[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smol}/{name}", folder / name)
    return folder
