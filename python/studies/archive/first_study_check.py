"""Why did the first study (first_study.py, results in python/results/archive/first_study/) give
``dora_dom == domlora`` in all 12 runs, and why did ``domlora_rbig`` diverge? A few steps of each, measured.

    python -m python.studies.archive.first_study_check [--steps 8] [--out OUT/old_study_check.json]

(OUT = python/results/archive/first_study; notes on the output: OUT/old_study_notes.md.)
With the first study's settings (r=8, alpha=16; rbig r=192, alpha=384; AdamW, 10% warm-up then
linear decay, clip 1, batch 4, its chosen rate 1e-2) on the maths and instruction tasks, it records:

- DoRA at the dominant module: how far the magnitude vector moves from its start (``||W||`` per
  output row), relative; the held-out loss and greedy answers of DoRA against LoRA from the same A;
- rbig against r=8 on the same module: the norm of the learned update ``s B A`` per step
  (relative to ``||W||``) and the training loss, to see which one diverges and when.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from python.studies import tasks as study_tasks
from python.studies.archive import first_study

OLD = Path(first_study.OUT)  # the first study's results: its PAGE scores page_TASK.json


def _layer(model, name):
    return first_study._inner(model).get_submodule(name)


def delta_norm(layer) -> float:
    """``||s B A||_F`` of the adapter's update of the weight."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        return float((layer.scaling["default"] * b @ a).norm())


def train_tracking(model, name, enc, pad, steps, lr, seed):
    """first_study.train's loop, one step at a time, recording the update norm and the magnitude drift."""
    layer = _layer(model, name)
    mag = getattr(layer, "lora_magnitude_vector", None)
    m0 = None if not mag else mag["default"].weight.detach().clone()
    w = float(layer.base_layer.weight.norm())
    track = []
    losses = first_study.train(model, enc, pad, steps, 4, lr, seed, "check",
                         on_step=lambda: track.append({
                             "update_rel": delta_norm(layer) / w,
                             "mag_rel": None if m0 is None else float((mag["default"].weight - m0).norm() / m0.norm())}))
    return losses, track


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OLD / "old_study_check.json")
    args = ap.parse_args(argv)
    from domlora_kernels.models import load_model
    from domlora_kernels.scores import PageScores

    torch.set_num_threads(1)
    base, tok = load_model()
    for p in base.parameters():
        p.requires_grad_(False)
    out = {"steps": args.steps, "lr": 1e-2}
    # DoRA on maths (where dora_dom == domlora), rbig on instruction (where it diverged)
    for task, methods in (("math", ("domlora", "dora_dom")), ("instruction", ("domlora", "domlora_rbig"))):
        sc = PageScores.from_json(OLD / f"page_{task}.json")
        plan = {"scores": sc, "rbig": 192}
        sp = study_tasks.make_splits(task, 160, 16, 30, seed=0)  # the first study's splits
        enc = {k: [first_study.encode(it, tok, 128) for it in v] for k, v in sp.items()}
        res = {"module": sc.dominant_module}
        for method in methods:
            t0 = time.time()
            model, _ = first_study.build(method, base, plan, 0)
            losses, track = train_tracking(model, sc.dominant_module, enc["train"], tok.pad_token_id, args.steps, 1e-2, 0)
            res[method] = {"train_losses": losses, "track": track, "test_loss": first_study.eval_loss(model, enc["test"], tok.pad_token_id),
                           "answers": first_study.greedy_answers(model, tok, sp["test"][:8], study_tasks.MAX_NEW_TOKENS[task]),
                           "wall_s": time.time() - t0}
            print(task, method, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", f"test {res[method]['test_loss']:.4f}",
                  f"update/||W|| {track[-1]['update_rel']:.4f}", f"mag drift {track[-1]['mag_rel']}", flush=True)
        if "dora_dom" in res:
            res["dora_vs_lora_same_answers"] = sum(a == b for a, b in zip(res["domlora"]["answers"], res["dora_dom"]["answers"]))
        out[task] = res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
