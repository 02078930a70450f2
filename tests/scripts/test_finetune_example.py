"""python/examples/finetune.py: probe, budget placement, Trainer, save, reload, generate.

The smoke test runs the example on the real SmolLM2-135M-Instruct for 3 steps, with a few short
samples, and checks what it returned rather than what it printed: the adapter reloaded with
PeftModel.from_pretrained onto a freshly loaded base gives the trained model's logits, the
adapters moved away from their B = 0 start, and the held-out loss went down.
"""

from __future__ import annotations

import pytest
import torch

from python.examples import finetune as fe

peft = pytest.importorskip("peft")


def test_plain_prompt_is_the_prefix_that_training_renders():
    """Without a chat template, generation is prompted exactly as data.py rendered the training turns."""
    from transformers import AutoTokenizer

    from domlora_kernels.data import IGNORE_INDEX, encode
    from domlora_kernels.models import _source

    tok = AutoTokenizer.from_pretrained(_source(None, True)[0])
    tok.chat_template = None
    for rendering in ("plain", "template"):
        if rendering == "template":
            tok = AutoTokenizer.from_pretrained(_source(None, True)[0])
        rec = fe.sums_task(1, seed=3)[0]
        enc = encode(rec, tok, max_length=256)
        prompt = fe.prompt_ids(tok, rec["messages"][0]["content"])[0].tolist()
        assert enc["input_ids"][: len(prompt)] == prompt, rendering
        assert set(enc["labels"][: len(prompt)]) == {IGNORE_INDEX}
        answer = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
        assert answer.strip() == rec["messages"][1]["content"], rendering


def test_budget_is_read_as_the_cli_reads_it(capsys):
    assert [fe.parse_args(["--budget", b]).budget for b in ("2%", "20000", "0.01")] == ["2%", 20000, 0.01]
    with pytest.raises(SystemExit):
        fe.parse_args(["--budget", "lots"])
    assert "a percentage (1%), got 'lots'" in capsys.readouterr().err


@pytest.mark.slow
def test_example_trains_saves_and_reloads(tmp_path, capsys):
    args = fe.parse_args(["--steps", "3", "--probe-samples", "4", "--train-samples", "12", "--eval-samples", "4",
                          "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32",
                          "--out-dir", str(tmp_path)])
    res = fe.run(args)
    printed = capsys.readouterr().out
    assert "held-out loss: before" in printed and "reloaded generation:" in printed
    trained, reloaded = res["model"], res["reloaded"]
    assert reloaded.get_base_model() is not trained.get_base_model()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    targets = trained.domlora_placement.targets
    assert 0 < trained.domlora_placement.trainable_params <= trained.domlora_placement.budget
    mods = dict(trained.get_base_model().named_modules())
    back = dict(reloaded.get_base_model().named_modules())
    for name in targets:
        b = mods[name].lora_B["default"].weight
        assert b.abs().max() > 0, name  # trained away from peft's B = 0
        assert torch.equal(back[name].lora_B["default"].weight, b)
    with torch.no_grad():
        want = trained(**res["batch"]).logits
        torch.testing.assert_close(reloaded(**res["batch"]).logits, want, rtol=0, atol=1e-5)
    assert res["after"]["loss"] < res["before"]["loss"]
