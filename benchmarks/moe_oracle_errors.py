"""PAGE of expert weights against both oracles, per MoE family: the worst relative errors.

From the repository root (output committed in benchmarks/results/moe_oracle_errors.txt):
    python -m benchmarks.moe_oracle_errors

Tiny random-weight float32 models built from configs (``domlora_kernels.testing.tiny_moe``:
Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss; 2 layers, 4 experts, top-2), two right-padded batches
of 5 samples.
Prints, per family, the worst relative error over the expert weights of ``page_scores``
against naive autograd (float64 energies of the full per-sample ``[E, out, in]`` gradient,
for each projection x estimator) and against peft's ``target_parameters`` LoRA
(``||lora_B.grad||^2`` per expert and per sample, ``lora_A`` = the probe's A). The same
comparisons run in CI with the bound 1e-4 (tests/probe/test_experts.py).
"""

from __future__ import annotations

import argparse

import torch

from domlora_kernels import page_scores
from domlora_kernels.testing import MOE_ARCHS, naive_expert_energies, peft_expert_energies, rel_err, sample_batch, tiny_moe

EXPERTS = r".*experts\..*"
# (projection, estimator) -> the naive oracle's entry
CASES = {("A", "fisher"): "A", ("B", "fisher"): "B", ("expected", "fisher"): "full",
         ("A", "gradient"): "A_mean", ("B", "gradient"): "B_mean"}


def _vs_naive(model, batches, projection, estimator, ref) -> float:
    got = page_scores(model, batches, rank=3, seed=5, lora_alpha=6, projection=projection, estimator=estimator,
                      target_modules=EXPERTS, progress=False)
    worst = 0.0
    for name, entries in ref.items():
        want = entries[CASES[projection, estimator]]
        if projection == "expected":  # s^2 r / (3n) ||G_e||^2, s = 6 / 3
            want = want * 4 * 3 / (3 * got.modules[name].in_features)
        per_expert = want.mean(dim=0) if estimator == "fisher" else want
        worst = max(worst, rel_err(torch.tensor(got.by_expert[name], dtype=torch.float64), per_expert))
        if estimator == "fisher":
            worst = max(worst, rel_err(got.per_sample[name][0], want.sum(dim=1)))
    return worst


def _vs_peft(model, batches) -> float:
    got = page_scores(model, batches, rank=4, lora_alpha=8, seed=3, target_modules=EXPERTS, progress=False)
    want = peft_expert_energies(model, batches, rank=4, lora_alpha=8, seed=3)
    return max(max(rel_err(torch.tensor(got.by_expert[n], dtype=torch.float64), per.mean(dim=0)),
                   rel_err(got.per_sample[n][0], per.sum(dim=1))) for n, per in want.items())


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    batches = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]
    print(f"{'family':<10} " + " ".join(f"{p + '-' + e:>18}" for p, e in CASES) + f" {'peft lora_B.grad':>18}")
    for arch in MOE_ARCHS:
        model = tiny_moe(arch)
        ref = naive_expert_energies(model, batches, rank=3, seed=5, lora_alpha=6)
        errs = [_vs_naive(model, batches, p, e, ref) for p, e in CASES] + [_vs_peft(model, batches)]
        print(f"{arch:<10} " + " ".join(f"{x:>18.1e}" for x in errs), flush=True)


if __name__ == "__main__":
    main()
