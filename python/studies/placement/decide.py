"""The default placement strategy, decided from the study's tables by the rule of
docs/placement_protocol.md, and the confirmation of that default read by the same rule.

A *cell* is one (family, task, budget) of the equal-budget stage. In a cell, each arm's outcome is
its per-item held-out loss drop on every seed (at its tuned rate); a difference between two arms
is paired on seeds and items (:func:`python.studies.placement.report.paired_ci`).

- ``decide`` (design cells): each candidate strategy's margin against the cell's best peer, the
  qualification of step 3 of the protocol, and the fallback of step 4 when none qualifies.
- ``confirm`` (confirmation cells, given the committed default): the default's difference from
  each peer and from vanilla LoRA, and whether the confirmation criterion holds.

Usage, from the repository root:
    python -m python.studies.placement.decide decide --cells smollm2:instruction:0.007,smollm2:instruction:0.05,gemma3:instruction:0.007
    python -m python.studies.placement.decide confirm --default types --cells qwen05:instruction:0.007
    python -m python.studies.placement.decide separation --cells smollm2:chat:0.007   # exit 3: it does not
    python -m python.studies.placement.decide arm --cells smollm2:chat:0.05   # the default's arm there
    python -m python.studies.placement.decide versus --cells ... --design ...   # versus.md: one row per cell

Each writes a markdown table and a JSON of every number next to the study's results
(``decision.md`` / ``decision.json``, ``confirmation.md`` / ``confirmation.json``, and for
``confirm`` a plot of the default's differences with their CIs, ``confirmation.png``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domlora_kernels.files import write_text_atomic
from python.studies.placement import report

# The arms of the protocol's comparison (python/studies/placement/study.py names them).
CANDIDATES = ("types", "adam", "heldout", "pilot", "page_budget")  # the package's strategies
PEERS = ("plop_vod", "eva", "kappatune", "shallow_down", "random_module", "page_top1")
# An arm's strategy name in domlora_kernels.placement (peers the package does not plan: None).
STRATEGY_OF = {"types": "types", "adam": "adam", "heldout": "heldout", "pilot": "pilot", "page_budget": "page",
               "plop_vod": "plop", "eva": None, "kappatune": None, "shallow_down": None, "random_module": None,
               "page_top1": None}
# Cheaper first (the protocol's tie-break: fewer probes, then fewer pilot steps; data-free first;
# among the one-probe rules, by the seconds each took to plan on SmolLM2, strategies_instruction.json).
COST_ORDER = ("plop_vod", "shallow_down", "random_module", "kappatune", "page_top1", "page_budget", "types",
              "adam", "heldout", "eva", "pilot")
TIE = 0.005
SEEDS = 3
DESIGN_TASK = "instruction"  # the confirmation's separation gate applies to the other tasks


@dataclass(frozen=True)
class Cell:
    family: str
    task: str
    budget: str  # as the study labels it: "0.007", "0.05"

    @classmethod
    def parse(cls, text: str) -> Cell:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"cell {text!r} is not FAMILY:TASK:BUDGET (e.g. smollm2:instruction:0.007)")
        float(parts[2])  # a clear ValueError if the budget is not a number
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.family} {self.task} {float(self.budget) * 100:g}%"


def cell_drops(root: Path, cell: Cell) -> dict[str, dict[int, list[float]]]:
    """``arm -> seed -> per-item loss drop`` of every arm with all its seeds in ``cell``
    (budgeted arms by their plain name; ``lora_all``, the reference, too)."""
    fam = Path(root) / cell.family
    if not (fam / "runs.jsonl").exists():
        raise FileNotFoundError(f"{fam}/runs.jsonl is missing: no run of {cell.family} yet")
    runs = report.load_runs(fam)
    picks_path = fam / "lr_picks.json"
    picks = json.loads(picks_path.read_text()) if picks_path.exists() else {}
    base = next((r for r in runs if r["task"] == cell.task and r["arm"] == "base" and r["phase"] == "test"), None)
    if base is None:
        raise ValueError(f"{cell}: the base model's test run is missing (run --stage budget first)")
    b = np.asarray(base["test_losses"], float)
    out: dict[str, dict[int, list[float]]] = {}
    for arm in CANDIDATES + PEERS + ("lora_all",):
        label = arm if arm == "lora_all" else f"{arm}@{cell.budget}"
        got = picks.get(f"{cell.task}|budget|{label}")
        rs = [r for r in runs if r["task"] == cell.task and r["stage"] == "budget" and r["arm"] == label
              and r["phase"] == "test" and (got is None or f"{got['lr']:.3g}" == f"{r['lr']:.3g}")]
        if len({r["seed"] for r in rs}) >= SEEDS:
            out[arm] = {r["seed"]: list(b - np.asarray(r["test_losses"], float)) for r in rs}
    return out


def mean_drop(d: dict[int, list[float]]) -> float:
    return float(np.mean([np.mean(v) for v in d.values()]))


def best_peer(drops: dict[str, dict[int, list[float]]]) -> str | None:
    peers = [p for p in PEERS if p in drops]
    return max(peers, key=lambda p: mean_drop(drops[p])) if peers else None


def _cheapest(names: list[str], score: dict[str, float]) -> str:
    top = max(score[n] for n in names)
    return min((n for n in names if score[n] >= top - TIE), key=COST_ORDER.index)


def decide(root: Path, cells: list[Cell]) -> dict:
    """The protocol's steps 1-4 on the design ``cells``; every number it rests on."""
    table = {}
    for c in cells:
        drops = cell_drops(root, c)
        bp = best_peer(drops)
        if bp is None:
            raise ValueError(f"{c}: no peer arm has all {SEEDS} seeds; the decision needs them")
        table[str(c)] = {"best_peer": bp, "drop": {a: mean_drop(d) for a, d in drops.items()},
                         "margin": {a: report.paired_ci(drops[a], drops[bp]) for a in drops if a != "lora_all"},
                         "vs_random": {a: report.paired_ci(drops[a], drops["random_module"]) for a in drops
                                       if "random_module" in drops and a not in ("lora_all", "random_module")},
                         "plop_fits": plop_fits(root, c)}
    everywhere = [a for a in CANDIDATES if all(a in t["drop"] for t in table.values())]
    short = {a: [k for k, t in table.items() if a not in t["drop"]] for a in CANDIDATES if a not in everywhere}
    mean_margin = {a: float(np.mean([t["margin"][a][0] for t in table.values()])) for a in everywhere}
    below = {a: [k for k, t in table.items() if t["margin"][a][2] < 0] for a in everywhere}
    qualified = [a for a in everywhere if mean_margin[a] > 0 and not below[a]]
    out = {"cells": table, "mean_margin": mean_margin, "cells_wholly_below_0": below, "qualified": qualified,
           "not_in_every_cell": short}
    if qualified:
        out["default"] = {"rule": "strategy", "arm": _cheapest(qualified, mean_margin)}
        return out
    # step 4: plop where it fits; below, the rule (package or peer) closest to each cell's best peer
    small = {k: t for k, t in table.items() if not t["plop_fits"]}
    pool = [a for a in CANDIDATES + PEERS if a != "plop_vod" and all(a in t["drop"] for t in small.values())]
    small_margin = {a: float(np.mean([t["margin"][a][0] for t in small.values()])) for a in pool}
    out["small_budget_margin"] = small_margin
    out["default"] = {"rule": "peer", "large": "plop_vod",
                      "small": _cheapest(pool, small_margin) if pool else None}
    return out


def plop_fits(root: Path, cell: Cell) -> bool:
    """Whether PLoP's types fit the cell's budget at rank 1 on every layer (the study's plan)."""
    from python.studies.placement.study import budget_arm, vanilla_params

    pf = Path(root) / cell.family / f"predictors_{cell.task}.json"
    if not pf.exists():
        raise FileNotFoundError(f"{pf} is missing: run --stage probe for {cell.family} first")
    pred = json.loads(pf.read_text())
    return isinstance(budget_arm("plop_vod", pred, int(float(cell.budget) * vanilla_params(pred)), None), dict)


def default_arm(decision: dict, root: Path, cell: Cell) -> str:
    """The arm that plays the decided default in ``cell``: the strategy's, or PLoP's types where
    they fit and the small-budget rule below that."""
    d = decision["default"]
    if d["rule"] == "strategy":
        return d["arm"]
    return d["large"] if plop_fits(root, cell) else d["small"]


def confirm(root: Path, cells: list[Cell], default: str | dict) -> dict:
    """The default against each peer and vanilla LoRA in each cell. ``default``: an arm name, or
    the committed decision (``decision.json``), whose arm then depends on the cell's budget."""
    table = {}
    sep = separation(root, [c for c in cells if c.task != DESIGN_TASK])
    for c in cells:
        arm = default if isinstance(default, str) else default_arm(default, root, c)
        if str(c) in sep and not sep[str(c)]["separates"]:  # a task whose peers tie is no evidence
            table[str(c)] = {"default_arm": arm, "excluded": True, "separation": sep[str(c)]}
            continue
        drops = cell_drops(root, c)
        if arm not in drops:
            table[str(c)] = {"default_arm": arm, "missing": True, "arms": sorted(drops)}
            continue
        bp = best_peer({k: v for k, v in drops.items() if k != arm})
        table[str(c)] = {"default_arm": arm, "best_peer": bp, "drop": {a: mean_drop(d) for a, d in drops.items()},
                         "delta": {a: report.paired_ci(drops[arm], drops[a]) for a in drops if a != arm},
                         "pending": [a for a in expected_arms(root, c) if a != arm and a not in drops]}
        if str(c) in sep:  # recorded: the gate that let this cell count
            table[str(c)]["separation"] = sep[str(c)]
    counted = [t for t in table.values() if not t.get("excluded")]
    done = [t for t in counted if not t.get("missing") and t["best_peer"]]
    margins = [t["delta"][t["best_peer"]] for t in done]
    out = {"default": default if isinstance(default, str) else default["default"], "cells": table,
           "complete": bool(counted) and len(done) == len(counted) and not any(t["pending"] for t in done)}
    if margins:
        out["mean_margin_vs_best_peer"] = float(np.mean([m[0] for m in margins]))
        # the criterion on these cells; the protocol's verdict is this over every confirmation cell
        out["criterion_met"] = (out["complete"] and out["mean_margin_vs_best_peer"] >= 0
                            and all(m[2] >= 0 for m in margins))
    return out


def expected_arms(root: Path, cell: Cell) -> list[str]:
    """Every arm a finished confirmation cell has: the peers (PLoP's types where they fit the
    budget), PAGE's budget plan (the paper's rule) and vanilla LoRA. A cell missing any of them is
    reported, not judged complete."""
    fits = plop_fits(root, cell)
    return [p for p in PEERS if p != "plop_vod" or fits] + ["page_budget", "lora_all"]


def separation(root: Path, cells: list[Cell]) -> dict:
    """Does the task separate placements? Per cell, the best peer minus the worst peer (paired);
    the cell separates when that CI lies wholly above 0. A cell where every placement ties is no
    evidence for or against a default."""
    out = {}
    for c in cells:
        drops = cell_drops(root, c)
        peers = sorted((p for p in PEERS if p in drops), key=lambda p: mean_drop(drops[p]))
        if len(peers) < 2:
            out[str(c)] = {"peers": peers, "separates": None}
            continue
        d = report.paired_ci(drops[peers[-1]], drops[peers[0]])
        out[str(c)] = {"peers": peers, "best": peers[-1], "worst": peers[0], "delta": d, "separates": d[1] > 0}
    return out


PEER_NAMES = {"plop_vod": "PLoP's types", "eva": "EVA", "kappatune": "KappaTune", "shallow_down": "the shallow down_proj",
              "random_module": "a random module", "page_top1": "PAGE's top-1", "page_budget": "PAGE's plan"}


def _fam(cell: str) -> str:
    return cell.replace("smollm2", "SmolLM2").replace("gemma3", "Gemma 3").replace("qwen05", "Qwen2.5-Coder-0.5B")


def arm_evidence(table: dict, arm) -> str:
    """One line: the arm against the best peer and a random module in each cell of ``table`` (the
    ``cells`` of :func:`decide`) where it ran. ``arm``: a name, or ``f(cell) -> name``."""
    parts = []
    for k, t in table.items():
        a = arm(t) if callable(arm) else arm
        if a not in t["margin"]:
            continue
        bp = t["best_peer"]
        bits = [f"the best peer ({t['drop'][a]:.3f})" if bp == a else
                f"{_ci(t['margin'][a])} against {PEER_NAMES[bp]}, the best peer"]
        if a in t.get("vs_random", {}):
            bits.append(f"{_ci(t['vs_random'][a])} against {PEER_NAMES['random_module']}")
        parts.append(f"{_fam(k)}{' (' + a + ')' if callable(arm) else ''}: " + ", ".join(bits))
    return "; ".join(parts)


EVIDENCE_PATH = Path("domlora_kernels/placement/evidence.json")
EVIDENCE_HEAD = "held-out loss drop, this strategy's minus the other's, paired 95% CI"


def default_strategy(decision: dict) -> str:
    """The package's name of the decided default: a strategy, or ``plop+SMALL`` for PLoP's types
    where they fit and SMALL's plan below that."""
    d = decision["default"]
    if d["rule"] == "strategy":
        return STRATEGY_OF[d["arm"]]
    return f"plop+{STRATEGY_OF[d['small']] or d['small']}"


def confirmation_evidence(c: dict) -> str:
    """One line: the verdict of a complete confirmation (:func:`confirm` over the protocol's
    cells), then per cell the default against its best peer and against vanilla LoRA."""
    verdict = "confirmed" if c["criterion_met"] else "NOT confirmed"
    parts = []
    for k, t in c["cells"].items():
        if t.get("excluded"):
            parts.append(f"{_fam(k)}: excluded (its peers tie)")
            continue
        bp = t["best_peer"]
        bits = [f"{_ci(t['delta'][bp], CONFIRM_DIGITS)} against {PEER_NAMES[bp]}, the best peer"]
        if "lora_all" in t["delta"]:
            bits.append(f"{_ci(t['delta']['lora_all'], CONFIRM_DIGITS)} against vanilla LoRA")
        parts.append(f"{_fam(k)} ({t['default_arm']}): " + ", ".join(bits))
    return (f"{verdict} where it was not designed, mean margin over each cell's best peer "
            f"{c['mean_margin_vs_best_peer']:+.4f}; " + "; ".join(parts))


def evidence(decision: dict, confirmation: dict | None = None) -> dict:
    """What ``domlora apply`` prints as each strategy's evidence: its line of :func:`arm_evidence`
    on the design cells (the default: its arm in each cell), with where it comes from; and, once
    the confirmation over the protocol's cells is complete, the default's line of
    :func:`confirmation_evidence`."""
    cells = decision["cells"]
    lines = {STRATEGY_OF[a]: arm_evidence(cells, a) for a in CANDIDATES + ("plop_vod",)}
    name = default_strategy(decision)
    if "+" in name:
        d = decision["default"]
        lines[name] = arm_evidence(cells, lambda t: d["large"] if t["plop_fits"] else d["small"])
    out = {"default": name, "units": EVIDENCE_HEAD, "source": "python -m python.studies.placement.decide evidence "
           "(python/results/placement/decision.json and confirmation.json)", "strategies": lines}
    if confirmation is not None and is_the_protocols_confirmation(confirmation):
        out["confirmation"] = {name: confirmation_evidence(confirmation)}
    return out


# The confirmation cells the protocol names (docs/placement_protocol.md, second amendment), as
# --cells takes them: its verdict is :func:`confirm` over exactly these, complete.
CONFIRMATION_CELLS = "smollm2:chat:0.007,smollm2:chat:0.05,qwen05:instruction:0.007,qwen05:instruction:0.05"


def is_the_protocols_confirmation(c: dict) -> bool:
    return c["complete"] and sorted(c["cells"]) == sorted(str(Cell.parse(x)) for x in CONFIRMATION_CELLS.split(","))


def _ci(t, digits: int = 3) -> str:
    return report._fmt(tuple(t), digits)


# Confirmation tables print four decimals: on a task that nearly saturates the differences are
# a few thousandths, which three decimals would round to 0.000.
CONFIRM_DIGITS = 4


def decision_lines(d: dict) -> list[str]:
    lines = ["| cell | best peer (loss drop) | " + " | ".join(f"{a} − best peer" for a in CANDIDATES) + " |",
             "|---|---|" + "---|" * len(CANDIDATES)]
    for k, t in d["cells"].items():
        bp = t["best_peer"]
        cols = [_ci(t["margin"][a]) if a in t["margin"] else "not run" for a in CANDIDATES]
        lines.append(f"| {k} | {bp} ({t['drop'][bp]:.3f}) | " + " | ".join(cols) + " |")
    lines += ["", "| strategy | mean margin | cells whose CI lies wholly below 0 | qualifies |", "|---|---:|---|---|"]
    for a, m in d["mean_margin"].items():
        lines.append(f"| {a} | {m:+.3f} | {', '.join(d['cells_wholly_below_0'][a]) or 'none'} | "
                     f"{'yes' if a in d['qualified'] else 'no'} |")
    for a, ks in d.get("not_in_every_cell", {}).items():
        lines.append(f"| {a} | - | not run with all seeds in: {', '.join(ks)} | not eligible |")
    dflt = d["default"]
    if dflt["rule"] == "strategy":
        lines += ["", f"**Default: `{STRATEGY_OF[dflt['arm']]}`** (arm `{dflt['arm']}`), by step 3."]
    else:
        sm = d["small_budget_margin"]
        intro = ("No strategy of the package qualifies (step 4). Below PLoP's threshold, mean margin over the "
                 "cells where v/o/down does not fit at rank 1 on every layer:")
        rows = [f"| {a} | {m:+.3f} |" for a, m in sorted(sm.items(), key=lambda x: -x[1])]
        lines += ["", intro, "", "| rule | mean margin |", "|---|---:|", *rows]
        lines += ["", f"**Default: PLoP's types (`plop`) where they fit, else `{dflt['small']}`**, by step 4."]
    return lines


def confirmation_lines(c: dict) -> list[str]:
    lines = [f"Default under test: `{json.dumps(c['default'])}`.", ""]
    for k, t in c["cells"].items():
        if t.get("excluded"):
            sp = t["separation"]
            why = (f"{sp['best']} − {sp['worst']} = {_ci(sp['delta'], CONFIRM_DIGITS)}" if sp.get("best") else
                   f"fewer than two peers with all seeds ({', '.join(sp['peers']) or 'none'})")
            lines += [f"## {k}", "", f"Excluded: the peers do not separate placements here ({why}).", ""]
            continue
        if t.get("missing"):
            have = ", ".join(t["arms"]) or "none"
            lines += [f"## {k}", "", f"The default (arm `{t['default_arm']}`) has no finished runs here yet (arms "
                      f"with all seeds: {have}).", ""]
            continue
        lines += [f"## {k}", "", f"Default's arm: `{t['default_arm']}` ({t['drop'][t['default_arm']]:.4f}); best peer: "
                  f"{t['best_peer']}.", "", "| other arm | its loss drop | default − it [95% CI] |", "|---|---:|---|"]
        lines += [f"| {a} | {t['drop'][a]:.4f} | {_ci(dl, CONFIRM_DIGITS)} |" for a, dl in sorted(t["delta"].items(),
                                                                                   key=lambda x: -t["drop"][x[0]])]
        lines.append("")
        if t.get("separation"):
            sp = t["separation"]
            lines += [f"Separation (best peer − worst peer, over the peers finished now): {sp['best']} − {sp['worst']} = "
                      f"{_ci(sp['delta'], CONFIRM_DIGITS)}.", ""]
        if t.get("pending"):
            lines += [f"Still to finish here (so the best peer may change): {', '.join(t['pending'])}.", ""]
    if "mean_margin_vs_best_peer" in c:
        verdict = ("criterion met" if c["criterion_met"] else "criterion not met") if c["complete"] else "incomplete"
        n = len(c["cells"])
        over = "this cell" if n == 1 else f"these {n} cells"
        line = f"Mean margin against each cell's best peer, over {over}: {c['mean_margin_vs_best_peer']:+.4f}; "
        if is_the_protocols_confirmation(c):
            word = "confirmed" if c["criterion_met"] else "not confirmed"
            line += (f"{verdict}, and these are every confirmation cell of the protocol: **the default is {word}** "
                     "(criterion: mean margin >= 0 and no cell's CI wholly below 0).")
        else:
            line += f"{verdict} there (the protocol's verdict pools every confirmation cell)."
        lines.append(line)
    return lines


VERSUS_ARMS = ("plop_vod", "eva", "kappatune", "shallow_down", "random_module", "page_top1", "page_budget", "lora_all")


def _versus_cell(t: dict, arm: str) -> str:
    if t.get("excluded"):
        return "excluded: its peers tie"
    if "delta" not in t:
        return "the default not run"
    if arm == t["default_arm"]:
        return "(the default's arm)"
    return _ci(t["delta"][arm], CONFIRM_DIGITS) if arm in t["delta"] else "-"


def versus_lines(c: dict, design: set[str]) -> list[str]:
    """One row per cell of :func:`confirm`: the default's arm minus each peer, PAGE's plan and
    vanilla LoRA (a wide view of the per-cell tables; ``design``: the cells the rule was chosen on)."""
    names = [PEER_NAMES.get(a, "vanilla LoRA").removeprefix("the ").removeprefix("a ") for a in VERSUS_ARMS]
    rows = [["cell", "default's arm", *(f"− {n}" for n in names)], ["---"] * (2 + len(names))]
    for k, t in c["cells"].items():
        role = "design" if k in design else "confirmation"
        rows.append([f"{k} ({role})", t["default_arm"], *(_versus_cell(t, a) for a in VERSUS_ARMS)])
    return ["| " + " | ".join(r) + " |" for r in rows]


def plot_confirmation(c: dict, path: Path) -> Path | None:
    """``confirmation.png``: per counted cell, the default's loss drop minus each other arm's, with
    its 95% CI (right of 0: the default learned more); the cell's best peer in red, vanilla LoRA
    in grey."""
    cells = {k: t for k, t in c["cells"].items() if t.get("delta")}
    if not cells:
        return None
    plt = report._pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(4.6 * len(cells), 0.9 + 0.3 * max(len(t["delta"]) for t in cells.values())),
                             squeeze=False)
    for ax, (k, t) in zip(axes[0], cells.items()):
        arms = sorted(t["delta"], key=lambda a: t["delta"][a][0])
        for y, a in enumerate(arms):
            est, lo, hi = t["delta"][a]
            color = "tab:red" if a == t["best_peer"] else "grey" if a == "lora_all" else "tab:blue"
            ax.errorbar(est, y, xerr=[[est - lo], [hi - est]], fmt="o", color=color, ms=4, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.locator_params(axis="x", nbins=4)
        ax.set_yticks(range(len(arms)))
        ax.set_yticklabels(["vanilla LoRA" if a == "lora_all" else a for a in arms], fontsize=8)
        ax.set_xlabel(f"{t['default_arm']} minus the arm: held-out loss drop, 95% CI", fontsize=8)
        title = k + (" (still running: " + ", ".join(t["pending"]) + ")" if t.get("pending") else "")
        ax.set_title(title, fontsize=8, wrap=True)
    return report._save(plt, fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("decide", "confirm", "separation", "arm", "evidence", "versus"))
    ap.add_argument("--cells", default="", help="comma-separated FAMILY:TASK:BUDGET (every command but evidence)")
    ap.add_argument("--default", help="confirm: an arm name (e.g. types); default: the committed decision.json")
    ap.add_argument("--root", type=Path, default=Path("python/results/placement"), help="the study's results")
    ap.add_argument("--out", type=Path, help="where decision/confirmation .md and .json go (default: --root)")
    ap.add_argument("--no-plot", action="store_true", help="confirm: skip confirmation.png (matplotlib)")
    ap.add_argument("--design", default="", help="versus: the design cells among --cells (FAMILY:TASK:BUDGET, comma-separated)")
    a = ap.parse_args(argv)
    cells = [Cell.parse(x) for x in a.cells.split(",") if x]
    if not cells and a.what != "evidence":
        ap.error(f"{a.what} needs --cells (e.g. smollm2:instruction:0.007)")
    if a.what == "evidence":  # the package's copy of the committed decision's evidence
        path = a.root / "decision.json"
        if not path.exists():
            ap.error(f"{path} is missing: decide on the design cells first (the decide command)")
        conf = a.root / "confirmation.json"  # its verdict joins the default's evidence once complete
        conf = json.loads(conf.read_text()) if conf.exists() else None
        write_text_atomic(EVIDENCE_PATH, json.dumps(evidence(json.loads(path.read_text()), conf), indent=1) + "\n")
        print(f"wrote {EVIDENCE_PATH}")
        return
    if a.what == "arm":  # the committed default's arm in each cell, one a line (for confirm.sh)
        path = a.root / "decision.json"
        if not path.exists():
            ap.error(f"{path} is missing: decide on the design cells first (the decide command)")
        decision = json.loads(path.read_text())
        print("\n".join(default_arm(decision, a.root, c) for c in cells))
        return
    if a.what == "separation":  # printed only: a gate of the confirmation script, not a result file
        sep = separation(a.root, cells)
        for k, v in sep.items():
            if v["separates"] is None:
                print(f"{k}: fewer than two peers with all seeds ({', '.join(v['peers']) or 'none'})")
            else:
                print(f"{k}: {v['best']} - {v['worst']} = {_ci(v['delta'])}: "
                      f"{'separates' if v['separates'] else 'does NOT separate'} placements")
        raise SystemExit(0 if all(v["separates"] for v in sep.values()) else 3)
    if a.what == "decide":
        d = decide(a.root, cells)
        what = ("Margin = the strategy's held-out loss drop minus the cell's best peer's, paired on seeds and items "
                "(95% bootstrap CI). Rule: docs/placement_protocol.md.")
        lines = ["# The default placement: the decision on the design cells", "", what, "", *decision_lines(d)]
        name = "decision"
    else:
        if a.default is None:
            path = a.root / "decision.json"
            if not path.exists():
                ap.error(f"{path} is missing: decide on the design cells first (the decide command), or name --default")
            dflt = json.loads(path.read_text())
        elif a.default not in CANDIDATES + PEERS:
            ap.error(f"--default must be an arm of the study ({', '.join(CANDIDATES + PEERS)}), got {a.default!r}")
        else:
            dflt = a.default
        d = confirm(a.root, cells, dflt)
        if a.what == "versus":
            design = {str(Cell.parse(x)) for x in a.design.split(",") if x}
            head = ("The default's arm minus each other arm, held-out loss drop, paired on seeds and items (95% "
                    "bootstrap CI); '-': not run there (PLoP's types where they do not fit the budget at rank 1).")
            lines = ["# The default placement against each peer, every cell", "", head, "", *versus_lines(d, design)]
            name = "versus"
        else:
            lines = ["# The default placement: confirmation", ""] + confirmation_lines(d)
            name = "confirmation"
    out = a.out or a.root
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    write_text_atomic(out / f"{name}.json", json.dumps(d, indent=1, default=float))
    if name == "confirmation" and not a.no_plot:
        plot_confirmation(d, out / "confirmation.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
