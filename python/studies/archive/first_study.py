"""Does DomLoRA match vanilla LoRA? A fine-tuning study on the embedded SmolLM2-135M, on the CPU.

For each task family of :mod:`python.studies.tasks` (maths, instruction following, code, multi-turn chat)
the study probes PAGE on that task's train split, then fine-tunes the same base model with each
method below on the same data, steps and schedule, and grades greedy decodes of the test split:

    base           no adapter (the reference every method starts from)
    lora_all       vanilla LoRA on all 210 linear modules, r=8
    lora_qv        LoRA on every q_proj and v_proj, r=8
    domlora        one adapter at the dominant module (argmax PAGE on the train split), r=8,
                   lora_A = the A the probe measured
    domlora_rbig   the same module with the rank that gives about lora_qv's parameter count
    random_module  control: one adapter at a module drawn with a fixed seed, r=8
    shallow_down   control: one adapter at model.layers.2.mlp.down_proj, r=8
    dora_dom       DoRA (use_dora) at the dominant module, r=8

The learning rate of each method is picked per task from ``--lr-grid`` on the validation split
(seed 0; task metric, ties broken by validation loss); the chosen setting then runs with the
other seeds. Every run is appended to ``runs.jsonl`` as soon as it ends (``--resume`` skips
finished runs), and ``summarize`` rebuilds the table, JSON and learning-curve PNG from it.

Superseded by the placement study (``python/studies/placement/``); its results are in
``python/results/archive/first_study/``.

Usage, from the repository root:
    python -m python.studies.archive.first_study run --out /tmp/first   # the full study, afresh
    python -m python.studies.archive.first_study run --smoke --out /tmp/smoke  # a smoke run (< 2 min)
    python -m python.studies.archive.first_study summarize              # table + PNG from runs.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from domlora_kernels.data import collate  # right-padded batch of {input_ids, labels} lists
from python.studies import tasks as study_tasks
from python.studies.common import IGNORE, encode, encode_prompt, optimiser_step

OUT = "python/results/archive/first_study"
METHODS = ("base", "lora_all", "lora_qv", "domlora", "domlora_rbig", "random_module", "shallow_down", "dora_dom")
SHALLOW_MODULE = "model.layers.2.mlp.down_proj"
RANDOM_MODULE_SEED = 1234
METRIC_NAME = {"math": "exact match", "instruction": "constraints met", "code": "hidden tests pass", "chat": "fact recalled"}


# ------------------------------------------------------------------------------ model
def _inner(model):
    """The ``LlamaForCausalLM`` under a peft wrapper (adapters are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the target tokens only.

    The output head (49152 x 576) runs on target positions only: on these short answers that is
    about a tenth of the positions, and the head is a fifth of the model's multiply-adds.
    """
    net = _inner(model)
    h = net.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    tgt = batch["labels"][:, 1:]
    sel = tgt != IGNORE
    logits = net.lm_head(h[:, :-1][sel])
    return F.cross_entropy(logits.float(), tgt[sel], reduction=reduction)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def candidate_names(model) -> list[str]:
    from domlora_kernels.probe.candidates import find_candidates

    return [c.name for c in find_candidates(model)]


def rank_for_budget(budget: int, in_features: int, out_features: int) -> int:
    """Rank (a multiple of 8, at most min(m, n)) whose ``r (m + n)`` is closest to ``budget``."""
    r = max(8, int(round(budget / (in_features + out_features) / 8)) * 8)
    return min(r, in_features, out_features)


def build(method: str, base, plan: dict, seed: int):
    """A fresh copy of ``base`` with ``method``'s adapter; returns ``(model, placement note)``."""
    from peft import LoraConfig, get_peft_model

    from domlora_kernels.lora_init import draw_lora_A

    torch.manual_seed(seed)  # peft's own init of lora_A (lora_all, lora_qv)
    net = copy.deepcopy(base)
    if method == "base":
        for p in net.parameters():
            p.requires_grad_(False)
        return net, "no adapter"
    if method in ("domlora", "dora_dom", "domlora_rbig"):
        from domlora_kernels.placement import apply_domlora

        # apply_domlora initialises lora_A with the A of the probe's first seed; reorder the
        # seeds so that training seed s starts from the A drawn (and measured) with seed s.
        sc0 = plan["scores"]
        sc = dataclasses.replace(sc0, config={**sc0.config, "seeds": [seed] + [x for x in sc0.seeds if x != seed]})
        r = plan["rbig"] if method == "domlora_rbig" else 8
        with warnings.catch_warnings():
            # r != the probe's rank: apply_domlora keeps peft's init and warns; intended here
            warnings.simplefilter("ignore")
            model = apply_domlora(net, sc, r=r, lora_alpha=2 * r, top_k=1,
                                  variant="dora" if method == "dora_dom" else "lora", verbose=False)
        a = f"probe A (seed {seed})" if r == sc.rank and seed in sc0.seeds else "peft's default A"
        return model, f"domlora_kernels.placement.apply_domlora(r={r}, lora_alpha={2 * r}, variant={'dora' if method == 'dora_dom' else 'lora'}), lora_A = {a}"
    rank, targets = 8, None
    if method == "lora_all":
        targets = "all-linear"
    elif method == "lora_qv":
        targets = ["q_proj", "v_proj"]
    elif method == "random_module":
        targets = [plan["random_module"]]
    elif method == "shallow_down":
        targets = [SHALLOW_MODULE]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = LoraConfig(target_modules=targets, r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    model = get_peft_model(net, cfg)
    note = "peft LoraConfig, peft's default init"
    if isinstance(targets, list) and len(targets) == 1:
        # the single-module controls start from the (seed, name) A the probe draws (the law of
        # peft's kaiming init), as DomLoRA does: placement is then the only difference.
        layer = _inner(model).get_submodule(targets[0])
        w = layer.lora_A["default"].weight
        with torch.no_grad():
            w.copy_(draw_lora_A(targets[0], rank, w.shape[1], seed))
        note = f"peft LoraConfig(target_modules=[{targets[0]!r}]), lora_A = draw_lora_A(name, {rank}, n, seed={seed})"
    return model, note


# ---------------------------------------------------------------------------- evaluate
@torch.no_grad()
def eval_loss(model, enc: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per target token over ``enc`` (all assistant turns)."""
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size], pad_id)
        tot += float(target_loss(model, b, reduction="sum"))
        n += int((b["labels"][:, 1:] != IGNORE).sum())
    return tot / n


@torch.no_grad()
def greedy_answers(model, tok, items: list[dict], max_new_tokens: int, batch_size: int = 20) -> list[str]:
    """Greedy decodes of the last assistant answer of each item (left-padded batches)."""
    model.eval()
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.pad_token_id
    outs = []
    for i in range(0, len(items), batch_size):
        prompts = [encode_prompt(it, tok) for it in items[i:i + batch_size]]
        t = max(map(len, prompts))
        ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, t - len(p):], mask[j, t - len(p):] = torch.tensor(p), 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end_id, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        for row in gen[:, t:]:
            row = row.tolist()
            outs.append(tok.decode(row[:row.index(end_id)] if end_id in row else row, skip_special_tokens=True))
    return outs


def evaluate(model, tok, task: str, items: list[dict], enc: list[dict]) -> dict[str, Any]:
    t0 = time.time()
    outs = greedy_answers(model, tok, items, study_tasks.MAX_NEW_TOKENS[task])
    scores = [study_tasks.score_answer(task, it, o) for it, o in zip(items, outs)]
    return {"metric": sum(scores) / len(scores), "loss": eval_loss(model, enc, tok.pad_token_id),
            "n": len(items), "examples": outs[:3], "eval_s": time.time() - t0}


# ------------------------------------------------------------------------------- train
def train(model, enc: list[dict], pad_id: int, steps: int, batch_size: int, lr: float, seed: int, desc: str,
          on_step=None) -> list[float]:
    """AdamW, linear warm-up over the first 10% of steps then linear decay to 0, grad-norm clip 1.

    ``on_step``: called after every optimiser step (first_study_check.py tracks the adapter with it).
    Returns the training loss of every step.
    """
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, mininterval=10, file=sys.stderr)
    for _ in bar:
        if len(order) < batch_size:  # reshuffle per epoch; same order for every method at one seed
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        loss = target_loss(model, collate([enc[i] for i in idx], pad_id))
        losses.append(optimiser_step(loss, params, opt, sched))
        if math.isnan(losses[-1]):
            break  # a diverged run is recorded as such (nan), not retried
        if on_step is not None:
            on_step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# ------------------------------------------------------------------------------- plan
def probe(base, tok, task: str, train_items: list[dict], n_probe: int, max_length: int, out: Path, log) -> dict:
    """PAGE on the task's train split (rank 8, alpha 16, A seeds 0-2 in one pass): the plan."""
    from domlora_kernels.probe import page_scores

    enc = [encode(it, tok, max_length) for it in train_items[:n_probe]]
    batches = [collate(enc[i:i + 8], tok.pad_token_id) for i in range(0, len(enc), 8)]
    t0 = time.time()
    sc = page_scores(base, batches, rank=8, lora_alpha=16, seed=[0, 1, 2], progress=False)
    sc.to_json(out / f"page_{task}.json")
    ranked = sc.ranked()
    dom = ranked[0][0]
    info = sc.modules[dom]
    by_seed_argmax = {str(s): max(v, key=v.get) for s, v in sc.by_seed.items()}
    log(f"[{task}] PAGE probe on {len(enc)} train items: {time.time() - t0:.1f}s; dominant {dom} "
        f"(share {sc.shares[dom]:.3f}); argmax per A seed {by_seed_argmax}")
    return {"dominant": dom, "dominant_share": sc.shares[dom], "in_features": info.in_features,
            "out_features": info.out_features, "top5": [(n, sc.shares[n]) for n, _ in ranked[:5]],
            "argmax_by_seed": by_seed_argmax, "probe_s": time.time() - t0, "n_probe": len(enc)}


def _run_key(r: dict) -> tuple:
    return (r["task"], r["method"], r["lr"], r["seed"], r["phase"])


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def run_study(args) -> None:
    from domlora_kernels.models import load_model
    from domlora_kernels.scores import PageScores

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, log_path = out / "runs.jsonl", out / "study_log.txt"
    if runs_path.exists() and not args.resume:
        raise FileExistsError(f"{runs_path} exists; pass --resume to continue it or choose another --out")
    done = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            done[_run_key(r)] = r
    logf = open(log_path, "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} load={os.getloadavg()[0]:.1f} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def record(r: dict) -> None:
        done[_run_key(r)] = r
        with open(runs_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    t_study = time.time()
    log(f"study start: {vars(args)}; machine {machine()}")
    base, tok = load_model()
    for p in base.parameters():
        p.requires_grad_(False)
    rnd_module = random.Random(RANDOM_MODULE_SEED).choice(candidate_names(base))
    log(f"random control module (random.Random({RANDOM_MODULE_SEED}).choice over candidates): {rnd_module}")
    plans = {}
    plan_path = out / "plans.json"
    if plan_path.exists() and args.resume:
        plans = json.loads(plan_path.read_text())
    chosen_lr: dict[str, float] = {}
    state_of: dict[str, tuple] = {}

    def test_runs(task: str, seeds: list[int]) -> None:
        sp, enc, plan, lrs = state_of[task]
        for seed in seeds:
            for method in args.methods:
                lr, best, state = lrs[method]
                if (task, method, lr, seed, "test") in done or (method == "base" and seed != args.seeds[0]):
                    continue  # the base model has nothing random to reseed
                first = seed == args.seeds[0]
                r, _ = one_run(task, method, lr, seed, base, tok, plan, sp, enc, args, log, grade_val=False,
                               reuse=best if first else None, state=state if first else None)
                r["phase"] = "test"
                record(r)
                summarize(out, log)
        lrs.update({m: (v[0], v[1], None) for m, v in lrs.items()})  # free the grid weights

    # grid tasks first: the other tasks reuse the rate each method got on the first of them
    order = sorted(args.tasks, key=lambda t: t not in args.grid_tasks)
    for task in order:
        lrs: dict[str, tuple] = {}
        sp = study_tasks.make_splits(task, args.n_train, args.n_val, args.n_test, seed=0)
        enc = {k: [encode(it, tok, args.max_length) for it in v] for k, v in sp.items()}
        if task not in plans:
            plans[task] = probe(base, tok, task, sp["train"], args.n_probe, args.max_length, out, log)
            plans[task]["random_module"] = rnd_module
            # rank whose parameter count is closest to lora_qv's (2 * 30 layers, r=8)
            qv = 30 * 8 * ((576 + 576) + (576 + 192))
            plans[task]["rbig"] = rank_for_budget(qv, plans[task]["in_features"], plans[task]["out_features"])
            plan_path.write_text(json.dumps(plans, indent=1))
        plan = {**plans[task], "scores": PageScores.from_json(out / f"page_{task}.json")}
        if plan["random_module"] == plan["dominant"]:
            log(f"[{task}] note: the random control module is also the dominant module")
        # 1) seed 0 of every method first (after its learning-rate grid), then the other seeds
        # method by method: a study stopped early still compares every method on equal terms
        for method in args.methods:
            grid = [0.0] if method == "base" else args.lr_grid
            if len(grid) > 1 and task not in args.grid_tasks:
                grid = [chosen_lr[method]]  # picked on the first grid task (a documented cut)
            kept, best = {}, None
            if len(grid) > 1:
                for lr in grid:
                    if (task, method, lr, args.seeds[0], "grid") in done:
                        continue
                    r, state = one_run(task, method, lr, args.seeds[0], base, tok, plan, sp, enc, args, log, grade_val=True)
                    r["phase"] = "grid"
                    record(r)
                    kept[lr] = state
                grid_runs = [done[(task, method, lr, args.seeds[0], "grid")] for lr in grid]
                best = max(grid_runs, key=lambda r: (r["val"]["metric"], -r["val"]["loss"]))
                picks = ", ".join(f"{g['lr']:g}: {g['val']['metric']:.3f}/{g['val']['loss']:.3f}" for g in grid_runs)
                log(f"[{task}] {method}: lr {best['lr']:g} chosen on validation metric/loss ({picks})")
            lr = best["lr"] if best else grid[0]
            chosen_lr.setdefault(method, lr)
            lrs[method] = (lr, best, kept.get(lr))
        state_of[task] = (sp, enc, plan, lrs)
        # seed 0 of every method on this task now (restoring the grid's weights where it ran)
        test_runs(task, args.seeds[:1])
    # then the other seeds, task by task, method by method: a study stopped early still
    # compares every method on every family, with fewer seeds where it stopped
    for seed in args.seeds[1:]:
        for task in order:
            test_runs(task, [seed])
    log(f"study done in {time.time() - t_study:.0f}s")


def one_run(task, method, lr, seed, base, tok, plan, sp, enc, args, log, grade_val, reuse=None, state=None):
    """Train (or restore) one adapter and grade it. Returns ``(record, trainable state)``."""
    t0 = time.time()
    model, note = build(method, base, plan, seed)
    params = trainable_parameters(model)
    load0 = os.getloadavg()[0]
    if reuse is not None and state is not None:
        # the seed-0 run of the chosen rate was trained in the grid: restore it, do not retrain
        model.load_state_dict(state, strict=False)
        losses, train_s = reuse["train_losses"], reuse["train_s"]  # the grid run trained it
    elif reuse is not None:  # resumed study: the grid run's weights are gone, so retrain (same seed, same result)
        losses = train(model, enc["train"], tok.pad_token_id, args.steps, args.batch_size, lr, seed, f"{task}/{method}/lr{lr:g}/s{seed}")
        train_s = time.time() - t0
    elif method == "base":
        losses, train_s = [], 0.0
    else:
        losses = train(model, enc["train"], tok.pad_token_id, args.steps, args.batch_size, lr, seed, f"{task}/{method}/lr{lr:g}/s{seed}")
        train_s = time.time() - t0
    val = evaluate(model, tok, task, sp["val"], enc["val"]) if grade_val and sp["val"] else None
    test = None if grade_val else evaluate(model, tok, task, sp["test"], enc["test"])
    kept = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    r = {"task": task, "method": method, "lr": lr, "seed": seed, "params": params, "placement": note,
         "train_losses": losses, "train_s": train_s, "val": val, "test": test, "load_avg_start": load0,
         "load_avg_end": os.getloadavg()[0], "steps": args.steps, "batch_size": args.batch_size,
         "wall_s": time.time() - t0}
    g = val or test
    log(f"[{task}] {method} lr={lr:g} seed={seed} params={params} train {train_s:.0f}s "
        f"{'val' if val else 'test'} metric={g['metric']:.3f} loss={g['loss']:.3f} eval {g['eval_s']:.0f}s "
        f"e.g. {g['examples'][0]!r}")
    del model
    return r, kept


# ---------------------------------------------------------------------------- summary
def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(out: Path, log=print) -> dict:
    """Rebuild ``summary.json``, ``table.md`` and ``curves.png`` from ``runs.jsonl``."""
    out = Path(out)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    plans = json.loads((out / "plans.json").read_text()) if (out / "plans.json").exists() else {}
    test_runs = [r for r in runs if r["phase"] == "test"]
    vanilla = {r["task"]: r["params"] for r in runs if r["method"] == "lora_all"}
    rows = {}
    for r in test_runs:
        rows.setdefault((r["task"], r["method"]), []).append(r)
    summary = {"rows": [], "plans": plans, "machine": machine()}
    tasks = list(dict.fromkeys(r["task"] for r in test_runs))
    for (task, method), rs in rows.items():
        m, s = _mean_std([r["test"]["metric"] for r in rs])
        lm, ls = _mean_std([r["test"]["loss"] for r in rs])
        p = rs[0]["params"]
        summary["rows"].append({
            "task": task, "method": method, "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "params": p,
            "pct_of_vanilla": (100.0 * p / vanilla[task]) if task in vanilla else None,
            "metric_mean": m, "metric_std": s, "loss_mean": lm, "loss_std": ls,
            "train_s_mean": _mean_std([r["train_s"] for r in rs])[0], "placement": rs[0]["placement"]})
    summary["rows"].sort(key=lambda x: (tasks.index(x["task"]), METHODS.index(x["method"])))
    # average over task families, for methods that ran on every family finished so far
    by_method = {}
    for row in summary["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    summary["average"] = {m: {"metric_mean": statistics.fmean(r["metric_mean"] for r in rs),
                              "tasks": [r["task"] for r in rs]} for m, rs in by_method.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = ["| task | method | module(s) | trainable params | % of vanilla | lr | test metric (mean ± std) | test loss (mean ± std) | seeds | train s/run |",
             "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for row in summary["rows"]:
        plan = plans.get(row["task"], {})
        where = {"lora_all": "all-linear", "lora_qv": "q_proj, v_proj", "base": "-",
                 "shallow_down": SHALLOW_MODULE, "random_module": plan.get("random_module", "?")}.get(
            row["method"], plan.get("dominant", "?") + (f" (r={plan.get('rbig')})" if row["method"] == "domlora_rbig" else ""))
        pct = "-" if row["pct_of_vanilla"] is None else f"{row['pct_of_vanilla']:.2f}%"
        lines.append(f"| {row['task']} ({METRIC_NAME[row['task']]}) | {row['method']} | {where.replace('model.layers.', 'L')} | "
                     f"{row['params']:,} | {pct} | {row['lr']:g} | {row['metric_mean']:.3f} ± {row['metric_std']:.3f} | "
                     f"{row['loss_mean']:.3f} ± {row['loss_std']:.3f} | {len(row['seeds'])} | {row['train_s_mean']:.0f} |")
    lines += ["", "| method | mean test metric over task families | families |", "|---|---:|---|"]
    for m in METHODS:
        if m in summary["average"]:
            a = summary["average"][m]
            lines.append(f"| {m} | {a['metric_mean']:.3f} | {', '.join(a['tasks'])} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(out, test_runs, tasks)
    return summary


def _plot(out: Path, test_runs: list[dict], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS[1:]:
            curves = [r["train_losses"] for r in test_runs if r["task"] == task and r["method"] == method and r["train_losses"]]
            if not curves:
                continue
            n = min(map(len, curves))
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            w = 5  # moving average: one batch of 4 is noisy
            smooth = [statistics.fmean(mean[max(0, i - w + 1):i + 1]) for i in range(n)]
            ax.plot(range(1, n + 1), smooth, label=f"{method} ({len(curves)} seeds)")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (target tokens, 5-step mean)")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- CLI
def _floats(s: str) -> list[float]:
    try:
        v = [float(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not v or any(x <= 0 for x in v):
        raise argparse.ArgumentTypeError(f"learning rates must be > 0, got {s!r}")
    return v


def _names(choices):
    def parse(s: str) -> list[str]:
        v = [x for x in s.split(",") if x]
        bad = [x for x in v if x not in choices]
        if bad or not v:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(choices)}")
        return v
    return parse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the study (appends to OUT/runs.jsonl)")
    r.add_argument("--out", default=OUT)
    r.add_argument("--tasks", type=_names(study_tasks.TASKS), default=list(study_tasks.TASKS))
    r.add_argument("--methods", type=_names(METHODS), default=list(METHODS))
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    r.add_argument("--lr-grid", type=_floats, default=[1e-3, 4e-3])
    r.add_argument("--grid-tasks", type=_names(study_tasks.TASKS), default=list(study_tasks.TASKS),
                   help="tasks whose validation split picks the rate; other tasks reuse the first one's pick")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--n-train", type=int, default=160)
    r.add_argument("--n-val", type=int, default=20)
    r.add_argument("--n-test", type=int, default=40)
    r.add_argument("--n-probe", type=int, default=32, help="train items the PAGE probe sees")
    r.add_argument("--max-length", type=int, default=128)
    # 1 thread by default: on this shared 2-core machine (load ~10) two OpenMP threads made greedy
    # decoding 14x slower (209 s against 15 s for 8 items), threads waiting on each other.
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--resume", action="store_true", help="continue OUT/runs.jsonl, skipping finished runs")
    r.add_argument("--smoke", action="store_true", help="tiny CI configuration: maths only, 2 steps, 4 test items")
    s = sub.add_parser("summarize", help="rebuild table.md, summary.json, curves.png from OUT/runs.jsonl")
    s.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.cmd == "summarize":
        if not (Path(args.out) / "runs.jsonl").exists():
            ap.error(f"{args.out}/runs.jsonl does not exist; run `python -m python.studies.archive.first_study run --out {args.out}` first")
        summarize(Path(args.out))
        print((Path(args.out) / "table.md").read_text())
        return
    if args.smoke:
        args.tasks, args.seeds, args.lr_grid = ["math"], [0], [2e-3]
        args.steps, args.batch_size, args.n_train, args.n_val, args.n_test, args.n_probe = 2, 2, 8, 0, 4, 4
    if args.steps < 1 or args.batch_size < 1 or args.n_test < 1 or args.n_probe < 1:
        ap.error("--steps, --batch-size, --n-test and --n-probe must be >= 1")
    if not set(args.grid_tasks) & set(args.tasks):
        args.grid_tasks = args.tasks[:1]
    if len(args.lr_grid) > 1 and args.n_val < 1:
        ap.error("a learning-rate grid needs a validation split: set --n-val >= 1 or give one --lr-grid value")
    run_study(args)


if __name__ == "__main__":
    main()
