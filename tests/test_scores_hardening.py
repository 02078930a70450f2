"""Reading a PAGE report refuses every malformed field by name; writing one never destroys the previous one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from domlora_kernels.scores import ModuleInfo, PageScores

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def _scores(n_samples: int = 3, big: bool = False) -> PageScores:
    names = NAMES if not big else [f"model.layers.{i}.mlp.down_proj" for i in range(400)]
    scores = {n: float(i + 1) for i, n in enumerate(names)}
    per = {n: torch.full((1, n_samples), v, dtype=torch.float64) for n, v in scores.items()}
    mods = {n: ModuleInfo(i, "down_proj", 96, 64) for i, n in enumerate(names)}
    cfg = {"rank": 4, "projection": "A", "estimator": "fisher", "seeds": [0], "lora_alpha": None, "use_rslora": False,
           "scaling": 1.0, "backend": "auto", "target_modules": "all-linear", "exclude_modules": None}
    s = PageScores(scores, {0: dict(scores)}, per, mods, n_samples, cfg, {"model": "tiny"})
    s.signals["adam"] = {n: -v for n, v in scores.items()}  # signals may be negative; finite
    return s


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize("path,value,match", [
    (["modules", 0, "page"], float("nan"), r"modules\[0\] \('model.layers.0.mlp.down_proj'\).page must be a finite number >= 0, got nan"),
    (["modules", 1, "page"], -1.0, r"modules\[1\] .*\.page must be a finite number >= 0, got -1.0"),
    (["modules", 1, "page"], None, r"modules\[1\] .*\.page must be a finite number >= 0, got null"),
    (["modules", 0, "page"], KeyError, r"modules\[0\] .*\.page is missing"),
    (["modules", 0, "name"], KeyError, r"modules\[0\].name is missing"),
    (["modules"], KeyError, r"modules is missing"),
    (["modules"], {}, r"modules must be a list, got dict"),
    (["modules"], [], r"modules must be a non-empty list"),
    (["by_seed"], [], r"by_seed must be an object \(a dict\), got list"),
    (["by_seed", "0", NAMES[0]], float("inf"), r"by_seed\['0'\]\['model.layers.0.mlp.down_proj'\] must be a finite number"),
    (["by_seed", "0"], {NAMES[0]: 1.0}, r"by_seed\['0'\] names other modules than 'modules'"),
    (["per_sample", NAMES[1]], [[1.0, float("nan"), 2.0]], r"per_sample\['model.layers.1.mlp.down_proj'\]\[0\]\[1\] must be a finite"),
    (["per_sample", NAMES[1]], [[1.0]], r"per_sample\[.*\] must be 1 list\(s\) \(one per seed\) of num_samples = 3"),
    (["num_samples"], "3", r"num_samples must be an integer >= 1, got '3'"),
    (["num_samples"], KeyError, r"num_samples is missing"),
    (["config"], None, r"config must be an object \(a dict\), got null"),
    (["config", "rank"], KeyError, r"config.rank is missing"),
    (["config", "projection"], "C", r"config.projection must be one of A, B, AB, expected"),
    (["config", "seeds"], [], r"config.seeds must be a non-empty list of distinct integers"),
    (["signals"], [], r"signals must be an object \(a dict\), got list"),
    (["signals", "adam"], [1.0], r"signals\['adam'\] must be an object \(a dict\), got list"),
    (["signals", "adam", NAMES[0]], float("nan"), r"signals\['adam'\]\['model.layers.0.mlp.down_proj'\] must be a finite number, got nan"),
    (["signals", "adam", NAMES[0]], "x", r"signals\['adam'\]\[.*\] must be a finite number, got 'x'"),
])
def test_malformed_report_is_refused_by_field(tmp_path, path, value, match):
    d = json.loads(json.dumps(_scores().to_dict()))
    _set(d, path, value)
    with pytest.raises(ValueError, match="not a valid PAGE report: " + match):
        PageScores.from_dict(d)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(d))  # NaN and Infinity as Python's json writes them
    with pytest.raises(ValueError, match=rf"^{str(f)}: not a valid PAGE report: " + match):
        PageScores.from_json(f)


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", r"the report must be an object \(a dict\), got list"),
    ('{"schema": "other"}', r"not a PAGE report of schema"),
    ('{"schema": ', r":1: not valid JSON"),
    ("[" * 100000 + "]" * 100000, r"nested too deeply"),
])
def test_not_a_report_names_the_file(tmp_path, text, match):
    f = tmp_path / "r.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=rf"^{str(f)}.*" + match):
        PageScores.from_json(f)
    f.write_bytes(b'{"schema": "\xff"}')
    with pytest.raises(ValueError, match=rf"^{str(f)}: not UTF-8 text"):
        PageScores.from_json(f)


def test_nan_report_no_longer_scrambles_the_ranking(tmp_path):
    d = _scores().to_dict()
    d["modules"][1]["page"] = float("nan")
    with pytest.raises(ValueError):
        PageScores.from_dict(d)


def test_valid_report_round_trips_with_signals(tmp_path):
    s = _scores()
    back = PageScores.from_json(s.to_json(tmp_path / "r.json"))
    assert back.scores == s.scores and back.by_seed == s.by_seed and back.signals == s.signals
    assert back.dominant_module == s.dominant_module


# ------------------------------------------------------------------ atomic writes
def test_a_write_that_fails_midway_keeps_the_previous_report(tmp_path):
    """A real failure midway: the file-size limit (RLIMIT_FSIZE) stops the write after 4 KiB,
    in a child process. The previous report must still be there, whole."""
    pytest.importorskip("resource")
    path = tmp_path / "r.json"
    _scores().to_json(path)
    before = path.read_bytes()
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from test_scores_helper import big
        s = big()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            s.to_json({str(path)!r})
        except OSError as e:
            print("failed:", e.errno)
        else:
            print("written")
    """)
    (tmp_path / "test_scores_helper.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_scores_hardening import _scores
        def big():
            return _scores(n_samples=50, big=True)
    """))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("failed:"), r.stdout  # the new report is larger than the limit
    assert path.read_bytes() == before
    assert PageScores.from_json(path).scores == _scores().scores
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


def test_a_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    import os

    path = tmp_path / "r.json"
    _scores().to_json(path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        _scores(n_samples=5).to_json(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_report_path_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file is a file, not a folder"):
        _scores().to_json(tmp_path / "file" / "sub" / "r.json")
    with pytest.raises(IsADirectoryError, match=r"is a folder; give the report a file name"):
        _scores().to_json(tmp_path)
