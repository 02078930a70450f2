"""python/studies/placement/confirm.sh: the order of a confirmation, with a stand-in interpreter.

The stand-in records every call and answers the two questions the script asks: whether a cell's
peers separate (yes at 0.7%, no at 5% here) and which arm plays the default there.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *"decide separation"*0.05*) exit 3 ;;
  *"decide separation"*0.007*) [ -n "${TIE_ALL:-}" ] && exit 3 ;;
  *"decide arm"*) echo types ;;
esac
exit 0
"""


def _run(tmp_path, task, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    run = subprocess.run(["bash", "python/studies/placement/confirm.sh", "smollm2", task], cwd=ROOT,
                         env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls), **env}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    arms = [(x.split("--budget-arms ")[1].split()[0], x.split("--budgets ")[1]) for x in lines
            if "--stage budget" in x and "--budget-arms " in x]
    return run, lines, arms


PEERS_SMALL = {"random_module", "kappatune", "page_budget", "eva", "shallow_down", "lora_all", "page_top1"}
PEERS_LARGE = {"plop_vod", "kappatune", "random_module", "page_budget", "eva", "shallow_down", "page_top1"}


def test_peers_first_then_the_default_only_where_they_separate(tmp_path):
    run, lines, arms = _run(tmp_path, "chat")
    assert "--budget-arms=" in lines[0]  # decisions and the base model's runs first
    assert {a for a, b in arms[:7]} == PEERS_SMALL and {b for a, b in arms[:7]} == {"0.007"}
    assert arms[7] == ("types", "0.007")  # the default's arm, after its cell's peers
    assert {a for a, b in arms[8:]} == PEERS_LARGE and all(b == "0.05" for a, b in arms[8:])  # 5%: the peers tie
    assert sum("decide separation" in x for x in lines) == 2 and "the peers tie" in run.stderr
    assert "decide confirm --cells smollm2:chat:0.007,smollm2:chat:0.05" in lines[-1]
    report = next(x for x in lines if "--stage report" in x)  # the default's arm where it ran, at that budget only
    assert report.split("--budget-arms ")[1].split()[0].endswith(",page_top1,types@0.007")


def test_the_design_task_needs_no_separation_gate(tmp_path):
    run, lines, arms = _run(tmp_path, "instruction")
    assert not any("decide separation" in x for x in lines)
    assert ("types", "0.007") in arms and ("types", "0.05") in arms
    report = next(x for x in lines if "--stage report" in x)
    assert report.split("--budget-arms ")[1].split()[0].endswith(",types@0.007,types@0.05")


def test_where_no_cell_separates_the_default_runs_nowhere_and_the_report_plans_only_the_peers(tmp_path):
    run, lines, arms = _run(tmp_path, "chat", TIE_ALL="1")
    assert not any(a == "types" for a, b in arms)
    report = next(x for x in lines if "--stage report" in x)
    assert report.split("--budget-arms ")[1].split()[0].endswith(",page_top1")
