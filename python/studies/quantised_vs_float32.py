"""PAGE of SmolLM2-135M-Instruct loaded 4-bit (bitsandbytes NF4, the QLoRA recipe) against float32.

1. The 4-bit probe against peft's LoRA on the same 4-bit model (lora_A = the probe's A, B = 0):
   per-sample ||lora_B.grad||^2 on the first few shipped samples, every module.
2. The 4-bit probe against the float32 probe on the whole shipped calibration set: the same
   dominant module?, rank correlation, top-10 overlap.

Run from the repository root (CPU: several minutes, most of it quantising the model on load):
    python -m python.studies.quantised_vs_float32 > python/results/quantised_vs_float32.txt
``--num-samples N`` uses the first N shipped samples (the four tasks interleaved).
"""

from __future__ import annotations

import argparse
import time

from domlora_kernels import compare, page_scores
from domlora_kernels.data import load_calibration, make_batches
from domlora_kernels.models import load_model
from domlora_kernels.testing import peft_lora_energies

RANK, ALPHA, ORACLE_SAMPLES = 8, 16, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=None, help="first N shipped samples (default: all 48)")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    records = load_calibration()[: args.num_samples]
    t0 = time.perf_counter()
    f32, tok = load_model()
    q4, _ = load_model(load_in_4bit=True)
    print(f"loaded float32 and 4-bit SmolLM2 in {time.perf_counter() - t0:.0f} s; "
          f"4-bit layer: {type(q4.model.layers[0].mlp.down_proj).__name__}")
    batches = make_batches(records, tok, batch_size=8, max_length=args.max_length)
    kw = dict(rank=RANK, lora_alpha=ALPHA, progress=False)

    few = make_batches(records[:ORACLE_SAMPLES], tok, batch_size=2, max_length=args.max_length)
    got = page_scores(q4, few, **kw)
    s32 = page_scores(f32, batches, **kw)
    s4 = page_scores(q4, batches, **kw)
    want = peft_lora_energies(q4, few, got, "A", RANK, ALPHA)  # wraps q4 in peft: last
    rel = max(float(((got.per_sample[n][0] - want[n]).abs() / want[n].abs().clamp_min(1e-300)).max()) for n in want)
    print(f"1. 4-bit probe vs peft lora_B.grad on the 4-bit model: {len(want)} modules x {ORACLE_SAMPLES} samples, "
          f"max per-sample relative error {rel:.2e}")

    print(f"2. 4-bit vs float32 probe on the shipped set ({s32.num_samples} samples, rank {RANK}, alpha {ALPHA}):")
    print(compare(s32, s4, top=10, label_a="float32", label_b="4-bit NF4").text())
    rel_scores = (sum((s4.scores[n] - s32.scores[n]) ** 2 for n in s32.scores) / sum(v ** 2 for v in s32.scores.values())) ** 0.5
    print(f"relative L2 difference of the score vectors: {rel_scores:.3f}")


if __name__ == "__main__":
    main()
