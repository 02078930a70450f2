"""`domlora probe` end to end on the real embedded model, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from domlora_kernels.cli import main

pytestmark = pytest.mark.slow


def test_probe_on_default_model(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["probe", "--num-samples", "4", "--batch-size", "2", "--max-length", "96", "--top", "5",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["schema"] == "domlora_kernels.page_scores/1"
    assert len(report["modules"]) == 210 and report["num_samples"] == 4
    dom = report["dominant_module"]
    assert f"dominant module: {dom} (layer " in text
    assert text.count("\n  ") >= 5  # five ranked rows
    assert max(m["page"] for m in report["modules"]) == next(m["page"] for m in report["modules"] if m["name"] == dom)


def test_user_jsonl_and_seed(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n{"text": "Two plus two is four."}\n')
    out = tmp_path / "r.json"
    assert main(["probe", "--data", str(data), "--seed", "3", "--rank", "4", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["seeds"] == [3] and report["config"]["rank"] == 4 and report["num_samples"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--data", "/nonexistent.jsonl"], "does not exist"),
        (["--tasks", "poetry"], "unknown calibration task"),
        (["--target-modules", "nothing_here"], "matched no linear module; candidates are"),
    ],
)
def test_errors_are_clear(args, message, capsys):
    assert main(["probe", "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "domlora_kernels.cli", "probe", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--projection {A,B,AB,expected}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "domlora_kernels.cli", "probe", "--rank", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "must be >= 1" in r.stderr


def test_model_name_not_in_the_cache(monkeypatch, capsys):
    """A hub name that is not cached, with the hub out of reach: exit 2 and say how to fix it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never ask the network from a test
    assert main(["probe", "--no-progress", "--model", "some-org/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model 'some-org/not-cached' is not a local path, and it is not in the local Hugging Face cache")
    assert "hf download some-org/not-cached" in err and "HF_HUB_CACHE" in err and "Traceback" not in err
