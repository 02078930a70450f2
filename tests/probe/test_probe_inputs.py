"""The probe on inputs the oracle tests do not try, and oracles that share no code with it.

- the per-row loss against transformers' own ``model(input_ids, labels=...).loss``;
- the ``r / (3n)`` constant of projection "expected" against a Monte-Carlo mean over A draws
  made here, not by :mod:`domlora_kernels.lora_init`;
- left padding, ``-100`` labels inside a sequence, generator batches, bf16 and fp16 models,
  an offloaded (meta-first) model, Ctrl-C mid-probe, a module on a flattened activation,
  backend="triton" on a CPU model, and ``torch.set_float32_matmul_precision("high")``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from domlora_kernels import page_scores
from domlora_kernels.probe.losses import causal_lm_losses
from domlora_kernels.testing import rel_err
from test_probe_behaviour import _assert_same, _mixed_state_model, _snapshot
from domlora_kernels.testing import naive_page, sample_batch, tiny_model

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]


def _rel(a: dict, b: dict) -> float:
    return rel_err(torch.tensor([a[k] for k in b]), torch.tensor([b[k] for k in b]))


# ------------------------------------------------------------------ loss against transformers
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_equals_transformers_loss_at_batch_one(arch):
    """causal_lm_losses shifts, masks -100 and averages as transformers does (B=1)."""
    model = tiny_model(arch, torch.float32)
    ids = sample_batch([14], seed=4)["input_ids"]
    labels = ids.clone()
    labels[0, 5:8] = -100  # inside the sequence, not only at its ends
    for lab in (ids, labels):
        with torch.no_grad():
            out = model(input_ids=ids, labels=lab, use_cache=False)
            ours = causal_lm_losses(out.logits, lab)
        assert ours.shape == (1,)
        assert float(ours[0]) == pytest.approx(float(out.loss), rel=1e-6)
    # the masked labels move the loss by more than the tolerance above
    assert float(causal_lm_losses(out.logits, labels)[0]) != pytest.approx(float(causal_lm_losses(out.logits, ids)[0]), rel=1e-5)


# ------------------------------------------------------------------ r / (3n) by Monte Carlo
def _sample_gradient(model, ids, name):
    """float64 weight gradient of module ``name`` for one sample, by plain autograd."""
    mod = dict(model.named_modules())[name]
    mod.weight.requires_grad_(True)
    try:
        causal_lm_losses(model(input_ids=ids, use_cache=False).logits, ids)[0].backward()
        return mod.weight.grad.detach().to(torch.float64)
    finally:
        mod.weight.grad = None
        mod.weight.requires_grad_(False)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"])
def test_expected_projection_matches_monte_carlo_over_A(name):
    """E_A ||s G A^T||^2 over A ~ U(-1/sqrt(n), 1/sqrt(n)) [r, n], estimated from 40,000 rows
    of A drawn here; the probe's "expected" energy must sit within 4 standard errors, and 4
    standard errors must be under 5% of it, so a constant wrong by 10% fails."""
    model = tiny_model("llama", torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = sample_batch([11], seed=7)["input_ids"]
    rank, alpha = 3, 6
    got = page_scores(model, [{"input_ids": ids}], rank=rank, lora_alpha=alpha, projection="expected",
                      target_modules=[name], progress=False).per_sample[name][0, 0].item()
    g = _sample_gradient(model, ids, name)  # [m, n]
    n = g.shape[1]
    gen = torch.Generator().manual_seed(123)
    rows = (torch.rand(40_000, n, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(n)  # rows of A
    s2 = (alpha / rank) ** 2
    per_row = s2 * (rows @ g.T).square().sum(dim=1)  # ||s G a||^2; ||s G A^T||^2 sums r rows
    mc, se = rank * per_row.mean().item(), rank * per_row.std().item() / math.sqrt(rows.shape[0])
    assert 4 * se < 0.05 * mc, "too few draws to tell a 10% error"
    assert abs(got - mc) < 4 * se, (got, mc, se)


# ------------------------------------------------------------------ padding and labels
def test_left_padding_equals_each_row_alone():
    """Left-padded rows score as the same rows alone. The position ids are passed as
    ``generate`` does (the probe hands extra batch keys to the model); the default labels must
    not make the first real token a target predicted from a pad."""
    model = tiny_model("llama", torch.float64)
    right = sample_batch([9, 12], seed=3)
    ids, mask = torch.zeros_like(right["input_ids"]), torch.zeros_like(right["attention_mask"])
    for b, n in enumerate([9, 12]):  # the same tokens, moved to the right end of the row
        ids[b, 12 - n:] = right["input_ids"][b, :n]
        mask[b, 12 - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    left = page_scores(model, [{"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}],
                       rank=3, projection="AB", progress=False)
    for b, n in enumerate([9, 12]):
        alone = page_scores(model, [{"input_ids": right["input_ids"][b:b + 1, :n]}], rank=3, projection="AB",
                            progress=False)
        for name, per in alone.per_sample.items():
            assert left.per_sample[name][0, b].item() == pytest.approx(per[0, 0].item(), rel=1e-8), (b, name)


def test_ignored_labels_inside_sequences_match_naive_oracle():
    model = tiny_model("llama", torch.float64)
    batch = sample_batch([9, 12, 7], seed=5)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[0, 3:5] = -100
    labels[1, 2] = labels[1, 6:9] = -100
    batch = dict(batch, labels=labels)
    got = page_scores(model, [batch], rank=3, progress=False)
    want, want_per = naive_page(model, [batch], list(got.scores), rank=3)
    assert _rel(got.scores, want) < 1e-10
    for name in want:
        torch.testing.assert_close(got.per_sample[name][0], want_per[name], rtol=1e-9, atol=0)
    plain = page_scores(model, [{k: v for k, v in batch.items() if k != "labels"}], rank=3, progress=False)
    assert _rel(plain.scores, got.scores) > 1e-3  # the labels really changed what was measured


def test_generator_batches_equal_a_list():
    model = tiny_model("llama", torch.float32)
    batches = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]
    listed = page_scores(model, batches, rank=3, progress=False)
    generated = page_scores(model, (b for b in batches), rank=3, progress=True)  # no __len__: bar without total
    assert generated.scores == listed.scores and generated.num_samples == 5
    assert generated.meta["num_batches"] == 2


# ------------------------------------------------------------------ half-precision models
# Measured worst over these three cases: bf16 3.0e-3, f16 2.2e-4; the tolerances leave ~7x.
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1.5e-3)], ids=["bf16", "f16"])
@pytest.mark.parametrize("projection,estimator", [("A", "fisher"), ("AB", "gradient"), ("expected", "fisher")])
def test_half_precision_model_close_to_float32(dtype, tol, projection, estimator):
    """Same weights (rounded), same batches: the scores of the whole model within ``tol``
    (relative L2) of the float32 model's; energies come back float64 and finite."""
    batches = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]
    kw = dict(rank=4, projection=projection, estimator=estimator, progress=False)
    ref = page_scores(tiny_model("llama", torch.float32), batches, **kw)
    got = page_scores(tiny_model("llama", dtype), batches, **kw)
    assert _rel(got.scores, ref.scores) < tol
    assert got.dominant_module == ref.dominant_module
    if estimator == "fisher":
        per = torch.stack(list(got.per_sample.values()))
        assert per.dtype == torch.float64 and torch.isfinite(per).all()


# ------------------------------------------------------------------ offloaded model
def test_offloaded_model_with_meta_first_parameter():
    """accelerate's cpu_offload leaves every weight on ``meta`` and loads it per forward."""
    accelerate = pytest.importorskip("accelerate")
    batches = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]
    ref = page_scores(tiny_model("llama", torch.float64), batches, rank=3, projection="AB", progress=False)
    model = accelerate.cpu_offload(tiny_model("llama", torch.float64), execution_device=torch.device("cpu"))
    assert next(model.parameters()).device.type == "meta"
    got = page_scores(model, batches, rank=3, projection="AB", progress=False)
    assert _rel(got.scores, ref.scores) < 1e-10
    assert all(p.device.type == "meta" for p in model.parameters())


# ------------------------------------------------------------------ Ctrl-C
def test_keyboard_interrupt_mid_probe_restores_the_model():
    model = _mixed_state_model()
    batches = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2)]
    before = _snapshot(model)
    seen = []

    def loss_fn(m, batch):
        seen.append(1)
        logits = m(input_ids=batch["input_ids"], use_cache=False).logits
        if len(seen) == 2:
            raise KeyboardInterrupt
        return causal_lm_losses(logits, batch["input_ids"])

    with pytest.raises(KeyboardInterrupt):
        page_scores(model, batches, rank=3, loss_fn=loss_fn, progress=False)
    assert len(seen) == 2
    _assert_same(before, _snapshot(model))


# ------------------------------------------------------------------ flattened activations
class _RoutedNet(nn.Module):
    """Embedding, an MLP, a MoE-style router on the tokens flattened ([B*T, d]), a head.

    ``copied``: the router gets a copy of the flattened tokens instead of a view of them.
    """

    def __init__(self, copied: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.copied = copied
        self.emb = nn.Embedding(40, 16)
        self.up = nn.Linear(16, 16)
        self.router = nn.Linear(16, 4)
        self.mix = nn.Linear(4, 16)
        self.head = nn.Linear(16, 40)
        self.to(torch.float64)

    def forward(self, ids):
        h = torch.tanh(self.up(self.emb(ids)))
        b, t, d = h.shape
        tokens = h.reshape(-1, d).clone() if self.copied else h.reshape(-1, d)
        w = torch.softmax(self.router(tokens), dim=-1).reshape(b, t, -1)
        return self.head(h + self.mix(w))


def _loss(model, batch):
    return causal_lm_losses(model(batch["input_ids"]), batch["input_ids"])


def _naive_per_sample(model, ids, scores):
    """Per-sample ||G_b A^T||^2 of every scored module, one sample at a time by autograd."""
    mods = dict(model.named_modules())
    per = {n: [] for n in scores.scores}
    for b in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        _loss(model, {"input_ids": ids[b:b + 1]})[0].backward()
        for n in per:
            per[n].append(float((mods[n].weight.grad @ scores.lora_A[n].double().T).square().sum()))
    model.zero_grad(set_to_none=True)
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in per.items()}


def test_module_on_a_flat_view_of_the_tokens_scored_per_sample():
    """h.reshape(-1, d) of h [B, T, d] holds each sample's T rows in order: scored exactly."""
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    net = _RoutedNet()
    got = page_scores(net, [{"input_ids": ids}], rank=2, loss_fn=_loss, progress=False)
    want = _naive_per_sample(net, ids, got)
    assert set(got.scores) == {"up", "router", "mix", "head"}
    for n, w in want.items():
        torch.testing.assert_close(got.per_sample[n][0], w, rtol=1e-10, atol=0)


def test_module_on_copied_tokens_is_refused_by_name():
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"router received 21 rows for a batch of 3 samples.*exclude_modules=\['router'\]"):
        page_scores(_RoutedNet(copied=True), [{"input_ids": ids}], rank=2, loss_fn=_loss, progress=False)
    # excluded, the rest is scored per sample, as one sample at a time by autograd gives
    net = _RoutedNet(copied=True)
    got = page_scores(net, [{"input_ids": ids}], rank=2, loss_fn=_loss, exclude_modules=["router"], progress=False)
    want = _naive_per_sample(net, ids, got)
    assert set(got.scores) == {"up", "mix", "head"}
    for n, w in want.items():
        torch.testing.assert_close(got.per_sample[n][0], w, rtol=1e-10, atol=0)


def test_module_on_flattened_input_scored_per_sample_at_batch_one():
    """With one sample per batch every row of the router is that sample's: scored exactly."""
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    net = _RoutedNet(copied=True)
    got = page_scores(net, [{"input_ids": ids[b:b + 1]} for b in range(3)], rank=2, loss_fn=_loss, progress=False)
    want = _naive_per_sample(net, ids, got)
    assert got.per_sample["router"].shape == (1, 3)
    for n, w in want.items():
        torch.testing.assert_close(got.per_sample[n][0], w, rtol=1e-10, atol=0)


# ------------------------------------------------------------------ backend and precision
def test_triton_backend_on_cpu_model_fails_before_the_forward(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("llama", torch.float32)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        page_scores(model, [sample_batch([5, 7])], rank=2, backend="triton", progress=False)
    assert forwards == []


def test_probe_matmuls_pinned_to_full_float32_precision(monkeypatch):
    """Under "high" (TF32 on CUDA) the probe's own matmuls and reductions still run at
    "highest", as the Triton kernels do; the model's forward keeps the caller's setting."""
    from domlora_kernels.probe import energies

    seen_ops, seen_model = set(), set()
    real = energies.ops.projected_energy

    def spy(*a, **k):
        seen_ops.add(torch.get_float32_matmul_precision())
        return real(*a, **k)

    monkeypatch.setattr(energies.ops, "projected_energy", spy)
    model = tiny_model("llama", torch.float32)
    model.model.layers[0].register_forward_hook(lambda *a: seen_model.add(torch.get_float32_matmul_precision()))
    batches = [sample_batch([9, 5, 12], seed=1)]
    ref = page_scores(model, batches, rank=3, projection="AB", progress=False)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = page_scores(model, batches, rank=3, projection="AB", progress=False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)
    assert seen_ops == {"highest"} and seen_model == {"highest", "high"}
    assert got.scores == pytest.approx(ref.scores, rel=1e-6)
