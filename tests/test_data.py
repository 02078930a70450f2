"""Calibration data: shipped set, user jsonl, chat templates and assistant-only labels."""

from __future__ import annotations

import json

import pytest
import torch

from domlora_kernels.data import TASKS, collate, encode, load_calibration, make_batches, read_jsonl


class CharTokenizer:
    """A transparent stand-in tokenizer: one id per character, a ChatML-like template."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False):
        out = "".join(f"<{m['role']}>{m['content']}</>" for m in msgs)
        return out + ("<assistant>" if add_generation_prompt else "")


def test_shipped_set_has_every_task_interleaved():
    recs = load_calibration()
    assert len(recs) == 48
    assert [r["task"] for r in recs[:4]] == list(TASKS)
    assert {r["task"] for r in load_calibration(["math"])} == {"math"}
    with pytest.raises(ValueError, match="unknown calibration task"):
        load_calibration(["poetry"])


def test_assistant_only_labels():
    tok = CharTokenizer()
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]}
    enc = encode(rec, tok)
    text = tok.apply_chat_template(rec["messages"])
    targets = "".join(text[i] for i, lab in enumerate(enc["labels"]) if lab != -100)
    assert targets == "yo</>ok</>"


def test_text_records_train_on_every_token():
    enc = encode({"text": "abcdef"}, CharTokenizer())
    assert enc["labels"] == enc["input_ids"]


def test_truncation_and_no_target_error():
    tok = CharTokenizer()
    rec = {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(ValueError, match="no target token within max_length=20; raise --max-length"):
        encode(rec, tok, max_length=20)
    assert len(encode({"text": "z" * 40}, tok, max_length=16)["input_ids"]) == 16


def test_collate_right_pads():
    b = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_make_batches_sizes():
    recs = [{"text": "abc" * (i + 1)} for i in range(5)]
    bs = make_batches(recs, CharTokenizer(), batch_size=2)
    assert [tuple(b["input_ids"].shape) for b in bs] == [(2, 6), (2, 12), (1, 15)]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_batches(recs, CharTokenizer(), batch_size=0)


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", r"data\.jsonl:2: not valid JSON"),
        ('{"text": ""}', "'text' must be a non-empty string"),
        ('{"text": "a", "messages": []}', "exactly one of 'text'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', r"message 0 must be \{'role': str, 'content': str\}"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, match):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_jsonl(p)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
