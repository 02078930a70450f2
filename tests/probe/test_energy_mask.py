"""energy_mask: only the masked positions' inputs and output gradients enter the energies (float64 oracle)."""

from __future__ import annotations

import pytest
import torch

from domlora_kernels import page_scores
from domlora_kernels.lora_init import draw_lora_A, lora_scaling
from domlora_kernels.probe.candidates import find_candidates
from domlora_kernels.probe.losses import causal_lm_losses
from domlora_kernels.testing import sample_batch, tiny_model


def _oracle(model, batch, mask, rank, seed, alpha):
    """Per sample: capture X and D = dL/dY of every candidate with autograd, then ||s sum_{t in mask} d_t (x_t A^T)^T||^2."""
    s = lora_scaling(rank, alpha)
    cands = {c.name: c for c in find_candidates(model)}
    out = {n: [] for n in cands}
    for b in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b:b + 1, :length]
        seen = {}

        def hook(name):
            def f(mod, args, y):
                y.retain_grad()
                seen[name] = (args[0].detach(), y)
            return f

        hs = [c.module.register_forward_hook(hook(n)) for n, c in cands.items()]
        try:
            causal_lm_losses(model(input_ids=ids, use_cache=False).logits, ids)[0].backward()
        finally:
            for h in hs:
                h.remove()
        keep = mask[b, :length].to(torch.float64)[:, None]
        for n, (x, y) in seen.items():
            c = cands[n]
            x2 = x.reshape(-1, c.in_features).double()
            d2 = y.grad.reshape(-1, c.out_features).double()
            a = draw_lora_A(n, rank, c.in_features, seed).double()
            out[n].append(float((s * d2.T @ ((x2 * keep) @ a.T)).square().sum()))
        model.zero_grad(set_to_none=True)
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in out.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_energies_count_only_the_masked_positions(arch):
    model = tiny_model(arch, torch.float64)
    batch = sample_batch([9, 6, 12], seed=3)
    mask = batch["attention_mask"].clone().bool()
    mask[:, 0] = False  # the first token (the attention sink) out of the energies
    got = page_scores(model, [{**batch, "energy_mask": mask}], rank=3, seed=2, lora_alpha=6, progress=False)
    want = _oracle(model, batch, mask, rank=3, seed=2, alpha=6)
    for n, w in want.items():
        assert torch.allclose(got.per_sample[n][0], w, rtol=1e-9, atol=1e-18), n
    full = page_scores(model, [batch], rank=3, seed=2, lora_alpha=6, progress=False)
    assert any(got.scores[n] != full.scores[n] for n in full.scores)  # the mask changed something


def test_a_full_mask_changes_nothing_and_a_bad_mask_is_refused():
    model = tiny_model("llama")
    batch = sample_batch([5, 7], seed=1)
    full = page_scores(model, [batch], rank=2, progress=False)
    ones = page_scores(model, [{**batch, "energy_mask": torch.ones_like(batch["input_ids"], dtype=torch.bool)}],
                       rank=2, progress=False)
    assert ones.scores == full.scores
    with pytest.raises(ValueError, match="energy_mask must be a tensor of the shape of input_ids"):
        page_scores(model, [{**batch, "energy_mask": torch.ones(2, 3)}], rank=2, progress=False)
