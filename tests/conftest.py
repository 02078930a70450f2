"""Shared test setup: the one place that marks GPU-only tests."""

from __future__ import annotations

import pytest
import torch


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
