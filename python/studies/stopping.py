"""Samples to a stable decision: how many calibration samples the probe needs before its decision stops moving.

For every family and task the placement study probed (``python/results/placement/FAMILY/page_TASK.json``:
64 samples, 3 A seeds, per-sample energies kept), the early-stopping rule of
:mod:`domlora_kernels.probe.stopping` is replayed at each batch end of that probe: the stability of
the decision (the fraction of 200 bootstrap resamples of the samples seen that give the decision of
all of them) for three decisions: the top-1 module, the top-3 set, and the plan a budget of 1% of
vanilla LoRA (r=8) buys by PAGE per parameter. It is the function the probe calls online
(``page_scores(stop=StopRule(...))``), on the same per-sample energies (mean over the A seeds), so
the first batch end at which it reaches 0.95 (with at least 16 samples) is where the probe would
have stopped.

Time to that point is the full probe's time (its ``probe_seconds``) times the fraction of the
batches read, the probe's cost being the same per batch; EVA's time to convergence on the same
64 samples comes from the placement study's ``decisions_TASK.json`` where it ran (instruction,
and maths on SmolLM2).

    python -m python.studies.stopping            # -> python/results/stopping/
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from domlora_kernels.placement.budget import vanilla_lora_params
from domlora_kernels.probe.stopping import StopRule, stability
from domlora_kernels.scores import PageScores

ROOT = Path(__file__).resolve().parents[2]
PLACEMENT = ROOT / "python" / "results" / "placement"
TASKS = ("instruction", "math", "code", "chat")
LEVEL, MIN_SAMPLES, RESAMPLES = 0.95, 16, 200


def decisions(scores: PageScores) -> dict[str, StopRule]:
    budget = int(0.01 * vanilla_lora_params(scores, 8))
    return {"top-1": StopRule(top_k=1, resamples=RESAMPLES, min_samples=MIN_SAMPLES, level=LEVEL),
            "top-3": StopRule(top_k=3, resamples=RESAMPLES, min_samples=MIN_SAMPLES, level=LEVEL),
            "budget 1%": StopRule(budget=budget, r=8, resamples=RESAMPLES, min_samples=MIN_SAMPLES, level=LEVEL)}


def trace(scores: PageScores) -> dict:
    """Stability after each batch end, per decision, and where the rule would stop."""
    names = list(scores.scores)
    per = torch.stack([scores.per_sample[n].mean(dim=0) for n in names])  # [modules, N], mean over seeds
    n, batches = per.shape[1], int(scores.meta["num_batches"])
    ends = [round(n * (i + 1) / batches) for i in range(batches)]
    infos = [scores.modules[m] for m in names]
    out = {"samples": n, "batches": batches, "probe_seconds": scores.meta["probe_seconds"], "ends": ends,
           "decisions": {}}
    for label, rule in decisions(scores).items():
        values = [stability(per[:, :e], rule, infos) if e >= MIN_SAMPLES else None for e in ends]
        stop = next((e for e, v in zip(ends, values) if v is not None and v >= LEVEL), None)
        out["decisions"][label] = {"stability": values, "samples_to_stable": stop,
                                   "seconds_to_stable": None if stop is None else
                                   scores.meta["probe_seconds"] * ends.index(stop) / batches + scores.meta[
                                       "probe_seconds"] / batches}
    return out


def eva_seconds(family: str, task: str) -> float | None:
    path = PLACEMENT / family / f"decisions_{task}.json"
    return json.loads(path.read_text()).get("eva_s") if path.exists() else None


def table(rows: list[dict]) -> str:
    lines = [f"Stable: at least {LEVEL:.0%} of {RESAMPLES} bootstrap resamples agree, after >= {MIN_SAMPLES} samples; "
             "'-': not stable within the 64 samples.", "",
             "| family | task | decision | samples to stable | of | stability at 64 | s to stable | s full probe | s EVA |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for label, d in r["decisions"].items():
            last = d["stability"][-1]
            s = d["seconds_to_stable"]
            eva = r["eva_s"]
            lines.append(f"| {r['family']} | {r['task']} | {label} | {d['samples_to_stable'] or '-'} | {r['samples']} | "
                         f"{last:.2f} | {'-' if s is None else f'{s:.1f}'} | {r['probe_seconds']:.1f} | "
                         f"{'-' if eva is None else f'{eva:.1f}'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows[0]["decisions"])
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.8), sharey=True)
    for ax, label in zip(axes, labels):
        for r in rows:
            xs = [e for e, v in zip(r["ends"], r["decisions"][label]["stability"]) if v is not None]
            ys = [v for v in r["decisions"][label]["stability"] if v is not None]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r['family']} {r['task']}",
                    ls="-" if r["family"] == "smollm2" else "--")
        ax.axhline(LEVEL, color="k", lw=0.8, ls=":")
        ax.set_title(label)
        ax.set_xlabel("samples seen")
    axes[0].set_ylabel("stability (share of resamples agreeing)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "python" / "results" / "stopping")
    args = ap.parse_args(argv)
    rows = []
    for family in ("smollm2", "gemma3"):
        for task in TASKS:
            path = PLACEMENT / family / f"page_{task}.json"
            if not path.exists():
                continue
            r = trace(PageScores.from_json(path))
            r.update(family=family, task=task, eva_s=eva_seconds(family, task))
            rows.append(r)
    if not rows:
        raise FileNotFoundError(f"no probe reports under {PLACEMENT}; run the placement study's probe stage first")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samples_to_stable.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "samples_to_stable.md").write_text(
        "# Samples to a stable decision\n\nCommand: `python -m python.studies.stopping` (replays the probe's "
        "stopping rule on the placement study's committed probes).\n\n" + text)
    plot(rows, args.out / "stability.png")
    print(text)
    return 0 if all(math.isfinite(r["probe_seconds"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
