"""Property tests of the data readers (:func:`domlora_kernels.data.read_records`): JSONL, JSON and CSV.

Whatever the file holds, reading it either returns valid records or raises a ValueError (or
TypeError) whose message names the file; never another exception. Generated records are
judged by an oracle written here, independently of the reader: a set of valid records reads
back exactly as written, and the first invalid one is reported at its own line.

Each test tries ``EXAMPLES`` examples (``pytest --hypothesis-show-statistics`` prints the count).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the dev extra: pip install 'domlora_kernels[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from domlora_kernels.data import read_records  # noqa: E402

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,  # no .hypothesis folder in the checkout
                    suppress_health_check=[HealthCheck.too_slow])
ROLES = ["system", "user", "assistant", "tool", "wizard", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=20)}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
    json_values,
)
chat = st.lists(message, max_size=4) | st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=20)}), min_size=1, max_size=4)
record = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=30)}),
    st.fixed_dictionaries({"messages": chat}),
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=30)}, optional={"task": st.text(max_size=5)}),
    st.dictionaries(st.sampled_from(["text", "messages", "other"]), json_values, max_size=3),
    json_values,
)


def valid_messages(msgs) -> bool:
    return (isinstance(msgs, list) and len(msgs) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)
            and any(m["role"] == "assistant" for m in msgs))


def valid_record(rec) -> bool:
    """The oracle: exactly one of a non-blank 'text' string and a valid 'messages' list."""
    if not isinstance(rec, dict) or ("text" in rec) == ("messages" in rec):
        return False
    if "text" in rec:
        return isinstance(rec["text"], str) and rec["text"].strip() != ""
    return valid_messages(rec["messages"])


def _read(path: Path):
    """``("ok", records)`` or ``("error", message)``; any other exception fails the test."""
    try:
        return "ok", read_records(path)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert str(path) in msg, f"the error does not name the file: {msg}"
        assert len(msg) > len(str(path)) + 10, f"an error with no explanation: {msg}"
        return "error", msg


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@SETTINGS
@given(data=st.binary(max_size=600) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_random_bytes_read_or_refuse_by_name(folder, data, suffix):
    path = folder / f"bytes{suffix}"
    path.write_bytes(data)
    kind, out = _read(path)
    if kind == "ok":
        assert out and all(valid_record(r) for r in out)


@SETTINGS
@given(records=st.lists(record, max_size=6), fmt=st.sampled_from(["jsonl", "json", "json-lines"]),
       ascii_only=st.booleans())
def test_json_records_round_trip_or_first_invalid_named(folder, records, fmt, ascii_only):
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in records]
    if fmt == "json":  # a list, one record per line from line 2 on
        text, first_line = "[\n" + ",\n".join(lines) + "\n]\n", 2
    else:
        text, first_line = "".join(line + "\n" for line in lines), 1
    path = folder / ("records.jsonl" if fmt == "jsonl" else "records.json")
    path.write_text(text, encoding="utf-8")
    kind, out = _read(path)
    if fmt == "json-lines" and records and isinstance(records[0], list):
        # a .json file that opens with "[" is a list of records: here the first line's list, and
        # any record after it is text after the list, an error on line 2
        inner = records[0]
        bad = [i for i, r in enumerate(inner) if not valid_record(r)]
        if bad:
            assert kind == "error" and out.startswith(f"{path}:1: "), out
        elif len(records) > 1:
            assert kind == "error" and out.startswith(f"{path}:2: not valid JSON (text after the list"), out
        elif not inner:
            assert kind == "error" and "has no records" in out
        else:
            assert kind == "ok" and json.dumps(out) == json.dumps(inner)
        return
    bad = [i for i, r in enumerate(records) if not valid_record(r)]
    if records and not bad:  # compared as JSON: a NaN inside a record equals itself there
        assert kind == "ok" and json.dumps(out) == json.dumps(records)
    elif not records:
        assert kind == "error" and "has no records" in out
    else:
        assert kind == "error" and out.startswith(f"{path}:{first_line + bad[0]}: "), out


cell = st.one_of(st.just(""), st.text(max_size=20), st.builds(json.dumps, chat), st.builds(json.dumps, json_values))


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({"text": cell, "messages": cell, "other": cell}), max_size=6),
       columns=st.sampled_from([["text"], ["messages"], ["text", "messages"], ["other", "text", "messages"]]))
def test_csv_rows_round_trip_or_first_invalid_named(folder, rows, columns):
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    starts, line = [], 2
    for row in rows:
        starts.append(line)
        before = buf.tell()
        writer.writerow(row)
        line += len(re.findall(r"\r\n|\r|\n", buf.getvalue()[before:]))  # a quoted cell may span lines, as csv counts them
    path = folder / "rows.csv"
    path.write_bytes(buf.getvalue().encode("utf-8"))

    def expect(row):
        """The record a row should read as, or None when it is invalid (the oracle)."""
        vals = {k: row[k] for k in ("text", "messages") if k in columns and row[k] != ""}
        if len(vals) != 1:
            return None
        if "text" in vals:
            return {"text": vals["text"]} if vals["text"].strip() else None
        try:
            msgs = json.loads(vals["messages"])
        except (ValueError, RecursionError):
            return None
        return {"messages": msgs} if valid_messages(msgs) else None

    want = [expect(r) for r in rows]
    kind, out = _read(path)
    if rows and None not in want:
        assert kind == "ok" and json.dumps(out) == json.dumps(want)
    elif not rows:
        assert kind == "error" and "has no records" in out
    else:
        assert kind == "error" and out.startswith(f"{path}:{starts[want.index(None)]}: "), out
