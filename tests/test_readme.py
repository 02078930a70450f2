"""The README's Python examples run as written (on the real embedded model).

Blocks fenced as ```python run in order in one namespace, as a reader would type them into
one Python interpreter. Blocks that need torchrun or GPUs are fenced as ```py and are exercised by
tests/probe/test_distributed.py instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

pytestmark = pytest.mark.slow


def test_readme_python_examples_run_in_order(tmp_path, monkeypatch, capsys):
    assert len(BLOCKS) >= 2, "README.md lost its Python examples"
    monkeypatch.chdir(tmp_path)  # examples write under domlora_out/
    namespace: dict = {}
    for i, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.dominant_module in scores.scores
    assert Path("domlora_out/example.json").is_file()
    out = capsys.readouterr().out
    assert "by strategy 'plop+types'" in out and "% of vanilla LoRA" in out
    placement = namespace["peft_model"].domlora_placement
    assert placement.strategy == "plop+types" and len(placement.targets) == 90  # v/o/down on all 30 layers
    assert {t.rsplit(".", 1)[1] for t in placement.targets} == {"v_proj", "o_proj", "down_proj"}
    assert placement.trainable_params <= placement.budget
