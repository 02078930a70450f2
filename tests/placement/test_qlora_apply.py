"""apply_domlora on a bitsandbytes 4-bit (and 8-bit) base: a trainable QLoRA model, prepared for
k-bit training as peft recommends, whose first per-sample ||lora_B.grad||^2 is the probe's energy."""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.probe.losses import causal_lm_losses
from domlora_kernels.models import load_model
from domlora_kernels.placement import apply_domlora
from domlora_kernels.testing import sample_batch

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra: pip install 'domlora_kernels[quant]'")
peft = pytest.importorskip("peft")
TOP = 3
RANK, ALPHA = 4, 8  # as the quantised probe test (tests/probe/test_quantised.py)


def _batches():
    return [sample_batch([7, 5], seed=1), sample_batch([6, 6, 3], seed=2)]


def _first_step_energies(pm, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Per sample, alone and unpadded: ||lora_B.grad||^2 of each named adapter after one backward."""
    layers = dict(pm.get_base_model().named_modules())
    out = {n: [] for n in names}
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            x = ids[: int(mask.sum())][None]
            pm.zero_grad(set_to_none=True)
            causal_lm_losses(pm(input_ids=x, use_cache=False).logits, x)[0].backward()
            for n in names:
                out[n].append(layers[n].lora_B["default"].weight.grad.double().square().sum())
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_first_step_lora_B_grad_is_the_probe_energy(tiny_folder, bits):  # noqa: F811
    """Tolerance 1e-4 per sample, as in test_quantised: float32 rounding of two summation orders."""
    model, _ = load_model(tiny_folder, load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    batches = _batches()
    scores = page_scores(model, batches, rank=RANK, lora_alpha=ALPHA, progress=False)
    pm = apply_domlora(model, scores, r=RANK, lora_alpha=ALPHA, top_k=TOP, verbose=False)
    pl = pm.domlora_placement
    assert len(pl.targets) == TOP and pl.copied_A == pl.targets
    layer = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}[bits]
    base = dict(pm.get_base_model().named_modules())
    assert all(isinstance(base[n].base_layer, layer) for n in pl.targets)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for m in pm.modules():  # eval mode on inputs without grad would repack 4-bit weights on an AVX512-BF16
        if hasattr(m, "support_avx512bf16_for_cpu"):  # CPU (a bfloat16 absmax); training and the probe do not
            m.support_avx512bf16_for_cpu = False
    got = _first_step_energies(pm, pl.targets, batches)
    for name in pl.targets:
        want = scores.per_sample[name][0]
        assert float(want.min()) > 0
        torch.testing.assert_close(got[name], want.double(), rtol=1e-4, atol=0)


def test_4bit_base_is_prepared_for_kbit_training(tiny_folder):  # noqa: F811
    """A bfloat16 compute dtype: peft's preparation casts the norms, embeddings and head to float32,
    keeps the 4-bit weights packed and frozen, and does not switch on gradient checkpointing."""
    model, _ = load_model(tiny_folder, load_in_4bit=True, dtype="bfloat16")
    assert model.model.norm.weight.dtype == torch.bfloat16
    scores = page_scores(model, _batches(), rank=RANK, lora_alpha=ALPHA, progress=False)
    pm = apply_domlora(model, scores, r=RANK, lora_alpha=ALPHA, top_k=1, verbose=False)
    base = pm.get_base_model()
    floats = {n: p.dtype for n, p in base.named_parameters() if type(p).__name__ != "Params4bit" and ".lora_" not in n}
    assert floats and set(floats.values()) == {torch.float32}, floats
    packed = [p for p in base.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and all(p.dtype == torch.uint8 and not p.requires_grad for p in packed)
    assert not base.is_activation_checkpointing


def test_full_precision_base_is_not_cast(tiny_folder):  # noqa: F811
    model, _ = load_model(tiny_folder, dtype="bfloat16")
    scores = page_scores(model, _batches(), rank=RANK, lora_alpha=ALPHA, progress=False)
    pm = apply_domlora(model, scores, r=RANK, lora_alpha=ALPHA, top_k=1, verbose=False)
    assert pm.get_base_model().model.norm.weight.dtype == torch.bfloat16
