"""Calibration data: the set shipped in the package, user files and datasets, tokenising and batching.

A record is ``{"text": ...}`` (plain language modelling: every token is a target) or
``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template, where
only assistant tokens are targets (the tokens a supervised fine-tune learns). Batches are
right-padded, so each row's positions are those it has alone and padding carries no gradient.

Chat records on a tokenizer without a chat template (a base model) fall back to a plain
rendering, and :func:`make_batches` warns that it did. Each message becomes the role tag, a
colon and a space, then its content; an assistant turn ends with the EOS token, any other
turn with a newline; the BOS token, where the tokenizer has one, starts the sample::

    <bos>User: What is 2+2?\nAssistant: 4<eos>User: And 3+3?\nAssistant: 6<eos>

The tag is the role capitalised (``User``, ``Assistant``, ``System``, ...). Every piece is
tokenised on its own and the ids concatenated, so the targets are exactly the assistant
contents and their EOS tokens.

User data (:func:`read_records`): ``.jsonl``, ``.json`` (a list of records, or JSON Lines),
``.parquet`` and ``.csv`` files, a folder saved by ``datasets``' ``save_to_disk``, or a
``datasets`` name or data folder (``load_dataset``). Tabular rows take their text from the
``text`` or ``messages`` column, or from ``text_field`` / ``messages_field``; a CSV
``messages`` cell holds the list as JSON. Files are UTF-8 (a byte-order mark is skipped).
Every problem in a file is a ``ValueError`` naming the file and line (or row): invalid UTF-8,
invalid or too deeply nested JSON, a CSV cell over the ``csv`` module's field limit.

Chat roles: ``system``, ``user``, ``assistant`` and the tool roles (``tool``, ``ipython``,
``function``, ``developer``) are known. A message with another role (``"wizard"``) is rendered
as the chat template renders it (plainly: ``Wizard: ...``), is no target, and
:func:`make_batches` warns once (:class:`UnknownRoleWarning`; the CLI prints a ``note:``).
With a chat template, the targets of an assistant turn are the tokens the template renders
after what it renders before the assistant's content: for a conversation that opens with an
assistant turn that is the template's default system prompt and the assistant header, never
targets.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .probe.losses import IGNORE_INDEX
from .errors import MissingExtraError

TASKS = ("instruction", "math", "code", "chat")
FORMATS = (".jsonl", ".json", ".parquet", ".csv")


KNOWN_ROLES = ("system", "user", "assistant", "tool", "ipython", "function", "developer")
# stands in for an assistant's content, to find where the template puts it (encode)
_CONTENT_MARK = "DOMLORA\u2063CONTENT\u2063MARK"


class ChatTemplateFallbackWarning(UserWarning):
    """Chat records were rendered plainly: the tokenizer has no chat template."""


class UnknownRoleWarning(UserWarning):
    """Chat records have messages whose role is none of :data:`KNOWN_ROLES`."""


def _validate_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict) or ("text" in rec) == ("messages" in rec):
        raise ValueError(f"{where}: each record needs exactly one of 'text' (a string) or 'messages' (a list)")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return rec
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {j} must be {{'role': str, 'content': str}}")
    if not any(m["role"] == "assistant" for m in msgs):
        roles = sorted({m["role"] for m in msgs})
        raise ValueError(f"{where}: no assistant message (roles: {', '.join(map(repr, roles))}), so nothing to learn; "
                         "add one or use 'text' (ShareGPT's 'human'/'gpt' are 'user'/'assistant')")
    return rec


def _field(row: dict, field: str, where: str) -> Any:
    if field not in row:
        raise ValueError(f"{where}: no field {field!r}; the fields are {', '.join(map(repr, row))}")
    return row[field]


def _loads(text: str, where: str) -> Any:
    """``json.loads``; every failure a ValueError naming ``where``: invalid JSON, nesting too deep
    for the parser (RecursionError), an integer of more digits than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: not readable JSON (nested too deeply)") from None
    except ValueError as e:
        raise ValueError(f"{where}: not readable JSON ({e})") from None


def _cell(value: Any, name: str, where: str, tabular: bool) -> Any:
    """A messages cell: a CSV cell is a string holding the list as JSON."""
    if not (tabular and isinstance(value, str)):
        return value
    try:
        return _loads(value, where)
    except ValueError as e:
        why = str(e).split(": ", 1)[-1]
        raise ValueError(f"{where}: {name!r} must hold a JSON list of {{'role', 'content'}} ({why})") from None


def _to_record(row: Any, where: str, text_field: str | None = None, messages_field: str | None = None,
               tabular: bool = False) -> dict:
    """One checked record from a row: the named field, or the row itself.

    ``tabular``: every row has every column, so an empty cell of ``text`` / ``messages`` means
    "not this one", and other columns are dropped.
    """
    if text_field is not None and messages_field is not None:
        raise ValueError("give text_field or messages_field, not both (--text-field / --messages-field)")
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each record must be an object, got {type(row).__name__}")
    if text_field is not None:
        return _validate_record({"text": _field(row, text_field, where)}, where)
    if messages_field is not None:
        return _validate_record({"messages": _cell(_field(row, messages_field, where), messages_field, where, tabular)}, where)
    if tabular:
        cols = list(row)
        row = {k: row[k] for k in ("text", "messages") if row.get(k) not in (None, "")}
        if not row:
            raise ValueError(f"{where}: no 'text' or 'messages' value; the fields are {', '.join(map(repr, cols))}: "
                             "name one with --text-field / --messages-field")
        if "messages" in row:
            row["messages"] = _cell(row["messages"], "messages", where, tabular)
    return _validate_record(row, where)


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark skipped); otherwise a ValueError naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}): save the file "
                         "as UTF-8") from None


def _jsonl_rows(path: Path, text: str | None = None) -> Iterator[tuple[str, Any]]:
    text = _read_text(path) if text is None else text
    for i, line in enumerate(text.split("\n"), 1):  # only \n ends a line: JSON strings may hold \u2028 and the like
        if not line.strip():
            continue
        yield f"{path}:{i}", _loads(line, f"{path}:{i}")


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file: a list of records (each error names the line its record starts on), or JSON Lines."""
    text = _read_text(path)
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        yield from _jsonl_rows(path, text)
        return
    dec = json.JSONDecoder()
    pos += 1
    line, counted = 1, 0  # the line of text[pos], counted incrementally (a big file stays linear)
    while True:
        pos = _SPACE.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if text.startswith("]", pos):
            rest = _SPACE.match(text, pos + 1).end()
            if rest < len(text):  # a second value after the list: JSON Lines whose first record is a list
                raise ValueError(f"{path}:{text.count(chr(10), 0, rest) + 1}: not valid JSON (text after the list "
                                 "of records that ends on line " f"{line}; give one list, or one record per line)")
            return
        try:
            row, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}:{line}: not readable JSON (nested too deeply)") from None
        except ValueError as e:
            raise ValueError(f"{path}:{line}: not readable JSON ({e})") from None
        yield f"{path}:{line}", row
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise ValueError(f"{path}:{text.count(chr(10), 0, pos) + 1}: not valid JSON (expected ',' or ']' between records)")


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    start = 2  # the line each row starts on (a quoted cell may span lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # the line after the last one read whole: where the failing row starts
            fix = (f" (the csv module reads cells of up to {csv.field_size_limit()} characters: give long texts "
                   f"as .jsonl)" if "field larger than field limit" in str(e) else "")
            raise ValueError(f"{path}:{reader.line_num + 1}: not valid CSV ({e}){fix}") from None
        yield f"{path}:{start}", row
        start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("reading .parquet needs pyarrow: `pip install 'domlora_kernels[data]'`") from None
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {i}", row


def _dataset_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    """Rows of a ``save_to_disk`` folder, or of what ``datasets.load_dataset(name)`` resolves."""
    try:
        import datasets
    except ImportError:
        raise MissingExtraError(f"--data {name!r} is a folder or a dataset name, which needs `datasets`: "
                          "`pip install 'domlora_kernels[data]'`") from None
    path = Path(name)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise FileNotFoundError(f"--data {name!r}: datasets could not load it ({e}); give a .jsonl/.json/.parquet/.csv "
                                    "file, a save_to_disk folder, or a dataset name in the local datasets cache") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"--data {name!r} has no split {split!r}; its splits are {', '.join(ds)} (--split)")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row


def read_records(source: str | Path, *, split: str = "train", text_field: str | None = None,
                 messages_field: str | None = None) -> list[dict]:
    """Checked records of a ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, or a ``datasets``
    folder or name (its ``split``); errors name the file and line (or row).

    Args:
        text_field / messages_field: the field holding the text (every token a target) or the
            chat messages; default: the ``text`` or ``messages`` field.
    """
    path = Path(source)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    if path.is_file():
        if path.suffix.lower() not in readers:
            raise ValueError(f"--data {str(path)!r}: unknown format {path.suffix!r}; give one of {', '.join(FORMATS)}, "
                             "a datasets folder or a dataset name")
        rows, tabular = readers[path.suffix.lower()](path), path.suffix.lower() in (".csv", ".parquet")
    elif path.suffix.lower() in FORMATS:
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    else:
        rows, tabular = _dataset_rows(str(source), split), True
    out = [_to_record(row, where, text_field, messages_field, tabular) for where, row in rows]
    if not out:
        raise ValueError(f"{source} has no records")
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a jsonl file, each checked; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    out = [_to_record(row, where) for where, row in _jsonl_rows(path)]
    if not out:
        raise ValueError(f"{path} has no records")
    return out


def load_calibration(tasks: Iterable[str] | None = None) -> list[dict]:
    """The calibration set shipped in the package, each record tagged with its ``task``.

    Args:
        tasks: a subset of :data:`TASKS` (default: all four, interleaved so that any prefix
            of the list mixes the tasks).
    """
    tasks = list(TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown calibration task(s) {unknown or tasks}; choose from {', '.join(TASKS)}")
    root = resources.files("domlora_kernels") / "calibration"
    per_task = []
    for t in tasks:
        with resources.as_file(root / f"{t}.jsonl") as p:
            per_task.append([{**r, "task": t} for r in read_jsonl(p)])
    out = []
    for i in range(max(len(x) for x in per_task)):
        out.extend(x[i] for x in per_task if i < len(x))
    return out


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` renders chats itself; without a template, chats are rendered plainly."""
    return callable(getattr(tokenizer, "apply_chat_template", None)) and getattr(tokenizer, "chat_template", "") is not None


def _plain_chat(tokenizer, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """Ids and labels of the plain rendering (module docstring): targets are the assistant contents + EOS."""
    ids = [] if getattr(tokenizer, "bos_token_id", None) is None else [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX] * len(ids)
    for m in msgs:
        head = tokenizer(f"{m['role'].capitalize()}: ", add_special_tokens=False)["input_ids"]
        ids += head
        labels += [IGNORE_INDEX] * len(head)
        if m["role"] == "assistant":
            eos = getattr(tokenizer, "eos_token_id", None)
            body = tokenizer(m["content"], add_special_tokens=False)["input_ids"] + ([] if eos is None else [eos])
            labels += body
        else:
            body = tokenizer(m["content"] + "\n", add_special_tokens=False)["input_ids"]
            labels += [IGNORE_INDEX] * len(body)
        ids += body
    return ids, labels


def encode(record: dict, tokenizer, max_length: int = 256, where: str = "record") -> dict[str, list[int]]:
    """Token ids and labels of one record (labels -100 off target), cut to ``max_length``.

    Chat records use the tokenizer's chat template, or the plain rendering where it has none.
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        labels = list(ids)
    elif not has_chat_template(tokenizer):
        ids, labels = _plain_chat(tokenizer, record["messages"])
    else:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        ids = _chat_ids(tokenizer, msgs, where=where)
        labels = [IGNORE_INDEX] * len(ids)
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            # the assistant span: the tokens message k adds after what the template renders before its content
            head = _assistant_head_ids(tokenizer, msgs, k, where)
            start = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
            upto = _chat_ids(tokenizer, msgs[: k + 1], where=where)
            end = len(upto)
            if upto != ids[:end]:
                raise ValueError(f"{where}: the chat template does not render conversations prefix by prefix")
            labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:
        raise ValueError(f"{where}: no target token within max_length={max_length}; raise --max-length")
    return {"input_ids": ids, "labels": labels}


def _render(tokenizer, msgs, where: str, add_generation_prompt: bool = False) -> str:
    """The template's text of ``msgs``; a template that refuses them (``raise_exception`` in
    the template, e.g. roles that must alternate) is a ValueError naming the record."""
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError and whatever the template raises
        raise ValueError(f"{where}: the tokenizer's chat template refuses this conversation ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise ValueError(f"{where}: the tokenizer's chat template returned {type(text).__name__}, not text")
    return text


def _chat_ids(tokenizer, msgs, add_generation_prompt: bool = False, where: str = "record") -> list[int]:
    if not msgs:
        return []
    text = _render(tokenizer, msgs, where, add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _assistant_head_ids(tokenizer, msgs, k: int, where: str) -> list[int]:
    """The ids the template renders before the content of assistant message ``k``.

    After earlier messages that is the rendering of ``msgs[:k]`` with the generation prompt.
    For a conversation that opens with the assistant (``k == 0``) there is no history to render
    (an empty one renders nothing, not even the default system prompt a template adds before
    the first message), so the assistant message is rendered with a marker for its content and
    the text before the marker is the head: system prompt and assistant header included.
    """
    if k > 0:
        return _chat_ids(tokenizer, msgs[:k], add_generation_prompt=True, where=where)
    text = _render(tokenizer, [{"role": "assistant", "content": _CONTENT_MARK}], where)
    cut = text.find(_CONTENT_MARK)
    if cut < 0:
        raise ValueError(f"{where}: the chat template does not render the assistant's content as given, so its "
                         "tokens cannot be told from the template's; start the conversation with a user turn")
    return tokenizer(text[:cut], add_special_tokens=False)["input_ids"] if cut else []


def _check_pad(pad_id: Any) -> None:
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise ValueError(
            f"pad id {pad_id!r}: the tokenizer has neither a pad token nor an EOS token, so batches cannot be padded; "
            f"set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.unk_token, or add one with "
            f"tokenizer.add_special_tokens({{'pad_token': '<pad>'}}); padding is masked out, so which token it is "
            f"does not matter)"
        )


def collate(encoded: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded records into one batch dict (``pad_id`` on padding, masked out)."""
    _check_pad(pad_id)
    if not encoded:
        raise ValueError("collate needs at least one encoded record")
    t = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((len(encoded), t), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), t), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _is_dataset(records: Any) -> bool:
    return type(records).__module__.startswith("datasets") and hasattr(records, "column_names")


def make_batches(records, tokenizer, batch_size: int = 8, max_length: int = 256, *, text_field: str | None = None,
                 messages_field: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``records`` and group them into right-padded batches of ``batch_size``.

    Args:
        records: a list of records, or a ``datasets.Dataset`` (its rows are read like a
            tabular file's, see :func:`read_records`).
        text_field / messages_field: take each record's text or messages from this field.

    Warns:
        ChatTemplateFallbackWarning: chat records met a tokenizer without a chat template and
            were rendered plainly (module docstring).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one input and one target token), got {max_length}")
    tabular = _is_dataset(records)
    records = [_to_record(r, f"record {i}", text_field, messages_field, tabular) for i, r in enumerate(records)]
    if not records:
        raise ValueError("no calibration records")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    _check_pad(pad)  # before any tokenising
    if any("messages" in r for r in records) and not has_chat_template(tokenizer):
        warnings.warn("the tokenizer has no chat template: chat records are rendered plainly as 'Role: content' turns, "
                      "with loss on the assistant's tokens only (see domlora_kernels.data)", ChatTemplateFallbackWarning,
                      stacklevel=2)
    _warn_unknown_roles(records)
    enc = [encode(r, tokenizer, max_length, where=f"record {i}") for i, r in enumerate(records)]
    return [collate(enc[i : i + batch_size], pad) for i in range(0, len(enc), batch_size)]


def _warn_unknown_roles(records: list[dict]) -> None:
    unknown: dict[str, int] = {}  # role -> first record holding it
    for i, r in enumerate(records):
        for m in r.get("messages", ()):
            if m["role"] not in KNOWN_ROLES:
                unknown.setdefault(m["role"], i)
    if unknown:
        roles = ", ".join(f"{role!r} (first in record {i})" for role, i in unknown.items())
        warnings.warn(f"chat messages with a role none of {', '.join(KNOWN_ROLES)}: {roles}; they are rendered as the "
                      "chat template (or the plain rendering) renders them and are no targets; check the role names",
                      UnknownRoleWarning, stacklevel=3)
