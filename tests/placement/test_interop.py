"""domlora_config / apply_domlora with a user's own peft config (EVA, PiSSA, ...): PAGE only restricts
or rank-patterns its targets; every other setting carries over and the user's object is not changed."""

from __future__ import annotations

import copy

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.placement.budget import plan_budget
from domlora_kernels.placement import apply_domlora, domlora_config
from domlora_kernels.testing import sample_batch, tiny_model

peft = pytest.importorskip("peft")
LENGTHS = [9, 6, 12]


@pytest.fixture(scope="module")
def probed():
    model = tiny_model("llama", torch.float32)
    return model, page_scores(model, [sample_batch(LENGTHS)], rank=4, lora_alpha=8, progress=False)


def eva_config(**overrides) -> "peft.LoraConfig":
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.05, bias="lora_only",
              init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.5, tau=0.9), task_type="CAUSAL_LM")
    return peft.LoraConfig(**{**kw, **overrides})


def _in_config(scores, types):
    return [n for n in scores.scores if n.rsplit(".", 1)[-1] in types]


def test_top_k_restricts_the_users_targets_and_keeps_the_rest(probed):
    _, scores = probed
    user = eva_config()
    before = copy.deepcopy(user.to_dict())
    cfg = domlora_config(scores, top_k=3, config=user)
    assert user.to_dict() == before  # not mutated
    allowed = _in_config(scores, {"q_proj", "v_proj", "down_proj"})
    want = sorted(allowed, key=lambda n: -scores.scores[n])[:3]
    got = cfg.to_dict()
    assert sorted(n for n in scores.scores if peft.tuners.tuners_utils.check_target_module_exists(cfg, n)) == sorted(want)
    same = {k: v for k, v in got.items() if k != "target_modules"}
    assert same == {k: v for k, v in before.items() if k != "target_modules"}
    assert cfg.init_lora_weights == "eva" and cfg.eva_config.rho == 1.5 and cfg.lora_dropout == 0.05
    assert cfg.bias == "lora_only" and cfg.rank_pattern == {} and cfg.alpha_pattern == {}


def test_budget_rank_patterns_the_users_config(probed):
    _, scores = probed
    user = eva_config(init_lora_weights="pissa", eva_config=None, use_rslora=True)
    before = copy.deepcopy(user.to_dict())
    allowed = _in_config(scores, {"q_proj", "v_proj", "down_proj"})
    plans = (plan_budget(scores, allowed, 4, budget=b) for b in range(800, 4000, 37))
    budget = next(p for p in plans if min(p.ranks.values()) < 4).budget  # a plan that cuts one module's rank
    cfg = domlora_config(scores, budget=budget, config=user, strategy="page")
    assert user.to_dict() == before
    assert [n for n in scores.scores if peft.tuners.tuners_utils.check_target_module_exists(cfg, n)] == [
        n for n in allowed if n in plan_budget(scores, allowed, 4, budget=budget).ranks]
    assert cfg.init_lora_weights == "pissa" and cfg.use_rslora and cfg.r == 4 and cfg.lora_alpha == 8
    assert len(cfg.rank_pattern) == 1 and len(cfg.alpha_pattern) == 1  # one module cut below rank 4
    (key, k), = cfg.rank_pattern.items()
    assert cfg.alpha_pattern[key] == pytest.approx(8 * (k / 4) ** 0.5)  # rsLoRA: alpha / sqrt(r) kept


def test_apply_keeps_the_users_init_and_eva_runs_on_it(probed):
    model, scores = probed
    pm = apply_domlora(copy.deepcopy(model), scores, top_k=2, config=eva_config(), verbose=False)
    placement = pm.domlora_placement
    assert placement.copied_A == [] and set(placement.kept_peft_init) == set(placement.targets)
    assert all("init_lora_weights='eva'" in why for why in placement.kept_peft_init.values())
    b = sample_batch(LENGTHS)
    loader = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}] * 4
    layers = dict(pm.get_base_model().named_modules())
    before = {n: layers[n].lora_A["default"].weight.clone() for n in placement.targets}
    peft.initialize_lora_eva_weights(pm, loader, show_progress_bar=False)
    layers = dict(pm.get_base_model().named_modules())  # EVA may rebuild the layers with its own ranks
    after = {n: layers[n].lora_A["default"].weight for n in placement.targets}
    assert all(after[n].shape != before[n].shape or not torch.equal(after[n], before[n]) for n in placement.targets)
    assert sorted(n for n, m in layers.items() if hasattr(m, "lora_A") and "default" in m.lora_A) == sorted(placement.targets)


def test_config_errors(probed):
    _, scores = probed
    with pytest.raises(ValueError, match="set r, lora_dropout in the LoraConfig"):
        domlora_config(scores, r=8, lora_dropout=0.1, config=eva_config())
    with pytest.raises(TypeError, match="config must be a peft.LoraConfig"):
        domlora_config(scores, config={"r": 4})
    with pytest.raises(ValueError, match="selects none of the 14 probed modules"):
        domlora_config(scores, config=eva_config(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already has a rank_pattern"):
        domlora_config(scores, budget=1500, config=eva_config(rank_pattern={"q_proj": 2}))
    with pytest.raises(ValueError, match=r"top_k must be an integer between 1 and 4"):  # 2 layers x (q, v)
        domlora_config(scores, top_k=5, config=eva_config(target_modules=["q_proj", "v_proj"]))
    kept = domlora_config(scores, top_k=2, config=eva_config(rank_pattern={"q_proj": 2}))  # no patterns of ours
    assert kept.rank_pattern == {"q_proj": 2}
    excl = domlora_config(scores, top_k=6, config=eva_config(target_modules="all-linear", exclude_modules=["v_proj"]))
    chosen = [n for n in scores.scores if peft.tuners.tuners_utils.check_target_module_exists(excl, n)]
    assert len(chosen) == 6 and not any(n.endswith("v_proj") for n in chosen)
