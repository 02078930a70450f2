"""The probe leaves a bitsandbytes model bit for bit as found.

On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight (and switches to a
bfloat16 absmax) the first time it runs in eval mode on an input that does not require grad,
which is how the probe runs the first layer. The probe must not trigger that (the logits after
it would drift by ~1e-3), and must not hit its assertion on widths that are no multiple of 32.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.models import _source, load_model
from domlora_kernels.testing import sample_batch

bnb = pytest.importorskip("bitsandbytes", reason="the quant extra: pip install 'domlora_kernels[quant]'")


def _folder(tmp_path, hidden: int, inter: int):
    import transformers as tf

    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    smol = _source(None, True)[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smol}/{name}", tmp_path / name)
    return tmp_path


def _state(model):
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out[n] = (m.weight.data.clone(), qs.absmax.clone(), qs.dtype, qs.nested,
                      getattr(qs, "packing_format_for_cpu", False), m.compute_dtype)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_model_logits_bit_identical_after_the_probe(tiny_folder, bits):
    model, _ = load_model(tiny_folder, load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    batch = sample_batch([7, 5], seed=1)

    def logits():  # the user's ordinary forward (grad mode on, as in training code)
        return model(**batch, use_cache=False).logits.detach().clone()

    first = logits()
    state = _state(model)
    page_scores(model, [batch], rank=4, progress=False)
    after = _state(model)
    assert state.keys() == after.keys()
    for n in state:
        w, absmax, dtype, nested, packed, cdt = state[n]
        w2, absmax2, dtype2, nested2, packed2, cdt2 = after[n]
        assert torch.equal(w, w2) and torch.equal(absmax, absmax2), n
        assert (dtype, nested, packed, cdt) == (dtype2, nested2, packed2, cdt2), n
    assert torch.equal(logits(), first)


def test_4bit_width_not_a_multiple_of_32(tmp_path):
    """bitsandbytes' CPU repacking asserts N % 32 == 0; the probe must not reach it."""
    model, _ = load_model(_folder(tmp_path, hidden=48, inter=72), load_in_4bit=True)
    s = page_scores(model, [sample_batch([7, 5], seed=1)], rank=4, progress=False)
    assert s.num_samples == 2 and all(v > 0 for v in s.scores.values())


def test_4bit_state_restored_even_if_the_model_repacks(tiny_folder, monkeypatch):
    """The explicit restore, on its own: with the probe's avoidance switched off (a layer that
    repacks whatever the probe does), every layer still comes back as it was."""
    from domlora_kernels.probe import frozen

    monkeypatch.setattr(frozen, "_BNB_CPU_REPACK_FLAG", "_no_such_flag")  # the probe no longer avoids the repack
    model, _ = load_model(tiny_folder, load_in_4bit=True)
    batch = sample_batch([7, 5], seed=1)
    first = model(**batch, use_cache=False).logits.detach().clone()
    state = _state(model)
    page_scores(model, [batch], rank=4, progress=False)
    after = _state(model)
    for n in state:
        assert torch.equal(state[n][0], after[n][0]) and torch.equal(state[n][1], after[n][1]), n
        assert state[n][2:] == after[n][2:], n
    assert torch.equal(model(**batch, use_cache=False).logits, first)
