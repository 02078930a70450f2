"""The task families of the studies (python/studies/tasks.py): generators, splits and checkers.

They need no model: each family's reference answers must pass and plausible wrong answers must
fail, or the studies' metrics would mean nothing; splits must be disjoint by prompt and stable.
"""

from __future__ import annotations

import json
import time

import pytest

from python.studies import tasks as study_tasks


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
    # the other families and version 1 are what the first study drew
    assert study_tasks.make_splits("math", 40, 5, 10, version=2) == study_tasks.make_splits("math", 40, 5, 10)
    old = study_tasks.make_splits("instruction", 160, 16, 30)  # the first study's splits (python/results/archive)
    assert old["test"][0]["messages"][0]["content"] == "List 2 countries, one per line, each line starting with '- '."
    assert old["train"][-1]["messages"][0]["content"] == (
        'Return a JSON object with the key "size" set to the number 76. No other text.')
