"""The probe on inputs that used to give silently wrong numbers or a bare traceback.

Each test names what it guards: a non-causal model probed as a causal LM, a model that
already carries peft adapters, left padding with user labels (against the unpadded oracle),
a loss_fn with too few losses, ids the model cannot embed, bad regexes, empty batches,
padding tokens as targets, inference mode, and a 4-bit model the probe must leave bit for
bit as found.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.probe.checks import PaddingTargetsWarning
from domlora_kernels.testing import naive_page, rel_err_dict, sample_batch, tiny_model
from test_probe_behaviour import _assert_same, _snapshot

LORA_SUBMODULES = ("lora_A", "lora_B", "lora_embedding", "lora_magnitude", "lora_dropout", "modules_to_save",
                   "original_module", "base_layer")


def _tiny_bert(cls_name: str, **cfg_kwargs):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=40, **cfg_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(tf, cls_name)(cfg).eval()


def _mlm_loss(model, batch):
    """A masked-LM style loss of the user's own: per-sample mean token log-loss, no shift."""
    logits = model(input_ids=batch["input_ids"]).logits.float()
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"], reduction="none")
    return tok.mean(dim=1)


# ------------------------------------------------------------------ 1. non-causal models
@pytest.mark.parametrize("cls_name,kwargs", [("BertForMaskedLM", {}), ("BertLMHeadModel", {}),
                                             ("BertLMHeadModel", {"is_decoder": False})])
def test_encoder_only_model_is_refused_without_a_loss_fn(cls_name, kwargs):
    model = _tiny_bert(cls_name, **kwargs)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"not a causal language model.*default loss is next-token prediction under "
                                         r"causal attention.*pass loss_fn"):
        page_scores(model, [sample_batch([6, 4])], rank=2, progress=False)
    _assert_same(before, _snapshot(model))


def test_encoder_only_model_with_its_own_loss_fn_is_probed():
    model = _tiny_bert("BertForMaskedLM")
    s = page_scores(model, [sample_batch([6, 6])], rank=2, loss_fn=_mlm_loss, progress=False)
    assert s.num_samples == 2 and all(v > 0 for v in s.scores.values())


def test_bert_as_a_decoder_is_probed():
    model = _tiny_bert("BertLMHeadModel", is_decoder=True)
    s = page_scores(model, [sample_batch([6, 4])], rank=2, progress=False)
    assert s.num_samples == 2


def test_encoder_decoder_model_is_refused():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=101, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match=r"encoder-decoder.*pass loss_fn"):
        page_scores(model, [sample_batch([6, 4])], rank=2, progress=False)


def test_logits_that_are_not_per_token_are_refused():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=40, num_labels=3, pad_token_id=0)).eval()
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\), not \[B, T, vocab\].*pass loss_fn"):
        page_scores(model, [sample_batch([6, 6])], rank=2, progress=False)


# ------------------------------------------------------------------ 2. models with peft adapters
def _peft_model(base, **extra):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "down_proj"], **extra))
    torch.manual_seed(1)
    with torch.no_grad():  # nonzero B: the adapters change the model's output while enabled
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return pm


def _assert_no_lora_candidates(scores):
    bad = [n for n in scores.scores if any(part in n.split(".") or part in n for part in LORA_SUBMODULES)]
    assert not bad, bad


@pytest.mark.parametrize("wrap", ["peft_model", "injected", "modules_to_save"])
def test_model_with_lora_adapters_probes_the_base_layers_under_base_names(wrap):
    base = tiny_model("llama", torch.float64)
    batches = [sample_batch([9, 5, 12], seed=1)]
    want = page_scores(base, batches, rank=3, progress=False)
    if wrap == "injected":
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), copy.deepcopy(base))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    else:
        model = _peft_model(base, **({"modules_to_save": ["lm_head"]} if wrap == "modules_to_save" else {}))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        out_before = model(input_ids=ids).logits
        assert not torch.allclose(out_before, base(input_ids=ids).logits)  # the adapters are live
    before = _snapshot(model)
    got = page_scores(model, batches, rank=3, progress=False)
    _assert_no_lora_candidates(got)
    assert list(got.scores) == list(want.scores)  # the base model's names, in its order
    assert rel_err_dict(got.scores, want.scores) < 1e-12  # the base model's PAGE: adapters off during the probe
    _assert_same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, out_before)  # adapters enabled again


def test_merged_lora_adapters_are_refused():
    pm = _peft_model(tiny_model("llama"))
    pm.merge_adapter()
    before = _snapshot(pm)
    with pytest.raises(ValueError, match=r"merged.*unmerge_adapter\(\)"):
        page_scores(pm, [sample_batch([6, 4])], rank=2, progress=False)
    _assert_same(before, _snapshot(pm))


# ------------------------------------------------------------------ 6. left padding with labels
def _left_padded(right: dict, lengths: list[int], convention: str) -> dict:
    """The rows of a right-padded batch moved to the right end, with position ids as ``generate``
    makes them (``pads0``: pads at 0, ``pads1``: pads at 1) and labels -100 on the pads."""
    t = right["input_ids"].shape[1]
    ids = torch.zeros_like(right["input_ids"])
    mask = torch.zeros_like(right["attention_mask"])
    labels = torch.full_like(ids, -100)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = right["input_ids"][b, :n]
        labels[b, t - n:] = right["labels"][b, :n]
        mask[b, t - n:] = 1
    pos = mask.cumsum(-1) - 1
    pos = pos.clamp(min=0) if convention == "pads0" else pos.masked_fill(mask == 0, 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("convention", ["pads0", "pads1"])
def test_left_padding_with_labels_matches_the_unpadded_oracle(arch, convention):
    """With labels, the first real token after left padding is no target (it would be
    predicted from a pad): the probe equals one unpadded sample at a time."""
    model = tiny_model(arch, torch.float64)
    lengths = [9, 12, 6]
    right = sample_batch(lengths, seed=7)
    labels = right["input_ids"].masked_fill(right["attention_mask"] == 0, -100)
    labels[1, 4:6] = -100  # an ignored span inside a row too
    right = dict(right, labels=labels)
    left = _left_padded(right, lengths, convention)
    got = page_scores(model, [left], rank=3, projection="AB", progress=False)
    want, want_per = naive_page(model, [right], list(got.scores), rank=3, projection="AB")
    assert rel_err_dict(got.scores, want) < 1e-10
    for name in want:
        torch.testing.assert_close(got.per_sample[name][0], want_per[name], rtol=1e-9, atol=0)


def test_labels_on_padding_positions_are_not_targets():
    """Right padding whose labels were not set to -100 on the pads: padding is no target."""
    model = tiny_model("llama", torch.float64)
    batch = sample_batch([9, 5, 12], seed=1)
    with_pad_labels = dict(batch, labels=batch["input_ids"].clone())  # pads (id 0) labelled as targets
    clean = dict(batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    a = page_scores(model, [with_pad_labels], rank=2, progress=False)
    b = page_scores(model, [clean], rank=2, progress=False)
    assert rel_err_dict(a.scores, b.scores) < 1e-12


# ------------------------------------------------------------------ 8. number of losses
def test_loss_fn_with_fewer_losses_than_samples_is_refused():
    model = tiny_model("llama")

    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"], use_cache=False).logits.float().logsumexp(-1).mean(-1)[:1]

    with pytest.raises(ValueError, match=r"batch 0: loss_fn returned 1 loss\(es\) for 2 samples \(input_ids rows\)"):
        page_scores(model, [sample_batch([6, 6])], rank=2, loss_fn=loss_fn, progress=False)


def test_custom_batch_type_counts_its_losses_as_samples():
    """A batch that is no dict with input_ids: the losses returned are the samples."""
    model = tiny_model("llama")
    ids = sample_batch([6, 6, 6], seed=2)["input_ids"]

    def loss_fn(m, batch):
        return m(input_ids=batch[0], use_cache=False).logits.float().logsumexp(-1).mean(-1)

    s = page_scores(model, [(ids,)], rank=2, loss_fn=loss_fn, progress=False)
    assert s.num_samples == 3


# ------------------------------------------------------------------ 9-11. ids, regexes, shapes
@pytest.mark.parametrize(
    "arch,make,match",
    [
        ("llama", lambda ids: ids.index_fill(1, torch.tensor([2]), 150),
         r"batch 0: token id 150 \(row 0, position 2\) is outside the model's vocabulary of 101 ids.*tokenizer"),
        ("llama", lambda ids: ids.index_fill(1, torch.tensor([1]), -100),
         r"batch 0: negative token id -100 \(row 0, position 1\) in input_ids.*-100 belongs in labels"),
        ("gpt2", lambda ids: torch.randint(3, 100, (1, 70)),
         r"batch 0: sequences of 70 tokens, longer than the model's limit of 64 positions \(config.n_positions\).*max_length"),
    ],
)
def test_ids_the_model_cannot_embed_are_named(arch, make, match):
    model = tiny_model(arch)
    ids = make(sample_batch([6, 6])["input_ids"])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        page_scores(model, [{"input_ids": ids}], rank=2, progress=False)
    _assert_same(before, _snapshot(model))


def test_label_outside_the_vocabulary_is_named():
    model = tiny_model("llama")
    batch = sample_batch([6, 6])
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][1, 3] = 500
    with pytest.raises(ValueError, match=r"label 500 \(sample 1\) is outside the model's 101 output classes"):
        page_scores(model, [batch], rank=2, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules="model.(layers"), r"target_modules='model.\(layers' is not a valid regular expression \(missing \),"),
    (dict(exclude_modules="[q_proj"), r"exclude_modules='\[q_proj' is not a valid regular expression"),
])
def test_invalid_regex_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        page_scores(tiny_model("llama"), [sample_batch([6, 4])], progress=False, **kwargs)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_names_its_index(shape):
    batches = [sample_batch([6, 4]), {"input_ids": torch.zeros(shape, dtype=torch.long)}]
    with pytest.raises(ValueError, match=rf"batch 1: input_ids has shape \({shape[0]}, {shape[1]}\)"):
        page_scores(tiny_model("llama"), batches, progress=False)


# ------------------------------------------------------------------ 20. padding as targets
def test_padding_without_mask_or_labels_warns():
    model = tiny_model("llama")
    model.config.pad_token_id = 0
    batch = sample_batch([9, 5, 12], seed=1)  # pads are id 0
    with pytest.warns(PaddingTargetsWarning, match=r"batch 0: rows start or end with runs of the pad token id 0 .*attention_mask"):
        page_scores(model, [{"input_ids": batch["input_ids"]}], rank=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaddingTargetsWarning)
        page_scores(model, [batch], rank=2, progress=False)  # with the mask: padding is no target, no warning
        model.config.eos_token_id = 0  # a tokenizer whose pad token is its EOS
        one = batch["input_ids"][:1, :9].clone()
        one[0, -1] = 0  # one trailing EOS: a sample that ends, no sign of padding
        page_scores(model, [{"input_ids": one}], rank=2, progress=False)
    one[0, -2] = 0  # two in a row: padding
    with pytest.warns(PaddingTargetsWarning, match=r"up to 2 per row"):
        page_scores(model, [{"input_ids": one}], rank=2, progress=False)


# ------------------------------------------------------------------ inference mode
def test_inference_mode_is_refused():
    model = tiny_model("llama")
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*needs autograd"):
        page_scores(model, [sample_batch([6, 4])], progress=False)
