"""User data in every format: .json, .csv, .parquet, datasets folders and objects; the plain chat
rendering for a tokenizer without a chat template."""

from __future__ import annotations

import csv
import json
import warnings

import pytest

from domlora_kernels.data import ChatTemplateFallbackWarning, encode, make_batches, read_jsonl, read_records
from test_data import CharTokenizer

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
RECORDS = [{"text": "first text"}, {"messages": CHAT}, {"text": "third"}]


def _write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- .json


def test_json_list_and_json_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(RECORDS, indent=2))
    assert read_records(p) == RECORDS
    p.write_text("\n".join(json.dumps(r) for r in RECORDS))  # JSON Lines under a .json name
    assert read_records(p) == RECORDS


@pytest.mark.parametrize(
    "text,match",
    [
        ('[\n {"text": "a"},\n {"text": ""}\n]', r"d\.json:3: 'text' must be a non-empty string"),
        ('[\n {"text": "a"},\n\n {"text": "b", "messages": []}\n]', r"d\.json:4: each record needs exactly one"),
        ('[\n {"text": "a"},\n {"text": nope}\n]', r"d\.json:3: not valid JSON"),
        ('[\n {"text": "a"}\n {"text": "b"}\n]', r"d\.json:3: not valid JSON \(expected ',' or '\]'"),
        ('[\n "just a string"\n]', r"d\.json:2: each record must be an object, got str"),
    ],
)
def test_json_errors_name_the_line(tmp_path, text, match):
    p = tmp_path / "d.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_records(p)


# ---------------------------------------------------------------- .csv


def test_csv_text_messages_and_named_fields(tmp_path):
    p = _write_csv(tmp_path / "d.csv", ["id", "text", "messages"],
                   [[1, "plain one", ""], [2, "", json.dumps(CHAT)], [3, "multi\nline", ""]])
    assert read_records(p) == [{"text": "plain one"}, {"messages": CHAT}, {"text": "multi\nline"}]
    q = _write_csv(tmp_path / "e.csv", ["prompt", "conv"], [["abc", json.dumps(CHAT)]])
    assert read_records(q, text_field="prompt") == [{"text": "abc"}]
    assert read_records(q, messages_field="conv") == [{"messages": CHAT}]


@pytest.mark.parametrize(
    "rows,kw,match",
    [
        ([["ok"], [""]], {}, r"d\.csv:3: no 'text' or 'messages' value; the fields are 'text'"),
        ([["ok"], ["fine"]], {"text_field": "body"}, r"d\.csv:2: no field 'body'; the fields are 'text'"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, rows, kw, match):
    p = _write_csv(tmp_path / "d.csv", ["text"], rows)
    with pytest.raises(ValueError, match=match):
        read_records(p, **kw)


def test_csv_line_numbers_count_multiline_cells(tmp_path):
    long = json.dumps(CHAT, indent=1)  # a valid cell over several lines
    p = _write_csv(tmp_path / "d.csv", ["messages"], [[json.dumps(CHAT)], [long], ["[not json"]])
    line = 3 + long.count("\n") + 1
    with pytest.raises(ValueError, match=rf"d\.csv:{line}: 'messages' must hold a JSON list"):
        read_records(p)  # the error names the line the bad row starts on
    assert read_records(_write_csv(tmp_path / "e.csv", ["messages"], [[long]])) == [{"messages": CHAT}]


# ---------------------------------------------------------------- .parquet


def test_parquet_rows_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the data extra: pip install 'domlora_kernels[data]'")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a b c", None], "messages": [None, CHAT]}), p)
    assert read_records(p) == [{"text": "a b c"}, {"messages": CHAT}]
    pq.write_table(pa.table({"text": ["fine", "  "]}), p)
    with pytest.raises(ValueError, match=r"d\.parquet: row 1: 'text' must be a non-empty string"):
        read_records(p)


# ---------------------------------------------------------------- datasets


def test_datasets_folder_split_and_dataset_object(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the data extra: pip install 'domlora_kernels[data]'")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"conv": CHAT, "text": "ignored"}] * 3),
        "test": datasets.Dataset.from_list([{"conv": CHAT, "text": "t"}]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd", messages_field="conv") == [{"messages": CHAT}] * 3
    assert read_records(tmp_path / "dd", split="test") == [{"text": "t"}]
    with pytest.raises(ValueError, match=r"has no split 'dev'; its splits are train, test \(--split\)"):
        read_records(tmp_path / "dd", split="dev")
    bs = make_batches(dd["train"], CharTokenizer(), batch_size=2, messages_field="conv")
    assert [b["input_ids"].shape[0] for b in bs] == [2, 1]
    with pytest.raises(ValueError, match=r"record 0: no field 'body'"):
        make_batches(dd["test"], CharTokenizer(), text_field="body")


def test_datasets_data_folder_and_missing_name(tmp_path):
    pytest.importorskip("datasets", reason="the data extra: pip install 'domlora_kernels[data]'")
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_csv(folder / "train.csv", ["text"], [["from a folder"], ["of csv files"]])
    assert read_records(folder) == [{"text": "from a folder"}, {"text": "of csv files"}]
    with pytest.raises(FileNotFoundError, match="datasets could not load it"):
        read_records(tmp_path / "no_such_dataset")


# ---------------------------------------------------------------- files and the JSONL reader


def test_unknown_and_missing_files(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unknown format '\.txt'; give one of \.jsonl, \.json, \.parquet, \.csv"):
        read_records(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "missing.csv")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert read_records(tmp_path / "d.jsonl") == read_jsonl(tmp_path / "d.jsonl") == [{"text": "x"}]


def test_fields_are_exclusive(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"a": "x"}) + "\n")
    with pytest.raises(ValueError, match="give text_field or messages_field, not both"):
        read_records(p, text_field="a", messages_field="b")


# ---------------------------------------------------------------- no chat template


class BaseTokenizer(CharTokenizer):
    """CharTokenizer as a base model's: BOS/EOS ids and no chat template."""

    bos_token_id = 2
    eos_token_id = 3
    chat_template = None


def test_plain_rendering_targets_assistant_content_and_eos():
    tok = BaseTokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]
    enc = encode({"messages": msgs}, tok)
    text = "User: hi\nAssistant: yo" + "\0" + "User: q\nAssistant: ok" + "\0"
    want = [2] + [3 if c == "\0" else tok(c)["input_ids"][0] for c in text]
    assert enc["input_ids"] == want
    targets = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert targets == tok("yo")["input_ids"] + [3] + tok("ok")["input_ids"] + [3]


def test_make_batches_warns_once_per_call_on_fallback():
    with pytest.warns(ChatTemplateFallbackWarning, match="no chat template: chat records are rendered plainly"):
        make_batches([{"messages": CHAT}] * 3, BaseTokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_batches([{"text": "plain text only"}], BaseTokenizer())  # no chat record: no warning
        make_batches([{"messages": CHAT}], CharTokenizer())  # a template: no warning


def test_real_tokenizer_without_template():
    """SmolLM2's tokenizer with its template removed, as a base model's would be."""
    from transformers import AutoTokenizer

    from domlora_kernels.models import _source

    tok = AutoTokenizer.from_pretrained(_source(None, True)[0])
    tok.chat_template = None
    with pytest.warns(ChatTemplateFallbackWarning):
        (batch,) = make_batches([{"messages": CHAT}], tok)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "yo" + tok.eos_token
    assert tok.decode(ids) == (tok.bos_token or "") + "User: hi\nAssistant: yo" + tok.eos_token
