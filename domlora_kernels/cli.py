"""The ``domlora`` command line.

``domlora probe`` with no arguments probes the embedded default model (SmolLM2-135M-Instruct)
on the calibration set shipped in the package, prints the ranked modules and the dominant
one, and writes a JSON report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import MissingExtraError
from .models import DEVICE_MAPS, DTYPES
from .ops import BACKENDS
from .probe import ESTIMATORS, PROJECTIONS

DEFAULT_OUT = Path("domlora_out") / "page_scores.json"
DEFAULT_ADAPTER_ALPHA = 16.0  # `apply` without --lora-alpha: peft's customary alpha = 2 r at r = 8

# a user's mistake: one "error:" line and exit status 2 (see errors.py); anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, MissingExtraError)


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
    g.add_argument("--estimator", choices=ESTIMATORS, default="fisher")
    g.add_argument("--lora-alpha", type=float, default=None, help="scaling alpha/rank as in peft (default: scaling 1)")
    g.add_argument("--target-modules", default="all-linear", help='"all-linear", a regex, or comma-separated names/suffixes')
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="ops backend (default auto: triton on CUDA tensors)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    """make_batches, with the plain-chat fallback reported as one "note:" line instead of a warning."""
    import warnings

    from .data import ChatTemplateFallbackWarning, make_batches

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ChatTemplateFallbackWarning)
        batches = make_batches(records, tok, args.batch_size, args.max_length)
    for w in caught:
        if issubclass(w.category, ChatTemplateFallbackWarning):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return batches


def run_probe(args: argparse.Namespace, lora_alpha: float | None, use_rslora: bool = False):
    """Load the model and data named by ``args`` and probe at the LoRA scaling of ``lora_alpha``
    (``use_rslora``: ``alpha / sqrt(rank)``); returns ``(scores, model, tokenizer)``.

    Under torchrun, load_model puts each rank's model on its own device (``cuda:LOCAL_RANK``)."""
    from .distributed import gather_ints, rank_and_world, shard
    from .models import DEFAULT_NAME, load_model
    from .probe import page_scores

    records = _records(args)  # data errors before the (slow) model load
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    t_load = time.perf_counter() - t0
    if args.num_samples is not None:
        records = records[: args.num_samples]
    # under torchrun each rank probes its contiguous share; page_scores merges them rank-major
    rank, world = rank_and_world()
    mine = shard(records) if world > 1 else records
    batches = _batches(mine, tok, args) if mine else []
    scores = page_scores(
        model, batches, rank=args.rank, target_modules=_target(args.target_modules), projection=args.projection,
        estimator=args.estimator, seed=_seeds(args), lora_alpha=lora_alpha, backend=args.backend,
        use_rslora=use_rslora, progress=not args.no_progress,
    )
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


def cmd_apply(args: argparse.Namespace) -> int:
    import json

    from .distributed import rank_and_world
    from .placement import apply_domlora

    if args.variant == "adalora" and args.total_step is None:
        raise ValueError("--variant adalora needs --total-step (the number of training steps AdaLoRA schedules over)")
    # probe with the adapter's own alpha and scaling rule: the report's PAGE is then the adapter's first ||lora_B.grad||^2
    alpha = DEFAULT_ADAPTER_ALPHA if args.lora_alpha is None else args.lora_alpha
    scores, model, _ = run_probe(args, lora_alpha=alpha, use_rslora=args.variant == "rslora")
    if rank_and_world()[0] != 0:  # under torchrun every rank has the same scores; rank 0 writes
        return 0
    conf = _confidence(scores, args)
    print(conf.sentence())
    extra = {"total_step": args.total_step} if args.variant == "adalora" else {}
    pm = apply_domlora(model, scores, r=args.rank, lora_alpha=alpha, top_k=args.top_k, variant=args.variant,
                       rank_pattern=args.rank_pattern, budget=args.budget, top_p=args.top_p, verbose=True, **extra)
    out = Path(args.out_dir)
    pm.save_pretrained(out)
    scores.to_json(out / "page_scores.json")
    (out / "domlora_placement.json").write_text(json.dumps(pm.domlora_placement.to_dict(), indent=1))
    print(f"adapter: {out} (adapter_config.json, adapter_model.safetensors), with page_scores.json and domlora_placement.json")
    print(f"load it with: PeftModel.from_pretrained(base_model, {str(out)!r})")
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

    p = sub.add_parser("apply", help="probe, then save a peft adapter on the top-PAGE module(s), lora_A set to the probe's A")
    add_probe_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=_positive(int), default=None, help="adapt the K highest-PAGE modules (default 1)")
    g.add_argument("--budget", type=_budget, default=None,
                   help="trainable parameters: a count (20000), a fraction (0.01) or a percentage (1%%) of vanilla LoRA "
                        "on all probed modules at --rank; modules by PAGE per parameter, ranks up to --rank")
    g.add_argument("--top-p", type=float, default=None, help="like --budget, until the adapters carry this fraction of the PAGE mass")
    p.add_argument("--variant", choices=("lora", "dora", "rslora", "adalora"), default="lora")
    p.add_argument("--rank-pattern", choices=("page",), default=None, help="page: ranks proportional to PAGE over the top-k")
    p.add_argument("--total-step", type=_positive(int), default=None, help="training steps (required by --variant adalora)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT.parent / "adapter", help="adapter folder (default: domlora_out/adapter)")
    _add_confidence_args(p)
    p.set_defaults(func=cmd_apply)

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
