"""The fine-tuning study (python/study.py): task checkers, and a --smoke run on the real model.

The checker tests need no model: each family's reference answers must pass and plausible wrong
answers must fail, or the study's metrics would mean nothing. The smoke test runs the study's
CLI end to end (probe, every method, training, greedy decoding, summary) in its CI
configuration and checks what it wrote: every method present, trainable-parameter counts equal
to the LoRA formula on the real module shapes, metrics in range, and training that moves the loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
import study_tasks  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 3 kv heads of 64 -> k/v out 192, 30 layers
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def _lora_params(name: str, r: int) -> int:
    n, m = SHAPES[name.rsplit(".", 1)[-1]]
    return r * (n + m)


@pytest.mark.parametrize("task", study_tasks.TASKS)
def test_reference_answers_pass_and_splits_are_disjoint(task):
    sp = study_tasks.make_splits(task, n_train=60, n_val=10, n_test=20, seed=0)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [60, 10, 20]
    prompts = {k: {json.dumps(it["messages"][:-1]) for it in v} for k, v in sp.items()}
    assert not (prompts["test"] & prompts["train"]) and not (prompts["val"] & prompts["train"])
    assert not (prompts["test"] & prompts["val"])
    for it in sp["test"]:
        assert study_tasks.score_answer(task, it, it["messages"][-1]["content"]) == 1.0
    # the test split does not depend on the train size
    assert study_tasks.make_splits(task, n_train=5, n_val=10, n_test=20, seed=0)["test"] == sp["test"]


def test_wrong_answers_fail():
    S = study_tasks
    assert S.score_answer("math", {"check": {"answer": 12}}, "7 + 5 = 13\nAnswer: 13") == 0.0
    assert S.score_answer("math", {"check": {"answer": 12}}, "the answer is 12") == 0.0  # format is part of the task
    assert S.score_answer("math", {"check": {"answer": 12}}, "Answer: 12") == 1.0
    ins = lambda **c: {"check": c}  # noqa: E731
    assert S.score_answer("instruction", ins(kind="upper", word="river"), "river") == 0.0
    assert S.score_answer("instruction", ins(kind="list", n=3), "- a\n- b") == 0.0
    assert S.score_answer("instruction", ins(kind="list", n=2), "- a\n- a") == 0.0
    assert S.score_answer("instruction", ins(kind="json", key="age", value=3), '{"age": 4}') == 0.0
    assert S.score_answer("instruction", ins(kind="json", key="age", value=3), "age: 3") == 0.0
    assert S.score_answer("instruction", ins(kind="include_end", word="river"), "A calm river.") == 0.0
    assert S.score_answer("instruction", ins(kind="repeat", word="fox", n=3), "fox fox") == 0.0
    tests = ["assert f(2) == 5"]
    assert S.score_answer("code", {"check": {"tests": tests}}, "```python\ndef f(x):\n    return x + 3\n```\nIt adds 3.") == 1.0
    assert S.score_answer("code", {"check": {"tests": tests}}, "def f(x):\n    return x + 2") == 0.0
    assert S.score_answer("code", {"check": {"tests": tests}}, "def f(x) return x") == 0.0  # syntax error
    assert S.score_answer("chat", {"check": {"value": "teal"}}, "Your favourite colour is blue.") == 0.0
    assert S.score_answer("chat", {"check": {"value": "lime"}}, "It is sublime.") == 0.0  # whole words only


def test_generated_code_cannot_hang_the_study():
    t0 = time.time()
    assert not study_tasks.run_hidden_tests("def f():\n    while True: pass", ["assert f() is None"], timeout=1.0)
    assert time.time() - t0 < 10


def test_bad_task_and_sizes_are_refused():
    with pytest.raises(ValueError, match="choose from"):
        study_tasks.make_splits("poetry", 1, 1, 1)
    with pytest.raises(ValueError, match="split sizes"):
        study_tasks.make_splits("math", 1, 1, 0)


@pytest.mark.slow
def test_smoke_run(tmp_path):
    out = tmp_path / "smoke"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "study.py"), "run", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    wall = time.time() - t0
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    by = {r["method"]: r for r in runs}
    import study

    assert set(by) == set(study.METHODS)
    plans = json.loads((out / "plans.json").read_text())
    plan = plans["math"]
    dom, rnd = plan["dominant"], plan["random_module"]
    page = json.loads((out / "page_math.json").read_text())
    assert page["dominant_module"] == dom
    expected = {
        "base": 0,
        "lora_all": 30 * sum(8 * (n + m) for n, m in SHAPES.values()),  # 2,442,240
        "lora_qv": 30 * (_lora_params("q_proj", 8) + _lora_params("v_proj", 8)),  # 460,800
        "domlora": _lora_params(dom, 8),
        "domlora_rbig": _lora_params(dom, plan["rbig"]),
        "random_module": _lora_params(rnd, 8),
        "shallow_down": _lora_params("model.layers.2.mlp.down_proj", 8),
        "dora_dom": _lora_params(dom, 8) + SHAPES[dom.rsplit(".", 1)[-1]][1],  # + DoRA's magnitude vector
    }
    assert {m: r["params"] for m, r in by.items()} == expected
    assert expected["lora_all"] == 2_442_240
    for m, r in by.items():
        assert r["phase"] == "test" and r["test"]["n"] == 4
        assert 0.0 <= r["test"]["metric"] <= 1.0
        assert 0.0 < r["test"]["loss"] < 20.0
        assert len(r["train_losses"]) == (0 if m == "base" else 2)
    assert "apply_domlora" in by["domlora"]["placement"] and "probe A (seed 0)" in by["domlora"]["placement"]
    # two steps of vanilla LoRA at 2e-3 on these items clearly lower the held-out loss (1.5 -> 0.8
    # when this test was written); an adapter that never trains would leave it at the base value
    assert by["lora_all"]["test"]["loss"] < by["base"]["test"]["loss"] - 0.1
    table = (out / "table.md").read_text()
    for m in study.METHODS:
        assert f"| {m} |" in table
    assert (out / "curves.png").stat().st_size > 1000
    print(f"smoke run wall time {wall:.0f}s")


def test_version_2_gives_instruction_enough_items_and_keeps_version_1():
    # the placement study needs 400 + 100 + 800 distinct instruction items; version 1 has 738
    with pytest.raises(ValueError, match="could only draw 738"):
        study_tasks.make_splits("instruction", 400, 100, 800)
    sp = study_tasks.make_splits("instruction", 400, 100, 800, version=2)
    kinds = {k: {it["check"]["kind"] for it in v} for k, v in sp.items()}
    assert {"sorted", "json_range", "json"} <= kinds["train"] and kinds["test"] >= {"sorted", "json_range", "repeat"}
    for it in sp["train"] + sp["test"]:
        assert study_tasks.score_answer("instruction", it, it["messages"][-1]["content"]) == 1.0
    assert study_tasks.score_answer("instruction", {"check": {"kind": "sorted", "words": ["a", "b"]}}, "b\na") == 0.0
    assert study_tasks.score_answer("instruction", {"check": {"kind": "json_range", "a": 1, "b": 3}}, "[1, 2]") == 0.0
    # the other families and version 1 are what the old study drew
    assert study_tasks.make_splits("math", 40, 5, 10, version=2) == study_tasks.make_splits("math", 40, 5, 10)
    old = study_tasks.make_splits("instruction", 160, 16, 30)  # the old study's splits (python/results)
    assert old["test"][0]["messages"][0]["content"] == "List 2 countries, one per line, each line starting with '- '."
    assert old["train"][-1]["messages"][0]["content"] == (
        'Return a JSON object with the key "size" set to the number 76. No other text.')
