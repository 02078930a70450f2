"""DomLoRA placement through peft: exact targets, the probe's A in lora_A, and oracle 2 of PAGE.md."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from domlora_kernels import page_scores
from domlora_kernels.probe.losses import causal_lm_losses
from domlora_kernels.placement import (
    Placement, apply_domlora, domlora_config, exact_names_regex, page_rank_pattern, top_modules,
)
from domlora_kernels.scores import ModuleInfo, PageScores

peft = pytest.importorskip("peft")
VOCAB = 101
LENGTHS = [9, 6, 12]  # right-padded rows of different lengths


def tiny_llama(seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return tf.LlamaForCausalLM(cfg).to(torch.float64).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def probed():
    """A float64 tiny Llama and its probe at rank 8, alpha 16 (scaling 2)."""
    model = tiny_llama()
    scores = page_scores(model, [batch()], rank=8, lora_alpha=16, progress=False)
    return model, scores


def synthetic_scores(pages: dict[str, float], shapes: dict[str, tuple[int, int]] | None = None, rank: int = 8) -> PageScores:
    shapes = shapes or {n: (16, 16) for n in pages}
    modules = {n: ModuleInfo(None, n.rsplit(".", 1)[-1], *shapes[n]) for n in pages}
    config = {"rank": rank, "projection": "A", "estimator": "fisher", "seeds": [0], "scaling": 1.0, "lora_alpha": None}
    return PageScores(dict(pages), {0: dict(pages)}, None, modules, 1, config)


def per_sample_lora_B_energies(pm, names: list[str], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[len(names), B]``: ||lora_B.grad||^2 after backpropagating each sample alone (unpadded)."""
    layers = dict(pm.get_base_model().named_modules())
    out = torch.zeros(len(names), len(LENGTHS), dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        ids = b["input_ids"][i : i + 1, :n]
        pm.zero_grad(set_to_none=True)
        loss = causal_lm_losses(pm(input_ids=ids, use_cache=False).logits, ids)[0]
        loss.backward()
        for j, name in enumerate(names):
            g = layers[name].lora_B["default"].weight.grad
            out[j, i] = g.to(torch.float64).square().sum()
    return out


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_lora_B_grad_energy_equals_probe_per_sample_energy(variant):
    """Oracle 2: the adapter DomLoRA places gets, per sample, exactly the energy the probe reported."""
    model = tiny_llama()
    scores = page_scores(model, [batch()], rank=8, lora_alpha=16, use_rslora=variant == "rslora", progress=False)
    pm = apply_domlora(copy.deepcopy(model), scores, r=8, lora_alpha=16, top_k=3, variant=variant, verbose=False)
    names = top_modules(scores, 3)
    layers = dict(pm.get_base_model().named_modules())
    for name in names:
        assert layers[name].lora_A["default"].weight.dtype == torch.float64
        assert layers[name].scaling["default"] == pytest.approx(scores.config["scaling"])
    energies = per_sample_lora_B_energies(pm, names, batch())
    for j, name in enumerate(names):
        ref = scores.per_sample[name][0]
        assert energies[j].min() > 0
        assert torch.allclose(energies[j], ref, rtol=1e-6, atol=0), (name, energies[j], ref)
        assert abs(energies[j].mean().item() - scores.scores[name]) <= 1e-6 * scores.scores[name]


def test_energy_scales_with_adapter_alpha_when_probe_used_another(probed):
    """Probe at scaling 2, adapter at alpha 32 / r 8 = 4: energies are 4x the probe's, as Placement says."""
    model, scores = probed
    pm = apply_domlora(copy.deepcopy(model), scores, r=8, lora_alpha=32, top_k=1, verbose=False)
    pl = pm.domlora_placement
    assert (pl.probe_scaling, pl.adapter_scaling) == (2.0, 4.0)
    name = pl.targets[0]
    e = per_sample_lora_B_energies(pm, [name], batch())[0]
    factor = (pl.adapter_scaling / pl.probe_scaling) ** 2
    assert torch.allclose(e, factor * scores.per_sample[name][0], rtol=1e-6, atol=0)


def test_apply_copies_probe_A_and_counts_parameters(probed, capsys):
    model, scores = probed
    base = copy.deepcopy(model)
    pm = apply_domlora(base, scores, r=8, lora_alpha=16, top_k=2, verbose=True)
    pl = pm.domlora_placement
    assert isinstance(pl, Placement)
    assert pl.targets == [n for n, _ in scores.ranked()[:2]]
    assert pl.copied_A == pl.targets and pl.kept_peft_init == {}
    layers = dict(pm.get_base_model().named_modules())
    for name in pl.targets:
        assert torch.equal(layers[name].lora_A["default"].weight.float(), scores.lora_A[name])
        assert torch.count_nonzero(layers[name].lora_B["default"].weight) == 0
    expect = sum(8 * (scores.modules[n].in_features + scores.modules[n].out_features) for n in pl.targets)
    vanilla = sum(8 * (i.in_features + i.out_features) for i in scores.modules.values())
    assert (pl.trainable_params, pl.vanilla_lora_params, pl.num_candidates) == (expect, vanilla, 14)
    assert pl.ratio == pytest.approx(expect / vanilla)
    out = capsys.readouterr().out
    assert f"trainable parameters: {expect:,} = {100 * expect / vanilla:.2f}% of vanilla LoRA on all 14" in out
    assert pl.targets[0] in out


def test_a_wide_plan_is_summarised_by_type_and_lists_its_first_modules(probed):
    model, scores = probed
    pl = apply_domlora(copy.deepcopy(model), scores, r=8, lora_alpha=16, top_k=14, verbose=False).domlora_placement
    text = pl.summary()
    assert "by type: " in text and "down_proj x2 at rank 8" in text
    assert sum(name in text for name in pl.targets) == Placement.SHOWN
    assert f"... and {14 - Placement.SHOWN} more" in text


def test_dora_lands_on_targets_with_probe_A_and_keeps_the_output(probed):
    model, scores = probed
    pm = apply_domlora(copy.deepcopy(model), scores, r=8, lora_alpha=16, top_k=2, variant="dora", verbose=False)
    assert pm.peft_config["default"].use_dora is True
    layers = {n: m for n, m in pm.get_base_model().named_modules() if hasattr(m, "lora_A")}
    targets = top_modules(scores, 2)
    assert sorted(n for n, m in layers.items() if "default" in m.lora_A) == sorted(targets)
    for name in targets:
        assert torch.equal(layers[name].lora_A["default"].weight.float(), scores.lora_A[name])
        assert "default" in layers[name].lora_magnitude_vector
    # B = 0 and DoRA's magnitude is ||W||: the wrapped model computes what the base model did
    ids = batch()["input_ids"][:1, :9]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        got = pm(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_adalora_needs_total_step_then_targets_exactly(probed):
    model, scores = probed
    with pytest.raises(ValueError, match="total_step"):
        domlora_config(scores, variant="adalora")
    with pytest.raises(ValueError, match="drop rank_pattern"):
        domlora_config(scores, variant="adalora", rank_pattern="page", total_step=100)
    cfg = domlora_config(scores, r=4, variant="adalora", total_step=100)
    assert isinstance(cfg, peft.AdaLoraConfig) and (cfg.target_r, cfg.init_r, cfg.total_step) == (4, 6, 100)
    pm = apply_domlora(copy.deepcopy(model), scores, r=4, top_k=2, variant="adalora", total_step=100, verbose=False)
    pl = pm.domlora_placement
    assert pl.copied_A == [] and sorted(pl.kept_peft_init) == sorted(top_modules(scores, 2))
    assert all(v == 6 for v in pl.ranks.values())
    adapted = [n for n, m in pm.get_base_model().named_modules() if hasattr(m, "lora_E")]
    assert sorted(adapted) == sorted(top_modules(scores, 2))


def test_config_per_variant(probed):
    _, scores = probed
    lora = domlora_config(scores, strategy="page")
    assert isinstance(lora, peft.LoraConfig) and not lora.use_dora and not lora.use_rslora
    assert lora.task_type == "CAUSAL_LM" and (lora.r, lora.lora_alpha) == (8, 16)
    assert domlora_config(scores, variant="dora", strategy="page").use_dora
    assert domlora_config(scores, variant="rslora", strategy="page").use_rslora
    assert domlora_config(scores, task_type="SEQ_CLS", strategy="page").task_type == "SEQ_CLS"
    assert domlora_config(scores, lora_dropout=0.1, strategy="page").lora_dropout == 0.1


class _Nested(nn.Module):
    """``a.proj`` and ``x.a.proj``: a full name that is a dotted suffix of another."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.proj = nn.Linear(16, 16)
        self.x = nn.Module()
        self.x.a = nn.Module()
        self.x.a.proj = nn.Linear(16, 16)

    def forward(self, h):
        return self.x.a.proj(self.a.proj(h))


def _adapted(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)


def test_exact_full_name_never_matches_a_longer_name():
    scores = synthetic_scores({"a.proj": 5.0, "x.a.proj": 1.0})
    # peft's list form would take both: the name "a.proj" is a dotted suffix of "x.a.proj"
    listed = peft.get_peft_model(_Nested(), peft.LoraConfig(target_modules=["a.proj"], r=2))
    assert _adapted(listed.get_base_model()) == ["a.proj", "x.a.proj"]
    pm = apply_domlora(_Nested(), scores, r=8, top_k=1, task_type=None, verbose=False)
    assert _adapted(pm.get_base_model()) == ["a.proj"]
    assert exact_names_regex(["a.proj"]) == r"(?:a\.proj)"


def test_page_rank_pattern_rule():
    s = synthetic_scores({"m.a": 3.0, "m.b": 1.0})
    assert page_rank_pattern(s, ["m.a", "m.b"], 8) == {"m.a": 12, "m.b": 4}
    s = synthetic_scores({"m.a": 1000.0, "m.b": 1e-9, "m.c": 1e-9})
    assert page_rank_pattern(s, ["m.a", "m.b", "m.c"], 2) == {"m.a": 4, "m.b": 1, "m.c": 1}
    s = synthetic_scores({"m.a": 5.0, "m.b": 3.0, "m.c": 2.0, "m.d": 0.0})
    ranks = page_rank_pattern(s, ["m.a", "m.b", "m.c"], 7)
    assert sum(ranks.values()) == 21 and ranks == {"m.a": 10, "m.b": 6, "m.c": 5}  # quotas 9, 5.4, 3.6 of 18


def test_page_rank_pattern_reaches_peft_and_warns_for_other_ranks(probed):
    model, scores = probed
    want = page_rank_pattern(scores, top_modules(scores, 3), 8)
    assert sum(want.values()) == 24
    with pytest.warns(UserWarning, match="differs from the probe's rank 8") as rec:
        pm = apply_domlora(copy.deepcopy(model), scores, r=8, top_k=3, rank_pattern="page", verbose=False)
    layers = dict(pm.get_base_model().named_modules())
    got = {n: layers[n].lora_A["default"].weight.shape[0] for n in want}
    assert got == want
    differ = [n for n, k in want.items() if k != 8]
    assert differ and all(any(n in str(w.message) for w in rec) for n in differ)
    assert sorted(pm.domlora_placement.copied_A) == sorted(n for n, k in want.items() if k == 8)


def test_rank_pattern_dict_and_bad_inputs(probed):
    model, scores = probed
    top = top_modules(scores, 2)
    cfg = domlora_config(scores, top_k=2, rank_pattern={top[1]: 3})
    assert list(cfg.rank_pattern.values()) == [3]
    with pytest.raises(ValueError, match="not among the top-2"):
        domlora_config(scores, top_k=2, rank_pattern={"nope": 3})
    with pytest.raises(ValueError, match="rank_pattern must be None, 'page'"):
        domlora_config(scores, rank_pattern="uniform", strategy="page")
    with pytest.raises(ValueError, match=r"top_k must be an integer between 1 and 14"):
        domlora_config(scores, top_k=0)
    with pytest.raises(ValueError, match=r"between 1 and 14"):
        domlora_config(scores, top_k=15)
    with pytest.raises(ValueError, match="unknown variant 'qlora'"):
        domlora_config(scores, variant="qlora", strategy="page")
    with pytest.raises(ValueError, match="target_modules is set by DomLoRA"):
        domlora_config(scores, target_modules=["q_proj"], strategy="page")
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        domlora_config(scores, lora_alpha=0, strategy="page")
    with pytest.raises(ValueError, match="does not match this model"):
        apply_domlora(nn.Linear(4, 4), scores, verbose=False, strategy="page")
    pm = apply_domlora(copy.deepcopy(model), scores, verbose=False, strategy="page")
    with pytest.raises(ValueError, match="already carries peft adapters"):
        apply_domlora(pm, scores, verbose=False, strategy="page")


def test_apply_takes_exactly_domlora_configs_arguments(probed):
    import inspect

    model, scores = probed
    kwargs = dict(r=4, lora_alpha=8, top_k=3, rank_pattern="page", lora_dropout=0.0)
    pm = apply_domlora(copy.deepcopy(model), scores, verbose=False, **kwargs, strategy="page")
    want = domlora_config(scores, **kwargs, strategy="page")
    got = pm.peft_config["default"]
    assert (got.target_modules, got.rank_pattern, got.r, got.lora_alpha) == (
        want.target_modules, want.rank_pattern, want.r, want.lora_alpha)
    params = list(inspect.signature(apply_domlora).parameters)
    assert params[:2] == ["model", "scores"] and params[2:-3] == list(inspect.signature(domlora_config).parameters)[1:-1]
    with pytest.raises(TypeError, match="takes domlora_config's arguments after the model"):
        apply_domlora(copy.deepcopy(model), scores, 8, 16, 1, "lora", None, "default")
