"""Expert weights of mixture-of-experts models: layouts, the routed forward, the
probe's matrices in peft's layout, and the per-expert energies against both oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from domlora_kernels.probe.experts import (
    draw_expert_A,
    draw_expert_B,
    find_expert_weights,
    routed_experts,
    unknown_weights,
)
from domlora_kernels.lora_init import draw_lora_A, draw_lora_B
from domlora_kernels.testing import rel_err
from domlora_kernels.testing import sample_batch
from domlora_kernels.testing import MOE_ARCHS, tiny_moe

IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]


def _batch():
    return sample_batch([9, 5, 12], seed=1)


def _identity_tap(seen: list):
    def tap(name, y, x, routing):
        seen.append((name, tuple(y.shape), tuple(x.shape), sum(routing.counts)))
        return y
    return tap


def _logits_and_input_grad(model, batch):
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False).logits
    (logits.square() * batch["attention_mask"][..., None]).sum().backward()
    return logits.detach(), emb.grad


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_weights_found_with_peft_shapes(arch):
    model = tiny_moe(arch)
    weights = find_expert_weights(model)
    names = [w.name for w in weights]
    assert names == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    hidden = model.config.hidden_size
    inter = model.config.moe_intermediate_size if arch.startswith("qwen") else model.config.intermediate_size
    for w in weights:
        assert w.num_experts == 4
        want = (hidden, 2 * inter) if w.parameter == "gate_up_proj" else (inter, hidden)
        assert (w.in_features, w.out_features) == want, w.name
    assert unknown_weights(model) == {}


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_routed_forward_equals_each_implementation(arch, impl):
    """The probe's per-expert forward gives the model's output and every upstream gradient."""
    model = tiny_moe(arch, experts_implementation=impl)
    batch = _batch()
    ref_logits, ref_grad = _logits_and_input_grad(model, batch)
    seen = []
    modules = {w.module: _identity_tap(seen) for w in find_expert_weights(model)}
    with routed_experts(modules):
        logits, grad = _logits_and_input_grad(model, batch)
    assert rel_err(logits, ref_logits) < 1e-6
    assert rel_err(grad, ref_grad) < 1e-5
    tokens = batch["input_ids"].numel()
    # each layer's two weights tapped once, on all tokens * top_k routed rows
    assert [s[0] for s in seen] == ["gate_up_proj", "down_proj"] * 2
    assert all(s[3] == tokens * 2 for s in seen)
    assert all("forward" not in m.__dict__ for m in modules)
    again, _ = _logits_and_input_grad(model, batch)
    assert torch.equal(again, ref_logits)


def test_routed_forward_restored_on_error():
    model = tiny_moe("mixtral")
    experts = [w.module for w in find_expert_weights(model)][::2]
    sentinel = experts[1].forward = experts[1].forward  # an instance forward, as some libraries set

    def boom(name, y, x, routing):
        raise RuntimeError("tap failed")

    with pytest.raises(RuntimeError, match="tap failed"):
        with routed_experts({m: boom for m in experts}):
            model(**_batch(), use_cache=False)
    assert "forward" not in experts[0].__dict__
    assert experts[1].__dict__["forward"] is sentinel


def test_probe_matrices_in_peft_layout():
    """A: rows e*r:(e+1)*r of peft's lora_A [r*E, in]; B: columns e::E of lora_B [out, r*E]."""
    a = draw_expert_A("x.experts.down_proj", 3, 4, 10, seed=7)
    b = draw_expert_B("x.experts.down_proj", 3, 4, 6, seed=7)
    flat_a = draw_lora_A("x.experts.down_proj", 12, 10, 7)
    flat_b = draw_lora_B("x.experts.down_proj", 12, 6, 7)
    assert a.shape == (4, 3, 10) and b.shape == (4, 6, 3)
    for e in range(4):
        assert torch.equal(a[e], flat_a[3 * e:3 * e + 3])
        assert torch.equal(b[e], flat_b[:, e::4])
    # peft's own mapping of the factors to the experts' deltas (ParamWrapper.get_delta_weight)
    delta = torch.einsum("ore,eri->eoi", flat_b.view(6, 3, 4), flat_a.view(4, 3, 10))
    assert torch.allclose(delta, b @ a)


class _Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 8, 8))
        self.conv = nn.Conv2d(2, 2, 3)
        self.proj = nn.Linear(8, 8)


def test_unknown_weights_named_and_convolutions_not():
    assert unknown_weights(_Fused()) == {"w": (4, 8, 8)}


def test_candidates_take_expert_weights_in_model_order():
    from domlora_kernels.probe.candidates import find_candidates

    model = tiny_moe("qwen2_moe")
    cands = find_candidates(model)
    names = [c.name for c in cands if c.layer == 0]
    assert names == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj", "mlp.shared_expert_gate")]
    experts = {c.name: c for c in cands if c.parameter is not None}
    down = experts["model.layers.1.mlp.experts.down_proj"]
    assert (down.type, down.layer, down.num_experts, down.in_features, down.out_features) == ("experts.down_proj", 1, 4, 24, 32)
    assert down.weight is model.model.layers[1].mlp.experts.down_proj
    assert cands[0].weight is model.model.layers[0].self_attn.q_proj.weight
    assert all(c.type != "gate" for c in cands)  # routers are no candidates, as in peft
    picked = find_candidates(model, ["experts.down_proj"])
    assert [c.name for c in picked] == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    rest = find_candidates(model, exclude_modules=r".*experts\..*")
    assert [c for c in rest if c.parameter is not None] == [] and len(rest) == len(cands) - 4


class _Remote(nn.Module):
    """An MoE block in a layout the probe does not know (expert weights as 3D w1/w2)."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.zeros(4, 16, 8))
        self.experts.w2 = nn.Parameter(torch.zeros(4, 8, 16))


def test_unknown_layouts_refused_by_name_unless_excluded():
    from domlora_kernels.probe.candidates import find_candidates

    model = _Remote()
    with pytest.raises(ValueError, match=r"experts\.w1 \[4, 16, 8\].*exclude_modules=\['experts.w1', 'experts.w2'\]"):
        find_candidates(model)
    with pytest.raises(ValueError, match=r"experts\.w2"):
        find_candidates(model, r"experts\.w2")
    assert [c.name for c in find_candidates(model, exclude_modules=["experts.w1", "experts.w2"])] == ["q_proj"]
    assert [c.name for c in find_candidates(model, ["q_proj"])] == ["q_proj"]  # not selected: nothing to refuse


# ------------------------------------------------------------------ page_scores against the oracles
def _batches():
    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]


# per (projection, estimator): the naive oracle's entry, and whether it is [N, E] per sample (fisher)
ORACLE_KEYS = {("A", "fisher"): "A", ("B", "fisher"): "B", ("expected", "fisher"): "full",
               ("A", "gradient"): "A_mean", ("B", "gradient"): "B_mean"}
TOL = 1e-4  # relative error below 1e-4 against both oracles (float32 models)


@pytest.fixture(scope="module")
def naive_by_arch():
    from domlora_kernels.testing import naive_expert_energies

    return {arch: naive_expert_energies(tiny_moe(arch), _batches(), rank=3, seed=5, lora_alpha=6) for arch in MOE_ARCHS}


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("projection,estimator", list(ORACLE_KEYS), ids=[f"{p}-{e}" for p, e in ORACLE_KEYS])
def test_expert_page_matches_naive_autograd(arch, projection, estimator, naive_by_arch):
    from domlora_kernels import page_scores

    model = tiny_moe(arch)
    got = page_scores(model, _batches(), rank=3, seed=5, lora_alpha=6, projection=projection, estimator=estimator,
                      target_modules=["experts.gate_up_proj", "experts.down_proj"], progress=False)
    ref = naive_by_arch[arch]
    assert set(got.scores) == set(ref) and got.num_samples == 5
    s2 = (6 / 3) ** 2
    for name, want in ref.items():
        want = want[ORACLE_KEYS[projection, estimator]]
        if projection == "expected":  # r / (3n) ||G_e||^2, scaled
            want = want * s2 * 3 / (3 * got.modules[name].in_features)
        per_expert = want.mean(dim=0) if estimator == "fisher" else want  # [E]
        assert rel_err(torch.tensor(got.by_expert[name], dtype=torch.float64), per_expert) < TOL, name
        assert got.scores[name] == pytest.approx(float(per_expert.sum()), rel=TOL), name
        if estimator == "fisher":  # per sample: the sum over the experts
            assert rel_err(got.per_sample[name][0], want.sum(dim=1)) < TOL, name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_page_matches_peft_target_parameters(arch):
    """||lora_B.grad||^2 of peft's LoRA on the expert weights, lora_A = the probe's A, per expert."""
    from domlora_kernels import page_scores
    from domlora_kernels.testing import peft_expert_energies

    model = tiny_moe(arch)
    got = page_scores(model, _batches(), rank=4, lora_alpha=8, seed=3, target_modules=r".*experts\..*",
                      progress=False)
    want = peft_expert_energies(model, _batches(), rank=4, lora_alpha=8, seed=3)
    for name, per in want.items():  # [N, E]
        assert rel_err(torch.tensor(got.by_expert[name], dtype=torch.float64), per.mean(dim=0)) < TOL, name
        assert rel_err(got.per_sample[name][0], per.sum(dim=1)) < TOL, name
        i = got.modules[name]
        assert got.lora_A[name].shape == (4 * i.num_experts, i.in_features)  # peft's lora_A, ready to copy


@pytest.mark.parametrize("projection", ["A", "expected"])
def test_float64_is_exact(projection, naive_by_arch):
    """In float64 (eager experts: grouped_mm takes no float64) the probe is exact to rounding."""
    from domlora_kernels import page_scores
    from domlora_kernels.testing import naive_expert_energies

    model = tiny_moe("gpt_oss", torch.float64, experts_implementation="eager")
    got = page_scores(model, _batches(), rank=3, seed=5, lora_alpha=6, projection=projection,
                      target_modules=r".*experts\..*", progress=False)
    ref = naive_expert_energies(model, _batches(), rank=3, seed=5, lora_alpha=6)
    for name, want in ref.items():
        per = want["A"] if projection == "A" else want["full"] * 4 * 3 / (3 * got.modules[name].in_features)
        assert rel_err(torch.tensor(got.by_expert[name], dtype=torch.float64), per.mean(dim=0)) < 1e-10, name


def test_two_seeds_and_AB_in_one_pass():
    from domlora_kernels import page_scores
    from domlora_kernels.testing import naive_expert_energies

    model = tiny_moe("mixtral")
    got = page_scores(model, _batches(), rank=3, seed=[5, 7], projection="AB", target_modules=["experts.down_proj"],
                      progress=False)
    for j, seed in enumerate((5, 7)):
        ref = naive_expert_energies(model, _batches(), rank=3, seed=seed)
        for name in got.scores:
            want = ref[name]["A"] + ref[name]["B"]  # [N, E]
            assert rel_err(got.per_sample[name][j], want.sum(dim=1)) < TOL
            assert got.by_seed[seed][name] == pytest.approx(float(want.sum(dim=1).mean()), rel=TOL)


def test_shared_expert_and_its_gate_scored_per_sample():
    """Qwen2-MoE feeds its shared expert (nn.Linear) and the gate the tokens flattened [B*T, h]."""
    from domlora_kernels import page_scores
    from domlora_kernels.testing import naive_page

    model = tiny_moe("qwen2_moe")
    got = page_scores(model, _batches(), rank=3, seed=5, target_modules=r".*shared_expert.*", progress=False)
    assert len(got.scores) == 8  # gate, up, down and the gate of the shared expert, 2 layers
    want, want_per = naive_page(model, _batches(), list(got.scores), rank=3, seed=5)
    for name in want:
        assert rel_err(got.per_sample[name][0], want_per[name]) < TOL, name


def test_model_left_as_found_and_output_unchanged():
    from domlora_kernels import page_scores

    model = tiny_moe("gpt_oss")
    batch = _batch()
    before = model(**batch, use_cache=False).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    page_scores(model, _batches(), rank=2, progress=False)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(**batch, use_cache=False).logits, before)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_expert_scores(use_reentrant):
    import warnings

    from domlora_kernels import page_scores

    model = tiny_moe("qwen3_moe")
    plain = page_scores(model, _batches(), rank=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed the method
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda *a: calls.append(1))  # the router, before the experts
    ckpt = page_scores(model, _batches(), rank=3, progress=False)
    assert len(calls) == 2 * len(_batches()), "the layer was not recomputed: checkpointing was not active"
    assert plain.by_expert.keys() == ckpt.by_expert.keys() and plain.by_expert
    for name, vals in plain.by_expert.items():
        assert rel_err(torch.tensor(ckpt.by_expert[name], dtype=torch.float64), torch.tensor(vals, dtype=torch.float64)) < 1e-6


def test_by_expert_round_trips_through_json(tmp_path):
    from domlora_kernels import page_scores
    from domlora_kernels.scores import PageScores

    got = page_scores(tiny_moe("mixtral"), _batches(), rank=2, progress=False)
    back = PageScores.from_json(got.to_json(tmp_path / "s.json"))
    assert back.by_expert == got.by_expert and len(got.by_expert) == 4
    name = "model.layers.1.mlp.experts.down_proj"
    assert back.modules[name].num_experts == 4 and back.modules[name].expert_weight
    assert torch.equal(back.lora_A[name], got.lora_A[name])
    assert sum(got.by_expert[name]) == pytest.approx(got.scores[name], rel=1e-12)


@pytest.mark.slow
def test_cli_probe_ranks_expert_weights_of_a_saved_moe_model(tmp_path, capsys):
    """`domlora probe --model <folder>` on a tiny Mixtral saved with save_pretrained."""
    import json

    import transformers as tf

    from domlora_kernels.cli import main
    from domlora_kernels.models import load_model

    _, tok = load_model()  # the embedded model's tokenizer, saved next to the tiny MoE
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    tf.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    out = tmp_path / "r.json"
    assert main(["probe", "--model", str(tmp_path / "moe"), "--num-samples", "8", "--batch-size", "4",
                 "--max-length", "256", "--top", "12", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    experts = [m for m in report["modules"] if "experts" in m]
    assert [m["name"] for m in experts] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                            for p in ("gate_up_proj", "down_proj")]
    for m in experts:
        assert m["type"] == "experts." + m["name"].rsplit(".", 1)[1] and m["num_experts"] == 4
        assert sum(m["experts"]) == pytest.approx(m["page"], rel=1e-9) and m["page"] > 0
        assert f"{m['name']}  [4 experts]" in text
    assert len(report["modules"]) == 12  # q, k, v, o and the two expert weights, in both layers


# ------------------------------------------------------------------ placement through target_parameters
def _placed_layers(pm) -> dict:
    """expert weight name -> peft's ParamWrapper holding its adapter."""
    from domlora_kernels.placement.wiring import adapted_layers as _adapted_layers

    return _adapted_layers(pm.get_base_model(), "default")


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_apply_domlora_on_expert_weights_first_step_identity(variant):
    """The adapter placed on an expert weight gets, per sample and per expert, the probe's energy."""
    import copy

    from domlora_kernels import apply_domlora, page_scores
    from domlora_kernels.probe.losses import causal_lm_losses

    model = tiny_moe("qwen3_moe")
    rslora = variant == "rslora"
    scores = page_scores(model, _batches(), rank=4, lora_alpha=8, use_rslora=rslora, progress=False)
    experts_ranked = [n for n, _ in scores.ranked() if scores.modules[n].expert_weight]
    top_k = [n for n, _ in scores.ranked()].index(experts_ranked[0]) + 1  # down to the best expert weight
    pm = apply_domlora(copy.deepcopy(model), scores, r=4, lora_alpha=8, top_k=top_k, variant=variant, verbose=False)
    placement = pm.domlora_placement
    name = experts_ranked[0]
    assert name in placement.targets and name in placement.copied_A
    layers = _placed_layers(pm)
    assert sorted(layers) == sorted(placement.targets)
    layer = layers[name]
    num_experts = scores.modules[name].num_experts
    assert layer.lora_A["default"].weight.shape == (4 * num_experts, scores.modules[name].in_features)
    assert torch.equal(layer.lora_A["default"].weight, scores.lora_A[name])
    per = []
    for batch in _batches():
        for b in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][b:b + 1, :int(batch["attention_mask"][b].sum())]
            pm.zero_grad(set_to_none=True)
            causal_lm_losses(pm(input_ids=ids, use_cache=False).logits, ids)[0].backward()
            g = layer.lora_B["default"].weight.grad.double()
            per.append(torch.stack([g[:, e::num_experts].square().sum() for e in range(num_experts)]))
    per = torch.stack(per)  # [N, E]
    assert rel_err(per.sum(dim=1), scores.per_sample[name][0]) < TOL
    assert rel_err(per.mean(dim=0), torch.tensor(scores.by_expert[name], dtype=torch.float64)) < TOL
    # trainable parameters: r * E * (n + m) for the expert weight, r * (n + m) per module
    want = sum(4 * i.num_experts * (i.in_features + i.out_features) for i in map(scores.modules.get, placement.targets))
    assert placement.trainable_params == want


def test_budget_counts_every_expert_and_ranks_expert_weights_without_peft_noise():
    import copy
    import warnings

    from domlora_kernels import apply_domlora, page_scores
    from domlora_kernels.placement.budget import rank_unit, vanilla_lora_params

    model = tiny_moe("mixtral")
    scores = page_scores(model, _batches(), rank=4, target_modules=["experts.down_proj", "q_proj"], progress=False)
    info = scores.modules["model.layers.0.mlp.experts.down_proj"]
    assert rank_unit(info) == 4 * (48 + 32)
    assert vanilla_lora_params(scores, 4) == sum(4 * rank_unit(i) for i in scores.modules.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft's "rank_pattern keys did not match" must not leak
        pm = apply_domlora(copy.deepcopy(model), scores, r=4, lora_alpha=8, budget="40%", verbose=False, strategy="page")
    placement = pm.domlora_placement
    assert placement.trainable_params <= placement.budget
    layers = _placed_layers(pm)
    for name, k in placement.ranks.items():
        e = scores.modules[name].num_experts
        assert layers[name].lora_A["default"].weight.shape[0] == k * e, name
    assert any(scores.modules[n].expert_weight for n in placement.targets)


def test_expert_weights_only_and_dora_refused_by_name():
    from domlora_kernels import apply_domlora, domlora_config, page_scores

    model = tiny_moe("mixtral")
    scores = page_scores(model, _batches(), rank=2, target_modules=["experts.down_proj"], progress=False)
    with pytest.raises(ValueError, match=r"variant 'dora' cannot adapt the expert weights \['model\.layers\.\d\.mlp\.experts\.down_proj'\]"):
        domlora_config(scores, variant="dora", strategy="page")
    cfg = domlora_config(scores, top_k=2)
    assert not cfg.target_modules and sorted(cfg.target_parameters) == sorted(scores.scores)
    pm = apply_domlora(model, scores, top_k=2, verbose=False)  # no module adapted besides the two weights
    assert sorted(_placed_layers(pm)) == sorted(scores.scores)
