"""The studies' shared helpers: result tables written atomically."""

from __future__ import annotations

import os

import pytest

from python.studies.common import write_atomic


def test_an_interrupted_write_keeps_the_previous_table(tmp_path, monkeypatch):
    path = tmp_path / "budget.md"
    write_atomic(path, "old table\n")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new table\n")
    assert path.read_text() == "old table\n" and list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    write_atomic(path, "new table\n")
    assert path.read_text() == "new table\n"
