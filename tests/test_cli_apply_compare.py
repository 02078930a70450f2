"""`domlora probe --plot --seeds`, `domlora apply` (adapter folder loads back with peft), `domlora compare`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from domlora_kernels.cli import main
from domlora_kernels.lora_init import draw_lora_A
from domlora_kernels.scores import ModuleInfo, PageScores

peft = pytest.importorskip("peft")
WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A local transformers folder (tiny Llama + word-level tokenizer) and a jsonl of text records."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("tiny")
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), pad_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    with open(root / "data.jsonl", "w") as f:
        for n in (7, 11, 5, 9, 13, 6):
            f.write(json.dumps({"text": " ".join(WORDS[int(i)] for i in torch.randint(0, 60, (n,), generator=g))}) + "\n")
    return root / "model", root / "data.jsonl"


def _common(tiny_folder):
    model, data = tiny_folder
    return ["--model", str(model), "--data", str(data), "--batch-size", "4", "--no-progress", "--resamples", "40"]


def test_probe_plot_and_seeds(tiny_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep" / "scores.json"
    assert main(["probe", *_common(tiny_folder), "--seeds", "3", "--plot", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = PageScores.from_json(out)
    assert scores.seeds == [0, 1, 2] and scores.per_sample[scores.dominant_module].shape == (3, 6)
    conf = scores.meta["confidence"]
    assert conf["num_seeds"] == 3 and conf["num_resamples"] == 40
    assert conf["sentence"] in printed and conf["sentence"].startswith(f"dominant: {scores.dominant_module} (share ")
    assert "of 40 resamples and" in conf["sentence"] and "/3 seeds)" in conf["sentence"]
    assert "concentration: top-1 share" in printed and "rank agreement between the 3 A seeds" in printed  # text_report
    for name in ("scores_heatmap.png", "scores_top.png"):
        png = out.parent / name
        assert png.read_bytes()[:4] == b"\x89PNG" and f"plot: {png}" in printed


# peft 0.21's PeftModel.__init__ (reached here through PeftModel.from_pretrained, the test's own call) reads
# transformers 5's deprecated is_gradient_checkpointing; apply_domlora filters the same warning around its call
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_apply_writes_an_adapter_peft_loads_back(tiny_folder, tmp_path, capsys):
    import transformers as tf

    out = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # `domlora apply` printed transformers' deprecation before
        assert main(["apply", *_common(tiny_folder), "--top-k", "2", "--rank", "4", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = PageScores.from_json(out / "page_scores.json")
    placement = json.loads((out / "domlora_placement.json").read_text())
    top2 = [n for n, _ in scores.ranked()[:2]]
    assert placement["targets"] == top2 and placement["copied_A"] == top2
    assert scores.config["lora_alpha"] == 16.0 and scores.config["scaling"] == 4.0  # probe used the adapter's alpha
    assert "trainable parameters:" in printed and placement["trainable_params"] == sum(
        4 * (scores.modules[n].in_features + scores.modules[n].out_features) for n in top2)

    base = tf.AutoModelForCausalLM.from_pretrained(tiny_folder[0]).eval()
    ids = torch.tensor([[3, 8, 9, 20, 4]])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    pm = peft.PeftModel.from_pretrained(base, out)
    layers = {n: m for n, m in pm.get_base_model().named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(layers) == sorted(top2)
    for n in top2:
        assert torch.equal(layers[n].lora_A["default"].weight, draw_lora_A(n, 4, scores.modules[n].in_features, 0))
        assert layers[n].scaling["default"] == 4.0
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=ids).logits, ref, atol=1e-6)  # lora_B = 0: the output is unchanged


def test_apply_adalora_requires_total_step(tiny_folder, tmp_path, capsys):
    rc = main(["apply", *_common(tiny_folder), "--variant", "adalora", "--out-dir", str(tmp_path / "a")])
    assert rc == 2 and "--total-step" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_apply_with_a_budget_prints_and_saves_the_plan(tiny_folder, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["apply", *_common(tiny_folder), "--budget", "3%", "--rank", "4", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = PageScores.from_json(out / "page_scores.json")
    placement = json.loads((out / "domlora_placement.json").read_text())
    vanilla = sum(4 * (i.in_features + i.out_features) for i in scores.modules.values())
    assert placement["rule"] == "budget" and placement["budget"] == int(0.03 * vanilla)
    assert 0 < placement["trainable_params"] <= placement["budget"]
    assert placement["trainable_params"] == sum(
        k * (scores.modules[n].in_features + scores.modules[n].out_features) for n, k in placement["ranks"].items())
    assert f"within a budget of {placement['budget']:,} parameters" in printed
    cfg = json.loads((out / "adapter_config.json").read_text())
    for name, k in placement["ranks"].items():  # every module keeps scaling alpha / r = 16 / 4
        assert (k == 4) != (name in placement["alphas"]) and placement["alphas"].get(name, 16.0) / k == 4.0
    assert len(cfg["alpha_pattern"]) == len(placement["alphas"])


@pytest.mark.parametrize("args,message", [
    (["--budget", "10", "--strategy", "page"], "buys no adapter: rank 1 of the densest module"),
    (["--budget", "10"], "buys no adapter by strategy 'plop+types'"),
    (["--budget", "2"], "buys no adapter"),
    (["--budget", "150%"], "fractional budget must be in (0, 1]"),
    (["--budget", "1%", "--rank-pattern", "page"], "drop rank_pattern"),
])
def test_apply_budget_errors(tiny_folder, tmp_path, capsys, args, message):
    assert main(["apply", *_common(tiny_folder), *args, "--out-dir", str(tmp_path / "a")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_parser_refuses_what_it_cannot_run(capsys):
    for argv in (["apply", "--budget", "1%", "--top-k", "2"], ["probe", "--backend", "cuda"], ["apply", "--budget", "lots"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and "invalid choice: 'cuda'" in err and "a percentage (1%)" in err


def test_only_user_errors_become_an_error_line(monkeypatch, capsys):
    from domlora_kernels import cli
    from domlora_kernels.errors import MissingExtraError

    def fails_with(exc):
        monkeypatch.setattr(cli, "cmd_compare", lambda args: (_ for _ in ()).throw(exc))
        return main(["compare", "a.json", "b.json"])

    assert fails_with(MissingExtraError("plots need matplotlib: pip install matplotlib")) == 2
    assert "error: plots need matplotlib" in capsys.readouterr().err
    assert fails_with(PermissionError("domlora_out: permission denied")) == 2
    for bug in (TypeError("unsupported operand"), ImportError("cannot import name 'x'"), AttributeError("y")):
        with pytest.raises(type(bug)):
            fails_with(bug)


def _report(pages: list[float], path, names=None):
    names = names or [f"model.layers.{i}.mlp.down_proj" for i in range(len(pages))]
    modules = {n: ModuleInfo(i, "down_proj", 8, 8) for i, n in enumerate(names)}
    sc = dict(zip(names, pages))
    cfg = {"rank": 8, "projection": "A", "estimator": "fisher", "seeds": [0], "scaling": 1.0}
    return PageScores(sc, {0: sc}, None, modules, 1, cfg).to_json(path)


def test_compare_command(tmp_path, capsys):
    a = _report([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], tmp_path / "a.json")
    b = _report([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], tmp_path / "b.json")
    assert main(["compare", str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "same dominant module: yes" in out and "Spearman 1.000, Kendall tau-b 1.000" in out
    assert "top-5 overlap: 5/5" in out
    assert main(["compare", str(a), str(b), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "same dominant module: no" in out and "Spearman -1.000, Kendall tau-b -1.000" in out
    assert "top-3 overlap: 0/3" in out
    c = _report([1.0, 2.0], tmp_path / "c.json", names=["x.q", "x.k"])
    assert main(["compare", str(a), str(c)]) == 2
    assert "cover different modules" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probe_loads_on_the_device_and_dtype_asked(tiny_folder, tmp_path, capsys, dtype):
    from domlora_kernels.cli import build_parser, run_probe

    argv = ["probe", *_common(tiny_folder), "--device", "cpu", "--dtype", dtype]
    scores, model, _ = run_probe(build_parser().parse_args(argv), lora_alpha=None)
    assert model.dtype == getattr(torch, dtype) and {p.device.type for p in model.parameters()} == {"cpu"}
    assert scores.num_samples == 6 and all(v > 0 for v in scores.scores.values())
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 0
    assert PageScores.from_json(tmp_path / "r.json").num_samples == 6


def test_data_formats_and_fields_reach_the_probe(tiny_folder, tmp_path, capsys):
    rows = [json.loads(line)["text"] for line in tiny_folder[1].read_text().splitlines()]
    csv = tmp_path / "d.csv"
    csv.write_text("id,body\n" + "".join(f"{i},{t}\n" for i, t in enumerate(rows)))
    out = tmp_path / "r.json"
    args = ["probe", "--model", str(tiny_folder[0]), "--data", str(csv), "--text-field", "body", "--no-progress",
            "--resamples", "20", "--out", str(out)]
    assert main(args) == 0
    from_csv = PageScores.from_json(out)
    assert main(["probe", *_common(tiny_folder), "--out", str(out)]) == 0
    assert from_csv.num_samples == 6 and from_csv.scores == pytest.approx(PageScores.from_json(out).scores, rel=1e-6)


def test_chat_records_without_a_template_print_a_note(tiny_folder, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(3):
            msgs = [{"role": "user", "content": " ".join(WORDS[i : i + 4])}, {"role": "assistant", "content": " ".join(WORDS[i + 5 : i + 9])}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is a note line, not a warning with a source line
        assert main(["probe", "--model", str(tiny_folder[0]), "--data", str(data), "--no-progress", "--resamples", "20",
                     "--out", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: the tokenizer has no chat template: chat records are rendered plainly") == 1
    assert "Warning" not in err


@pytest.mark.parametrize("args,message", [
    (["--split", "test"], "--split select(s) from --data"),
    (["--text-field", "body", "--messages-field", "m"], "--text-field, --messages-field select(s) from --data"),
    (["--dtype", "float16", "--device-map", "auto", "--device", "cpu"], "not both"),
])
def test_loading_and_data_flag_errors(tiny_folder, capsys, args, message):
    assert main(["probe", "--model", str(tiny_folder[0]), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_on_a_cpu_machine(tiny_folder, capsys):
    assert main(["probe", *_common(tiny_folder), "--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err


def test_parser_takes_one_quantisation(capsys):
    with pytest.raises(SystemExit) as e:
        main(["probe", "--load-in-4bit", "--load-in-8bit"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_apply_on_a_4bit_base(tiny_folder, tmp_path, capsys):
    """`domlora apply --load-in-4bit --budget`: the QLoRA path saves an adapter that loads onto a 4-bit base."""
    bnb = pytest.importorskip("bitsandbytes", reason="the quant extra: pip install 'domlora_kernels[quant]'")
    from domlora_kernels.models import load_model

    out = tmp_path / "adapter"
    assert main(["apply", *_common(tiny_folder), "--load-in-4bit", "--budget", "3%", "--rank", "4", "--out-dir", str(out)]) == 0
    placement = json.loads((out / "domlora_placement.json").read_text())
    assert 0 < placement["trainable_params"] <= placement["budget"]
    base, _ = load_model(tiny_folder[0], load_in_4bit=True)
    pm = peft.PeftModel.from_pretrained(base, out)
    layers = {n: m for n, m in pm.get_base_model().named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(layers) == sorted(placement["ranks"])
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers.values())
