"""The PAGE probe against naive autograd and its peers: time and peak memory, side by side.

From the repository root:
    python -m benchmarks.bench_probe --workload headline      # the headline table (7 rounds, EVA and KappaTune 3)
    python -m benchmarks.bench_probe --workload all           # headline + every sweep + plots
    python -m benchmarks.bench_probe --workload tokens        # one sweep: tokens|batch|rank|width
    python -m benchmarks.bench_probe --workload moe           # a Mixtral-shaped mixture of experts
    python -m benchmarks.bench_probe --workload strategies    # what each placement strategy costs
    python -m benchmarks.bench_probe --plot-only              # plots from the saved JSON

Providers (benchmarks/providers.py), all on the same model and the same token ids:
``probe`` (page_scores as shipped, the baseline of the ratios), ``floor`` (the same forward
and backward with every weight frozen and no probe), ``autograd`` (weights require grad,
one backward, batch gradient), ``autograd-per-sample`` (one sample per backward: the
paper's definition), ``torch.func`` (vmap(grad) per-sample gradients, when they fit in
memory), ``probe-expected`` (page_scores(projection="expected")) and ``opacus`` (ghost
norms; its ratio is also given against probe-expected, which computes the same quantity).
Next to them, on the headline and width workloads, the peers a user would pick instead of
PAGE to decide where LoRA goes, which compute something else: ``eva`` (peft's EVA, a rank
allocation: forwards with an incremental SVD of each module's input, cycled over the batch
until converged; the table gives its passes over the batch) and ``kappatune`` (peft's
KappaTune, a data-free module selection from the weights' condition numbers). Their rows
compare the cost of a decision, not of the same number; the agreement checks do not apply
to them and say so.

Time: one process, providers interleaved (the order rotates each round), ``--warmup``
untimed rounds, then ``--repeats`` timed rounds (default 7 for the headline, 3 for a sweep
point); the median is reported. The slow providers (EVA, KappaTune) skip the warm-up and run
in ``--slow-rounds`` of the timed rounds (default 3 for the headline, 1 for a sweep point),
spread evenly; the table says so. Memory: a fresh
subprocess per provider loads the model, builds the inputs, then resets the kernel's
high-water mark (``/proc/self/clear_refs``, so the transient peak of loading the model is
not counted), runs the provider once and reads ``ru_maxrss``: the peak resident memory
during the run, model included, reported as is and as the delta over the resident memory
just before the run (model loaded). On CUDA, ``torch.cuda.max_memory_allocated`` over
``memory_allocated`` before the run, with synchronised timings (written, not run here).

Before the table, the harness checks that the energy providers computed the same thing on this
very batch (relative error of the per-sample energies, float32) and exits 1 if the probe
and autograd-per-sample differ by more than 1e-4. Results go to benchmarks/results/ as
JSON (with the machine: CPU model, cores, load average, versions, GPU) and CSV; plots
(``--workload all`` or ``--plot-only``) as PNG.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"
BASELINE = "probe"
CHECK_TOL = 1e-4

SMOLLM2 = {"model": "smollm2"}


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int = 32000) -> dict:
    return {"model": "llama", "hidden": hidden, "intermediate": intermediate, "layers": layers,
            "heads": heads, "kv_heads": kv_heads, "vocab": vocab}


# Width sweep: random-weight Llama configs from tiny to the Llama-3.2-1B shape. B=1, T=128
# keeps the 1B point at ~10 s a run on 2 cores; the vocabulary is cut to 32000 (Llama-3.2
# has 128256) so the LM head does not dominate the small points. Layers vary with width
# like real models do; the x axis is the candidate-weight count.
WIDTHS = [
    ("tiny-128", llama(128, 344, 4, 4, 2)),
    ("smollm2-shape", llama(576, 1536, 30, 9, 3, 49152)),
    ("1024x16", llama(1024, 4096, 16, 16, 4)),
    ("llama3.2-1B-shape", llama(2048, 8192, 16, 32, 8)),
]

# A Mixtral-shaped mixture of experts (8 experts, top 2, intermediate 3.5x hidden as in
# Mixtral-8x7B), small enough to time on 2 CPU cores.
MIXTRAL_SHAPE = {"model": "mixtral", "hidden": 512, "intermediate": 1792, "layers": 4, "heads": 8, "kv_heads": 2,
                 "experts": 8, "top_k": 2, "vocab": 32000}

# The peers that decide placement some other way (providers.py: ``decision``): they compute a
# rank allocation or a module selection, not PAGE's energies, so only their cost compares.
DECISION_PROVIDERS = ["eva", "kappatune"]
ALL_PROVIDERS = ["probe", "floor", "autograd", "autograd-per-sample", "torch.func", "probe-expected", "opacus",
                 *DECISION_PROVIDERS]
SWEEP_PROVIDERS = ["probe", "floor", "autograd", "autograd-per-sample"]
# What each placement strategy of the package runs before it can plan (domlora_kernels.placement.
# strategies), beside the probe, the floor, one training step of vanilla LoRA and the peers
STRATEGY_PROVIDERS = ["probe", "floor", "lora-step", "strategy-adam", "strategy-heldout", "strategy-pilot",
                      "probe-set", "probe-stopped", *DECISION_PROVIDERS]
# Timed rounds per workload unless --repeats says otherwise: the headline is the median of
# at least 7 interleaved rounds; each sweep point 3.
DEFAULT_REPEATS = {"headline": 7}
SWEEP_REPEATS = 3
# Timed rounds of a slow provider (providers.py: ``slow``; EVA, KappaTune) unless
# --slow-rounds says otherwise, without a warm-up round: they take tens of seconds a run,
# so first-call effects are small against them, and 7+1 rounds of them would double the
# headline. A sweep point gets one (KappaTune's SVDs of the 1B shape take minutes).
SLOW_ROUNDS = 3
DEFAULT_SLOW_ROUNDS = {"headline": SLOW_ROUNDS}
SWEEP_SLOW_ROUNDS = 1


# --providers: run only these of each point's providers (None: all of them)
ONLY_PROVIDERS: list[str] | None = None


def workloads() -> dict[str, list[dict]]:
    """name -> list of points; each point is a dict(spec, batch, tokens, rank, providers, memory, label)."""
    def pt(label, spec, b, t, r, providers=SWEEP_PROVIDERS, memory=True):
        if ONLY_PROVIDERS is not None:
            providers = [p for p in providers if p in ONLY_PROVIDERS]
        return {"label": label, "spec": spec, "batch": b, "tokens": t, "rank": r, "providers": providers, "memory": memory}

    return {
        "headline": [pt("smollm2 B=8 T=128 r=8", SMOLLM2, 8, 128, 8, ALL_PROVIDERS)],
        # B=2 so that T=512 stays affordable for the per-sample loop
        "tokens": [pt(f"T={t}", SMOLLM2, 2, t, 8) for t in (32, 64, 128, 256, 512)],
        "batch": [pt(f"B={b}", SMOLLM2, b, 128, 8, memory=False) for b in (1, 2, 4, 8, 16)],
        # rank changes only the probe (and the naive projections): floor as the reference
        "rank": [pt(f"r={r}", SMOLLM2, 8, 128, r, ["probe", "floor", "autograd"], memory=False) for r in (1, 8, 64, 256)],
        "width": [pt(label, spec, 1, 128, 8, SWEEP_PROVIDERS + DECISION_PROVIDERS) for label, spec in WIDTHS],
        "moe": [pt("mixtral-shape B=4 T=128 r=8", MIXTRAL_SHAPE, 4, 128, 8)],
        "strategies": [pt("smollm2 B=8 T=128 r=8", SMOLLM2, 8, 128, 8, STRATEGY_PROVIDERS)],
    }


# ----------------------------------------------------------------------------- machine


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    # glibc's malloc tunables change peak RSS by ~10% here (FIXED_MALLOC)
    info["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    info["malloc_env_memory_children"] = {**info["malloc_env"], **FIXED_MALLOC}  # measure_memory's
    try:
        import opacus

        info["opacus"] = opacus.__version__
    except ImportError:
        info["opacus"] = None
    return info


def machine_line(m: dict) -> str:
    dev = m["gpu"] or f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), no GPU"
    line = f"{dev}; torch {m['torch']}, transformers {m['transformers']}, opacus {m['opacus']}"
    if m.get("malloc_env_memory_children"):
        line += "; memory runs with " + " ".join(f"{k}={v}" for k, v in m["malloc_env_memory_children"].items())
    return line


# ----------------------------------------------------------------------------- model and inputs

_MODELS: dict[str, torch.nn.Module] = {}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not os.environ.get("BENCH_CPU") else "cpu")


def build_model(spec: dict) -> torch.nn.Module:
    """The model of a spec, frozen and in eval mode (the state every provider starts from)."""
    key = json.dumps(spec, sort_keys=True)
    if key in _MODELS:
        return _MODELS[key]
    _MODELS.clear()  # one model at a time: the sweeps go up to 1B parameters
    from benchmarks import providers as P

    P.TOKENIZERS.clear()  # by id(model): a freed model's id may come back for the next one
    gc.collect()
    if spec["model"] == "smollm2":
        from domlora_kernels.models import load_model

        model, tok = load_model()
    elif spec["model"] == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(
            hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
            num_local_experts=spec["experts"], num_experts_per_tok=spec["top_k"], tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        model = MixtralForCausalLM(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
            num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
            tie_word_embeddings=True, max_position_embeddings=4096,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model = model.to(device()).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _MODELS[key] = model
    if spec["model"] == "smollm2":
        P.TOKENIZERS[id(model)] = tok  # the set providers read the shipped calibration set through it
    return model


def make_ids(model: torch.nn.Module, batch: int, tokens: int) -> torch.Tensor:
    """Random token ids ``[batch, tokens]`` with a fixed seed; every row full length."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g).to(device())


def candidate_params(model) -> int:
    from domlora_kernels.probe.candidates import find_candidates

    return sum(c.weight.numel() for c in find_candidates(model))


def mem_available() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_reason(name: str, model, ids, rank: int | None = None) -> str | None:
    """Why a provider cannot run here, or None."""
    from benchmarks import providers as P

    if name == "opacus":
        try:
            import opacus  # noqa: F401
        except ImportError as e:
            return f"opacus not installed ({e}); pip install opacus"
    if name in DECISION_PROVIDERS:
        return decision_skip_reason(name, ids, rank)
    if name == "torch.func":
        need = P.per_sample_grad_bytes(model, ids.shape[0])
        if ids.is_cuda:
            free = torch.cuda.mem_get_info()[0]
        else:
            free = mem_available()
        # the per-sample weight gradients alone; activations under vmap come on top
        if free is not None and need > 0.6 * free:
            return f"needs {need / 2**30:.1f} GiB for {ids.shape[0]} per-sample weight gradients, only {free / 2**30:.1f} GiB free"
    return None


def decision_skip_reason(name: str, ids, rank: int | None) -> str | None:
    """Why EVA or KappaTune cannot run here (the installed peft lacks it, or a batch too
    small for EVA's SVD), or None. ``ids`` None: only the installation is checked."""
    import peft

    api = {"eva": ("get_eva_state_dict", "EvaConfig"), "kappatune": ("find_kappa_target_modules",)}[name]
    missing = [a for a in api if not hasattr(peft, a)]
    if missing:
        return f"peft {peft.__version__} has no {', '.join(missing)} ({name}); pip install -U peft"
    if name == "eva" and ids is not None and rank is not None:
        from benchmarks import providers as P

        if ids.numel() < P.eva_min_tokens(rank):
            return (f"a batch of {ids.numel()} tokens is below the {P.eva_min_tokens(rank)} components EVA fits "
                    f"at rank {rank} (rho {P.EVA_RHO}); peft would skip every SVD step and never converge")
    return None


# ----------------------------------------------------------------------------- timing


def _sync():
    if torch.cuda.is_available() and device().type == "cuda":
        torch.cuda.synchronize()


def slow_schedule(warmup: int, repeats: int, slow_rounds: int) -> list[int]:
    """The rounds (0-based, warm-up rounds first) a slow provider runs in: no warm-up, and
    ``min(slow_rounds, repeats)`` timed rounds spread evenly over the timed ones."""
    k = min(slow_rounds, repeats)
    return [warmup + (j * repeats) // k for j in range(k)]


def _time_one(p):
    """One run of a provider, untimed prepare and teardown: ``(seconds, energies)``."""
    p.prepare()
    _sync()
    t0 = time.perf_counter()
    e = p.run()
    _sync()
    dt = time.perf_counter() - t0
    p.teardown()
    return dt, e


def time_providers(model, ids, rank: int, names: list[str], warmup: int, repeats: int, log=print,
                   slow_rounds: int = SLOW_ROUNDS):
    """Interleaved timings: ``{name: [seconds per run]}``, the first run's energies, and the
    outcome of every timed run of each decision provider."""
    from benchmarks import providers as P

    provs = {n: P.PROVIDERS[n](model, ids, rank) for n in names}
    slow = {n: slow_schedule(warmup, repeats, slow_rounds) for n in names if provs[n].slow}
    for n, rounds in slow.items():
        log(f"  {n}: slow provider, {len(rounds)} of {repeats} timed rounds (rounds {', '.join(str(r + 1) for r in rounds)}),"
            f" no warm-up (--slow-rounds)")
    times, outcomes = {n: [] for n in names}, {n: [] for n in names if provs[n].decision}
    energies = {}
    for rnd in range(warmup + repeats):
        this = {}
        k = rnd % len(names)
        order = names[k:] + names[:k]  # rotate, so no provider always runs after the same one
        for n in (n for n in order if n not in slow or rnd in slow[n]):
            this[n], e = _time_one(provs[n])
            energies.setdefault(n, e)
            if rnd >= warmup:
                times[n].append(this[n])
                if n in outcomes:
                    outcomes[n].append(provs[n].outcome())
        log(f"  round {rnd + 1}/{warmup + repeats}{' (warmup)' if rnd < warmup else ''}: "
            + ", ".join(f"{n} {this[n]:.2f}s" for n in names if n in this), flush=True)
    return times, energies, outcomes


# ----------------------------------------------------------------------------- memory (child processes)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child_memory(job: dict) -> dict:
    """Runs in a fresh process: peak memory of one provider's run over the loaded model."""
    from benchmarks import providers as P

    model = build_model(job["spec"])
    ids = make_ids(model, job["batch"], job["tokens"])
    why = skip_reason(job["provider"], model, ids, job["rank"])
    if why:
        return {"provider": job["provider"], "skipped": why}
    p = P.PROVIDERS[job["provider"]](model, ids, job["rank"])
    p.prepare()
    gc.collect()
    out = {"provider": job["provider"]}
    if ids.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        p.run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(kind="cuda max_memory_allocated", peak_bytes=peak, baseline_bytes=base)
    else:
        load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = _rss_now()
        reset = True
        try:  # "5" resets the peak RSS (VmHWM, which ru_maxrss reads) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            reset = False
        p.run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # ru_maxrss is max(this mm's high-water mark, the RSS of the process image that
        # exec'd us): hence the parent spawns these children before it loads any model.
        # VmHWM is the mm's own mark alone; the two agree when the parent was small.
        out.update(kind="ru_maxrss" + ("" if reset else " (lifetime: clear_refs not writable)"),
                   peak_bytes=peak, vm_hwm_bytes=_vm_hwm(), baseline_bytes=base, load_peak_bytes=load_peak)
    p.teardown()
    out["delta_bytes"] = out["peak_bytes"] - out["baseline_bytes"]
    return out


# glibc raises its mmap threshold each time a large mmapped block is freed, so which later
# allocations land on the heap (and how far the heap grows before it is trimmed) depends on the
# order of earlier frees: three fresh runs of the floor peaked at 2,745, 2,486 and 2,802 MiB
# (benchmarks/results/memory_floor.txt). With the threshold fixed at glibc's initial 128 KiB a
# provider's peak repeats within 2 MiB and measures its tensors, not the heap's history. The
# memory children run so unless told otherwise.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_memory(point: dict, name: str, log=print, malloc: dict | None = None) -> dict:
    """Peak memory of one provider in a fresh process; ``malloc``: environment of glibc's
    allocator for it (default :data:`FIXED_MALLOC`; ``{}``: glibc's defaults, no ``MALLOC_*``)."""
    job = {k: point[k] for k in ("spec", "batch", "tokens", "rank")}
    job["provider"] = name
    cmd = [sys.executable, "-m", "benchmarks.bench_probe", "--child", json.dumps(job)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if malloc is not None and not malloc:  # glibc's defaults: none of the parent's tunables either
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    env.update(FIXED_MALLOC if malloc is None else malloc)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    log(f"  memory of {name} failed (exit {r.returncode}): {' | '.join(tail)}")
    return {"provider": name, "error": " | ".join(tail)}


# ----------------------------------------------------------------------------- checks


def agreement(energies: dict, model, ids, rank: int) -> list[dict]:
    """Relative errors between providers that computed the same quantity on this batch."""
    from benchmarks import providers as P

    checks = []

    def add(a, b, what, required):
        if a in energies and b in energies and energies[a] is not None and energies[b] is not None:
            err = P.rel_err(energies[a], energies[b])
            checks.append({"a": a, "b": b, "what": what, "rel_err": err, "tol": CHECK_TOL,
                           "required": required, "ok": err < CHECK_TOL})

    add("probe", "autograd-per-sample", "per-sample ||G_b A^T||^2, every module", True)
    add("probe", "torch.func", "per-sample ||G_b A^T||^2, every module", False)
    add("opacus", "probe-expected", "per-sample r/(3n) ||G_b||^2, every module", False)
    if "autograd" in energies:
        # autograd measures the batch gradient: compare with the probe's "gradient"
        # estimator, ||(1/N) sum_b G_b A^T||^2, times N^2 (an extra, untimed probe run)
        from domlora_kernels import page_scores

        s = page_scores(model, [{"input_ids": ids}], rank=rank, estimator="gradient", progress=False)
        n2 = ids.shape[0] ** 2
        ref = {k: torch.tensor([v * n2], dtype=torch.float64) for k, v in s.scores.items()}
        err = P.rel_err(energies["autograd"], ref)
        checks.append({"a": "autograd", "b": "probe(estimator=gradient) x N^2", "what": "batch ||G A^T||^2, every module",
                       "rel_err": err, "tol": CHECK_TOL, "required": False, "ok": err < CHECK_TOL})
    return checks


def not_checked(names: list[str]) -> dict[str, str]:
    """The providers the agreement checks do not apply to, with why: the decision providers."""
    from benchmarks import providers as P

    return {n: f"computes a {P.PROVIDERS[n].decision}, not PAGE's energies: nothing of the probe's to check it "
               f"against; its row compares the cost of a decision"
            for n in names if P.PROVIDERS[n].decision}


# ----------------------------------------------------------------------------- one point


def memory_point(point: dict, log=print) -> dict:
    """Peak memory of each provider of a point, one fresh process each. Must run before
    this process loads a model (see child_memory)."""
    mem = {}
    if not point["memory"]:
        return mem
    for n in point["providers"]:
        if n in ("opacus", *DECISION_PROVIDERS) and skip_reason(n, None, None):
            continue
        log(f"[{point['label']}] memory: {n} in a fresh process (parent RSS {_rss_now() / 2**20:.0f} MiB)")
        mem[n] = measure_memory(point, n, log)
    return mem


def run_point(point: dict, warmup: int, repeats: int, mem: dict, log=print, slow_rounds: int = SLOW_ROUNDS) -> dict:
    from domlora_kernels.probe.candidates import find_candidates

    model = build_model(point["spec"])
    ids = make_ids(model, point["batch"], point["tokens"])
    names, skipped = [], {}
    for n in point["providers"]:
        why = skip_reason(n, model, ids, point["rank"])
        if why:
            skipped[n] = why
            log(f"  {n}: skipped: {why}")
        else:
            names.append(n)
    log(f"[{point['label']}] timing {', '.join(names)}: {warmup} warmup + {repeats} rounds, interleaved")
    times, energies, outcomes = time_providers(model, ids, point["rank"], names, warmup, repeats, log, slow_rounds)
    checks = agreement(energies, model, ids, point["rank"]) if len(names) > 1 else []
    rows = {}
    for n in names:
        rows[n] = {"times_s": times[n], "median_s": statistics.median(times[n]), "memory": mem.get(n)}
        if n in outcomes:
            rows[n].update(decision_row(n, outcomes[n]))
    return {
        "label": point["label"], "spec": point["spec"], "batch": point["batch"], "tokens": point["tokens"],
        "rank": point["rank"], "candidate_params": candidate_params(model),
        "num_candidates": len(find_candidates(model)),
        "providers": rows, "skipped": skipped, "checks": checks, "not_checked": not_checked(names),
        "warmup": warmup, "repeats": repeats, "slow_rounds": slow_rounds,
    }


def decision_row(name: str, outcomes: list[dict]) -> dict:
    """What a decision provider's row adds: what it decides, its first timed run's outcome,
    and its passes over the batches in every timed run (EVA)."""
    from benchmarks import providers as P

    row = {"decision": P.PROVIDERS[name].decision, "outcome": outcomes[0]}
    if "passes" in outcomes[0]:
        row["passes"] = [o["passes"] for o in outcomes]
    return row


# ----------------------------------------------------------------------------- output


def _mb(b):
    return f"{b / 2**20:,.0f}" if b is not None else "-"


def _passes(r: dict) -> str:
    ps = r.get("passes")
    return f"{statistics.median(ps):g}" if ps else "-"


def outcome_text(outcome: dict) -> str:
    """One line of what a decision provider decided (EVA's ranks and passes, KappaTune's pick)."""
    if "ranks" in outcome:
        o = outcome
        return (f"ranks {o['rank_min']}-{o['rank_max']}, {o['modules_with_rank']} of {len(o['ranks'])} modules get an "
                f"adapter, {o['rank_total']} of a {o['rank_budget']} rank budget; {o['passes']:g} passes over "
                f"{o['batches']} batch{'es' if o['batches'] > 1 else ''} ({o['forwards']} forwards, one to find equal inputs)")
    if "modules_picked" in outcome:
        return (f"picks {outcome['modules_picked']} modules ({outcome['candidates_picked']} of them candidates), "
                f"top_p {outcome['top_p']}")
    if "top_module" in outcome:  # a strategy of the package: what its signal ranks first
        steps = f", after {outcome['steps']} pilot steps" if "steps" in outcome else ""
        read = f", read {outcome['samples']} of {outcome['of']} samples of {outcome['set']}" if "samples" in outcome else ""
        stable = f" (stability {outcome['stability']:.2f})" if outcome.get("stability") is not None else ""
        return f"ranks {outcome['top_module']} first{steps}{read}{stable}"
    return "-"


def table(res: dict) -> str:
    rows = res["providers"]
    base = rows.get(BASELINE)
    step = rows.get("lora-step")  # the strategies workload: costs in training steps of vanilla LoRA too
    lines = [f"{res['label']}  ({res['num_candidates']} candidate modules, {res['candidate_params'] / 1e6:.1f}M weights)",
             f"{'provider':<22}{'median s':>10}{'x probe':>9}" + (f"{'x step':>8}" if step else "")
             + f"{'peak MB':>10}{'+MB run':>10}{'mem x probe':>12}{'passes':>8}"]
    for n, r in rows.items():
        m = r["memory"] or {}
        ratio = r["median_s"] / base["median_s"] if base else float("nan")
        mb = m.get("peak_bytes")
        bm = (base["memory"] or {}).get("peak_bytes") if base else None
        mem_ratio = f"{mb / bm:.2f}" if mb and bm else "-"
        mark = "  <- baseline" if n == BASELINE else ""
        if n == "opacus" and "probe-expected" in rows:
            mark = f"  ({r['median_s'] / rows['probe-expected']['median_s']:.2f} x probe-expected)"
        hwm = m.get("vm_hwm_bytes")
        if mb and hwm and abs(mb - hwm) > 0.01 * mb:
            mark += f"  (ru_maxrss != VmHWM {_mb(hwm)} MB: parent too large when spawned)"
        if m.get("skipped") or m.get("error"):
            mark += f"  (memory: {m.get('skipped') or m.get('error')})"
        if len(r["times_s"]) < res["repeats"]:
            mark += f"  ({len(r['times_s'])} of {res['repeats']} rounds: slow-provider cap, --slow-rounds)"
        steps = f"{r['median_s'] / step['median_s']:>8.1f}" if step else ""
        lines.append(f"{n:<22}{r['median_s']:>10.3f}{ratio:>9.2f}{steps}{_mb(mb):>10}{_mb(m.get('delta_bytes')):>10}"
                     f"{mem_ratio:>12}{_passes(r):>8}{mark}")
    for n, why in res["skipped"].items():
        lines.append(f"{n:<22}  skipped: {why}")
    decisions = [n for n, r in rows.items() if r.get("decision")]
    if decisions:
        lines.append(f"{', '.join(decisions)}: the cost of deciding placement another way, not of computing the same "
                     f"number; the probe's row is the cost of PAGE's scores, from which its placement follows")
        lines += [f"  {n} ({rows[n]['decision']}): {outcome_text(rows[n]['outcome'])}" for n in decisions]
    return "\n".join(lines)


def checks_text(res: dict) -> str:
    out = []
    for c in res["checks"]:
        verdict = "ok" if c["ok"] else ("FAIL" if c["required"] else "above tol")
        out.append(f"check {c['a']} vs {c['b']} ({c['what']}): max rel err {c['rel_err']:.2e} (tol {c['tol']:.0e}) {verdict}")
    for n, why in res.get("not_checked", {}).items():
        out.append(f"check {n}: not applicable: {why}")
    return "\n".join(out)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", "batch", "tokens", "rank", "candidate_params", "provider", "median_s", "ratio_to_probe",
                    "peak_rss_bytes", "delta_bytes", "passes", "decision"])
        for pt in payload["points"]:
            base = pt["providers"].get(BASELINE)
            for n, r in pt["providers"].items():
                m = r["memory"] or {}
                w.writerow([pt["label"], pt["batch"], pt["tokens"], pt["rank"], pt["candidate_params"], n,
                            f"{r['median_s']:.4f}", f"{r['median_s'] / base['median_s']:.3f}" if base else "",
                            m.get("peak_bytes", ""), m.get("delta_bytes", ""),
                            f"{statistics.median(r['passes']):g}" if r.get("passes") else "", r.get("decision", "")])
    return path


def _plot_provider(axes, pts: list[dict], n: str, xkey: str, has_mem: bool) -> None:
    """One provider's line on the time (and memory) axes; a decision provider's dashed and
    labelled as such (its cost only: it computes something else), EVA's points with their passes."""
    rows = [(p[xkey], p["providers"][n]) for p in pts if n in p["providers"]]
    decision = any(r.get("decision") for _, r in rows)
    style, label = ("o--", f"{n} (a decision: cost only)") if decision else ("o-", n)
    axes[0].plot([x for x, _ in rows], [r["median_s"] for _, r in rows], style, label=label)
    for x, r in rows:
        if r.get("passes"):
            axes[0].annotate(f"{statistics.median(r['passes']):g} passes", (x, r["median_s"]), fontsize=7,
                             textcoords="offset points", xytext=(4, 4))
    if has_mem:
        ms = [(x, (r["memory"] or {}).get("delta_bytes")) for x, r in rows]
        ms = [(x, y / 2**20) for x, y in ms if y is not None]
        axes[1].plot([x for x, _ in ms], [y for _, y in ms], style, label=label)


def plot() -> list[Path]:
    """Time and memory against tokens and against model size, from the saved sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for sweep, xkey, xlabel in (("tokens", "tokens", "tokens per sample T (SmolLM2-135M, B=2, r=8)"),
                               ("width", "candidate_params", "candidate linear weights (random Llama configs, B=1, T=128)"),
                               ("batch", "batch", "batch B (SmolLM2-135M, T=128, r=8)"),
                               ("rank", "rank", "rank r (SmolLM2-135M, B=8, T=128)")):
        path = RESULTS / f"{sweep}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        pts = data["points"]
        has_mem = any((r["memory"] or {}).get("peak_bytes") for p in pts for r in p["providers"].values())
        fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4.2), squeeze=False)
        provs = list(dict.fromkeys(n for p in pts for n in p["providers"]))
        for n in provs:
            _plot_provider(axes[0], pts, n, xkey, has_mem)
        axes[0, 0].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median seconds per batch", title=f"time ({sweep} sweep)")
        if has_mem:
            axes[0, 1].set(xscale="log", yscale="log", xlabel=xlabel, ylabel="peak RSS over loaded model, MiB",
                           title=f"memory ({sweep} sweep)")
        for ax in axes[0]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(machine_line(data["machine"]), fontsize=8)
        fig.tight_layout()
        out = RESULTS / f"{sweep}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        made.append(out)
    return made


# ----------------------------------------------------------------------------- main


def run_workload(name: str, args, mems: list[dict]) -> dict:
    points = workloads()[name]
    m = machine()
    if args.no_memory:
        m["malloc_env_memory_children"] = None  # no memory children ran
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    warmup = args.warmup
    repeats = args.repeats if args.repeats is not None else DEFAULT_REPEATS.get(name, SWEEP_REPEATS)
    slow_rounds = args.slow_rounds if args.slow_rounds is not None else DEFAULT_SLOW_ROUNDS.get(name, SWEEP_SLOW_ROUNDS)
    results = []
    for pt, mem in zip(points, mems):
        results.append(run_point(pt, warmup, repeats, mem, slow_rounds=slow_rounds))
        print(table(results[-1]), flush=True)
    payload = {"workload": name, "machine": m, "machine_line": machine_line(m), "loadavg_before": load0,
               "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t0,
               "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_probe", *sys.argv[1:]]), "points": results}
    path = write(name + args.suffix, payload)
    print(f"wrote {path.relative_to(ROOT)} ({payload['wall_s']:.0f} s)")
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="headline",
                    help=f"one of {', '.join(workloads())}, a comma-separated list of them, or all (default headline)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed rounds (default {DEFAULT_REPEATS['headline']} for headline, {SWEEP_REPEATS} for the sweeps)")
    ap.add_argument("--slow-rounds", type=int, default=None,
                    help=f"timed rounds of the slow providers (EVA, KappaTune), at most --repeats, no warm-up "
                         f"(default {SLOW_ROUNDS} for headline, {SWEEP_SLOW_ROUNDS} for the sweeps)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-provider memory subprocesses")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--suffix", default="", help="appended to the results file names (headline<suffix>.json)")
    ap.add_argument("--providers", help="comma-separated: run only these providers of each point (probe among them), "
                                        "e.g. probe,floor for more rounds of the ratio that matters")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.warmup < 0 or (args.repeats is not None and args.repeats < 1) or (args.slow_rounds is not None and args.slow_rounds < 1):
        ap.error("--warmup must be >= 0, --repeats >= 1 and --slow-rounds >= 1")
    if args.child:
        print("CHILD_RESULT " + json.dumps(child_memory(json.loads(args.child))), flush=True)
        return 0
    if args.plot_only:
        for p in plot():
            print(f"wrote {p.relative_to(ROOT)}")
        return 0
    if args.providers:
        global ONLY_PROVIDERS
        from benchmarks import providers as P

        only = args.providers.split(",")
        unknown = [n for n in only if n not in P.PROVIDERS]
        if unknown or BASELINE not in only:
            ap.error(f"--providers: {'unknown ' + ', '.join(unknown) if unknown else 'must include ' + BASELINE}; "
                     f"choose from {', '.join(P.PROVIDERS)}")
        ONLY_PROVIDERS = only
    t0 = time.perf_counter()
    names = ["tokens", "batch", "rank", "width", "moe", "headline"] if args.workload == "all" else args.workload.split(",")
    bad = [n for n in names if n not in workloads()]
    if bad:
        ap.error(f"unknown workload {', '.join(bad)}; choose from {', '.join(workloads())}, or all")
    # Memory first, every point of every workload, while this process is still small: a
    # child's ru_maxrss cannot read below the RSS of the parent that spawned it.
    t_mem = time.perf_counter()
    mems = {n: [memory_point(pt) if not args.no_memory else {} for pt in workloads()[n]] for n in names}
    if not args.no_memory:
        print(f"memory phase: {time.perf_counter() - t_mem:.0f} s")
    payloads = {n: run_workload(n, args, mems[n]) for n in names}
    if set(names) & {"tokens", "batch", "rank", "width"}:
        for p in plot():
            print(f"wrote {p.relative_to(ROOT)}")
    # the summary last: the headline (or the one workload run) with its checks
    last = payloads[names[-1]]
    print()
    print(f"machine: {last['machine_line']}")
    print(f"load average before/after: {' '.join(f'{x:.2f}' for x in last['loadavg_before'])} / "
          f"{' '.join(f'{x:.2f}' for x in last['loadavg_after'])}; total {time.perf_counter() - t0:.0f} s")
    failed = False
    for pt in last["points"]:
        if pt["checks"] or pt["not_checked"]:
            print(checks_text(pt))
        failed |= any(c["required"] and not c["ok"] for c in pt["checks"])
        print(table(pt))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
