"""Placement strategies: every plan within its budget, deterministic, and clear errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from domlora_kernels import STRATEGIES, apply_domlora, domlora_config, measure_signals
from domlora_kernels.placement.budget import budget_params, rank_unit, vanilla_lora_params
from domlora_kernels.placement.strategies import plan_strategy
from domlora_kernels.testing import sample_batch, tiny_model


def _batches():
    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2), sample_batch([8, 6], seed=3)]


@pytest.fixture(scope="module")
def scores():
    """One probe carrying every signal (gradient estimator, then held-out and pilot signals added)."""
    model = tiny_model("llama")
    s = measure_signals(model, _batches(), "heldout", rank=4, progress=False)
    s.signals["pilot"] = measure_signals(model, _batches(), "pilot", rank=4, progress=False,
                                         pilot={"steps": 2}).signals["pilot"]
    return s


def _params(scores, ranks, dora=False):
    return sum(k * rank_unit(scores.modules[n]) + (scores.modules[n].out_features if dora else 0)
               for n, k in ranks.items())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("dora", [False, True])
def test_every_plan_stays_within_its_budget_and_repeats(scores, strategy, fraction, dora):
    budget = budget_params(fraction, vanilla_lora_params(scores, 4))
    ranks = plan_strategy(scores, strategy, list(scores.scores), 4, budget, dora)
    assert _params(scores, ranks, dora) <= budget
    assert all(1 <= k <= 4 for k in ranks.values())
    assert ranks == plan_strategy(copy.deepcopy(scores), strategy, list(scores.scores), 4, budget, dora)


def test_types_spread_whole_types_at_one_rank_and_plop_takes_v_o_down(scores):
    vanilla = vanilla_lora_params(scores, 4)
    types = plan_strategy(scores, "types", list(scores.scores), 4, vanilla // 2)
    chosen = {scores.modules[n].type for n in types}
    for t in chosen:  # every layer of a chosen type, at one rank
        assert {n for n in scores.scores if scores.modules[n].type == t} <= set(types)
    assert len(set(types.values())) == 1
    plop = plan_strategy(scores, "plop", list(scores.scores), 4, vanilla // 2)
    assert {scores.modules[n].type for n in plop} == {"v_proj", "o_proj", "down_proj"}
    assert len(plop) == 3 * 2 and len(set(plop.values())) == 1


def test_heldout_never_places_a_module_whose_gain_is_negative(scores):
    negative = [n for n, v in scores.signals["heldout"].items() if v <= 0]
    ranks = plan_strategy(scores, "heldout", list(scores.scores), 4, vanilla_lora_params(scores, 4))
    assert not set(negative) & set(ranks)


@pytest.mark.parametrize("strategy", ["adam", "heldout", "pilot", "types", "plop"])
def test_each_strategy_end_to_end_through_peft(scores, strategy):
    model = tiny_model("llama")
    pm = apply_domlora(model, scores, budget="30%", strategy=strategy, r=4, verbose=False)
    p = pm.domlora_placement
    assert p.strategy == strategy and p.rule == "budget"
    assert p.trainable_params <= p.budget
    assert p.trainable_params == sum(k * rank_unit(scores.modules[n]) for n, k in p.ranks.items())
    out = pm(**{k: v for k, v in _batches()[0].items()}).logits
    assert torch.isfinite(out).all()


def test_top_k_by_a_signal(scores):
    cfg = domlora_config(scores, top_k=2, strategy="adam")
    adam = scores.signals["adam"]
    want = sorted(adam, key=lambda n: -adam[n])[:2]
    assert re.fullmatch(cfg.target_modules, want[0]) and re.fullmatch(cfg.target_modules, want[1])
    assert sum(bool(re.fullmatch(cfg.target_modules, n)) for n in scores.scores) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "best", "budget": "1%"}, "unknown strategy 'best'"),
    ({"strategy": 3, "budget": "1%"}, "unknown strategy 3"),
    ({"strategy": "types", "top_k": 2}, "takes budget="),
    ({"strategy": "adam", "top_p": 0.5}, "top_p is a fraction of the PAGE mass"),
    ({"strategy": "adam", "budget": "1%", "rank_pattern": "page"}, "drop rank_pattern"),
    ({"strategy": "adam", "budget": 3}, "buys no adapter by strategy 'adam'"),
    ({"strategy": "adam", "variant": "adalora", "total_step": 10, "budget": "5%"}, "adalora"),
])
def test_bad_strategy_settings_are_refused(scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        domlora_config(scores, **kwargs)


def test_a_signal_the_scores_lack_is_named_with_how_to_measure_it():
    from domlora_kernels import page_scores

    fisher = page_scores(tiny_model("llama"), _batches(), rank=4, progress=False)
    with pytest.raises(ValueError, match="needs the 'adam' signal.*estimator='gradient'"):
        domlora_config(fisher, budget="10%", strategy="adam")
    with pytest.raises(ValueError, match="needs the 'pilot' signal.*measure_signals"):
        domlora_config(fisher, budget="10%", strategy="pilot")
    assert domlora_config(fisher, budget="50%", strategy="plop").target_modules  # data-free: no signal needed


def test_plop_then_types_is_plop_where_it_fits_and_types_below(scores):
    names = list(scores.scores)
    vanilla = vanilla_lora_params(scores, 4)
    for budget in (vanilla // 2, vanilla // 20, vanilla // 200):
        plop = plan_strategy(scores, "plop", names, 4, budget)
        want = plop or plan_strategy(scores, "types", names, 4, budget)
        assert plan_strategy(scores, "plop+types", names, 4, budget) == want
    assert plan_strategy(scores, "plop", names, 4, vanilla // 2)  # both regimes above are exercised
    assert not plan_strategy(scores, "plop", names, 4, vanilla // 200)


def test_a_plop_then_types_plan_says_which_rule_planned_it(scores):
    from domlora_kernels.placement.plan import make_plan
    from domlora_kernels.placement.strategies import plop_threshold

    need = plop_threshold(scores, list(scores.scores))
    vanilla = vanilla_lora_params(scores, 4)
    model = tiny_model("llama")
    for budget, rule in ((need, "plop"), (need - 1, "types")):
        plan = make_plan(scores, 4, 8, None, "lora", None, budget / vanilla, None, None, {}, strategy="plop+types")
        assert (plan.planned_by, plan.plop_threshold) == (rule, need)
        placed = apply_domlora(copy.deepcopy(model), scores, r=4, budget=budget / vanilla, verbose=False).domlora_placement
        assert (placed.planned_by, placed.to_dict()["plop_threshold"]) == (rule, need)
        head = placed.summary().splitlines()[0]
        assert (f"PLoP's types (v/o/down on every layer; they need {need:,}" in head) == (rule == "plop")
        assert (f"below the {need:,} PLoP's types need" in head) == (rule == "types")
    assert make_plan(scores, 4, 8, None, "lora", None, 0.5, None, None, {}, strategy="types").planned_by is None


def test_plop_then_types_needs_the_signal_only_below_the_threshold():
    model = tiny_model("llama")
    fisher = measure_signals(model, _batches(), "page", rank=4, progress=False)  # no "adam" signal
    cfg = domlora_config(fisher, r=4, budget=0.5, strategy="plop+types")
    assert {re.sub(r".*\.", "", n) for n in re.findall(r"[\w.]+_proj", cfg.target_modules)} == {
        "v_proj", "o_proj", "down_proj"}
    with pytest.raises(ValueError, match="needs the 'adam' signal"):
        domlora_config(fisher, r=4, budget=0.005, strategy="plop+types")


def test_the_default_is_plop_then_types_at_five_percent_and_page_with_page_selections(scores):
    from domlora_kernels.placement.strategies import DEFAULT_BUDGET, DEFAULT_STRATEGY, resolve

    assert (DEFAULT_STRATEGY, DEFAULT_BUDGET) == ("plop+types", "5%")
    assert resolve(None, None, None, None, "lora", None) == ("plop+types", "5%")
    assert resolve(None, None, None, None, "lora", 0.01) == ("plop+types", 0.01)
    assert resolve(None, 2, None, None, "lora", None) == ("page", None)
    assert resolve(None, None, 0.5, None, "lora", None) == ("page", None)
    assert resolve(None, None, None, "page", "lora", None) == ("page", None)
    assert resolve(None, None, None, None, "adalora", None) == ("page", None)
    assert resolve("types", None, None, None, "lora", None) == ("types", "5%")
    with pytest.raises(ValueError, match="unknown strategy"):
        resolve("plop+eva", None, None, None, "lora", None)
    model = tiny_model("llama")
    pm = apply_domlora(copy.deepcopy(model), scores, r=4, verbose=False)
    placed = pm.domlora_placement
    want = plan_strategy(scores, "plop+types", list(scores.scores), 4, budget_params("5%", vanilla_lora_params(scores, 4)))
    assert placed.strategy == "plop+types" and placed.ranks == want
    assert domlora_config(scores, r=4, top_k=2).target_modules == domlora_config(scores, r=4, top_k=2,
                                                                                 strategy="page").target_modules


def test_naming_a_budget_strategy_without_a_budget_fills_the_default_one(scores):
    from domlora_kernels.placement.strategies import resolve

    for s in ("types", "plop", "plop+types"):
        assert resolve(s, None, None, None, "lora", None) == (s, "5%")
    assert resolve("adam", None, None, None, "lora", None) == ("adam", None)  # top-1 by its signal
    named = domlora_config(scores, r=4, strategy="plop+types")
    assert named.target_modules == domlora_config(scores, r=4).target_modules
    with pytest.raises(ValueError, match="takes budget=.*not top_k=2"):
        domlora_config(scores, r=4, top_k=2, strategy="types")


def test_below_the_threshold_without_the_signal_the_error_gives_the_threshold():
    from domlora_kernels.placement.strategies import plop_threshold

    model = tiny_model("llama")
    fisher = measure_signals(model, _batches(), "page", rank=4, progress=False)
    need = plop_threshold(fisher, list(fisher.scores))
    assert need == sum(rank_unit(fisher.modules[n]) for n in fisher.scores
                       if fisher.modules[n].type in ("v_proj", "o_proj", "down_proj"))
    with pytest.raises(ValueError, match=f"need {need:,} parameters and the budget is {need - 1:,}.*raise the budget"):
        domlora_config(fisher, r=4, budget=need - 1, strategy="plop+types")
    assert domlora_config(fisher, r=4, budget=need, strategy="plop+types")  # at the threshold: PLoP's types
    dora_need = plop_threshold(fisher, list(fisher.scores), dora=True)
    assert dora_need > need  # DoRA's magnitude vectors raise it
    with pytest.raises(ValueError, match=f"need {dora_need:,} parameters"):
        domlora_config(fisher, r=4, budget=need, variant="dora")


def test_a_model_without_v_o_down_plans_plop_then_types_by_types(scores):
    names = [n for n in scores.scores if scores.modules[n].type in ("q_proj", "k_proj", "up_proj")]
    budget = budget_params(0.5, vanilla_lora_params(scores, 4))
    assert plan_strategy(scores, "plop+types", names, 4, budget) == plan_strategy(scores, "types", names, 4, budget)


def test_an_adalora_config_without_a_strategy_is_placed_by_page(scores):
    from peft import AdaLoraConfig

    cfg = domlora_config(scores, config=AdaLoraConfig(target_r=4, init_r=6, lora_alpha=8, total_step=10))
    top = max(scores.scores, key=scores.scores.get)
    assert re.escape(top) in cfg.target_modules and cfg.target_modules.count("|") == 0
