"""Modules that read the same input (q/k/v, gate/up) share one projection matmul, with the same
scores as one matmul per module: on a call's first batch by a guess from the model's structure,
from the second batch on by the groups learned on the first."""

from __future__ import annotations

import torch

from domlora_kernels import page_scores
from domlora_kernels.probe import energies
from domlora_kernels.testing import rel_err
from domlora_kernels.testing import naive_page, sample_batch, tiny_model

BATCHES = [sample_batch([9, 5, 12], seed=1), sample_batch([7, 12], seed=2), sample_batch([4, 10], seed=3)]


def _counting(monkeypatch) -> list[int]:
    widths: list[int] = []
    real = energies.project

    def project(x3, a):
        widths.append(a.shape[0])
        return real(x3, a)

    monkeypatch.setattr(energies, "project", project)
    return widths


def test_shared_projection_is_used_and_exact(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    widths = _counting(monkeypatch)
    got = page_scores(model, BATCHES, rank=4, seed=[0, 1], progress=False)
    # first batch, guessed from the structure: the siblings of equal input width share a matmul,
    # [q; k; v; o] (the tiny Llama's o_proj reads 32 features too; its columns are wasted and it
    # projects its own input), [gate; up], down
    first = [32, 8, 16, 8]
    learned = [24, 8, 16, 8]  # [q; k; v], o, [gate; up], down: k*r = 8 columns per module
    assert widths == first * 2 + learned * 2 * 2
    names = list(got.scores)
    ref, ref_per = naive_page(model, BATCHES, names, rank=4, seed=0)
    assert rel_err(torch.tensor([got.by_seed[0][n] for n in names]), torch.tensor([ref[n] for n in names])) < 1e-10
    assert max(rel_err(got.per_sample[n][0], ref_per[n]) for n in names) < 1e-10


def test_an_input_changed_between_modules_is_projected_again(monkeypatch):
    """From the second batch on, v_proj's input is modified in place after q and k ran: v_proj
    must not take its columns of the [q; k; v] projection, but project its own input."""
    model = tiny_model("llama", dtype=torch.float64)
    calls = []

    def bump(module, args):
        calls.append(1)
        if len(calls) > 1:
            args[0].add_(0.0)  # same values, new version

    widths = _counting(monkeypatch)
    h = model.model.layers[0].self_attn.v_proj.register_forward_pre_hook(bump)
    try:
        names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
        got = page_scores(model, BATCHES, rank=4, target_modules=names, progress=False)
        # first batch (v's input not yet bumped): [q;k;v] per layer, guessed; then per batch
        # layer 0: [q;k;v] and v again, layer 1: [q;k;v]
        assert widths == [12] * 2 + [12, 4, 12] * 2
        # one call per batch: the guess, and v projects again in layer 0 (its input was bumped)
        alone = [page_scores(model, [b], rank=4, target_modules=names, progress=False) for b in BATCHES]
    finally:
        h.remove()
    for n in names:
        ref = torch.cat([a.per_sample[n] for a in alone], dim=1)
        assert rel_err(got.per_sample[n], ref) < 1e-12


def test_both_cpu_layouts_of_the_projection_give_the_same_scores(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64)
    x3 = torch.randn(2, 5, 32, dtype=torch.float64)
    a = torch.randn(8, 32, dtype=torch.float64)
    p = energies.project(x3, a)  # the transposed layout: a view of a [8, 10] product
    assert p.shape == (2, 5, 8) and not p.is_contiguous() and rel_err(p, x3 @ a.T) < 1e-14
    got = page_scores(model, BATCHES, rank=4, seed=[0, 1], progress=False)
    monkeypatch.setattr(energies, "CPU_TRANSPOSED_PROJECTION", False)
    assert energies.project(x3, a).is_contiguous()
    plain = page_scores(model, BATCHES, rank=4, seed=[0, 1], progress=False)
    for n in plain.scores:
        assert rel_err(got.per_sample[n], plain.per_sample[n]) < 1e-12
