"""Measuring what a placement strategy ranks by: :func:`measure_signals`.

``"page"`` is one probe; ``"adam"``, ``"types"`` and ``"plop+types"`` one probe with the gradient estimator
(its mean projected gradient gives Adam's first-step decrease, exactly, with no weight
gradient formed); ``"heldout"`` one such probe on each half of the calibration set;
``"pilot"`` a probe for the module list, then :func:`pilot_signal`, a short all-module LoRA
run. ``"plop"`` is data-free, but a probe still lists the modules and their shapes.

Each leaves the model as it found it, also when it fails (the probe's guarantee, and for the
pilot: the adapters are taken out again in a ``finally``, and every parameter's
``requires_grad``, the train/eval mode and the weights are as before).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..probe import page_scores
from ..probe.frozen import frozen_eval
from ..probe.losses import causal_lm_losses, default_labels
from ..scores import PageScores
from .plan import exact_names_regex
from .strategies import DEFAULT_STRATEGY, STRATEGIES, check_strategy

PILOT_DEFAULTS = {"steps": 30, "rank": 1, "lr": 1e-2}


def split_halves(batches: Iterable[Mapping[str, Any]]) -> tuple[list, list]:
    """A training half and a held-out half of the calibration set: alternate batches (batch 0
    trains), or, for a single batch, alternate rows (row 0 trains).

    Raises:
        ValueError: fewer than two samples to split.
    """
    batches = list(batches)
    if len(batches) >= 2:
        return batches[0::2], batches[1::2]
    rows = _rows(batches[0]) if batches else 0
    if rows < 2:
        raise ValueError(f"strategy 'heldout' splits the calibration samples into two halves and needs at least "
                         f"2 of them, got {rows}; pass more samples")
    (batch,) = batches
    return ([{k: v[0::2] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}],
            [{k: v[1::2] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}])


def _rows(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 0


def heldout_signal(train: PageScores, heldout: PageScores) -> dict[str, float]:
    """``<g_heldout, sign(g_train)>`` per module, mean over seeds: the first-order decrease of the
    held-out loss per unit learning rate under Adam's first (sign) step on the training half."""
    for what, s in (("training", train), ("held-out", heldout)):
        if s.mean_gradient is None:
            raise ValueError(f"the {what} scores carry no mean gradient: probe with estimator='gradient'")
    if train.config["seeds"] != heldout.config["seeds"] or train.rank != heldout.rank:
        raise ValueError("the training and held-out probes must use the same rank and seeds (the same A)")
    return {n: float((heldout.mean_gradient[n] * torch.sign(g)).sum(dim=1).mean())
            for n, g in train.mean_gradient.items()}


def _lora_modules(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    out = {}
    for name, mod in model.named_modules():
        a = getattr(mod, "lora_A", None)
        if isinstance(a, nn.ModuleDict) and adapter in a:
            out[name] = mod
    return out


def _batch_loss(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(batch["input_ids"], mask)
    kwargs = {"input_ids": ids, "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
    logits = model(**kwargs).logits
    losses = causal_lm_losses(logits, labels.to(device))
    return losses.mean()


def _check_pilot(steps: Any, rank: Any, lr: Any) -> None:
    for what, v in (("steps", steps), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"pilot {what} must be an integer >= 1, got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"pilot lr must be a positive number, got {lr!r}")


def pilot_signal(model: nn.Module, batches: Iterable[Mapping[str, Any]], names: list[str], *,
                 steps: int = 30, rank: int = 1, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Train LoRA on every module of ``names`` at ``rank`` for ``steps`` Adam steps (batches in
    a cycle, mean causal-LM loss), then score each module by the RMS over attended tokens of
    what its adapter adds to the output, ``||s B A x||`` (LoRA-drop's realised-update score).

    The adapters live only inside this call: they are removed in a ``finally`` and the model's
    weights, ``requires_grad`` flags and mode are restored.
    """
    import peft

    _check_pilot(steps, rank, lr)
    batches = list(batches)
    if not batches:
        raise ValueError("the pilot needs at least one batch")
    device = next(p.device for p in model.parameters())
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=exact_names_regex(names))
    with frozen_eval(model):
        pm = peft.get_peft_model(model, cfg, adapter_name="domlora_pilot")
        try:
            layers = _lora_modules(pm.get_base_model(), "domlora_pilot")
            params = [p for p in pm.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            with torch.enable_grad():
                for step in range(steps):
                    loss = _batch_loss(pm, batches[step % len(batches)], device)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"pilot loss became {loss.item()} at step {step}; lower the pilot lr ({lr})")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            return _realised(pm, layers, batches, device)
        finally:
            pm.unload()  # the base layers go back in place of the LoRA layers
            if hasattr(model, "peft_config"):
                del model.peft_config


def _realised(pm, layers: dict[str, nn.Module], batches: list, device: torch.device) -> dict[str, float]:
    """RMS of each adapter's output ``s B A x`` over the attended tokens of ``batches``."""
    sums = {n: 0.0 for n in layers}
    tokens = 0
    mask_now: list[torch.Tensor] = []

    def hook_of(name: str, layer: nn.Module):
        def hook(module, args, output):
            x = args[0]
            delta = layer.lora_B["domlora_pilot"](layer.lora_A["domlora_pilot"](x)) * layer.scaling["domlora_pilot"]
            sq = delta.double().square().sum(dim=-1)  # [B, T]
            sums[name] += float((sq * mask_now[0]).sum())
        return hook

    handles = [layer.register_forward_hook(hook_of(n, layer)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                m = (torch.ones_like(ids) if mask is None else mask).to(device=device, dtype=torch.float64)
                mask_now[:] = [m]
                tokens += int(m.sum())
                kwargs = {"input_ids": ids.to(device), "use_cache": False}
                if mask is not None:
                    kwargs["attention_mask"] = mask.to(device)
                pm(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n.removeprefix("base_model.model."): math.sqrt(v / max(tokens, 1)) for n, v in sums.items()}


def measure_signals(model: nn.Module, batches: Iterable[Mapping[str, Any]], strategy: str | None = None, *,
                    rank: int = 8, seed: int = 0, lora_alpha: float | None = None,
                    target_modules: Any = "all-linear", exclude_modules: Any = None, progress: bool = True,
                    pilot: Mapping[str, Any] | None = None, **probe_kwargs: Any) -> PageScores:
    """Measure what ``strategy`` needs, and return it as a :class:`PageScores` to plan from.

    Args:
        model, batches: as for :func:`~domlora_kernels.page_scores`.
        strategy: one of :data:`~domlora_kernels.placement.strategies.STRATEGIES`; None (the
            default): :data:`~domlora_kernels.placement.strategies.DEFAULT_STRATEGY`.
        rank, seed, lora_alpha, target_modules, exclude_modules, progress, **probe_kwargs: the
            probe's arguments.
        pilot: the pilot's settings (``steps``, ``rank``, ``lr``), strategy "pilot" only;
            defaults :data:`PILOT_DEFAULTS`.

    Returns:
        The probe's scores, with ``signals`` holding what the strategy ranks by.
    """
    strategy = DEFAULT_STRATEGY if strategy is None else check_strategy(strategy)
    if pilot is not None and strategy != "pilot":
        raise ValueError(f"pilot settings are for strategy 'pilot', not {strategy!r}; drop pilot=")
    common = dict(rank=rank, seed=seed, lora_alpha=lora_alpha, target_modules=target_modules,
                  exclude_modules=exclude_modules, progress=progress, **probe_kwargs)
    if strategy in ("adam", "types", "plop+types"):
        return page_scores(model, batches, estimator="gradient", **common)
    if strategy == "heldout":
        train, held = split_halves(batches)
        scores = page_scores(model, train, estimator="gradient", **common)
        other = page_scores(model, held, estimator="gradient", **common)
        scores.signals["heldout"] = heldout_signal(scores, other)
        scores.meta["heldout_samples"] = other.num_samples
        return scores
    batches = list(batches)
    scores = page_scores(model, batches, **common)
    if strategy == "pilot":
        settings = {**PILOT_DEFAULTS, **(pilot or {})}
        unknown = sorted(set(settings) - set(PILOT_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown pilot setting(s) {unknown}; the settings are {', '.join(PILOT_DEFAULTS)}")
        names = [n for n in scores.scores if not scores.modules[n].expert_weight]
        scores.signals["pilot"] = {**{n: 0.0 for n in scores.scores},
                                   **pilot_signal(model, batches, names, seed=seed, **settings)}
        scores.meta["pilot"] = settings
    return scores


__all__ = ["measure_signals", "pilot_signal", "heldout_signal", "split_halves", "PILOT_DEFAULTS", "STRATEGIES"]
