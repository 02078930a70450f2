"""The placement study's report: tables and plots from whatever runs are finished.

``write_report(FAMILY_DIR)`` reads ``runs.jsonl``, ``predictors_TASK.json`` and ``lr_picks.json``
of one family (see :mod:`python.studies.placement.study`) and writes into the same folder:

- ``correlation.md``: Spearman's rho between each predictor and the outcome of the core test
  (loss drop; task-metric gain), per task, with a 95% bootstrap CI over modules;
- ``budget.md``: the equal-budget table, each arm's loss drop and metric with CIs, and its
  paired difference from PAGE's budgeted placement at the same budget and from vanilla LoRA
  (95% CI of a bootstrap over seeds, then items: the same items for both arms);
- ``predictors_vs_outcome.png``: each predictor against the loss drop, per task;
- ``budget.png``: each equal-budget arm's loss drop with its CI, vanilla LoRA's as a band;
- ``report.json``: every number of the tables.

``combine(OUT)`` then joins the families' tables into ``OUT/correlation.md`` and ``OUT/budget.md``
(predictor x family x task), each family under its own status line.

Everything finished is used; the header says how many of the planned runs that is, so a
partial report is labelled as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from python.studies.common import write_atomic

PREDICTORS = ("page", "page_expected", "full_grad", "page_per_param", "layer")
PREDICTOR_NAMES = {"page": "PAGE (projection A)", "page_expected": "expected PAGE (A-free)",
                   "full_grad": "full-gradient energy", "page_per_param": "PAGE per parameter", "layer": "layer depth"}
RESAMPLES = 2000


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(x, y, seed: int = 0) -> tuple[float, float, float]:
    """``(rho, low, high)``: rho and the 95% percentile bootstrap CI over the pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    boot = [spearman(x[i], y[i]) for i in rng.integers(0, len(x), (RESAMPLES, len(x)))]
    boot = np.array([b for b in boot if not np.isnan(b)])
    if len(boot) < RESAMPLES / 2:
        return rho, float("nan"), float("nan")
    return rho, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def paired_ci(a: dict[int, list[float]], b: dict[int, list[float]] | None, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` (``b`` None: of ``a``) over common seeds and items, with the 95% CI of a
    bootstrap that resamples seeds, then items within each seed (the same for ``a`` and ``b``)."""
    seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
    if not seeds:
        return float("nan"), float("nan"), float("nan")
    d = [np.asarray(a[s], float) - (np.asarray(b[s], float) if b is not None else 0.0) for s in seeds]
    est = float(np.mean([x.mean() for x in d]))
    rng = np.random.default_rng(seed)
    boot = np.empty(RESAMPLES)
    for i in range(RESAMPLES):
        pick = rng.integers(0, len(d), len(d))
        boot[i] = np.mean([d[j][rng.integers(0, len(d[j]), len(d[j]))].mean() for j in pick])
    return est, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def _fmt(t: tuple[float, float, float], digits: int = 3) -> str:
    est, lo, hi = t
    if np.isnan(est):
        return "-"
    ci = "" if np.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{est:.{digits}f}{ci}"


def runs_by_key(path: Path) -> dict[str, dict]:
    """``runs.jsonl`` read by run key, for the study's resume logic and for the report alike: a run
    written twice (two processes started on the same work) counts once, its last line kept."""
    runs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            runs[r["key"]] = r
    return runs


def load_runs(fam_dir: Path) -> list[dict]:
    """Every finished run of the family, once."""
    return list(runs_by_key(Path(fam_dir) / "runs.jsonl").values())


def _per_seed(runs: list[dict], field: str) -> dict[int, list[float]]:
    return {r["seed"]: r[field] for r in runs}


def core_rows(runs: list[dict], preds: dict[str, dict]) -> dict[str, list[dict]]:
    """task -> one row per core module with a finished test run: predictors and outcomes."""
    out: dict[str, list[dict]] = {}
    for task, pred in preds.items():
        base = [r for r in runs if r["task"] == task and r["arm"] == "base" and r["phase"] == "test"]
        if not base:
            continue
        base_loss = np.asarray(base[0]["test_losses"])
        base_metric = {r["seed"]: np.mean(r["metric_scores"]) for r in base}
        rows = []
        total = sum(m["page"] for m in pred["modules"].values())
        for name, m in pred["modules"].items():
            rs = [r for r in runs if r["task"] == task and r["stage"] == "core" and r["arm"] == name and r["phase"] == "test"]
            if not rs:
                continue
            drop = float(np.mean([np.mean(base_loss - np.asarray(r["test_losses"])) for r in rs]))
            # its 95% CI over the held-out items (seeds, then items), paired with the base model
            drop_ci = paired_ci({r["seed"]: base_loss for r in rs}, {r["seed"]: r["test_losses"] for r in rs})
            gains = [np.mean(r["metric_scores"]) - base_metric[r["seed"]] for r in rs if r["seed"] in base_metric]
            rows.append({"module": name, "loss_drop": drop, "loss_drop_ci": drop_ci[1:], "metric_gain": float(np.mean(gains)) if gains else float("nan"),
                         "seeds": [r["seed"] for r in rs], "params": rs[0]["params"], "lr": rs[0]["lr"],
                         "ranks": rs[0]["ranks"], "type": m["type"], "layer": m["layer"], "share": m["page"] / total,
                         **{p: float(m[p]) for p in PREDICTORS}, "page_rank": m["page_rank"]})
        out[task] = rows
    return out


def correlation_table(family: str, rows: dict[str, list[dict]]) -> tuple[list[str], list[dict]]:
    lines = ["| family | task | predictor | Spearman rho, loss drop [95% CI] | Spearman rho, metric gain [95% CI] | modules |",
             "|---|---|---|---|---|---:|"]
    out = []
    for task, rs in rows.items():
        if len(rs) < 3:
            continue
        for p in PREDICTORS:
            x = [r[p] for r in rs]
            cl = spearman_ci(x, [r["loss_drop"] for r in rs])
            ok = [r for r in rs if not np.isnan(r["metric_gain"])]
            cm = spearman_ci([r[p] for r in ok], [r["metric_gain"] for r in ok]) if len(ok) >= 3 else (float("nan"),) * 3
            out.append({"task": task, "predictor": p, "loss_drop": cl, "metric_gain": cm, "n": len(rs)})
            lines.append(f"| {family} | {task} | {PREDICTOR_NAMES[p]} | {_fmt(cl)} | {_fmt(cm)} | {len(rs)} |")
    return lines, out


def core_module_lines(family: str, rows: dict[str, list[dict]]) -> list[str]:
    """One row per core module, by PAGE rank: what it got and what it gave."""
    lines = ["| family | task | module | PAGE rank | PAGE share | type | layer | LoRA rank | lr | held-out loss drop [95% CI] "
             "| metric gain |", "|---|---|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for task, rs in rows.items():
        for r in sorted(rs, key=lambda r: r["page_rank"]):
            lo, hi = r["loss_drop_ci"]
            rank = r["ranks"][r["module"]]  # a core run adapts only its module
            lines.append(f"| {family} | {task} | {r['module']} | {r['page_rank']} | {r['share']:.3f} | {r['type']} | "
                         f"{int(r['layer'])} | {rank} | {r['lr']:.3g} | {r['loss_drop']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{r['metric_gain']:+.3f} |")
    return lines


TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def probe_lines(family: str, preds: dict[str, dict]) -> list[str]:
    """Is PAGE concentrated, and where? Per task, from the probes alone (no training)."""
    lines = ["| family | task | top-1 module (share) | top-10 share | PAGE share by type (" + ", ".join(TYPES)
             + ") | share of parameters by type | rho(PAGE, expected PAGE) | rho(PAGE, full-gradient energy) "
             "| rho between A seeds (min) |", "|---|---|---|---:|---|---|---:|---:|---:|"]
    for task, pred in preds.items():
        mods = pred["modules"]
        page = np.array([m["page"] for m in mods.values()])
        share = page / page.sum()
        order = np.argsort(-share)
        top = list(mods)[order[0]]
        size = {n: m["in"] + m["out"] for n, m in mods.items()}
        by_type = [sum(share[i] for i, m in enumerate(mods.values()) if m["type"] == t) for t in TYPES]
        par_type = [sum(v for n, v in size.items() if mods[n]["type"] == t) / sum(size.values()) for t in TYPES]
        seeds = np.array([m["page_by_seed"] for m in mods.values()]).T
        seed_rho = min(spearman(seeds[i], seeds[j]) for i in range(len(seeds)) for j in range(i + 1, len(seeds)))
        col = lambda k: np.array([m[k] for m in mods.values()])  # noqa: E731
        lines.append(f"| {family} | {task} | {top} ({share[order[0]]:.3f}) | {share[order[:10]].sum():.3f} | "
                     f"{' / '.join(f'{x:.2f}' for x in by_type)} | {' / '.join(f'{x:.2f}' for x in par_type)} | "
                     f"{spearman(page, col('page_expected')):.3f} | {spearman(page, col('full_grad')):.3f} | {seed_rho:.3f} |")
    return lines


def budget_rows(runs: list[dict], picks: dict | None = None) -> list[dict]:
    """One row per (task, budget arm or reference) with finished test runs; where ``picks``
    (``lr_picks.json``) names the arm's rate, only the runs at that rate (a test run at an
    earlier pick, kept in runs.jsonl, is not mixed in)."""
    picks = picks or {}

    def at_pick(r: dict) -> bool:
        got = picks.get(f"{r['task']}|budget|{r['arm']}")
        return got is None or f"{got['lr']:.3g}" == f"{r['lr']:.3g}"

    test = [r for r in runs if r["stage"] == "budget" and r["phase"] == "test" and at_pick(r)]
    base = {r["task"]: r for r in runs if r["arm"] == "base" and r["phase"] == "test"}
    base_metric = {(r["task"], r["seed"]): r["metric_scores"] for r in runs if r["arm"] == "base" and r["phase"] == "test"}
    groups: dict[tuple, list[dict]] = {}
    for r in test:
        groups.setdefault((r["task"], r["arm"]), []).append(r)
    rows = []
    for (task, arm), rs in groups.items():
        budget = arm.split("@")[1] if "@" in arm else None
        page = groups.get((task, f"page_budget@{budget}")) if budget else None
        vanilla = groups.get((task, "lora_all"))
        neg = {s: [-x for x in v] for s, v in _per_seed(rs, "test_losses").items()}  # drop = base - loss
        b = base.get(task)
        drop = paired_ci(neg, {s: [-x for x in b["test_losses"]] for s in neg}) if b else (float("nan"),) * 3
        metric = paired_ci(_per_seed(rs, "metric_scores"), None)
        mgain = paired_ci(_per_seed(rs, "metric_scores"), {s: base_metric[(task, s)] for s in neg if (task, s) in base_metric})
        row = {"task": task, "arm": arm, "budget": budget, "params": rs[0]["params"], "lr": rs[0]["lr"],
               "modules": len(rs[0]["ranks"]), "seeds": sorted(r["seed"] for r in rs), "loss_drop": drop,
               "metric": metric, "metric_gain": mgain}
        for label, other in (("vs_page", page), ("vs_vanilla", vanilla)):
            if other and other is not rs:
                ol = {s: [-x for x in v] for s, v in _per_seed(other, "test_losses").items()}
                row[f"{label}_loss_drop"] = paired_ci(neg, ol)
                row[f"{label}_metric"] = paired_ci(_per_seed(rs, "metric_scores"), _per_seed(other, "metric_scores"))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["budget"] or "~", r["arm"]))


def budget_table(family: str, rows: list[dict], vanilla_params: int | None) -> list[str]:
    lines = ["| family | task | arm | modules | params | % of vanilla | lr | seeds | loss drop [95% CI] | "
             "metric [95% CI] | Δ loss drop vs PAGE budget [95% CI] | Δ metric vs PAGE budget | "
             "Δ loss drop vs vanilla LoRA | Δ metric vs vanilla LoRA |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['params'] / vanilla_params:.2f}%" if vanilla_params else "-"
        na = (float("nan"),) * 3
        lines.append(f"| {family} | {r['task']} | {r['arm']} | {r['modules']} | {r['params']:,} | {pct} | {r['lr']:.3g} | "
                     f"{len(r['seeds'])} | {_fmt(r['loss_drop'])} | {_fmt(r['metric'])} | "
                     f"{_fmt(r.get('vs_page_loss_drop', na))} | {_fmt(r.get('vs_page_metric', na))} | "
                     f"{_fmt(r.get('vs_vanilla_loss_drop', na))} | {_fmt(r.get('vs_vanilla_metric', na))} |")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_budget(fam_dir: Path, rows: list[dict]) -> Path | None:
    """``budget.png``: each arm's held-out loss drop with its 95% CI, one panel per task, arms
    grouped by budget; vanilla LoRA's CI as a grey band."""
    plt = _pyplot()
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return None
    order = lambda r: (float(r["budget"]) if r["budget"] else float("inf"), -r["loss_drop"][0])  # noqa: E731
    per = {t: sorted((r for r in rows if r["task"] == t), key=order) for t in tasks}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 0.9 + 0.32 * max(map(len, per.values()))),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = per[task]
        y = np.arange(len(rs))[::-1]
        est = np.array([r["loss_drop"][0] for r in rs])
        lo, hi = np.array([r["loss_drop"][1] for r in rs]), np.array([r["loss_drop"][2] for r in rs])
        colors = [{"0.007": "tab:blue", "0.05": "tab:orange"}.get(r["budget"], "black") for r in rs]
        for k in range(len(rs)):
            ax.errorbar(est[k], y[k], xerr=[[est[k] - lo[k]], [hi[k] - est[k]]], fmt="none", ecolor=colors[k], capsize=3)
        ax.scatter(est, y, c=colors, zorder=3, s=18)
        van = next((r for r in rs if r["arm"] == "lora_all"), None)
        if van is not None:
            ax.axvspan(van["loss_drop"][1], van["loss_drop"][2], color="grey", alpha=0.25, lw=0)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r['arm']} ({100 * r['params'] / van['params']:.3g}%, {len(r['seeds'])} seeds)"
                            if van else r["arm"] for r in rs], fontsize=8)
        ax.set_xlabel("held-out loss drop (base minus adapted), 95% CI", fontsize=8)
        ax.set_title(f"{fam_dir.name}, {task}: blue 0.7%, orange 5%, black references; band: vanilla LoRA", fontsize=8)
    return _save(plt, fig, fam_dir / "budget.png")


def plot(fam_dir: Path, rows: dict[str, list[dict]]) -> Path | None:
    plt = _pyplot()
    tasks = [t for t, rs in rows.items() if rs]
    if not tasks:
        return None
    fig, axes = plt.subplots(len(tasks), len(PREDICTORS), figsize=(3.2 * len(PREDICTORS), 2.8 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, p in enumerate(PREDICTORS):
            ax = axes[i][j]
            x = [r[p] for r in rows[task]]
            ax.scatter(x, [r["loss_drop"] for r in rows[task]], s=14)
            if p != "layer" and min(x) > 0:
                ax.set_xscale("log")
            ax.set_xlabel(PREDICTOR_NAMES[p], fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{task}: held-out loss drop", fontsize=8)
    return _save(plt, fig, fam_dir / "predictors_vs_outcome.png")


def lr_edge_lines(fam_dir: Path) -> list[str]:
    path = fam_dir / "lr_picks.json"
    picks = json.loads(path.read_text()) if path.exists() else {}
    notes = [f"- {k}: {'; '.join(v['edge_notes'])}; final rate {v['lr']:.3g}" for k, v in picks.items() if v["edge_notes"]]
    core = [f"- {k}: {v['lr']:.3g}" for k, v in picks.items() if v.get("from") == "core"]
    return (["## Learning-rate picks at a grid edge (the grid was extended there)", ""] + (notes or ["- none"])
            + ["", "## Budget arms that took their module type's core-stage rate (same module budget, no grid of "
               "their own)", ""] + (core or ["- none"]))


def status_line(runs: list[dict], picks: dict, done: int, planned: int | None,
                cells: list[tuple[str, str]] | None, seeds: int) -> str:
    """The report's status. With ``cells`` (``(task, arm label)`` of every planned budget arm),
    complete only when each has ``seeds`` test runs at its picked rate, and the missing ones are
    named; without, by the run count against ``planned``."""
    partial = "; every number below is from the finished runs only"
    if cells is None:
        if planned is not None and done >= planned:
            return f"complete: {done} runs"
        return f"PARTIAL: {done} runs finished" + (f" of about {planned} planned" if planned else "") + partial
    if not cells:
        return f"no budget arms planned for these tasks ({done} runs)"
    have = {(r["task"], r["arm"]): len(r["seeds"]) for r in budget_rows(runs, picks)}
    missing = [f"{t} {a} ({have.get((t, a), 0)} of {seeds} seeds)" for t, a in cells if have.get((t, a), 0) < seeds]
    if not missing:
        return f"complete: all {len(cells)} planned budget arms have {seeds} seeds ({done} runs)"
    return (f"PARTIAL: {len(cells) - len(missing)} of {len(cells)} planned budget arms finished ({done} runs); "
            f"missing: {', '.join(missing)}" + partial)


def write_report(fam_dir: Path, planned: int | None = None, smoke: bool = False, tasks=None,
                 cells: list[tuple[str, str]] | None = None, seeds: int = 3) -> dict:
    """Write ``correlation.md``, ``budget.md``, ``report.json`` and the plot; returns the report.
    ``planned`` is the run count of the plan for ``tasks`` (all tasks when None), ``cells`` its
    budget arms (:func:`status_line`); every finished run is reported either way."""
    fam_dir = Path(fam_dir)
    family = fam_dir.name
    runs = load_runs(fam_dir)
    preds = {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in sorted(fam_dir.glob("predictors_*.json"))}
    vanilla = next((8 * sum(m["in"] + m["out"] for m in p["modules"].values()) for p in preds.values()), None)
    done = sum((r["phase"] == "test" or r["phase"] == "val") and (tasks is None or r["task"] in tasks) for r in runs)
    picks_path = fam_dir / "lr_picks.json"
    picks = json.loads(picks_path.read_text()) if picks_path.exists() else {}
    status = status_line(runs, picks, done, planned, cells, seeds)
    head = [f"# Placement study, {family}{' (smoke: a tiny random Llama, numbers mean nothing)' if smoke else ''}", "",
            f"Status: {status}.", ""]
    write_atomic((fam_dir / "probe.md"), "\n".join([
        f"# PAGE probes, {family}: concentration, by type, and agreement of the predictors", "",
        "Spearman's rho over all candidate modules; probe on each task's first 64 train items, rank 8, "
        "A seeds 0-2.", ""] + probe_lines(family, preds)) + "\n")
    crow = core_rows(runs, preds)
    clines, cnums = correlation_table(family, crow)
    write_atomic((fam_dir / "correlation.md"), "\n".join(head + [
        "Core test: single-module adapters at equal parameters; outcome = mean per-item drop of the held-out loss "
        "(base minus adapted), and task-metric gain over the base model; CI: bootstrap over modules.", ""]
        + clines + ["", "## The core modules", "",
                    "Held-out loss drop: mean over the test items of base minus adapted loss, its CI a bootstrap over "
                    "the items; metric gain: the adapted model's task metric minus the base model's, same items.", ""]
        + core_module_lines(family, crow) + [""] + lr_edge_lines(fam_dir)) + "\n")
    brows = budget_rows(runs, picks)
    write_atomic((fam_dir / "budget.md"), "\n".join(head + [
        "Equal budgets (arm@fraction of vanilla LoRA r=8) and references; Δ = arm minus the other, paired on "
        "seeds and items (bootstrap over seeds, then items).", ""] + budget_table(family, brows, vanilla)) + "\n")
    plot(fam_dir, crow)
    plot_budget(fam_dir, brows)
    report = {"family": family, "status": status, "runs": done, "correlation": cnums, "budget": brows,
              "core_rows": crow}
    write_atomic((fam_dir / "report.json"), json.dumps(report, indent=1, default=float))
    return report


def combine(out: Path) -> None:
    """``OUT/correlation.md`` and ``OUT/budget.md``: every family's table, with its status."""
    out = Path(out)
    for name in ("correlation.md", "budget.md"):
        parts = []
        for fam in sorted(p for p in out.iterdir() if (p / name).is_file()):
            lines = (fam / name).read_text().splitlines()
            status = next((x for x in lines if x.startswith("Status:")), "Status: unknown")
            tables, prev = [], False  # every table of the family's file, a blank line between two
            for x in lines:
                row = x.startswith("|")
                if row and not prev and tables:
                    tables.append("")
                if row:
                    tables.append(x)
                prev = row
            parts += [f"## {fam.name}", "", status, ""] + tables + [""]
        if parts:
            title = "Correlation of the predictors with the gain" if name == "correlation.md" else "Equal budgets"
            write_atomic((out / name), "\n".join([f"# Placement study: {title}, all families", ""] + parts))
