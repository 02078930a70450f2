"""The decision rule of docs/placement_protocol.md, on synthetic study results."""

import json

import numpy as np
import pytest

from python.studies.placement import decide

ITEMS = 40


def _write(root, family, task, drops: dict[str, float], budget="0.007", seeds=3, noise=0.01):
    """A family folder whose runs give each arm (budgeted ones at ``budget``) the mean loss drop asked."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 2.0, ITEMS)
    fam = root / family
    fam.mkdir(parents=True, exist_ok=True)
    # ten layers whose v/o/down at rank 1 are 3.75% of vanilla LoRA: PLoP's types fit 5%, not 0.7%
    shapes = {"q_proj": (16, 16), "k_proj": (16, 16), "v_proj": (16, 16), "o_proj": (16, 16), "gate_proj": (16, 64),
              "up_proj": (16, 64), "down_proj": (64, 16)}
    names = [(i, t) for i in range(10) for t in shapes]
    mods = {f"model.layers.{i}.{t}": {"type": t, "layer": i, "in": shapes[t][0], "out": shapes[t][1], "page_rank": k + 1}
            for k, (i, t) in enumerate(names)}
    (fam / f"predictors_{task}.json").write_text(json.dumps({"modules": mods}))
    lines = [{"key": f"{task}|base", "task": task, "stage": "budget", "arm": "base", "phase": "test", "seed": 0,
              "lr": 0.0, "test_losses": base.tolist()}]
    for arm, d in drops.items():
        label = arm if arm == "lora_all" else f"{arm}@{budget}"
        for s in range(seeds):
            loss = base - d + rng.normal(0, noise, ITEMS)
            lines.append({"key": f"{task}|{label}|{s}", "task": task, "stage": "budget", "arm": label, "phase": "test",
                          "seed": s, "lr": 0.01, "test_losses": loss.tolist()})
    with open(fam / "runs.jsonl", "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)


def test_a_strategy_ahead_of_the_best_peer_everywhere_is_the_default(tmp_path):
    _write(tmp_path, "a", "t", {"types": 1.1, "adam": 1.3, "eva": 1.0, "shallow_down": 0.9})
    _write(tmp_path, "b", "t", {"types": 2.2, "adam": 1.5, "eva": 2.0, "shallow_down": 2.1})
    d = decide.decide(tmp_path, [decide.Cell("a", "t", "0.007"), decide.Cell("b", "t", "0.007")])
    assert d["cells"]["a t 0.7%"]["best_peer"] == "eva"
    assert d["cells"]["b t 0.7%"]["best_peer"] == "shallow_down"
    assert d["qualified"] == ["types"]  # adam: behind shallow_down on b, its CI wholly below 0
    assert d["cells_wholly_below_0"]["adam"] == ["b t 0.7%"]
    assert d["default"] == {"rule": "strategy", "arm": "types"}


def test_ties_go_to_the_cheaper_strategy(tmp_path):
    _write(tmp_path, "a", "t", {"types": 1.2, "adam": 1.202, "eva": 1.0}, noise=0.0)
    d = decide.decide(tmp_path, [decide.Cell("a", "t", "0.007")])
    assert set(d["qualified"]) == {"types", "adam"}
    assert d["default"]["arm"] == "types"  # within 0.005 of adam, and cheaper


def test_without_a_qualified_strategy_the_small_budget_rule_is_the_closest_to_the_best_peer(tmp_path):
    _write(tmp_path, "a", "t", {"types": 0.95, "eva": 1.0, "kappatune": 0.8, "plop_vod": 0.5}, budget="0.05")
    _write(tmp_path, "a", "t", {"types": 0.95, "eva": 1.0, "kappatune": 0.97}, budget="0.007")
    _write(tmp_path, "b", "t", {"types": 1.8, "eva": 1.7, "kappatune": 2.0})
    cells = [decide.Cell("a", "t", "0.05"), decide.Cell("a", "t", "0.007"), decide.Cell("b", "t", "0.007")]
    d = decide.decide(tmp_path, cells)
    assert d["qualified"] == []
    assert set(d["small_budget_margin"]) == {"types", "eva", "kappatune"}  # plop_vod fits only at 5%
    assert d["small_budget_margin"]["types"] == pytest.approx((-0.05 - 0.2) / 2, abs=0.01)
    assert d["default"] == {"rule": "peer", "large": "plop_vod", "small": "kappatune"}


def test_an_arm_short_of_seeds_is_not_counted(tmp_path):
    _write(tmp_path, "a", "t", {"eva": 1.0})
    _write(tmp_path, "a", "t", {"types": 2.0}, seeds=2)
    assert "types" not in decide.cell_drops(tmp_path, decide.Cell("a", "t", "0.007"))


def test_confirmation_reports_each_peer_and_is_incomplete_until_the_default_ran(tmp_path):
    _write(tmp_path, "q", "t", {"eva": 1.0, "random_module": 0.5, "lora_all": 1.5})
    c = decide.confirm(tmp_path, [decide.Cell("q", "t", "0.007")], "types")
    assert c["cells"]["q t 0.7%"]["missing"] and not c["complete"] and "criterion_met" not in c
    _write(tmp_path, "q", "t", {"types": 1.1})
    c = decide.confirm(tmp_path, [decide.Cell("q", "t", "0.007")], "types")
    cell = c["cells"]["q t 0.7%"]
    assert cell["best_peer"] == "eva"
    assert cell["delta"]["eva"][0] == pytest.approx(0.1, abs=0.01)
    assert cell["delta"]["lora_all"][0] == pytest.approx(-0.4, abs=0.01)
    # ahead of every peer that finished, but a cell with peers still running is not judged complete
    assert cell["pending"] == ["kappatune", "shallow_down", "page_top1", "page_budget"]  # plop_vod: no fit at 0.7%
    assert not c["complete"] and not c["criterion_met"]
    assert "Still to finish here" in "\n".join(decide.confirmation_lines(c))
    _write(tmp_path, "q", "t", {"kappatune": 0.9, "shallow_down": 0.8, "page_top1": 0.4, "page_budget": 0.6})
    c = decide.confirm(tmp_path, [decide.Cell("q", "t", "0.007")], "types")
    assert c["cells"]["q t 0.7%"]["pending"] == [] and c["complete"] and c["criterion_met"]


def test_bad_cells_say_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="FAMILY:TASK:BUDGET"):
        decide.Cell.parse("smollm2:0.007")
    with pytest.raises(FileNotFoundError, match="no run of nope"):
        decide.cell_drops(tmp_path, decide.Cell("nope", "t", "0.007"))


def test_cli_writes_the_table(tmp_path, capsys):
    _write(tmp_path, "a", "t", {"types": 1.1, "eva": 1.0})
    decide.main(["decide", "--cells", "a:t:0.007", "--root", str(tmp_path)])
    text = (tmp_path / "decision.md").read_text()
    assert "**Default: `types`**" in text and text in capsys.readouterr().out + "\n"


def test_separation_needs_the_best_peer_clear_of_the_worst(tmp_path):
    _write(tmp_path, "a", "t", {"eva": 1.0, "random_module": 0.6})
    _write(tmp_path, "b", "t", {"eva": 1.0, "random_module": 0.998})
    sep = decide.separation(tmp_path, [decide.Cell("a", "t", "0.007"), decide.Cell("b", "t", "0.007")])
    assert sep["a t 0.7%"]["separates"] and sep["a t 0.7%"]["best"] == "eva"
    assert not sep["b t 0.7%"]["separates"]
    with pytest.raises(SystemExit) as e:
        decide.main(["separation", "--cells", "b:t:0.007", "--root", str(tmp_path)])
    assert e.value.code == 3


def test_the_package_evidence_is_the_committed_decisions():
    from pathlib import Path

    from domlora_kernels.placement.strategies import DEFAULT_STRATEGY, EVIDENCE

    decision = json.loads(Path("python/results/placement/decision.json").read_text())
    confirmation = json.loads(Path("python/results/placement/confirmation.json").read_text())
    shipped = json.loads(decide.EVIDENCE_PATH.read_text())
    # regenerate: python -m python.studies.placement.decide evidence
    assert shipped == decide.evidence(decision, confirmation)
    assert DEFAULT_STRATEGY == shipped["default"] == decide.default_strategy(decision)
    assert EVIDENCE[DEFAULT_STRATEGY] == shipped["strategies"][DEFAULT_STRATEGY]


def test_a_confirmation_cell_whose_peers_tie_is_excluded_unless_it_is_the_design_task(tmp_path):
    ties = {p: 1.0 for p in ("eva", "random_module", "kappatune", "shallow_down", "page_top1", "page_budget",
                             "lora_all")} | {"types": 1.2}
    _write(tmp_path, "q", "chat", ties)
    _write(tmp_path, "q", "instruction", ties)
    c = decide.confirm(tmp_path, [decide.Cell("q", "chat", "0.007"), decide.Cell("q", "instruction", "0.007")], "types")
    assert c["cells"]["q chat 0.7%"]["excluded"] and not c["cells"]["q instruction 0.7%"].get("excluded")
    assert c["complete"] and c["criterion_met"]  # on the one cell that counts
    text = "\n".join(decide.confirmation_lines(c))
    assert "Excluded: the peers do not separate placements here" in text
    _write(tmp_path, "r", "chat", {"eva": 1.0, "random_module": 0.5, "types": 1.2})
    c = decide.confirm(tmp_path, [decide.Cell("r", "chat", "0.007")], "types")
    assert c["cells"]["r chat 0.7%"]["separation"]["separates"]  # the gate is recorded with the cell
    assert "Separation (best peer − worst peer" in "\n".join(decide.confirmation_lines(c))


def test_confirm_cli_plots_the_default_against_each_arm(tmp_path):
    pytest.importorskip("matplotlib")
    _write(tmp_path, "q", "t", {"eva": 1.0, "random_module": 0.5, "lora_all": 1.5, "types": 1.1})
    decide.main(["confirm", "--default", "types", "--cells", "q:t:0.007", "--root", str(tmp_path)])
    png = tmp_path / "confirmation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    decide.main(["confirm", "--default", "types", "--cells", "q:t:0.007", "--root", str(tmp_path), "--no-plot"])
    assert not png.exists()


def test_only_the_protocols_complete_confirmation_gives_a_verdict():
    from pathlib import Path

    c = json.loads(Path("python/results/placement/confirmation.json").read_text())
    assert decide.is_the_protocols_confirmation(c)
    word = "confirmed" if c["criterion_met"] else "not confirmed"
    assert f"**the default is {word}**" in "\n".join(decide.confirmation_lines(c))
    one = dict(c, cells={k: v for k, v in c["cells"].items() if k.startswith("qwen05")})
    assert not decide.is_the_protocols_confirmation(one)  # a family's cells alone: progress, no verdict
    assert "the default is" not in "\n".join(decide.confirmation_lines(one))
    assert "confirmation" not in decide.evidence(json.loads(Path("python/results/placement/decision.json").read_text()),
                                                 one)
    assert not decide.is_the_protocols_confirmation(dict(c, complete=False))


def test_versus_has_one_row_per_cell_with_every_peer(tmp_path, capsys):
    _write(tmp_path, "q", "t", {"types": 1.1, "eva": 1.0, "random_module": 0.5, "lora_all": 1.5})
    decide.main(["versus", "--default", "types", "--cells", "q:t:0.007", "--design", "q:t:0.007", "--root",
                 str(tmp_path)])
    text = (tmp_path / "versus.md").read_text()
    row = next(x for x in text.splitlines() if x.startswith("| q t 0.7% (design) | types |"))
    cols = [x.strip() for x in row.strip("|").split("|")]
    assert len(cols) == 2 + len(decide.VERSUS_ARMS)
    by_arm = dict(zip(decide.VERSUS_ARMS, cols[2:]))
    assert float(by_arm["eva"].split()[0]) == pytest.approx(0.1, abs=0.01)  # 1.1 - 1.0
    assert float(by_arm["lora_all"].split()[0]) == pytest.approx(-0.4, abs=0.01)  # 1.1 - 1.5
    assert by_arm["kappatune"] == "-" and by_arm["plop_vod"] == "-"  # not run there
    assert text in capsys.readouterr().out + "\n"
