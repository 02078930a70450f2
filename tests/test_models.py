"""load_model: model names from the Hugging Face cache, devices, dtypes, and their errors."""

from __future__ import annotations

import os

import pytest
import torch
from huggingface_hub import constants

from domlora_kernels.models import _source, load_model, resolve_device, resolve_dtype


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, with the hub switched off (as HF_HUB_OFFLINE=1 does)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_name_not_cached_says_how_to_fix(offline_cache):
    with pytest.raises(FileNotFoundError) as e:
        load_model("someorg/not-cached-model")
    msg = str(e.value)
    assert "'someorg/not-cached-model' is not a local path, and it is not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg
    assert "hf download someorg/not-cached-model" in msg and str(offline_cache) in msg
    assert "or pass a local transformers folder or a .gguf file" in msg


def test_hub_name_resolves_through_the_cache(offline_cache):
    """A cached snapshot (the hub's layout: refs/main -> snapshots/<commit>/) loads by its name."""
    smol = _source(None, True)[0]  # the de-quantised SmolLM2 folder
    repo = offline_cache / "models--someorg--smol"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name in os.listdir(smol):
        (snap / name).symlink_to(os.path.join(smol, name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model, tok = load_model("someorg/smol")
    assert model.config.num_hidden_layers == 30 and tok.chat_template is not None
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training


@pytest.mark.parametrize(
    "model,err,match",
    [
        ("./missing-folder", FileNotFoundError, "does not exist; give a .gguf file, a local transformers folder, or a model name"),
        ("missing.gguf", FileNotFoundError, "does not exist"),
        ("not a/valid name!", FileNotFoundError, "does not exist"),
    ],
)
def test_missing_paths(offline_cache, model, err, match):
    with pytest.raises(err, match=match):
        load_model(model)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device 'gpu' is not one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA, which this torch .* cannot use here; use --device cpu"):
            resolve_device("cuda:1")


def test_torchrun_rank_gets_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # explicit: kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="cuda:1 does not exist; this machine has 1 CUDA device"):
        resolve_device("auto")


def test_dtype_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(ValueError, match="dtype torch.float64 is not one of"):
        resolve_dtype(torch.float64, cpu)


def test_load_argument_errors():
    with pytest.raises(ValueError, match="device_map 'everywhere' is not one of auto, balanced"):
        load_model(device_map="everywhere")
    with pytest.raises(ValueError, match="give device_map='auto' or device='cpu', not both"):
        load_model(device_map="auto", device="cpu")


def test_load_in_dtype():
    model, _ = load_model(dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
