"""Task families of the fine-tuning studies: generators, splits and answer checkers.

Every item is produced by code from a seeded ``random.Random`` (nothing comes from a hub), and
every family has a metric that checks the answer itself, not only the loss:

- ``math``: one- or two-step word problems, answer ``"a + b = c\\nAnswer: c"``; exact match of the
  number after ``Answer:`` in the greedy decode.
- ``instruction``: short instructions with checkable constraints (upper case, a list of n
  lines, a JSON object, a word to include plus an ending, a word repeated n times); a checker
  per constraint.
- ``code``: small Python functions; the decoded function runs against hidden asserts in a
  fresh interpreter (``python -I``) with a timeout.
- ``chat``: three-turn conversations where the last question asks a fact the user gave in
  the first turn; metric is recall of that fact (plus the held-out loss on all assistant turns,
  which the studies compute for every family).

An item is a dict ``{"messages": [{"role", "content"}, ...], "check": {...}}``: the last message
is the assistant answer the metric grades; ``check`` holds what the checker needs (never shown
to the model). Splits are disjoint by prompt: :func:`make_splits` draws unique items and
slices them, so no test prompt is ever trained on.

Example:
    >>> splits = make_splits("math", n_train=64, n_val=16, n_test=16, seed=0)
    >>> item = splits["test"][0]
    >>> score_answer("math", item, item["messages"][-1]["content"])
    1.0
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from typing import Any, Callable

TASKS = ("math", "instruction", "code", "chat")

# Decoding budget per family: the longest reference answer plus a little slack; decoding is
# the largest part of an evaluation on the CPU, so it is kept as short as the answers allow.
MAX_NEW_TOKENS = {"math": 20, "instruction": 28, "code": 40, "chat": 14}

_NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Finn", "Gita", "Hugo", "Ines", "Jonas", "Kai", "Lena", "Mo", "Nora", "Omar", "Pia"]
_ITEMS = ["apple", "marble", "book", "pencil", "sticker", "card", "shell", "coin", "stamp", "cookie"]


# ----------------------------------------------------------------------------- math
def _math_item(rng: random.Random) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        work, ans = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item}s and gave away {b}. How many {item}s are left?"
        work, ans = f"{a} - {b} = {a - b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} buys {a} boxes with {b} {item}s in each box. How many {item}s is that in total?"
        work, ans = f"{a} * {b} = {a * b}", a * b
    else:
        a, b = rng.randint(5, 30), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}s, buys {b} more and then gives {c} to a friend. How many {item}s are left?"
        work, ans = f"{a} + {b} - {c} = {a + b - c}", a + b - c
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{work}\nAnswer: {ans}"}],
            "check": {"answer": ans}}


_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def _check_math(check: dict, out: str) -> float:
    m = _ANSWER_RE.search(out)
    return float(m is not None and int(m.group(1)) == check["answer"])


# ----------------------------------------------------------------------- instruction
_WORDS = ["river", "lantern", "garden", "planet", "window", "thunder", "violin", "harbor", "meadow", "candle", "rocket", "forest"]
_CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "mango", "pear", "plum", "kiwi"],
    "colours": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "animals": ["cat", "dog", "horse", "tiger", "rabbit", "eagle", "whale", "fox"],
    "countries": ["France", "Japan", "Brazil", "Canada", "Kenya", "India", "Spain", "Peru"],
}
_TOPICS = {"the sea": "The sea is calm and {w} today", "music": "Music makes the {w} feel alive",
           "winter": "Winter brings snow to the {w}", "travel": "Travel shows us a new {w}",
           "the city": "The city lights shine over the {w}", "school": "School taught me about the {w}"}
_KEYS = ["count", "score", "level", "total", "age", "size"]


def _instruction_item(rng: random.Random) -> dict:
    return _instruction_kind(rng, rng.randrange(5))


def _instruction_item_v2(rng: random.Random) -> dict:
    """Version 2: the five kinds of version 1 plus two with many distinct prompts (sorting 3-4
    words; a JSON list of a range), for splits larger than version 1's 738 distinct prompts."""
    kind = rng.randrange(7)
    if kind < 5:
        return _instruction_kind(rng, kind)
    if kind == 5:
        words = rng.sample(_WORDS, rng.randint(3, 4))
        q = f"Sort these words alphabetically, one per line, nothing else: {', '.join(words)}."
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "\n".join(sorted(words))}],
                "check": {"kind": "sorted", "words": sorted(words)}}
    a = rng.randint(1, 40)
    b = a + rng.randint(2, 5)
    q = f"Return a JSON list of the whole numbers from {a} to {b}, inclusive. No other text."
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": json.dumps(list(range(a, b + 1)))}],
            "check": {"kind": "json_range", "a": a, "b": b}}


def _instruction_kind(rng: random.Random, kind: int) -> dict:
    if kind == 0:
        w = rng.choice(_WORDS)
        q = f"Reply with the word '{w}' in capital letters and nothing else."
        a, check = w.upper(), {"kind": "upper", "word": w}
    elif kind == 1:
        cat = rng.choice(sorted(_CATEGORIES))
        n = rng.randint(2, 4)
        items = rng.sample(_CATEGORIES[cat], n)
        q = f"List {n} {cat}, one per line, each line starting with '- '."
        a, check = "\n".join(f"- {x}" for x in items), {"kind": "list", "n": n}
    elif kind == 2:
        k, v = rng.choice(_KEYS), rng.randint(1, 99)
        q = f'Return a JSON object with the key "{k}" set to the number {v}. No other text.'
        a, check = json.dumps({k: v}), {"kind": "json", "key": k, "value": v}
    elif kind == 3:
        topic, w = rng.choice(sorted(_TOPICS)), rng.choice(_WORDS)
        q = f"Write one short sentence about {topic} that contains the word '{w}' and ends with '!'."
        a, check = _TOPICS[topic].format(w=w) + "!", {"kind": "include_end", "word": w}
    else:
        w, n = rng.choice(_WORDS), rng.randint(2, 5)
        q = f"Repeat the word '{w}' exactly {n} times, separated by single spaces."
        a, check = " ".join([w] * n), {"kind": "repeat", "word": w, "n": n}
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "check": check}


def _check_instruction(check: dict, out: str) -> float:
    out = out.strip()
    kind = check["kind"]
    if kind == "upper":
        ok = out == check["word"].upper()
    elif kind == "list":
        lines = [x for x in out.split("\n") if x.strip()]
        items = [x[2:].strip() for x in lines]
        ok = len(lines) == check["n"] and all(x.startswith("- ") for x in lines) and all(items) and len(set(items)) == len(items)
    elif kind == "json":
        try:
            ok = json.loads(out) == {check["key"]: check["value"]}
        except ValueError:
            ok = False
    elif kind == "include_end":
        words = re.findall(r"[a-z]+", out.lower())
        ok = "\n" not in out and out.endswith("!") and check["word"] in words and len(words) <= 25
    elif kind == "repeat":
        ok = out.split(" ") == [check["word"]] * check["n"]
    elif kind == "sorted":
        ok = [x.strip() for x in out.split("\n") if x.strip()] == check["words"]
    elif kind == "json_range":
        try:
            ok = json.loads(out) == list(range(check["a"], check["b"] + 1))
        except ValueError:
            ok = False
    else:
        raise ValueError(f"unknown instruction check kind {kind!r}")
    return float(ok)


# ----------------------------------------------------------------------------- code
_FN_VERBS = ["calc", "compute", "get", "make", "find", "build"]
_FN_NOUNS = ["value", "result", "score", "total", "output", "answer"]

# (prompt template, body template, argument sets for the hidden tests); {k} is a constant.
_CODE_FAMILIES: list[tuple[str, str, str, list[tuple]]] = [
    ("x", "returns x multiplied by {k} plus {c}", "return x * {k} + {c}", [(0,), (3,), (-2,), (11,)]),
    ("s", "returns the string s repeated {k} times", "return s * {k}", [("ab",), ("",), ("xyz",)]),
    ("xs", "returns the sum of the elements of the list xs that are greater than {k}",
     "return sum(x for x in xs if x > {k})", [([1, 5, 9, 12],), ([],), ([20, -3, 7, 4],)]),
    ("s", "returns the string s reversed", "return s[::-1]", [("hello",), ("",), ("ab c",)]),
    ("xs", "returns how many elements of the list xs are divisible by {k}",
     "return sum(1 for x in xs if x % {k} == 0)", [([1, 2, 3, 4, 6, 8, 9],), ([],), ([10, 15, 20, 21],)]),
    ("a, b", "returns the larger of a and b minus {k}", "return max(a, b) - {k}", [(3, 7), (10, -2), (5, 5)]),
    ("s", "returns s in upper case followed by the character '{ch}'", "return s.upper() + '{ch}'", [("abc",), ("",), ("Hi there",)]),
]


def _code_item(rng: random.Random) -> dict:
    args, desc, body, cases = rng.choice(_CODE_FAMILIES)
    fn = f"{rng.choice(_FN_VERBS)}_{rng.choice(_FN_NOUNS)}"
    consts = {"k": rng.randint(2, 9), "c": rng.randint(0, 20), "ch": rng.choice("!?#*+")}
    q = f"Write a Python function `{fn}({args})` that {desc.format(**consts)}. Only code."
    src = f"def {fn}({args}):\n    {body.format(**consts)}"
    ns: dict[str, Any] = {}
    exec(src, ns)  # the reference implementation computes the hidden expected values
    tests = [f"assert {fn}({', '.join(map(repr, c))}) == {ns[fn](*c)!r}" for c in cases]
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": src}],
            "check": {"tests": tests}}


_FENCE_RE = re.compile(r"```(?:python)?\n?(.*?)(?:```|$)", re.S)


def extract_code(out: str) -> str:
    """The code in a model answer: the inside of a ``` fence if there is one, else all of it."""
    m = _FENCE_RE.search(out)
    return (m.group(1) if m else out).strip("\n")


def run_hidden_tests(code: str, tests: list[str], timeout: float = 5.0) -> bool:
    """Run ``code`` then the ``assert`` lines in a fresh isolated interpreter; True if all pass.

    A separate process with a timeout, so a generated infinite loop or ``sys.exit`` cannot
    touch the study; ``-I`` ignores the user's environment and site-packages paths.
    """
    prog = code + "\n\n" + "\n".join(tests) + "\n"
    try:
        r = subprocess.run([sys.executable, "-I", "-c", prog], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def _check_code(check: dict, out: str) -> float:
    return float(run_hidden_tests(extract_code(out), check["tests"]))


# ----------------------------------------------------------------------------- chat
_ATTRS = {
    "colour": ["teal", "crimson", "amber", "lilac", "olive", "navy", "coral", "indigo"],
    "animal": ["otter", "falcon", "panda", "lynx", "koala", "heron", "badger", "gecko"],
    "city": ["Lisbon", "Oslo", "Kyoto", "Quito", "Dublin", "Cairo", "Hanoi", "Zagreb"],
    "fruit": ["papaya", "lychee", "quince", "guava", "fig", "apricot", "melon", "lime"],
}
_FILLERS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "It is blue."),
    ("What do bees make?", "Bees make honey."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Which planet is closest to the Sun?", "Mercury is closest to the Sun."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
]


def _chat_item(rng: random.Random) -> dict:
    name = rng.choice(_NAMES)
    attr = rng.choice(sorted(_ATTRS))
    value = rng.choice(_ATTRS[attr])
    fq, fa = rng.choice(_FILLERS)
    msgs = [
        {"role": "user", "content": f"Hi, I'm {name}. My favourite {attr} is {value}."},
        {"role": "assistant", "content": f"Nice to meet you, {name}! {value} is a great choice."},
        {"role": "user", "content": fq},
        {"role": "assistant", "content": fa},
        {"role": "user", "content": f"What is my favourite {attr}?"},
        {"role": "assistant", "content": f"Your favourite {attr} is {value}."},
    ]
    return {"messages": msgs, "check": {"value": value}}


def _check_chat(check: dict, out: str) -> float:
    return float(re.search(rf"\b{re.escape(check['value'].lower())}\b", out.lower()) is not None)


# ---------------------------------------------------------------------------- public
_GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "math": _math_item, "instruction": _instruction_item, "code": _code_item, "chat": _chat_item,
}
_CHECKERS: dict[str, Callable[[dict, str], float]] = {
    "math": _check_math, "instruction": _check_instruction, "code": _check_code, "chat": _check_chat,
}


# Version 2 of the generators (make_splits(version=2), the placement study): instruction gets two
# more kinds; the other families are unchanged. Version 1 keeps the first study's items exactly.
_GENERATORS_V2 = {**_GENERATORS, "instruction": _instruction_item_v2}


def _check_task(task: str) -> None:
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def make_splits(task: str, n_train: int, n_val: int, n_test: int, seed: int = 0,
                version: int = 1) -> dict[str, list[dict]]:
    """Disjoint ``train`` / ``val`` / ``test`` lists of items of one family.

    Items are drawn from ``random.Random(seed)`` and kept only if their full conversation is new,
    then sliced test first, so changing ``n_train`` never changes the test set.

    Args:
        task: one of :data:`TASKS`.
        n_train, n_val, n_test: split sizes (>= 0; test >= 1).
        seed: generator seed (default 0).
        version: 1 (the first study's items) or 2 (instruction with two more kinds, for large splits,
            its distinct items shuffled before slicing; the other families as in version 1).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of items (see module docstring).
    """
    _check_task(task)
    if min(n_train, n_val) < 0 or n_test < 1:
        raise ValueError(f"split sizes must be >= 0 (test >= 1), got train={n_train} val={n_val} test={n_test}")
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    gen = (_GENERATORS if version == 1 else _GENERATORS_V2)[task]
    rng = random.Random(f"{task}-{seed}")
    need, seen, items = n_train + n_val + n_test, set(), []
    for _ in range(need * 200):
        it = gen(rng)
        key = json.dumps(it["messages"][:-1])  # the prompt side: the test never repeats a trained prompt
        if key not in seen:
            seen.add(key)
            items.append(it)
            if len(items) == need:
                break
    else:
        raise ValueError(f"{task}: could only draw {len(items)} distinct items, asked for {need}; lower the split sizes")
    if version == 2 and task == "instruction":
        rng.shuffle(items)  # its small kinds (12-72 prompts) run out first: mix them into every split
    return {"test": items[:n_test], "val": items[n_test:n_test + n_val], "train": items[n_test + n_val:]}


def score_answer(task: str, item: dict, output: str) -> float:
    """1.0 if ``output`` (the decoded assistant answer) satisfies the item's check, else 0.0.

    Example:
        >>> score_answer("math", {"check": {"answer": 12}}, "7 + 5 = 12\\nAnswer: 12")
        1.0
    """
    _check_task(task)
    return _CHECKERS[task](item["check"], output)
