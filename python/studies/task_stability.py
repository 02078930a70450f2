"""Is the dominant module task-stable, and how concentrated is PAGE? Probe one embedded model
on each calibration task separately.

From the repository root:
    python -m python.studies.task_stability [--model smollm2-135m] [--dtype float32] [--seeds 8] [--resamples 200]
    python -m python.studies.task_stability --combine      # the table of every model probed so far

For each of the four shipped calibration tasks (12 samples each) it probes every linear module
with ``--seeds`` A draws in one backward pass, prints the confidence sentence and the
concentration (top-1 share, normalised entropy, PAGE share by module type and by layer, the
rank of the highest ``down_proj``), then compares every pair of tasks (same dominant module?,
Spearman and Kendall over all modules, top-5 overlap). Writes one JSON report per task and
``summary.md`` under ``--out`` (default ``python/results/task_stability/MODEL``); ``--combine``
writes ``python/results/task_stability/concentration.md`` from every model's JSON reports.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import torch

from domlora_kernels import page_scores
from domlora_kernels.confidence import confidence
from domlora_kernels.data import TASKS, load_calibration, make_batches
from domlora_kernels.models import load_model
from domlora_kernels.report import compare


ROOT_OUT = Path("python/results/task_stability")
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def concentration(scores) -> dict:
    """Top-1 module and share, normalised entropy, share by type and by layer (the top layer),
    and the PAGE rank of the highest ``down_proj``."""
    from domlora_kernels.stats import entropy_concentration

    shares = scores.shares
    ranked = [n for n, _ in scores.ranked()]
    by_type = {t: sum(v for n, v in shares.items() if scores.modules[n].type == t) for t in TYPES}
    by_layer: dict[int, float] = {}
    for n, v in shares.items():
        by_layer[scores.modules[n].layer] = by_layer.get(scores.modules[n].layer, 0.0) + v
    top_layer = max(by_layer, key=by_layer.get)
    down = next((i + 1 for i, n in enumerate(ranked) if scores.modules[n].type == "down_proj"), None)
    return {"top1": ranked[0], "top1_share": shares[ranked[0]], "entropy": entropy_concentration(list(scores.scores.values())),
            "by_type": by_type, "top_layer": top_layer, "top_layer_share": by_layer[top_layer], "layers": len(by_layer),
            "down_rank": down, "down_name": next((n for n in ranked if scores.modules[n].type == "down_proj"), None),
            "modules": len(ranked)}


def combine(root: Path = ROOT_OUT) -> str:
    """``concentration.md``: one row per (model, task) of every model folder under ``root``."""
    from domlora_kernels.scores import PageScores

    lines = ["# PAGE's concentration per model and calibration task", "",
             "From `python -m python.studies.task_stability --model M` per model (12 shipped samples per task, rank 8, "
             "A seeds as each summary.md says); table by `python -m python.studies.task_stability --combine`.", "",
             "| model | task | top-1 module (share) | normalised entropy | share by type (" + ", ".join(TYPES)
             + ") | top layer (share) | highest down_proj (rank of modules) | top-1 = other tasks' top-1 |",
             "|---|---|---|---:|---|---|---|---|"]
    for fam in sorted(p for p in root.iterdir() if p.is_dir()):
        reports = {t: PageScores.from_json(fam / f"{t}.json") for t in TASKS if (fam / f"{t}.json").is_file()}
        tops = {t: s.dominant_module for t, s in reports.items()}
        for task, scores in reports.items():
            c = concentration(scores)
            same = sum(tops[o] == tops[task] for o in tops if o != task)
            by_type = " / ".join(f"{c['by_type'][t]:.2f}" for t in TYPES)
            lines.append(f"| {fam.name} | {task} | {c['top1'].removeprefix('model.')} ({c['top1_share']:.3f}) | "
                         f"{c['entropy']:.3f} | {by_type} | "
                         f"layer {c['top_layer']} of {c['layers']}: {c['top_layer_share']:.2f} | "
                         f"{(c['down_name'] or '-').removeprefix('model.')} ({c['down_rank']} of {c['modules']}) | "
                         f"{same} of {len(tops) - 1} |")
    text = "\n".join(lines) + "\n"
    (root / "concentration.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model's name (domlora models)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="default python/results/task_stability/MODEL")
    ap.add_argument("--combine", action="store_true", help="only write concentration.md from the models probed")
    args = ap.parse_args(argv)
    if args.combine:
        print(combine())
        return 0
    if args.seeds < 1 or args.resamples < 1:
        ap.error("--seeds and --resamples must be >= 1")
    args.out = args.out or ROOT_OUT / args.model
    args.out.mkdir(parents=True, exist_ok=True)

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    command = (f"python -m python.studies.task_stability --model {args.model} --dtype {args.dtype} --seeds {args.seeds} "
               f"--resamples {args.resamples}")
    lines = [f"# Dominant module per calibration task ({args.model}, {args.dtype}, rank 8, {args.seeds} A seeds, "
             f"{args.resamples} bootstrap resamples)", "",
             f"Command: `{command}`; torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads.", "",
             "| task | samples | confidence of the dominant module | seed Spearman | entropy | probe s |",
             "|---|---:|---|---:|---:|---:|"]
    reports = {}
    for task in TASKS:
        batches = make_batches(load_calibration([task]), tok, batch_size=8, max_length=256)
        t0 = time.perf_counter()
        scores = page_scores(model, batches, rank=8, seed=list(range(args.seeds)), progress=True)
        secs = time.perf_counter() - t0
        conf = confidence(scores, num_resamples=args.resamples, seed=0)
        scores.meta["confidence"] = conf.to_dict()
        scores.to_json(args.out / f"{task}.json")
        reports[task] = scores
        sentence = conf.sentence()
        print(f"{task}: {sentence}")
        rho = conf.seed_spearman
        rho_txt = "-" if rho is None else f"{rho:.3f}"
        lines.append(f"| {task} | {scores.num_samples} | {sentence} | {rho_txt} | {conf.entropy:.3f} | {secs:.0f} |")
    lines += ["", "| tasks | same dominant | Spearman | Kendall tau-b | top-5 overlap |", "|---|---|---:|---:|---:|"]
    for a, b in itertools.combinations(TASKS, 2):
        c = compare(reports[a], reports[b], top=5, label_a=a, label_b=b)
        lines.append(f"| {a} vs {b} | {'yes' if c.same_dominant else 'no'} | {c.spearman:.3f} | "
                     f"{c.kendall:.3f} | {len(c.overlap)}/5 |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
