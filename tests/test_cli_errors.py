"""`domlora` on what the user gets wrong: one ``error:`` line and exit status 2, never a traceback,
and every argument checked before the (slow) model load and probe."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

import domlora_kernels.models
import domlora_kernels.probe
from domlora_kernels.cli import main

pytest.importorskip("peft")
WORDS = [f"w{i}" for i in range(60)]


def _word_model(root, nan: bool = False):
    """A tiny Llama and a word-level tokenizer (as in test_cli_apply_compare.py); ``nan``: a NaN weight."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.save_pretrained(root)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                                               pad_token_id=1, eos_token_id=2))
    if nan:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    data = root / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"text": " ".join(WORDS[int(i)] for i in torch.randint(0, 60, (n,), generator=g))})
                            + "\n" for n in (7, 11, 5, 9)))
    return {"model": _word_model(root / "model"), "nan": _word_model(root / "nan", nan=True), "data": data}


def _common(folders, model="model"):
    return ["--model", str(folders[model]), "--data", str(folders["data"]), "--batch-size", "2", "--no-progress",
            "--resamples", "20"]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model is loaded (or probed): the error must come before."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(domlora_kernels.models, "load_model", refuse)
    monkeypatch.setattr(domlora_kernels.probe, "page_scores", refuse)


@pytest.fixture
def no_probe(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the probe ran before the arguments were checked")

    monkeypatch.setattr(domlora_kernels.probe, "page_scores", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ 13. tracebacks that were no user errors
def test_nan_weights_are_an_error_line(folders, tmp_path, capsys):
    assert main(["probe", *_common(folders, "nan"), "--out", str(tmp_path / "r.json")]) == 2
    assert _error(capsys).startswith("error: non-finite loss nan for sample 0")


@pytest.mark.parametrize("cmd,flag", [("probe", "--out"), ("apply", "--out-dir")])
def test_output_under_a_file_is_an_error_before_loading(folders, tmp_path, capsys, no_load, cmd, flag):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "sub" / ("r.json" if cmd == "probe" else "adapter")
    assert main([cmd, *_common(folders), flag, str(target)]) == 2
    assert _error(capsys) == f"error: {flag} {str(target)!r}: {str(tmp_path / 'file')!r} is a file, not a folder; choose another path"


def test_output_that_is_a_folder_is_an_error_before_loading(folders, tmp_path, capsys, no_load):
    assert main(["probe", *_common(folders), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in _error(capsys)


def test_deeply_nested_json_line_is_an_error_line(folders, tmp_path, capsys, no_load):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "w1 w2 w3"}\n' + "[" * 100000 + "\n")
    assert main(["probe", "--model", str(folders["model"]), "--data", str(data), "--no-progress"]) == 2
    assert _error(capsys) == f"error: {data}:2: not readable JSON (nested too deeply)"


def test_tokenizer_that_does_not_match_the_model(tiny_folder, tmp_path, capsys):
    """conftest's tiny_folder: SmolLM2's tokenizer (49152 ids) over a model of 101."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n')
    assert main(["probe", "--model", str(tiny_folder), "--data", str(data), "--no-progress",
                 "--out", str(tmp_path / "r.json")]) == 2
    msg = _error(capsys)
    assert "outside the model's vocabulary of 101 ids" in msg and "the tokenizer does not match the model" in msg


def test_unknown_chat_role_is_a_note(folders, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "wizard", "content": "w1 w2"},
                                             {"role": "assistant", "content": "w3 w4 w5"}]}) + "\n")
    assert main(["probe", "--model", str(folders["model"]), "--data", str(data), "--no-progress", "--resamples", "10",
                 "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "note: chat messages with a role none of system, user, assistant" in err and "'wizard' (first in record 0)" in err


# ------------------------------------------------------------------ 18. arguments checked before the model and the probe
@pytest.mark.parametrize("args,message", [
    (["--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["--budget", "1%", "--rank-pattern", "page"], "drop rank_pattern"),
    (["--variant", "adalora", "--total-step", "10", "--budget", "1%"], "use top_k with it, not a budget"),
    (["--lora-alpha", "-1"], "lora_alpha must be a positive number"),
    (["--lora-alpha", "nan"], "lora_alpha must be a positive number"),
    (["--target-modules", "q_proj("], "target_modules='q_proj(' is not a valid regular expression"),
    (["--seeds", "2", "--projection", "expected"], "several seeds would give identical scores"),
])
def test_apply_arguments_checked_before_loading(folders, tmp_path, capsys, no_load, args, message):
    assert main(["apply", *_common(folders), *args, "--out-dir", str(tmp_path / "a")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args,message", [
    (["--top-k", "999"], "top_k must be an integer between 1 and 14, got 999"),
    (["--budget", "10", "--strategy", "page"], "buys no adapter: rank 1 of the densest module"),
])
def test_apply_arguments_the_model_decides_checked_before_the_probe(folders, tmp_path, capsys, no_probe, args, message):
    assert main(["apply", *_common(folders), *args, "--out-dir", str(tmp_path / "a")]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("args,message", [
    (["--lora-alpha", "0"], "lora_alpha must be a positive number"),
    (["--target-modules", "[q"], "is not a valid regular expression"),
])
def test_probe_arguments_checked_before_loading(folders, tmp_path, capsys, no_load, args, message):
    assert main(["probe", *_common(folders), *args, "--out", str(tmp_path / "r.json")]) == 2
    assert message in _error(capsys)


# ------------------------------------------------------------------ 16. atomic JSON files
def test_placement_json_write_failing_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    from domlora_kernels import cli

    path = tmp_path / "domlora_placement.json"
    cli._write_json(path, {"targets": ["a"]})
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match="No space left"):
        cli._write_json(path, {"targets": ["b" * 1000]})
    assert json.loads(path.read_text()) == {"targets": ["a"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["domlora_placement.json"]
