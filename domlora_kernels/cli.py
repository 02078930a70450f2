"""The ``domlora`` command line.

``domlora probe`` with no arguments probes the embedded default model (SmolLM2-135M-Instruct)
on the calibration set shipped in the package, prints the ranked modules and the dominant
one, and writes a JSON report.

Every argument is checked before the model is loaded (the output paths, the probe's settings,
the placement's ``--top-k`` / ``--budget`` / ``--top-p`` / ``--variant`` on a dry run); what
depends on the model (``--top-k`` beyond the number of modules) right after it is loaded,
before the probe. The JSON files are written atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from .errors import USER_ERRORS, MissingExtraError
from .models import DEVICE_MAPS, DTYPES
from .ops import BACKENDS
from .placement.strategies import STRATEGIES
from .probe import ESTIMATORS, PROJECTIONS

DEFAULT_OUT = Path("domlora_out") / "page_scores.json"
DEFAULT_ADAPTER_ALPHA = 16.0  # `apply` without --lora-alpha: peft's customary alpha = 2 r at r = 8



def _positive(kind):
    def parse(text: str):
        val = kind(text)
        if val < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
        return val

    return parse


def add_probe_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by every command that runs a probe."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="a .gguf file, a local transformers folder, or a model name in the Hugging Face "
                                                  "cache (org/name) (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default=None, help='.jsonl/.json/.parquet/.csv with a "text" or "messages" field per record, a datasets '
                                                "folder, or a dataset name (default: the shipped calibration set)")
    g.add_argument("--split", default=None, help="split of a datasets folder or name (default: train)")
    g.add_argument("--text-field", default=None, help="field holding each record's text (every token a target)")
    g.add_argument("--messages-field", default=None, help="field holding each record's chat messages (assistant tokens are targets)")
    g.add_argument("--tasks", default=None, help="comma-separated subset of the shipped calibration tasks: instruction,math,code,chat")
    g.add_argument("--num-samples", type=_positive(int), default=None, help="use only the first N samples")
    g.add_argument("--batch-size", type=_positive(int), default=8)
    g.add_argument("--max-length", type=_positive(int), default=256, help="tokens per sample (longer ones are cut)")
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", help="auto (CUDA where available), cpu, cuda or cuda:N; under torchrun auto and cuda "
                                                    "mean cuda:LOCAL_RANK")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on a GPU that supports it, else float32")
    g.add_argument("--device-map", choices=DEVICE_MAPS, default=None,
                   help="auto: spread a model larger than one GPU over the visible GPUs (accelerate); needs --device auto")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", action="store_true",
                   help="4-bit NF4 with double quantisation, QLoRA's recipe (bitsandbytes: pip install 'domlora_kernels[quant]')")
    q.add_argument("--load-in-8bit", action="store_true", help="LLM.int8 (bitsandbytes)")
    g = p.add_argument_group("probe")
    g.add_argument("--rank", type=_positive(int), default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seeds", type=_positive(int), default=1,
                   help="probe N A draws at once (seeds SEED..SEED+N-1, one backward pass) for seed statistics")
    g.add_argument("--projection", choices=PROJECTIONS, default="A")
    g.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="fisher (the default: PAGE, the mean per-sample energy) or gradient (the mean gradient's energy); "
                        "adam, types, heldout and plop+types always measure with gradient")
    g.add_argument("--lora-alpha", type=float, default=None, help="scaling alpha/rank as in peft (default: scaling 1)")
    g.add_argument("--target-modules", default="all-linear", help='"all-linear", a regex, or comma-separated names/suffixes')
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="ops backend (default auto: triton on CUDA tensors)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--stable", type=float, default=None, metavar="LEVEL",
                   help="stop reading batches once the top-k (probe: top-1; apply: --top-k) is the same in LEVEL of "
                        "bootstrap resamples of the samples seen (e.g. 0.95; at least 16 samples); the data is then a cap")


def _budget(text: str) -> int | float | str:
    """``--budget``: :func:`~domlora_kernels.placement.parse_budget`, its error as argparse's."""
    from .placement.budget import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _target(text: str):
    if text == "all-linear" or "," not in text and any(c in text for c in "^$*+?[](){}|\\"):
        return text
    return [t for t in text.split(",") if t]


def _seeds(args: argparse.Namespace):
    return args.seed if args.seeds == 1 else list(range(args.seed, args.seed + args.seeds))


def _confidence(scores, args: argparse.Namespace):
    """Confidence of the dominant module, stored in the report under meta["confidence"]."""
    from .confidence import confidence

    conf = confidence(scores, num_resamples=args.resamples, seed=args.bootstrap_seed)
    scores.meta["confidence"] = conf.to_dict()
    return conf


def _records(args: argparse.Namespace) -> list[dict]:
    """The records of ``--data`` (any format data.read_records takes) or of the shipped calibration set."""
    from .data import load_calibration, read_records

    if args.data is None:
        given = [flag for flag, v in (("--split", args.split), ("--text-field", args.text_field),
                                      ("--messages-field", args.messages_field)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} select(s) from --data; give --data, or drop {', '.join(given)}")
        return load_calibration(args.tasks.split(",") if args.tasks else None)
    if args.tasks is not None:
        raise ValueError("--tasks selects from the shipped calibration set; drop it when giving --data")
    return read_records(args.data, split=args.split or "train", text_field=args.text_field,
                        messages_field=args.messages_field)


def _batches(records: list[dict], tok, args: argparse.Namespace) -> list:
    """make_batches, with the plain-chat fallback and unknown chat roles reported as one "note:"
    line each instead of a warning."""
    import warnings

    from .data import ChatTemplateFallbackWarning, UnknownRoleWarning, make_batches

    notes = (ChatTemplateFallbackWarning, UnknownRoleWarning)
    with warnings.catch_warnings(record=True) as caught:
        for cls in notes:
            warnings.simplefilter("always", cls)
        batches = make_batches(records, tok, args.batch_size, args.max_length)
    for w in caught:
        if issubclass(w.category, notes):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return batches


def _check_out_file(path: Path, flag: str) -> None:
    """A file the command will write: not a folder, and under a folder (or one it can create)."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'page_scores.json')!r}")
    _check_out_dir(path.parent, flag, of=path)


def _check_out_dir(path: Path, flag: str, of: Path | None = None) -> None:
    """A folder the command will write into: no file in its place or above it, and writable."""
    shown = str(of if of is not None else path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"{flag} {shown!r}: {str(folder)!r} is a file, not a folder; choose another path")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{flag} {shown!r}: the folder {str(folder)!r} is not writable; choose another path")
            return


def _check_probe_args(args: argparse.Namespace, lora_alpha: float | None) -> None:
    """What page_scores would refuse, checked before the model is loaded."""
    from .probe.candidates import check_selection
    from .probe.checks import validate

    validate(args.rank, args.projection, _estimator(args), args.backend, _seeds(args), lora_alpha, [], None)
    check_selection(_target(args.target_modules))


def _estimator(args: argparse.Namespace) -> str:
    """``--estimator``, or PAGE's own (fisher) when none was given (None: the user chose none)."""
    return args.estimator or "fisher"


def _stop_kwargs(args: argparse.Namespace, strategy: str) -> dict:
    """``stop=`` of ``--stable``: the top-k decision (probe: top-1; apply: ``--top-k``)."""
    if args.stable is None:
        return {}
    from .probe.stopping import StopRule

    if getattr(args, "budget", None) is not None or getattr(args, "top_p", None) is not None or strategy != "page":
        raise ValueError("--stable stops when the top-k modules by PAGE are stable; use it with `domlora probe`, or "
                         "with `domlora apply --top-k K` (PAGE's rule), not with --budget, --top-p or another strategy")
    return {"stop": StopRule(top_k=getattr(args, "top_k", None) or 1, level=args.stable)}


def run_probe(args: argparse.Namespace, lora_alpha: float | None, use_rslora: bool = False, check_model=None,
              strategy: str = "page"):
    """Load the model and data named by ``args`` and probe at the LoRA scaling of ``lora_alpha``
    (``use_rslora``: ``alpha / sqrt(rank)``); returns ``(scores, model, tokenizer)``.

    ``strategy``: a placement strategy whose signal the probe must measure too
    (:func:`~domlora_kernels.measure_signals`: the gradient estimator for "adam", "types" and
    "heldout", a pilot run for "pilot").
    ``check_model(model)``, if given, runs after the model is loaded and before the probe.
    Under torchrun, load_model puts each rank's model on its own device (``cuda:LOCAL_RANK``)."""
    from .distributed import gather_ints, rank_and_world, shard
    from .models import DEFAULT_NAME, load_model
    from .probe import page_scores

    _check_probe_args(args, lora_alpha)
    _stop_kwargs(args, strategy)  # --stable's level and decision, before the model loads
    records = _records(args)  # data errors before the (slow) model load
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    t_load = time.perf_counter() - t0
    if check_model is not None:
        check_model(model)
    if args.num_samples is not None:
        records = records[: args.num_samples]
    # under torchrun each rank probes its contiguous share; page_scores merges them rank-major
    rank, world = rank_and_world()
    mine = shard(records) if world > 1 else records
    batches = _batches(mine, tok, args) if mine else []
    common = dict(rank=args.rank, target_modules=_target(args.target_modules), projection=args.projection,
                  seed=_seeds(args), lora_alpha=lora_alpha, backend=args.backend, use_rslora=use_rslora,
                  progress=not args.no_progress, **_stop_kwargs(args, strategy))
    if strategy in ("page", "plop"):
        scores = page_scores(model, batches, estimator=_estimator(args), **common)
    else:
        from .placement import measure_signals

        if world > 1 and strategy in ("heldout", "pilot"):
            raise ValueError(f"--strategy {strategy} runs in one process; run it without torchrun")
        if strategy != "pilot" and args.estimator not in (None, "gradient"):  # only a choice the user made
            print(f"note: --strategy {strategy} measures with the gradient estimator (its signal is the mean "
                  f"gradient's), not --estimator {args.estimator}", file=sys.stderr)
        if strategy == "pilot":
            common["estimator"] = _estimator(args)
        scores = measure_signals(model, batches, strategy, **common)
    tasks = sorted({r.get("task", "user") for r in records})
    scores.meta.update({
        "model": args.model or DEFAULT_NAME,
        "data": args.data or f"shipped calibration set ({', '.join(tasks)})",
        "load_seconds": t_load,
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
    })
    if world > 1:
        scores.meta["tokens"] = int(gather_ints([scores.meta["tokens"]]).sum())
    return scores, model, tok


def cmd_probe(args: argparse.Namespace) -> int:
    from .distributed import rank_and_world
    from .report import text_report

    _check_out_file(args.out, "--out")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError("--plot needs matplotlib: `pip install 'domlora_kernels[plot]'`")
    scores, _, _ = run_probe(args, lora_alpha=args.lora_alpha)
    if rank_and_world()[0] != 0:  # every rank holds the same merged scores; rank 0 reports
        return 0
    m = scores.meta
    print(f"model: {m['model']}")
    print(f"data: {m['data']}: {scores.num_samples} samples, {m['tokens']} tokens")
    c = scores.config
    seeds = f"seed {c['seeds'][0]}" if len(c["seeds"]) == 1 else f"seeds {c['seeds'][0]}..{c['seeds'][-1]}"
    print(f"probe: rank {c['rank']}, projection {c['projection']}, estimator {c['estimator']}, {seeds}, "
          f"{len(scores.scores)} modules; load {m['load_seconds']:.1f} s, probe {m['probe_seconds']:.1f} s")
    print()
    conf = _confidence(scores, args)
    print(text_report(scores, conf, top=args.top))
    path = scores.to_json(args.out)
    print(f"report: {path}")
    if args.plot:
        from .report import plot_report

        for png in plot_report(scores, path, conf=conf, top=args.top, log_scale=args.log_scale):
            print(f"plot: {png}")
    return 0


def _write_json(path: Path, data) -> Path:
    """``data`` as JSON at ``path``, atomically: a temporary file in the same folder, then ``os.replace``,
    so a failed write leaves what was there intact."""
    import json

    from .files import write_text_atomic

    return write_text_atomic(path, json.dumps(data, indent=1))


def _placement_kwargs(args: argparse.Namespace, alpha: float) -> dict:
    extra = {"total_step": args.total_step} if args.variant == "adalora" else {}
    return dict(r=args.rank, lora_alpha=alpha, top_k=args.top_k, variant=args.variant, rank_pattern=args.rank_pattern,
                budget=args.budget, top_p=args.top_p, strategy=args.strategy, **extra)


def _dry_run_placement(args: argparse.Namespace, alpha: float, modules: dict | None = None) -> None:
    """Plan the placement on uniform scores, so that ``--top-k``, ``--budget``, ``--top-p``,
    ``--variant``, ``--rank-pattern`` and ``--total-step`` fail before the probe, not after it.

    ``modules``: name -> ModuleInfo of the model's candidates (after loading it); before, stand-ins
    of one row and column each, which check everything the model does not decide."""
    from .placement import domlora_config
    from .scores import ModuleInfo, PageScores

    kwargs = _placement_kwargs(args, alpha)
    if modules is None:  # the budget's size is the model's to judge: here a whole one, to check the rest
        # of a type every strategy plans (plop adapts v_proj): whether the model has it is the model's to judge
        modules = {f"m.{i}.v_proj": ModuleInfo(i, "v_proj", 1, 1) for i in range(max(args.top_k or 1, 1))}
        kwargs["budget"] = None if args.budget is None else 1.0
    uniform = {n: 1.0 for n in modules}
    config = {"rank": args.rank, "projection": args.projection, "estimator": _estimator(args), "seeds": [0]}
    signals = {k: dict(uniform) for k in ("adam", "heldout", "pilot")}  # what the strategies will measure
    domlora_config(PageScores(uniform, {0: dict(uniform)}, None, modules, 1, config, signals=signals), **kwargs)


def _dry_run_on_model(args: argparse.Namespace, alpha: float):
    def check(model) -> None:
        from .probe.candidates import find_candidates, peft_base_model
        from .scores import ModuleInfo

        cands = find_candidates(peft_base_model(model), _target(args.target_modules))
        _dry_run_placement(args, alpha, {c.name: ModuleInfo(c.layer, c.type, c.in_features, c.out_features,
                                                            c.num_experts, c.parameter is not None) for c in cands})
    return check


def cmd_apply(args: argparse.Namespace) -> int:
    from .distributed import rank_and_world
    from .placement import apply_domlora
    from .placement.strategies import CONFIRMATION, EVIDENCE, EVIDENCE_UNITS, describe, resolve

    if args.variant == "adalora" and args.total_step is None:
        raise ValueError("--variant adalora needs --total-step (the number of training steps AdaLoRA schedules over)")
    # the default strategy and its budget, as domlora_config resolves them, named from here on
    args.strategy, args.budget = resolve(args.strategy, args.top_k, args.top_p, args.rank_pattern, args.variant,
                                         args.budget)
    # probe with the adapter's own alpha and scaling rule: the report's PAGE is then the adapter's first ||lora_B.grad||^2
    alpha = DEFAULT_ADAPTER_ALPHA if args.lora_alpha is None else args.lora_alpha
    _check_out_dir(args.out_dir, "--out-dir")
    _dry_run_placement(args, alpha)
    scores, model, _ = run_probe(args, lora_alpha=alpha, use_rslora=args.variant == "rslora",
                                 check_model=_dry_run_on_model(args, alpha), strategy=args.strategy)
    if rank_and_world()[0] != 0:  # under torchrun every rank has the same scores; rank 0 writes
        return 0
    conf = _confidence(scores, args)
    print(conf.sentence())
    print(describe(args.strategy))
    pm = apply_domlora(model, scores, verbose=True, **_placement_kwargs(args, alpha))
    print(f"evidence ({EVIDENCE_UNITS}): {EVIDENCE[args.strategy]}")
    if args.strategy in CONFIRMATION:
        print(f"confirmation: {CONFIRMATION[args.strategy]}")
    out = Path(args.out_dir)
    pm.save_pretrained(out)
    scores.to_json(out / "page_scores.json")
    _write_json(out / "domlora_placement.json", pm.domlora_placement.to_dict())
    print(f"adapter: {out} (adapter_config.json, adapter_model.safetensors), with page_scores.json and domlora_placement.json")
    print(f"load it with: PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import format_models_table, list_models

    print(format_models_table(list_models()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .report import compare
    from .scores import PageScores

    a, b = PageScores.from_json(args.a), PageScores.from_json(args.b)
    print(compare(a, b, top=args.top, label_a=str(args.a), label_b=str(args.b)).text())
    return 0


def _add_confidence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=_positive(int), default=200, help="bootstrap resamples of the calibration set")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domlora", description="Find the dominant adaptation module with PAGE and place a LoRA there.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="measure PAGE for every candidate module and report the dominant one")
    add_probe_args(p)
    p.add_argument("--top", type=_positive(int), default=15, help="rows of the ranked table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report path (default: {DEFAULT_OUT})")
    p.add_argument("--plot", action="store_true", help="also write <out>_heatmap.png and <out>_top.png next to the report")
    p.add_argument("--log-scale", action="store_true", help="logarithmic colour scale for the heatmap")
    _add_confidence_args(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("apply", help="probe, then save a peft adapter where the placement strategy says (lora_A set "
                                     "to the probe's A where the ranks agree)")
    add_probe_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=_positive(int), default=None, help="adapt the K highest-PAGE modules (strategy page)")
    g.add_argument("--budget", type=_budget, default=None,
                   help="trainable parameters: a count (20000), a fraction (0.01) or a percentage (1%%) of vanilla LoRA "
                        "on all probed modules at --rank, filled by --strategy (default 5%%)")
    g.add_argument("--top-p", type=float, default=None, help="like --budget, until the adapters carry this fraction of the PAGE mass")
    p.add_argument("--variant", choices=("lora", "dora", "rslora", "adalora"), default="lora")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="where the adapters go (default: plop+types within --budget, 5%% of vanilla LoRA unless given; "
                        "page, the paper's rule, with --top-k, --top-p or --rank-pattern): plop+types is PLoP's v/o/down "
                        "types where the budget buys them at rank 1 on every layer, whole types by Adam's first-step "
                        "gain below; adam, types, heldout and plop+types measure with the gradient estimator; pilot "
                        "trains a 30-step rank-1 LoRA on every module first (docs/placement_protocol.md)")
    p.add_argument("--rank-pattern", choices=("page",), default=None, help="page: ranks proportional to PAGE over the top-k")
    p.add_argument("--total-step", type=_positive(int), default=None, help="training steps (required by --variant adalora)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT.parent / "adapter", help="adapter folder (default: domlora_out/adapter)")
    _add_confidence_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("models", help="the embedded models --model takes by name: size, and whether installed")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("compare", help="do two PAGE reports agree? dominant module, rank correlations, top-k overlap")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--top", type=_positive(int), default=5, help="size of the top lists to overlap (default 5)")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import destroy, init_from_env

    owned = False
    try:
        owned = init_from_env()  # under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if owned:
            destroy()


if __name__ == "__main__":
    sys.exit(main())
