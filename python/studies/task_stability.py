"""Is the dominant module task-stable? Probe SmolLM2 on each calibration task separately.

From the repository root:
    python -m python.studies.task_stability [--seeds 8] [--resamples 200] [--out python/results/task_stability]

For each of the four shipped calibration tasks (12 samples each) it probes all 210 linear
modules with ``--seeds`` A draws in one backward pass, prints the confidence sentence, then
compares every pair of tasks (same dominant module?, Spearman and Kendall over all modules,
top-5 overlap). Writes one JSON report per task and ``summary.md`` under ``--out``.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("python/results/task_stability"))
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.resamples < 1:
        ap.error("--seeds and --resamples must be >= 1")

    model, tok = load_model()
    lines = [f"# Dominant module per calibration task (SmolLM2-135M-Instruct, rank 8, {args.seeds} A seeds, "
             f"{args.resamples} bootstrap resamples)", "",
             f"Command: `python -m python.studies.task_stability --seeds {args.seeds} --resamples {args.resamples}`; "
             f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads.", "",
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
