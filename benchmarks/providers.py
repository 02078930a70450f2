"""The providers the probe benchmark compares, all on the same model and the same batch.

Every provider does the work of one PAGE measurement of one batch (forward, backward, the
energies) and returns its energies as ``{module name: float64 tensor}`` so the harness can
check that the providers agree before it compares their times. The loss is the same
everywhere: per-sample mean next-token cross-entropy
(:func:`domlora_kernels.probe.losses.causal_lm_losses`), summed over the batch.

A provider is a class with three steps, of which only ``run`` is timed:

- ``prepare()``: untimed state changes the method needs on the shared model (weights that
  require grad, Opacus' wrapper), so that no provider leaves hooks or flags on the model
  that would slow down the next one;
- ``run()``: the measured work, returns the energies;
- ``teardown()``: undo ``prepare`` (the model is left frozen, in eval mode, no ``.grad``).

The shared model is kept frozen and in eval mode between providers, which is the state
``page_scores`` also leaves it in.

Decision providers (``decision`` set) are the peers a user would pick instead of PAGE to
decide where LoRA goes: peft's EVA (a data-driven rank allocation) and peft's KappaTune (a
data-free module selection). They compute something else than the energies, so ``run``
returns None and the harness compares only the cost of the decision; what they decided is
in ``outcome()``. ``slow`` providers run fewer timed rounds (the harness's round cap).
"""

from __future__ import annotations

import abc

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from domlora_kernels import page_scores
from domlora_kernels.probe.losses import causal_lm_losses
from domlora_kernels.lora_init import draw_lora_A
from domlora_kernels.probe.candidates import find_candidates

Energies = dict[str, torch.Tensor]


def _losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample losses ``[B]`` of a full-length batch (labels = input ids, no padding)."""
    out = model(input_ids=ids, use_cache=False)
    return causal_lm_losses(out.logits, ids)


class Provider(abc.ABC):
    """Base class: holds the model, the batch ``ids [B, T]`` and the rank."""

    name = "?"
    # What the energies are comparable with: "A" (per-sample ||G_b A^T||^2), "A-batch"
    # (||sum_b G_b A^T||^2), "expected" (r / 3n ||G_b||^2), or None (the floor computes none).
    kind: str | None = "A"
    # What a decision provider decides (None: it computes PAGE's energies or the floor).
    decision: str | None = None
    # True: too slow for every round of the headline; the harness caps its timed rounds.
    slow = False

    def __init__(self, model: nn.Module, ids: torch.Tensor, rank: int):
        self.model, self.ids, self.rank = model, ids, rank
        self.cands = find_candidates(model)
        # The probe's own A matrices, drawn once outside the timed region: every naive
        # provider projects its gradients on exactly the A the probe uses. An expert weight's
        # is peft's [r*E, n], viewed [E, r, n].
        self.A = {}
        for c in self.cands:
            a = draw_lora_A(c.name, rank * c.num_experts, c.in_features, 0).to(ids.device)
            self.A[c.name] = a if c.parameter is None else a.view(c.num_experts, rank, c.in_features)

    def prepare(self) -> None:
        pass

    @abc.abstractmethod
    def run(self) -> Energies | None:
        """The timed work: one probe / forward+backward on the batch; returns its energies."""

    def teardown(self) -> None:
        pass

    def outcome(self) -> dict | None:
        """What the last ``run`` decided, JSON-able (decision providers only)."""
        return None

    # shared helpers
    def _weights_require_grad(self, flag: bool) -> None:
        for c in self.cands:
            c.weight.requires_grad_(flag)
            c.weight.grad = None

    def _projected(self, c, g: torch.Tensor) -> torch.Tensor:
        """``||G A^T||^2`` of the gradient ``g`` of candidate ``c``'s weight; for an expert
        weight the sum over its experts of ``||G_e A_e^T||^2``."""
        if c.parameter is None:
            return (g @ self.A[c.name].T).square().sum()
        g = g.transpose(1, 2) if c.module.is_transposed else g  # [E, out, in]
        return (g @ self.A[c.name].transpose(1, 2)).square().sum()


class Probe(Provider):
    """``page_scores`` as shipped: backend "auto", estimator fisher, projection A."""

    name = "probe"
    projection = "A"

    def run(self) -> Energies:
        s = page_scores(
            self.model, [{"input_ids": self.ids}], rank=self.rank, projection=self.projection,
            estimator="fisher", progress=False,
        )
        return {n: t[0] for n, t in s.per_sample.items()}


class ProbePlainLayout(Probe):
    """The probe with its CPU projection computed as ``X A^T`` instead of ``(A X^T)^T``
    (``energies.CPU_TRANSPOSED_PROJECTION``): the comparison benchmarks/projection_layout.py makes."""

    name = "probe-xat"

    def run(self) -> Energies:
        from domlora_kernels.probe import energies

        before = energies.CPU_TRANSPOSED_PROJECTION
        energies.CPU_TRANSPOSED_PROJECTION = False
        try:
            return super().run()
        finally:
            energies.CPU_TRANSPOSED_PROJECTION = before


class ProbeExpected(Probe):
    """``page_scores(projection="expected")``: E_A ||G_b A^T||^2 = r/(3n) ||G_b||^2, the
    quantity Opacus' ghost norms give too."""

    name = "probe-expected"
    kind = "expected"
    projection = "expected"


class Floor(Provider):
    """The same forward and backward with every weight frozen and no probe: what the probe
    cannot go below. The embedding output is made to require grad (as
    ``enable_input_require_grads`` does) so that backward runs through every layer."""

    name = "floor"
    kind = None

    def prepare(self) -> None:
        emb = self.model.get_input_embeddings()
        self._h = emb.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))

    def run(self) -> None:
        with torch.enable_grad():
            _losses(self.model, self.ids).sum().backward()
        return None

    def teardown(self) -> None:
        self._h.remove()


class Autograd(Provider):
    """Naive: candidate weights require grad, one backward of the summed loss, then
    ``||G A^T||^2`` per module from the batch gradient ``G = weight.grad`` (not per sample)."""

    name = "autograd"
    kind = "A-batch"

    def prepare(self) -> None:
        self._weights_require_grad(True)

    def run(self) -> Energies:
        for c in self.cands:
            c.weight.grad = None
        with torch.enable_grad():
            _losses(self.model, self.ids).sum().backward()
        with torch.no_grad():
            return {c.name: self._projected(c, c.weight.grad).double().reshape(1) for c in self.cands}

    def teardown(self) -> None:
        self._weights_require_grad(False)


class AutogradPerSample(Autograd):
    """Naive and exactly the paper's definition: one sample per forward/backward,
    ``||G_b A^T||^2`` per module and sample. (Oracle 1 of PAGE.md, in float32.)"""

    name = "autograd-per-sample"
    kind = "A"

    def run(self) -> Energies:
        out = {c.name: torch.zeros(self.ids.shape[0], dtype=torch.float64) for c in self.cands}
        for b in range(self.ids.shape[0]):
            for c in self.cands:
                c.weight.grad = None
            with torch.enable_grad():
                _losses(self.model, self.ids[b:b + 1]).sum().backward()
            with torch.no_grad():
                for c in self.cands:
                    out[c.name][b] = float(self._projected(c, c.weight.grad))
        return out


class TorchFunc(Provider):
    """``torch.func``: ``vmap(grad(loss of one sample))`` over the batch, differentiating only
    the candidate weights through ``functional_call``. Holds ``B`` copies of all candidate
    weights (their per-sample gradients) at once."""

    name = "torch.func"

    def prepare(self) -> None:
        from torch.func import functional_call, grad, vmap

        model = self.model
        names = [c.name + ".weight" for c in self.cands]
        params = dict(model.named_parameters())
        self._params = {n: params[n].detach() for n in names}

        def loss_one(p, ids_row):
            # causal_lm_losses checks for empty rows with a data-dependent nonzero(), which
            # vmap cannot batch; for full-length rows (no -100 label) its value is exactly
            # this mean next-token cross-entropy.
            out = functional_call(model, p, (ids_row.unsqueeze(0),), {"use_cache": False})
            return F.cross_entropy(out.logits[0, :-1].float(), ids_row[1:], reduction="mean")

        self._fn = vmap(grad(loss_one), in_dims=(None, 0))

    def run(self) -> Energies:
        with torch.enable_grad():
            g = self._fn(self._params, self.ids)  # name -> [B, m, n]
        with torch.no_grad():
            return {c.name: (g[c.name + ".weight"] @ self.A[c.name].T).square().sum(dim=(1, 2)).double() for c in self.cands}

    def teardown(self) -> None:
        self._fn = self._params = None


class Opacus(Provider):
    """Opacus' ghost norms (``GradSampleModuleFastGradientClipping``, ``use_ghost_clipping``):
    per-sample ``||G_b||`` of each linear weight from ``[T, T]`` Gram matrices in one backward
    pass; weights require grad, so autograd also forms the batch weight gradients.
    Compared with ``page_scores(projection="expected")``: energy ``r / (3n) ||G_b||^2``."""

    name = "opacus"
    kind = "expected"

    def prepare(self) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        self._weights_require_grad(True)
        # strict=False: Llama keeps its rotary frequencies in a buffer, which strict mode
        # refuses; loss_reduction="sum" matches our summed per-sample losses (no rescale).
        self._gsm = GradSampleModuleFastGradientClipping(
            self.model, batch_first=True, loss_reduction="sum", strict=False, use_ghost_clipping=True,
        )
        # Opacus captures activations only in training mode; Llama has no active dropout
        # (attention_dropout 0), so train mode computes the same function as eval.
        self.model.train()

    def run(self) -> Energies:
        for c in self.cands:
            c.module.weight.grad = None
        with torch.enable_grad():
            _losses(self._gsm, self.ids).sum().backward()
        out = {}
        for c in self.cands:
            ns = c.module.weight._norm_sample  # [B] per-sample ||G_b||_F
            out[c.name] = ns.double().square() * (self.rank / (3.0 * c.in_features))
        return out

    def teardown(self) -> None:
        self._gsm._close()
        self.model.eval()
        for c in self.cands:
            for attr in ("_norm_sample", "_forward_counter", "grad_sample"):
                if hasattr(c.module.weight, attr):
                    delattr(c.module.weight, attr)
        self._weights_require_grad(False)
        self._gsm = None


EVA_RHO = 2.0  # EvaConfig's default: a module may get up to rho * r of the r * modules budget


def eva_min_tokens(rank: int) -> int:
    """Tokens a batch needs for EVA to fit its SVD (``round(rho r)`` components); with fewer,
    peft skips every SVD step and its convergence loop never ends."""
    return round(rank * EVA_RHO)


def _remove_eva_hooks(model: nn.Module) -> None:
    """Drop the forward hooks EVA registers, which it leaves behind when it raises."""
    from peft.tuners.lora.eva import _Hook

    for mod in model.modules():
        for key in [k for k, h in mod._forward_hooks.items() if isinstance(h, _Hook)]:
            del mod._forward_hooks[key]


class Eva(Provider):
    """peft's EVA, the way ``initialize_lora_eva_weights`` computes it before loading the
    weights: ``get_eva_state_dict`` with ``LoraConfig(r=rank, init_lora_weights="eva",
    eva_config=EvaConfig(rho=2))`` on every candidate, the provider's batch as the
    dataloader. One forward to find modules with equal inputs, then forwards with an
    incremental SVD of each module's input, cycling over the batches until the components
    its rank budget uses have converged. Its outcome: the rank of every module (0: no
    adapter) and the passes it needed, counted through the ``forward_fn`` it calls (the
    same forward as the other providers: ``use_cache=False``)."""

    name = "eva"
    kind = None
    decision = "rank allocation (incremental SVD of each module's inputs, cycled to convergence)"
    slow = True
    max_passes = 200  # EVA has no cap of its own: a batch that never converges would loop forever

    def prepare(self) -> None:
        from peft import EvaConfig, LoraConfig

        self._batches = [{"input_ids": self.ids}]
        self._config = LoraConfig(r=self.rank, init_lora_weights="eva", eva_config=EvaConfig(rho=EVA_RHO),
                                  target_modules=[c.name for c in self.cands])
        self._forwards, self._ranks = 0, None

    def _forward(self, model: nn.Module, inputs: dict):
        self._forwards += 1
        if self._forwards > 1 + self.max_passes * len(self._batches):
            raise RuntimeError(f"EVA did not converge within {self.max_passes} passes over the batches")
        return model(**inputs, use_cache=False)

    def run(self) -> None:
        from peft import get_eva_state_dict

        self._forwards, training = 0, self.model.training
        try:
            eva = get_eva_state_dict(self.model, self._batches, peft_config=self._config,
                                     forward_fn=self._forward, show_progress_bar=False)
        except BaseException:
            _remove_eva_hooks(self.model)
            self.model.train(training)
            raise
        self._ranks = {n: int(u.shape[0]) for n, u in eva.items()}
        return None

    def outcome(self) -> dict:
        ranks = list(self._ranks.values())
        return {"passes": (self._forwards - 1) / len(self._batches), "forwards": self._forwards,
                "batches": len(self._batches), "rank_budget": self.rank * len(self.cands), "rank_total": sum(ranks),
                "rank_min": min(ranks), "rank_max": max(ranks), "modules_with_rank": sum(r > 0 for r in ranks),
                "ranks": self._ranks}


class KappaTune(Provider):
    """peft's KappaTune (``find_kappa_target_modules``, its default ``top_p=0.2``): the fifth
    of the model's linear modules with the lowest weight condition number, from an SVD of
    every weight; data-free, so the batch is not used. Its outcome: the modules it picks."""

    name = "kappatune"
    kind = None
    decision = "module selection (lowest weight condition numbers, data-free)"
    slow = True
    top_p = 0.2

    def run(self) -> None:
        from peft import find_kappa_target_modules

        self._picked = find_kappa_target_modules(self.model, top_p=self.top_p, show_progress=False)["target_modules"]
        return None

    def outcome(self) -> dict:
        cands = {c.name for c in self.cands}
        return {"top_p": self.top_p, "modules_picked": len(self._picked),
                "candidates_picked": sum(n in cands for n in self._picked), "modules": self._picked}


class StrategyAdam(Provider):
    """The package's ``adam`` and ``types`` strategies: one probe with the gradient estimator, whose
    exact mean projected gradient gives Adam's first-step decrease per module (its L1 norm)."""

    name = "strategy-adam"
    kind = None
    decision = "module ranking by Adam's first-step loss decrease (mean projected gradient, L1)"

    def run(self) -> None:
        self._s = page_scores(self.model, [{"input_ids": self.ids}], rank=self.rank, estimator="gradient",
                              progress=False)
        return None

    def outcome(self) -> dict:
        adam = self._s.signals["adam"]
        return {"top_module": max(adam, key=adam.get)}


class StrategyHeldout(StrategyAdam):
    """The ``heldout`` strategy: a gradient probe on each half of the batch (rows alternate), then
    the held-out half's mean gradient against the sign of the training half's."""

    name = "strategy-heldout"
    decision = "module ranking by the held-out loss decrease under Adam's first step on the other half"

    def run(self) -> None:
        from domlora_kernels import measure_signals

        self._s = measure_signals(self.model, [{"input_ids": self.ids}], "heldout", rank=self.rank, progress=False)
        return None

    def outcome(self) -> dict:
        held = self._s.signals["heldout"]
        return {"top_module": max(held, key=held.get)}


class StrategyPilot(Provider):
    """The ``pilot`` strategy's own work (the probe it also runs for the module list is the
    ``probe`` row): LoRA rank 1 on every candidate, 30 AdamW steps on the batch, one forward to
    score each module's realised update."""

    name = "strategy-pilot"
    kind = None
    decision = "module ranking by what a 30-step rank-1 all-module LoRA pilot realised (||s B A x||)"
    slow = True

    def run(self) -> None:
        from domlora_kernels.placement.signals import PILOT_DEFAULTS, pilot_signal

        names = [c.name for c in self.cands if c.parameter is None]
        self._pilot = pilot_signal(self.model, [{"input_ids": self.ids}], names, **PILOT_DEFAULTS)
        return None

    def outcome(self) -> dict:
        return {"top_module": max(self._pilot, key=self._pilot.get), "steps": 30}


# Tokenizers of the harness's real models, by id(model) (bench_probe.build_model registers them):
# the set providers read the shipped calibration set through them.
TOKENIZERS: dict[int, object] = {}


class ProbeSet(Provider):
    """The probe over a calibration set, reading every batch: what a user who probes a whole set
    waits for. On a real model (its tokenizer registered in ``TOKENIZERS``) the set is the shipped
    calibration set (48 samples of 4 tasks, in batches of the harness's B, at most T tokens);
    on a random-weight model, ``SET_BATCHES`` batches of random ids of the harness's shape (the
    first the harness's batch). Its decision is PAGE's top-1 module."""

    name = "probe-set"
    kind = None
    decision = "PAGE's top-1 module over a calibration set, every batch read"
    slow = True
    SET_BATCHES = 6
    stop = None

    def prepare(self) -> None:
        B, T = self.ids.shape
        tok = TOKENIZERS.get(id(self.model))
        if tok is not None:
            from domlora_kernels.data import load_calibration, make_batches

            self._batches = [{k: v.to(self.ids.device) for k, v in b.items()}
                             for b in make_batches(load_calibration(), tok, batch_size=B, max_length=T)]
            self._set = f"the shipped calibration set, batches of {B}, at most {T} tokens"
            return
        vocab = self.model.config.vocab_size
        self._batches = [{"input_ids": self.ids}] + [
            {"input_ids": torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1235 + i)).to(self.ids.device)}
            for i in range(self.SET_BATCHES - 1)]
        self._set = f"{self.SET_BATCHES} batches of random ids [{B}, {T}]"

    def run(self) -> None:
        self._s = page_scores(self.model, self._batches, rank=self.rank, estimator="fisher", stop=self.stop,
                              progress=False)
        return None

    def outcome(self) -> dict:
        out = {"top_module": max(self._s.scores, key=self._s.scores.get), "samples": int(self._s.num_samples),
               "of": sum(int(b["input_ids"].shape[0]) for b in self._batches), "set": self._set}
        if self.stop is not None:
            out["stability"] = self._s.meta["stability"]
        return out


class ProbeStopped(ProbeSet):
    """The same set, probed with the default stopping rule on the top-1 module
    (:class:`~domlora_kernels.probe.stopping.StopRule`: 95% of 200 bootstrap resamples agree,
    at least 16 samples): it stops at the first batch where the decision is stable."""

    name = "probe-stopped"
    decision = "PAGE's top-1 module over the same set, stopped once stable (StopRule(top_k=1))"

    @property
    def stop(self):
        from domlora_kernels.probe.stopping import StopRule

        return StopRule(top_k=1)


class LoraStep(Provider):
    """One training step of vanilla LoRA (rank r on every candidate module, AdamW): the unit a
    strategy's cost is also given in ("x one training step")."""

    name = "lora-step"
    kind = None
    decision = "(reference) one AdamW step of vanilla LoRA on every candidate module"

    def prepare(self) -> None:
        import peft

        self._pm = peft.get_peft_model(self.model, peft.LoraConfig(
            r=self.rank, lora_alpha=2 * self.rank, target_modules=[c.name for c in self.cands if c.parameter is None]))
        self._opt = torch.optim.AdamW([p for p in self._pm.parameters() if p.requires_grad], lr=1e-4)

    def run(self) -> None:
        with torch.enable_grad():
            _losses(self._pm, self.ids).mean().backward()
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        return None

    def teardown(self) -> None:
        self._pm.unload()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config

    def outcome(self) -> dict:
        return {}


PROVIDERS: dict[str, Callable[..., Provider]] = {
    p.name: p for p in (Probe, ProbePlainLayout, Floor, Autograd, AutogradPerSample, TorchFunc, ProbeExpected, Opacus, Eva, KappaTune,
                        StrategyAdam, StrategyHeldout, StrategyPilot, LoraStep, ProbeSet, ProbeStopped)
}


def per_sample_grad_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of ``batch`` per-sample copies of all candidate weights (what torch.func holds)."""
    return batch * sum(c.module.weight.numel() * c.module.weight.element_size() for c in find_candidates(model))


def rel_err(a: Energies, b: Energies) -> float:
    """Largest over modules of ``||a - b|| / ||b||`` of the per-sample energy vectors."""
    worst = 0.0
    for n, ref in b.items():
        x = a[n].double().cpu()
        ref = ref.double().cpu()
        denom = float(ref.norm())
        err = float((x - ref).norm()) / denom if denom > 0 else float(x.norm())
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst
