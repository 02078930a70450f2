"""Quantised and low-precision bases: PAGE on bitsandbytes 4-bit / 8-bit layers is the gradient
energy peft's LoRA on those layers receives; bf16 against float32 on SmolLM2.

The quantised oracle runs on a tiny Llama saved to disk and loaded through ``load_model``
(quantising SmolLM2 on two CPU cores takes minutes; python/quantised_vs_float32.py does it and
records the result in python/results/quantised_vs_float32.txt).
"""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.models import load_model
from domlora_kernels.testing import peft_lora_energies as _peft_energies, rel_err_dict as _rel
from domlora_kernels.testing import sample_batch, tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra: pip install 'domlora_kernels[quant]'")

RANK, ALPHA = 4, 8


def _batches():
    return [sample_batch([7, 5], seed=1), sample_batch([6, 6, 3], seed=2)]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_probe_matches_peft(tiny_folder, bits):
    """The probe on Linear4bit / Linear8bitLt equals peft's per-sample ||lora_B.grad||^2.

    Both see the same forward (peft's B = 0 adds nothing) and the same output gradient of the
    quantised layer, so they differ only in float32 rounding of two summation orders over
    t * r <= 7 * 4 terms per entry: a relative error of ~1e-6. The tolerance, 1e-4 per
    sample, is 100 times that; a wrong projection, scaling or sample split is off by O(1).
    """
    model, _ = load_model(tiny_folder, load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    layer = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}[bits]
    assert all(isinstance(m, layer) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))
    batches = _batches()
    got = page_scores(model, batches, rank=RANK, lora_alpha=ALPHA, progress=False)
    assert len(got.scores) == 2 * 7 and got.num_samples == 5
    # The oracle runs peft in eval mode on inputs that do not require grad, where bitsandbytes (on an
    # AVX512-BF16 CPU) would repack the 4-bit weights with a bfloat16 absmax, a different forward
    # (~1e-3). The probe leaves that path off (docs/design.md, section 3), as training does; so does the oracle.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    per = _peft_energies(model, batches, got, "A", rank=RANK, alpha=ALPHA)
    for name, want in per.items():
        assert float(want.min()) > 0, name  # a real gradient reached every module
        torch.testing.assert_close(got.per_sample[name][0], want, rtol=1e-4, atol=0)
    assert _rel(got.scores, {n: float(v.mean()) for n, v in per.items()}) < 1e-5


def test_quantised_load_errors(tiny_folder):
    with pytest.raises(ValueError, match="choose one of load_in_4bit and load_in_8bit"):
        load_model(tiny_folder, load_in_4bit=True, load_in_8bit=True)


@pytest.mark.slow
def test_bf16_against_float32_on_smollm2():
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation); over 30
    layers the per-module energies move by a few percent, not by their order of magnitude,
    which spans ~4 decades over SmolLM2's 210 modules. So the score vectors must agree to a
    relative L2 error of 10% and the rankings must agree where they are not ties: Spearman
    >= 0.98 and at least 8 of the float32 top-10 in the bf16 top-10. Per-module equality is
    not asked of bf16.
    """
    from domlora_kernels.data import load_calibration, make_batches
    from domlora_kernels.report import compare

    runs = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(dtype=dtype)
        assert model.dtype == getattr(torch, dtype)
        batches = make_batches(load_calibration()[:4], tok, batch_size=2, max_length=96)
        runs[dtype] = page_scores(model, batches, rank=8, progress=False)
    f32, bf16 = runs["float32"], runs["bfloat16"]
    cmp = compare(f32, bf16, top=10)
    print(f"bf16 vs float32 on SmolLM2 (4 samples): relative L2 error {_rel(bf16.scores, f32.scores):.3g}, "
          f"Spearman {cmp.spearman:.4f}, top-10 overlap {len(cmp.overlap)}/10")  # shown with pytest -s
    assert _rel(bf16.scores, f32.scores) < 0.10
    assert cmp.spearman >= 0.98
    assert len(cmp.overlap) >= 8, cmp.text()
