"""Does PAGE follow activation scale? The first-token (attention-sink) test.

Hypothesis: PAGE goes where the inputs are large, and the largest inputs of a causal LM are the
"massive activations" of the first token (the attention sink), not where adaptation helps. Two
measurements per family on the shipped calibration set (all four tasks):

1. Per layer, the largest input-activation norm of each candidate module type, at the first
   position and at every other position, and the layer where the first position's norm first
   exceeds 10 times the largest of the other positions (where massive activations appear).
2. PAGE twice: as shipped, and with the first position excluded from the loss (its target,
   predicted from the first token, is ignored) and from the energies (``energy_mask``: the first
   position's input and output gradient do not enter any module's energy). Reported: the top-5
   of each, the Spearman correlation of the two rankings, the top-1's rank in the other, and the
   PAGE share by type in each.

    python -m python.studies.activation_scale --model smollm2-135m    # -> python/results/activation_scale/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from domlora_kernels import page_scores
from domlora_kernels.data import load_calibration, make_batches
from domlora_kernels.models import load_model
from domlora_kernels.probe.candidates import find_candidates
from domlora_kernels.stats import spearman

ROOT = Path(__file__).resolve().parents[2]
MASSIVE = 10.0  # "massive": the first position's largest input norm over 10x the other positions' largest


def activation_norms(model, batches) -> dict[str, dict]:
    """Per candidate: the largest input L2 norm at the first position and at the other attended positions."""
    cands = find_candidates(model)
    found = {c.name: {"first": 0.0, "rest": 0.0, "layer": c.layer, "type": c.type} for c in cands}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def f(mod, args, out):
            x = args[0].detach().float()
            norms = x.norm(dim=-1)  # [B, T]
            m = mask_now[0].bool()
            found[name]["first"] = max(found[name]["first"], float(norms[:, 0].max()))
            rest = norms[:, 1:][m[:, 1:]]
            if rest.numel():
                found[name]["rest"] = max(found[name]["rest"], float(rest.max()))
        return f

    hs = [c.module.register_forward_hook(hook(c.name)) for c in cands if c.parameter is None]
    try:
        with torch.no_grad():
            for b in batches:
                mask_now[:] = [b["attention_mask"]]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return found


def first_position_out(batches) -> list[dict]:
    """The same batches with the first position out of the loss and out of the energies."""
    out = []
    for b in batches:
        labels = b.get("labels", b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).clone()
        labels[:, :2] = -100  # position 1's target is predicted from position 0 (and position 0 is no target)
        energy = b["attention_mask"].bool().clone()
        energy[:, 0] = False
        out.append({**b, "labels": labels, "energy_mask": energy})
    return out


def by_type(scores) -> dict[str, float]:
    shares = scores.shares
    out: dict[str, float] = {}
    for n, info in scores.modules.items():
        out[info.type] = out.get(info.type, 0.0) + shares[n]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run(model_name: str, out_dir: Path) -> dict:
    model, tok = load_model(model_name)
    records = load_calibration()
    batches = make_batches(records, tok, 8, 256)
    norms = activation_norms(model, batches)
    layers = sorted({v["layer"] for v in norms.values() if v["layer"] is not None})
    per_layer = {L: {"first": max(v["first"] for v in norms.values() if v["layer"] == L),
                     "rest": max(v["rest"] for v in norms.values() if v["layer"] == L)} for L in layers}
    appear = next((L for L in layers if per_layer[L]["first"] > MASSIVE * per_layer[L]["rest"]), None)
    base = page_scores(model, batches, rank=8, progress=False)
    cut = page_scores(model, first_position_out(batches), rank=8, progress=False)
    names = list(base.scores)
    rho = spearman([base.scores[n] for n in names], [cut.scores[n] for n in names])
    rank_cut = {n: i + 1 for i, (n, _) in enumerate(cut.ranked())}
    rank_base = {n: i + 1 for i, (n, _) in enumerate(base.ranked())}
    result = {
        "model": model_name, "samples": base.num_samples,
        "per_layer_max_input_norm": per_layer, "massive_from_layer": appear, "massive_factor": MASSIVE,
        "spearman_base_vs_first_out": rho,
        "top5_base": [(n, round(100 * base.shares[n], 2)) for n, _ in base.ranked()[:5]],
        "top5_first_out": [(n, round(100 * cut.shares[n], 2)) for n, _ in cut.ranked()[:5]],
        "base_top1_rank_when_first_out": rank_cut[base.dominant_module],
        "first_out_top1_rank_in_base": rank_base[cut.dominant_module],
        "type_share_base": by_type(base), "type_share_first_out": by_type(cut),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{model_name}.json").write_text(json.dumps(result, indent=1))
    return result


def summary(r: dict) -> str:
    lines = [f"## {r['model']} ({r['samples']} samples of the shipped set)", "",
             f"- massive first-position inputs (> {r['massive_factor']:g}x the other positions' largest) from layer: "
             f"{r['massive_from_layer']}",
             "- largest input norm per layer, first position / other positions: " + ", ".join(
                 f"L{L}: {v['first']:.0f}/{v['rest']:.0f}" for L, v in r["per_layer_max_input_norm"].items()),
             f"- Spearman rho of the PAGE ranking with and without the first position: {r['spearman_base_vs_first_out']:.3f}",
             f"- top-5 as shipped: {r['top5_base']}", f"- top-5 without the first position: {r['top5_first_out']}",
             f"- the shipped top-1 ranks {r['base_top1_rank_when_first_out']} without the first position; the new "
             f"top-1 ranked {r['first_out_top1_rank_in_base']} as shipped",
             f"- PAGE share by type as shipped: { {k: round(100 * v, 1) for k, v in r['type_share_base'].items()} }",
             f"- without the first position: { {k: round(100 * v, 1) for k, v in r['type_share_first_out'].items()} }", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None, help="embedded model name (repeatable; default smollm2-135m)")
    ap.add_argument("--out", type=Path, default=ROOT / "python" / "results" / "activation_scale")
    args = ap.parse_args(argv)
    texts = []
    for name in args.model or ["smollm2-135m"]:
        texts.append(summary(run(name, args.out)))
        print(texts[-1], flush=True)
    md = args.out / "summary.md"
    old = md.read_text() if md.exists() else "# PAGE and the first token\n\nCommand: `python -m python.studies.activation_scale --model NAME`\n\n"
    kept = [blk for blk in old.split("\n## ") if not any(blk.startswith(f"{n} (") for n in (args.model or ["smollm2-135m"]))]
    md.write_text("\n## ".join(kept).rstrip() + "\n\n" + "\n".join(texts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
