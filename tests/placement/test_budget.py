"""Budget plans (domlora_config(budget=..., top_p=...)): never over budget, nested in the budget, the
scaling kept by alpha_pattern; on the real SmolLM2 scores committed with the study and on a tiny model."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.placement.budget import budget_params, density_order, plan_budget, vanilla_lora_params
from domlora_kernels.placement import apply_domlora, domlora_config
from domlora_kernels.scores import ModuleInfo, PageScores
from domlora_kernels.testing import sample_batch, tiny_model

peft = pytest.importorskip("peft")
# PAGE of SmolLM2-135M-Instruct's 210 linear modules over the whole shipped calibration set, 8 seeds
SMOL_REPORT = Path(__file__).resolve().parents[2] / "python" / "results" / "page_all_tasks" / "page_scores.json"


@pytest.fixture(scope="module")
def smol_scores() -> PageScores:
    return PageScores.from_json(SMOL_REPORT)


def _cost(scores: PageScores, ranks: dict[str, int], dora: bool = False) -> int:
    m = scores.modules
    return sum(k * (m[n].in_features + m[n].out_features) + (m[n].out_features if dora else 0) for n, k in ranks.items())


def _budgets(vanilla: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    random = torch.randint(700, vanilla, (60,), generator=g).tolist()
    return sorted({700, 767, 768, 769, 1536, 20000, 24422, vanilla // 10, vanilla // 2, vanilla, *random})


@pytest.mark.parametrize("r,dora", [(8, False), (4, False), (8, True), (16, False)], ids=["r8", "r4", "r8-dora", "r16"])
def test_real_plans_never_exceed_and_are_nested(smol_scores, r, dora):
    names = list(smol_scores.scores)
    vanilla = vanilla_lora_params(smol_scores, r)
    prev: dict[str, int] = {}
    for b in _budgets(vanilla):
        plan = plan_budget(smol_scores, names, r, budget=b, dora=dora)
        assert plan.params == _cost(smol_scores, plan.ranks, dora) <= b
        assert all(1 <= k <= r for k in plan.ranks.values())
        assert all(plan.ranks.get(n, 0) >= k for n, k in prev.items()), f"budget {b} dropped a module or a rank"
        # tight: the next rank unit of the sequence would not have fitted
        order = density_order(smol_scores, names)
        nxt = next((n for n in order if plan.ranks.get(n, 0) < r), None)
        if nxt is not None:
            info = smol_scores.modules[nxt]
            unit = info.in_features + info.out_features + (info.out_features if dora and nxt not in plan.ranks else 0)
            assert plan.params + unit > b
        prev = plan.ranks
    if not dora:  # the whole vanilla budget buys every module with PAGE > 0 at rank r (DoRA's magnitudes cost more)
        assert prev == {n: r for n in order}


def test_real_top_p_plans_are_nested_and_reach_their_mass(smol_scores):
    names = list(smol_scores.scores)
    mass = smol_scores.total
    prev: dict[str, int] = {}
    for p in (0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 0.9, 0.99, 1.0):
        plan = plan_budget(smol_scores, names, 8, top_p=p)
        carried = sum(smol_scores.scores[n] * k / 8 for n, k in plan.ranks.items())
        assert carried >= p * mass * (1 - 1e-9) and plan.covered == pytest.approx(carried / mass)
        last = list(plan.ranks)[-1]  # the shortest prefix: without its last rank unit the plan falls short
        assert carried - smol_scores.scores[last] / 8 < p * mass
        assert all(plan.ranks.get(n, 0) >= k for n, k in prev.items())
        prev = plan.ranks


def test_real_one_percent_plan_in_the_config(smol_scores):
    vanilla = vanilla_lora_params(smol_scores, 8)
    assert budget_params("1%", vanilla) == budget_params(0.01, vanilla) == vanilla // 100
    cfg = domlora_config(smol_scores, budget="1%", strategy="page")
    plan = plan_budget(smol_scores, list(smol_scores.scores), 8, budget=vanilla // 100)
    assert _cost(smol_scores, plan.ranks) <= vanilla // 100
    partial = {n: k for n, k in plan.ranks.items() if k != 8}
    assert {k.lstrip("^").replace("\\", ""): v for k, v in cfg.rank_pattern.items()} == partial
    assert {k.lstrip("^").replace("\\", ""): v for k, v in cfg.alpha_pattern.items()} == {n: 2.0 * k for n, k in partial.items()}
    assert cfg.r == 8 and cfg.lora_alpha == 16


def test_the_prefix_is_within_one_rank_unit_of_the_best_plan():
    # brute force over every rank vector of 4 modules with cap 3: the total rank-scaled PAGE of the greedy
    # prefix is at least the optimum's minus the energy of one rank unit of the module it stopped in
    shapes = {"a": (4, 4), "b": (10, 2), "c": (3, 9), "d": (6, 6)}
    pages = {"a": 3.0, "b": 5.0, "c": 2.5, "d": 4.0}
    s = _synthetic(pages, shapes)
    r = 3
    for b in range(8, 100, 3):
        plan = plan_budget(s, list(pages), r, budget=b)
        got = sum(pages[n] * k / r for n, k in plan.ranks.items())
        best = max(
            sum(pages[n] * k / r for n, k in zip(pages, ks))
            for ks in itertools.product(range(r + 1), repeat=4) if _cost(s, dict(zip(pages, ks))) <= b
        )
        assert got >= best - max(pages[n] / r for n in pages) - 1e-12 and got <= best + 1e-12


def _synthetic(pages, shapes) -> PageScores:
    modules = {n: ModuleInfo(None, n, *shapes[n]) for n in pages}
    cfg = {"rank": 8, "projection": "A", "estimator": "fisher", "seeds": [0], "scaling": 1.0}
    return PageScores(dict(pages), {0: dict(pages)}, None, modules, 1, cfg)


def test_budget_forms_and_errors():
    assert budget_params(20000, 10**6) == 20000 and budget_params("2.5%", 1000) == 25 and budget_params(1.0, 7) == 7
    for bad, msg in ((0, ">= 1"), (True, "must be an int"), ("1", "percentage such as '1%'"), (1.5, r"\(0, 1\]"),
                     ("0%", r"\(0, 1\]"), (float("nan"), r"\(0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            budget_params(bad, 1000)
    s = _synthetic({"a": 1.0, "b": 0.0}, {"a": (4, 4), "b": (4, 4)})
    with pytest.raises(ValueError, match="buys no adapter: rank 1 of the densest module, a, needs 8"):
        domlora_config(s, budget=7, strategy="page")
    with pytest.raises(ValueError, match="give one of top_k"):
        domlora_config(s, budget=100, top_k=1)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        domlora_config(s, top_p=0, strategy="page")
    with pytest.raises(ValueError, match="drop rank_pattern"):
        domlora_config(s, budget=100, rank_pattern="page", strategy="page")
    with pytest.raises(ValueError, match="allocates its ranks itself"):
        domlora_config(s, budget=100, variant="adalora", total_step=10, strategy="page")
    with pytest.raises(ValueError, match="zero PAGE"):
        domlora_config(_synthetic({"a": 0.0}, {"a": (4, 4)}), budget=100, strategy="page")
    assert domlora_config(s, budget=10**6, strategy="page").rank_pattern == {}  # a zero-PAGE module never enters a plan
    assert domlora_config(s, budget=10**6, strategy="page").target_modules == "(?:a)"


@pytest.fixture(scope="module")
def tiny_probed():
    model = tiny_model("llama", torch.float64)
    return model, page_scores(model, [sample_batch([9, 6, 12])], rank=4, lora_alpha=8, progress=False)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_budget_adapter_keeps_the_scaling_and_the_count(tiny_probed, variant):
    model, scores = tiny_probed
    plans = (plan_budget(scores, list(scores.scores), 4, budget=b, dora=variant == "dora") for b in range(2000, 9000, 97))
    plan = next(p for p in plans if len(p.ranks) > 1 and min(p.ranks.values()) < 4)  # a cut rank: alpha_pattern at work
    pm = apply_domlora(copy.deepcopy(model), scores, r=4, lora_alpha=8, variant=variant, budget=plan.budget, verbose=False, strategy="page")
    placement = pm.domlora_placement
    assert placement.ranks == {n: plan.ranks[n] for n in placement.targets} and placement.budget == plan.budget
    assert placement.trainable_params == plan.params <= plan.budget
    base = 8 / (math.sqrt(4) if variant == "rslora" else 4)
    layers = dict(pm.get_base_model().named_modules())
    for name, k in placement.ranks.items():
        assert layers[name].r["default"] == k
        assert layers[name].scaling["default"] == pytest.approx(base, rel=1e-12)
    assert sorted(placement.copied_A) == sorted(n for n, k in placement.ranks.items() if k == 4)


@pytest.mark.slow
def test_apply_one_percent_on_the_real_model(smol_scores, capsys):
    from domlora_kernels.models import load_model

    model, _ = load_model()
    pm = apply_domlora(model, smol_scores, budget="1%", strategy="page")
    placement = pm.domlora_placement
    plan = plan_budget(smol_scores, list(smol_scores.scores), 8, budget=vanilla_lora_params(smol_scores, 8) // 100)
    assert placement.trainable_params == plan.params <= placement.budget == 24422
    assert placement.targets == sorted(plan.ranks, key=lambda n: -smol_scores.scores[n])
    assert "within a budget of 24,422 parameters" in capsys.readouterr().out
