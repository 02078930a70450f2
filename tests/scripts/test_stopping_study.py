"""python -m python.studies.stopping: the stopping rule replayed on the committed probes."""

from __future__ import annotations

import json

import pytest

from python.studies import stopping


def test_replay_writes_a_row_per_committed_probe(tmp_path):
    pytest.importorskip("matplotlib")
    assert stopping.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "samples_to_stable.json").read_text())
    assert {(r["family"], r["task"]) for r in rows} >= {("smollm2", "instruction"), ("gemma3", "instruction")}
    for r in rows:
        for d in r["decisions"].values():
            assert len(d["stability"]) == r["batches"]
            stop = d["samples_to_stable"]
            if stop is not None:  # the first batch end at or above the level, with enough samples
                i = r["ends"].index(stop)
                assert d["stability"][i] >= stopping.LEVEL and stop >= stopping.MIN_SAMPLES
                assert all(v is None or v < stopping.LEVEL for v in d["stability"][:i])
    assert (tmp_path / "stability.png").stat().st_size > 1000
