"""The placement study (python/studies/placement/): parameter matching, and a --smoke run end to end.

The arithmetic tests need no model: on SmolLM2's and Gemma 3 270M's real shapes the core
test's single-module adapters are parameter-matched within 1.5% of the budget, and every
budgeted arm stays within its budget. The smoke test runs the CLI in its CI configuration (a
tiny random Llama with SmolLM2's tokenizer, every stage) twice: the second run must add no run
(resume), and the report stage must write both tables and the plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from python.studies.placement import report as placement_report
from python.studies.placement import study as ps

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# (in, out) per module type
SMOLLM2 = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
           "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
GEMMA3 = {"q_proj": (640, 1024), "k_proj": (640, 256), "v_proj": (640, 256), "o_proj": (1024, 640),
          "gate_proj": (640, 2048), "up_proj": (640, 2048), "down_proj": (2048, 640)}


def _pred(shapes: dict, layers: int) -> dict:
    """A predictors file of a model with these shapes; PAGE falls with depth and type order."""
    mods, k = {}, 0
    for layer in range(layers):
        for t, (n, m) in shapes.items():
            k += 1
            kind = "self_attn" if t[0] in "qkvo" else "mlp"
            mods[f"model.layers.{layer}.{kind}.{t}"] = {"layer": layer, "type": t, "in": n, "out": m, "page": 1.0 / k,
                                                        "page_rank": k}
    return {"modules": mods}


@pytest.mark.parametrize("shapes,layers,vanilla", [(SMOLLM2, 30, 2_442_240), (GEMMA3, 18, 1_898_496)],
                         ids=["smollm2", "gemma3"])
def test_core_adapters_are_parameter_matched(shapes, layers, vanilla):
    pred = _pred(shapes, layers)
    assert ps.vanilla_params(pred) == vanilla
    budget = int(0.007 * vanilla)
    picks = ps.core_modules(pred)
    assert 14 <= len(picks) <= 16
    reasons = " ".join(picks.values())
    for what in ("PAGE rank 1", "PAGE rank 80", "median", "bottom", "shallow down_proj (layer 1)", "PLoP type v_proj"):
        assert what in reasons
    for name in picks:
        ranks = ps.single(name, pred["modules"], budget)
        params = ps.lora_params(ranks, pred["modules"])
        assert abs(params / budget - 1) <= 0.015, (name, ranks, params, budget)


@pytest.mark.parametrize("frac", [0.007, 0.05])
def test_budget_arms_stay_within_budget(frac):
    pred = _pred(SMOLLM2, 30)
    mods = pred["modules"]
    budget = int(frac * ps.vanilla_params(pred))
    decisions = {"eva_ranks": {n: (16 if i % 7 == 0 else 4 if i % 3 == 0 else 0) for i, n in enumerate(mods)},
                 "kappa_order": list(reversed(mods))}
    for arm in ("plop_vod", "eva", "kappatune"):
        ranks = ps.budget_arm(arm, pred, budget, decisions)
        if arm == "plop_vod" and frac == 0.007:
            assert isinstance(ranks, str) and "needs more than" in ranks  # 120,960 per rank > 17,095
            continue
        params = ps.lora_params(ranks, mods)
        assert budget * 0.85 <= params <= budget, (arm, params, budget)
    one = ps.budget_arm("page_top1", pred, budget, decisions)
    assert list(one) == ["model.layers.0.self_attn.q_proj"]
    assert abs(ps.lora_params(one, mods) / budget - 1) <= 0.04


def test_fill_order_gives_the_rest_to_the_first_module_that_does_not_fit():
    mods = {"a": {"in": 10, "out": 10}, "b": {"in": 5, "out": 5}, "c": {"in": 1, "out": 1}}
    assert ps.fill_order(["a", "b", "c"], mods, 75, {"a": 2, "b": 8, "c": 8}) == {"a": 2, "b": 3}


def test_budget_rates_reuse_the_core_pick_only_for_the_same_single_adapter():
    pred = _pred(SMOLLM2, 30)
    mods = pred["modules"]
    core = int(0.007 * ps.vanilla_params(pred))
    picks = {"math|core|down_proj": {"lr": 0.01, "edge_notes": []}}
    down = "model.layers.2.mlp.down_proj"
    lr = ps.core_rate(picks, "math", "shallow_down@0.007", ps.single(down, mods, core), mods, core)
    assert lr == 0.01
    # another budget (another rank), another task, another type, or an arm that tuned its own grid: no reuse
    assert ps.core_rate(picks, "math", "shallow_down@0.05", ps.single(down, mods, 7 * core), mods, core) is None
    assert ps.core_rate(picks, "chat", "shallow_down@0.007", ps.single(down, mods, core), mods, core) is None
    up = "model.layers.2.mlp.up_proj"
    assert ps.core_rate(picks, "math", "x@0.007", ps.single(up, mods, core), mods, core) is None
    own = {**picks, "math|budget|shallow_down@0.007": {"lr": 0.03, "edge_notes": []}}
    assert ps.core_rate(own, "math", "shallow_down@0.007", ps.single(down, mods, core), mods, core) is None
    again = {**picks, "math|budget|shallow_down@0.007": {"lr": 0.01, "edge_notes": [], "from": "core"}}
    assert ps.core_rate(again, "math", "shallow_down@0.007", ps.single(down, mods, core), mods, core) == 0.01
    two = {down: 4, up: 4}
    assert ps.core_rate(picks, "math", "x@0.007", two, mods, core) is None
    cfg = ps.Cfg(family="smollm2", out=Path("unused"))
    assert ps.grid_low(cfg, two, len(mods)) == cfg.lr_single  # 2 of 210 modules: a narrow arm
    assert ps.grid_low(cfg, {n: 8 for n in list(mods)[:22]}, len(mods)) == cfg.lr_multi


def test_budget_rows_keep_only_the_runs_at_the_arms_pick():
    def run(arm, lr, seed, loss):
        return {"task": "t", "stage": "budget", "arm": arm, "phase": "test", "lr": lr, "seed": seed, "params": 10,
                "ranks": {"m": 1}, "test_losses": [loss, loss], "metric_scores": [1.0, 0.0]}
    base = {"task": "t", "stage": "core", "arm": "base", "phase": "test", "lr": 0.0, "seed": 0,
            "test_losses": [2.0, 2.0], "metric_scores": [0.0, 0.0]}
    runs = [base, run("x@0.05", 0.0316, 0, 1.5), run("x@0.05", 0.01, 0, 0.5)]
    rows = placement_report.budget_rows(runs, {"t|budget|x@0.05": {"lr": 0.01, "edge_notes": []}})
    assert len(rows) == 1 and rows[0]["lr"] == 0.01 and rows[0]["loss_drop"][0] == pytest.approx(1.5)
    assert placement_report.budget_rows(runs, {})[0]["seeds"] == [0, 0]  # no pick recorded: every run


def test_a_run_written_twice_is_read_once(tmp_path):
    """Two processes started on the same work both append the same run: the report counts it once
    (the last line, as the study's resume logic keeps it), so a budget arm's seeds are not doubled."""
    lines = [{"key": "t|budget|x|0.01|0|test", "loss": 1.0}, {"key": "t|budget|x|0.01|1|test", "loss": 2.0},
             {"key": "t|budget|x|0.01|0|test", "loss": 1.5}]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    runs = placement_report.load_runs(tmp_path)
    assert sorted(r["loss"] for r in runs) == [1.5, 2.0]
    assert placement_report.load_runs(tmp_path / "missing") == []


def test_combined_tables_stay_apart(tmp_path):
    """Two tables of one family's file are two tables in the combined file: a blank line between
    them, or markdown would read the second header as a row of the first."""
    fam = tmp_path / "fam"
    fam.mkdir()
    (fam / "correlation.md").write_text("# t\n\nStatus: complete: 3 runs.\n\n| a |\n|---|\n| 1 |\n\ntext\n\n| b |\n|---|\n| 2 |\n")
    placement_report.combine(tmp_path)
    out = (tmp_path / "correlation.md").read_text()
    assert "| 1 |\n\n| b |" in out and "Status: complete: 3 runs." in out


def test_paired_ci_and_spearman():
    a = {0: [1.0, 2.0, 3.0], 1: [2.0, 3.0, 4.0]}
    est, lo, hi = placement_report.paired_ci(a, {s: [x - 0.5 for x in v] for s, v in a.items()})
    assert est == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    rho, lo, hi = placement_report.spearman_ci([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 12])
    assert rho == pytest.approx(1.0) and lo <= rho <= hi
    assert placement_report.spearman([1, 2, 3], [6, 5, 4]) == pytest.approx(-1.0)


def _smoke(out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "python.studies.placement.study", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smoke_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "ps"
    _smoke(out)
    fam = out / "tiny"
    lines = (fam / "runs.jsonl").read_text().splitlines()
    runs = [json.loads(x) for x in lines]
    pred = json.loads((fam / "predictors_math.json").read_text())
    mods = pred["modules"]
    budget = int(0.08 * ps.vanilla_params(pred))
    core = [r for r in runs if r["stage"] == "core" and r["arm"] != "base"]
    assert {r["arm"] for r in core if r["phase"] == "test"} == set(ps.core_modules(pred))
    for r in core:  # tiny model: rank units of 48-96 parameters against 655: within 3%
        assert r["params"] == ps.lora_params(r["ranks"], mods)
        assert abs(r["params"] / budget - 1) <= 0.03, r["key"]
    budget_test = {r["arm"] for r in runs if r["stage"] == "budget" and r["phase"] == "test"}
    assert {f"{a}@0.08" for a in ps.BUDGET_ARMS} | set(ps.REFERENCE_ARMS) == budget_test
    for r in runs:
        if r["phase"] == "test":
            assert len(r["test_losses"]) == 6 and len(r["metric_scores"]) == 2
        else:
            assert len(r["val_losses"]) == 4 and len(r["train_losses"]) == 2
    trained = [r for r in runs if r["arm"] == "lora_all" and r["phase"] == "test"]
    base = next(r for r in runs if r["arm"] == "base")
    assert all(sum(r["test_losses"]) != sum(base["test_losses"]) for r in trained)  # training moved the loss

    # a single-module budget arm at the core budget and its type's core rate repeats a core run
    # exactly (on SmolLM2, maths, the two were trained apart and agree bit for bit): it is copied
    # and a budget arm whose plan another arm already trained (same modules, ranks, rate, seed) is copied too
    reused = [r for r in runs if r.get("same_as")]
    by_key = {r["key"]: r for r in runs}
    from_core = [r for r in reused if by_key[r["same_as"]]["stage"] == "core"]
    assert from_core and all(r["stage"] == "budget" and r["seed"] == 0 and len(r["ranks"]) == 1 for r in from_core)
    for r in reused:
        first = by_key[r["same_as"]]
        assert not first.get("same_as") and first["key"] != r["key"] and r["stage"] == "budget"
        assert first["ranks"] == r["ranks"] and first["lr"] == r["lr"] and first["seed"] == r["seed"]
        assert first.get("test_losses") == r.get("test_losses") and first.get("val_losses") == r.get("val_losses")

    # the page_budget arm is PAGE's budget plan, whatever the package's default strategy is
    from domlora_kernels import domlora_config
    from domlora_kernels.scores import PageScores

    scores = PageScores.from_json(fam / "page_math.json")
    page_plan = ps.plan_ranks(domlora_config(scores, r=8, lora_alpha=16, budget=budget, strategy="page"), list(mods))
    default_plan = ps.plan_ranks(domlora_config(scores, r=8, lora_alpha=16, budget=budget), list(mods))
    assert page_plan != default_plan  # else this check could not tell them apart
    assert json.loads((fam / "decisions_math.json").read_text())["page_budget"][str(budget)] == page_plan

    _smoke(out)  # resume: every run is found finished
    assert (fam / "runs.jsonl").read_text().splitlines() == lines

    corr = (fam / "correlation.md").read_text()
    for name in placement_report.PREDICTOR_NAMES.values():
        assert f"| tiny | math | {name} |" in corr
    module_rows = [x for x in corr.split("## The core modules")[1].splitlines() if x.startswith("| tiny | math | model.")]
    assert len(module_rows) == len(ps.core_modules(pred))  # one row per core module, with its CI
    table = (fam / "budget.md").read_text()
    assert "| tiny | math | page_budget@0.08 |" in table and "| tiny | math | lora_all |" in table
    assert "Status: complete" in table
    assert (fam / "predictors_vs_outcome.png").stat().st_size > 1000
    assert (fam / "budget.png").stat().st_size > 1000
    report = json.loads((fam / "report.json").read_text())
    assert len(report["correlation"]) == len(placement_report.PREDICTORS)


def test_a_resumed_study_keeps_its_sizes_and_seed_pool(tmp_path):
    cfg = ps.Cfg(family="smollm2", out=tmp_path)
    cfg.dir.mkdir(parents=True)
    ps.check_sizes(cfg)
    ps.check_sizes(cfg)  # same sizes: fine
    with pytest.raises(ValueError, match="sizes.json records"):
        ps.check_sizes(ps.replace(cfg, n_test=100))
    with pytest.raises(ValueError, match="seeds must be in 0..2"):
        ps.make_data("math", cfg, None, [0, 3])


def test_budget_arms_select_a_subset_and_unknown_arms_are_refused(tmp_path, capsys):
    cfg, _, _ = ps.parse(["--stage", "budget", "--budget-arms", "eva,lora_all", "--out", str(tmp_path)])
    assert cfg.budget_arms == ["eva", "lora_all"]
    cfg, _, _ = ps.parse(["--stage", "budget", "--budget-arms="])  # none: decisions and base runs only
    assert cfg.budget_arms == []
    with pytest.raises(SystemExit):
        ps.parse(["--budget-arms", "page_top1,bogus"])
    assert "unknown ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a budget call on no budget task would silently do nothing
        ps.parse(["--stage", "budget", "--tasks", "math", "--budget-tasks", "instruction"])
    assert "add the task there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ps.parse(["--lr-single", "0"])
    assert "must be > 0" in capsys.readouterr().err
    assert ps.parse(["--lr-single", "0.00316"])[0].lr_single == 0.00316
    # the plan counts only the selected arms: 4 grid runs + 3 seeds per arm and budget
    fam = tmp_path / "smollm2"
    fam.mkdir()
    (fam / "predictors_math.json").write_text(json.dumps(_pred(SMOLLM2, 30)))
    base = dict(tasks=["math"], core_tasks=[], budget_tasks=["math"])
    every = ps.plan_runs(ps.Cfg(family="smollm2", out=tmp_path, **base))
    two = ps.plan_runs(ps.Cfg(family="smollm2", out=tmp_path, budget_arms=["shallow_down", "lora_qv"], **base))
    base_runs = 3  # the base model's metric on each seed's items
    # a single module at another budget than the core test's tunes its own grid, whichever
    # budget comes first on the command line (the rank differs from the core run's)
    for budgets, grid in (([0.05], 4), ([0.007], 0)):
        cfg = ps.Cfg(family="smollm2", out=tmp_path, tasks=["math"], core_tasks=["math"], budget_tasks=["math"],
                     budgets=budgets, budget_arms=["shallow_down"])
        val = [r for r in ps.plan_runs(cfg) if r["stage"] == "budget" and r["phase"] == "val"]
        assert len(val) == grid, budgets
    assert len(two) == base_runs + (2 + 1) * (4 + 3)  # shallow_down at 2 budgets, lora_qv once
    assert len(every) > len(two)
    # ARM@BUDGET: that arm at that budget only (the confirmation's default arm differs by budget)
    one = ps.plan_runs(ps.Cfg(family="smollm2", out=tmp_path, budget_arms=["shallow_down@0.05", "lora_qv"], **base))
    assert len(one) == base_runs + (1 + 1) * (4 + 3)
    assert {label for _, label in ps.planned_cells(ps.Cfg(family="smollm2", out=tmp_path,
                                                          budget_arms=["shallow_down@0.05"], **base))} == {"shallow_down@0.05"}
    assert ps.parse(["--budget-arms", "types@0.007,eva"])[0].budget_arms == ["types@0.007", "eva"]
    assert ps.parse(["--budget-arms", "types@0.0070"])[0].budget_arms == ["types@0.007"]  # as the study labels it
    for wrong in ("types@small", "lora_all@0.05", "bogus@0.05", "types@0.01"):  # lora_all: no budget; 0.01: not run
        with pytest.raises(SystemExit):
            ps.parse(["--budget-arms", wrong])
        assert f"unknown ['{wrong}']" in capsys.readouterr().err


def test_two_processes_append_to_one_runs_file_without_mixing_lines(tmp_path):
    path = tmp_path / "runs.jsonl"
    code = ("import sys; from pathlib import Path; from python.studies.placement import study as ps; "
            f"r = ps.Runs(Path({str(path)!r})); w = sys.argv[1]; "
            "[r.add({'key': f'{w}{i}', 'pad': w * 20000}) for i in range(40)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, w], cwd=ROOT, env=ENV) for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 80 and sorted(json.loads(x)["key"] for x in lines) == sorted(f"{w}{i}" for w in "ab" for i in range(40))


def test_status_names_the_arms_short_of_seeds_however_many_runs_there_are():
    from python.studies.placement.report import status_line

    def run(arm, seed, lr=0.01):
        return {"task": "t", "stage": "budget", "arm": arm, "phase": "test", "seed": seed, "lr": lr,
                "params": 1, "ranks": {"m": 1}, "test_losses": [1.0], "metric_scores": [1.0]}

    runs = [run("a@0.007", s) for s in range(3)] + [run("b@0.007", 0)] + [run("b@0.007", s, lr=0.1) for s in range(3)]
    picks = {"t|budget|b@0.007": {"lr": 0.01}}  # b's three seeds at 0.1 are at an earlier pick
    cells = [("t", "a@0.007"), ("t", "b@0.007"), ("t", "c@0.05")]
    text = status_line(runs, picks, done=99, planned=10, cells=cells, seeds=3)
    assert text.startswith("PARTIAL: 1 of 3 planned budget arms")
    assert "t b@0.007 (1 of 3 seeds)" in text and "t c@0.05 (0 of 3 seeds)" in text
    assert status_line(runs, picks, 99, 10, cells[:1], 3).startswith("complete: all 1 planned")
    assert status_line(runs, picks, 99, 10, [], 3).startswith("no budget arms planned")  # never "complete: all 0"
