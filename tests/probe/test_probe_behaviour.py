"""The probe's contract beyond the numbers: determinism, A draws, the model left as found, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from domlora_kernels import PageScores, page_scores
from domlora_kernels.lora_init import draw_lora_A
from domlora_kernels.testing import sample_batch, tiny_model


@pytest.fixture
def model():
    return tiny_model("llama", torch.float32)


@pytest.fixture
def batches():
    return [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]


def test_same_call_twice_is_bit_identical(model, batches):
    a = page_scores(model, batches, rank=4, progress=False)
    b = page_scores(model, batches, rank=4, progress=False)
    assert a.scores == b.scores
    for n in a.per_sample:
        assert torch.equal(a.per_sample[n], b.per_sample[n])


def test_a_depends_on_seed_and_name_only(model, batches):
    full = page_scores(model, batches, rank=4, seed=3, progress=False)
    sub = page_scores(model, batches, rank=4, seed=3, target_modules=["down_proj", "q_proj"], progress=False)
    assert set(sub.scores) == {n for n in full.scores if n.endswith(("down_proj", "q_proj"))}
    for n in sub.scores:
        assert torch.equal(sub.lora_A[n], full.lora_A[n])
        # the same A, so the same energy; not bit for bit, since probing all modules projects
        # q/k/v's shared input in one matmul (probe._SharedInputs), a different float32 rounding
        assert sub.scores[n] == pytest.approx(full.scores[n], rel=1e-5)
    other = page_scores(model, batches, rank=4, seed=4, target_modules=["down_proj"], progress=False)
    assert all(not torch.equal(other.lora_A[n], full.lora_A[n]) for n in other.scores)


def test_a_has_peft_default_distribution():
    a = draw_lora_A("x", 64, 1000, seed=0)
    bound = 1 / 1000**0.5
    assert a.abs().max() <= bound
    assert float(a.var()) == pytest.approx(1 / (3 * 1000), rel=0.05)


def test_candidates_exclude_output_embedding_and_parse_names(model, batches):
    s = page_scores(model, batches, rank=2, progress=False)
    assert "lm_head" not in s.scores
    assert len(s.scores) == 2 * 7
    info = s.modules["model.layers.1.mlp.down_proj"]
    assert (info.layer, info.type, info.in_features, info.out_features) == (1, "down_proj", 96, 64)
    assert s.ranked()[0] == (s.dominant_module, max(s.scores.values()))
    assert sum(s.shares.values()) == pytest.approx(1.0)


def test_regex_and_exclude(model, batches):
    s = page_scores(model, batches, rank=2, target_modules=r".*layers\.0\..*", exclude_modules=["o_proj"], progress=False)
    assert sorted(s.scores) == sorted(
        f"model.layers.0.{p}" for p in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])


def test_padding_rows_change_nothing(model):
    alone = page_scores(model, [sample_batch([9], seed=1)], rank=3, progress=False)
    padded_batch = sample_batch([9, 12], seed=1)
    padded_batch["input_ids"][0, :9] = sample_batch([9], seed=1)["input_ids"][0]
    padded = page_scores(model, [padded_batch], rank=3, progress=False)
    for n in alone.scores:
        assert padded.per_sample[n][0, 0].item() == pytest.approx(alone.per_sample[n][0, 0].item(), rel=1e-5)


def test_json_round_trip(model, batches, tmp_path):
    s = page_scores(model, batches, rank=3, seed=[1, 2], progress=False)
    path = s.to_json(tmp_path / "r.json")
    back = PageScores.from_json(path)
    assert back.scores == s.scores and back.by_seed == s.by_seed
    assert back.dominant_module == s.dominant_module and back.num_samples == 5
    for n in s.scores:
        torch.testing.assert_close(back.per_sample[n], s.per_sample[n])
        assert torch.equal(back.lora_A[n], s.lora_A[n])


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "rg": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()},
    }


def _assert_same(a, b):
    assert a["rg"] == b["rg"] and a["modes"] == b["modes"] and a["hooks"] == b["hooks"]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for k in a["grad"]:
        assert (a["grad"][k] is None) == (b["grad"][k] is None) and (a["grad"][k] is None or torch.equal(a["grad"][k], b["grad"][k])), k


def _mixed_state_model():
    model = tiny_model("llama", torch.float32)
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back one module at a time
    model.model.embed_tokens.weight.requires_grad_(False)
    p = model.model.layers[1].mlp.up_proj.weight
    p.grad = torch.full_like(p, 0.5)  # an existing .grad must survive untouched
    return model


def test_model_left_as_found(batches):
    model = _mixed_state_model()
    before = _snapshot(model)
    page_scores(model, batches, rank=3, projection="AB", progress=False)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("where", ["forward", "loss", "backward"])
def test_model_left_as_found_after_failure(batches, where):
    model = _mixed_state_model()
    before = _snapshot(model)

    def loss_fn(m, batch):
        out = m(input_ids=batch["input_ids"], use_cache=False).logits
        if where == "forward":
            raise RuntimeError("boom in forward")
        losses = out.float().logsumexp(-1).mean(-1)
        if where == "loss":
            return losses * float("nan")
        losses.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom in backward")))
        return losses

    with pytest.raises((RuntimeError, FloatingPointError)):
        page_scores(model, batches, rank=3, loss_fn=loss_fn, progress=False)
    _assert_same(before, _snapshot(model))
    # and the model still trains normally afterwards: no probe hook left behind
    out = model(input_ids=batches[0]["input_ids"]).logits.sum()
    out.backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad is not None


def test_custom_loss_fn_matches_default(model, batches):
    from domlora_kernels.probe.losses import causal_lm_losses, default_labels

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return causal_lm_losses(logits, default_labels(batch["input_ids"], batch["attention_mask"]))

    a = page_scores(model, batches, rank=3, loss_fn=loss_fn, progress=False)
    b = page_scores(model, batches, rank=3, progress=False)
    assert a.scores == pytest.approx(b.scores, rel=1e-6)


def test_user_batches_not_modified(model, batches):
    before = copy.deepcopy(batches)
    page_scores(model, batches, rank=2, progress=False)
    for x, y in zip(before, batches):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_labels_restrict_targets(model):
    batch = sample_batch([10, 10], seed=3)
    masked = dict(batch, labels=batch["input_ids"].clone())
    masked["labels"][:, :6] = -100
    full = page_scores(model, [batch], rank=2, progress=False)
    part = page_scores(model, [masked], rank=2, progress=False)
    assert part.scores != pytest.approx(full.scores, rel=1e-3)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer >= 1"),
        (dict(projection="C"), "unknown projection 'C'; choose one of A, B, AB, expected"),
        (dict(estimator="mean"), "unknown estimator 'mean'; choose one of fisher, gradient"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(projection="expected", estimator="gradient"), "use estimator='fisher', or projection='A'"),
        (dict(target_modules=["nope"]), "matched no linear module; candidates are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "matched no linear module"),
        (dict(seed=[1, 1]), "seeds must be distinct"),
        (dict(seed="0"), "seed must be an int"),
        (dict(lora_alpha=-1), "lora_alpha must be a positive number"),
        (dict(projection="expected", seed=[0, 1]), "several seeds would give identical scores"),
    ],
)
def test_bad_arguments(model, batches, kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("'", "'")):
        page_scores(model, batches, progress=False, **kwargs)


def test_empty_batches(model):
    with pytest.raises(ValueError, match="batches is empty"):
        page_scores(model, [], progress=False)


def test_single_dict_instead_of_list(model, batches):
    with pytest.raises(TypeError, match=r"wrap a single batch in a list"):
        page_scores(model, batches[0], progress=False)


def test_batch_without_input_ids(model):
    with pytest.raises(ValueError, match="has no 'input_ids' tensor.*loss_fn"):
        page_scores(model, [{"tokens": torch.zeros(1, 3, dtype=torch.long)}], progress=False)


def test_mask_shape_mismatch(model):
    b = sample_batch([5, 5])
    b["attention_mask"] = b["attention_mask"][:, :3]
    with pytest.raises(ValueError, match="attention_mask must be a tensor of the same shape as input_ids"):
        page_scores(model, [b], progress=False)


def test_sample_without_target_token(model):
    b = sample_batch([6, 6])
    b["labels"] = b["input_ids"].clone()
    b["labels"][1] = -100
    with pytest.raises(ValueError, match="sample 1 has no target token"):
        page_scores(model, [b], progress=False)


def test_nonfinite_loss_names_the_sample(model, batches):
    def loss_fn(m, batch):
        out = m(input_ids=batch["input_ids"], use_cache=False).logits.mean(dim=(1, 2))
        return out * torch.tensor([1.0, float("inf"), 1.0])[: out.shape[0]]

    with pytest.raises(FloatingPointError, match="non-finite loss inf for sample 1"):
        page_scores(model, batches, loss_fn=loss_fn, progress=False)


def test_nonfinite_energy_names_module_and_sample(model, batches):
    # a finite loss whose gradient overflows float32 once squared: ||D^T P||^2 ~ (1e34)^2
    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"], use_cache=False).logits.mean(dim=(1, 2)) * 1e37

    with pytest.raises(FloatingPointError, match=r"non-finite PAGE energy for module model\.layers\.\d\..* at sample \d"):
        page_scores(model, batches, loss_fn=loss_fn, progress=False)


def test_loss_must_be_per_sample(model, batches):
    with pytest.raises(ValueError, match=r"one loss per sample \[B\]"):
        page_scores(model, batches, loss_fn=lambda m, b: m(input_ids=b["input_ids"]).logits.mean(), progress=False)


def test_loss_that_ignores_the_model(model, batches):
    with pytest.raises(RuntimeError, match="does not depend on any probed module"):
        page_scores(model, batches, loss_fn=lambda m, b: torch.ones(2), progress=False)


def test_shared_module_is_refused(batches):
    model = tiny_model("llama", torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    model.model.layers[1].mlp.down_proj = layer  # the same weight applied twice per forward
    with pytest.raises(RuntimeError, match="ran 2 times in one forward pass.*exclude_modules"):
        page_scores(model, batches, rank=2, progress=False)
