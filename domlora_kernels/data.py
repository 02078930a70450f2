"""Calibration data: the set shipped in the package, user jsonl files, tokenising and batching.

A record is ``{"text": ...}`` (plain language modelling: every token is a target) or
``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template, where
only assistant tokens are targets (the tokens a supervised fine-tune learns). Batches are
right-padded, so each row's positions are those it has alone and padding carries no gradient.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import torch

from .losses import IGNORE_INDEX

TASKS = ("instruction", "math", "code", "chat")


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
        raise ValueError(f"{where}: no assistant message, so nothing to learn; add one or use 'text'")
    return rec


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a jsonl file, each checked; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        out.append(_validate_record(rec, f"{path}:{i}"))
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
    root = resources.files("domlora_kernels") / "data" / "calibration"
    per_task = []
    for t in tasks:
        with resources.as_file(root / f"{t}.jsonl") as p:
            per_task.append([{**r, "task": t} for r in read_jsonl(p)])
    out = []
    for i in range(max(len(x) for x in per_task)):
        out.extend(x[i] for x in per_task if i < len(x))
    return out


def encode(record: dict, tokenizer, max_length: int = 256, where: str = "record") -> dict[str, list[int]]:
    """Token ids and labels of one record (labels -100 off target), cut to ``max_length``."""
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        labels = list(ids)
    else:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        ids = _chat_ids(tokenizer, msgs)
        labels = [IGNORE_INDEX] * len(ids)
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            # the assistant span: tokens added by message k after the generation prompt
            start = len(_chat_ids(tokenizer, msgs[:k], add_generation_prompt=True))
            upto = _chat_ids(tokenizer, msgs[: k + 1])
            end = len(upto)
            if upto != ids[:end]:
                raise ValueError(f"{where}: the chat template does not render conversations prefix by prefix")
            labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    if sum(lab != IGNORE_INDEX for lab in labels[1:]) == 0:
        raise ValueError(f"{where}: no target token within max_length={max_length}; raise --max-length")
    return {"input_ids": ids, "labels": labels}


def _chat_ids(tokenizer, msgs, add_generation_prompt: bool = False) -> list[int]:
    if not msgs:
        return []
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collate(encoded: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded records into one batch dict."""
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


def make_batches(records: list[dict], tokenizer, batch_size: int = 8, max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``records`` and group them into right-padded batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one input and one target token), got {max_length}")
    if not records:
        raise ValueError("no calibration records")
    enc = [encode(r, tokenizer, max_length, where=f"record {i}") for i, r in enumerate(records)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate(enc[i : i + batch_size], pad) for i in range(0, len(enc), batch_size)]
