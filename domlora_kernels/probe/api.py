"""The PAGE probe: per-sample projected adapter gradient energy inside one backward pass.

How it works (docs/design.md). Every weight is frozen, so no weight gradient is ever
formed. A forward hook on each candidate module keeps what the energy needs from its input
(``P = X A^T``, ``[B, T, r]``, for projection "A"; ``X`` itself for "B" and "expected") and
passes the module's output through ``_Tap``, an identity autograd function whose backward
receives ``D = dL/dY`` and reduces the per-sample energy at once; the formulas are in
:mod:`~domlora_kernels.probe.energies`, the reductions in :mod:`domlora_kernels.ops`. A frozen model has no tensor that requires grad, so each tap
also takes ``anchor``, a scalar leaf that requires grad: the outputs of the taps then carry
the graph, and backward stops at the first tapped modules instead of running to the
embeddings. The losses of the rows are summed, not averaged, so row ``b`` receives exactly
``d loss_b / d Y_b``: the per-sample gradients come out of one ordinary backward pass.
A module's input rows must be the batch's samples, or its tokens flattened: a flat view
``[B*T, n]`` of a ``[B, T, n]`` activation, or rows as many as such a view of the same pass
(computed row-wise from it: the down projection of a MoE block's shared expert). Other rows
(tokens gathered or copied) are refused unless the batch has one sample.

The expert weights of MoE blocks (3D parameters, :mod:`domlora_kernels.experts`) have no
module of their own to hook: for the probe their experts module runs the routed forward of
:func:`~domlora_kernels.experts.routed_forward`, which hands each weight's output rows, sorted
by expert, to ``_ExpertSite.tap``; the rest is as for a module, per expert and per sample.

Per batch the host waits for the device once: the losses and every module's energies are
checked for non-finite values and copied to the CPU together (``_end_batch``).

Activation checkpointing reruns a module's forward; hooks that fire inside the backward pass
are recognised as such reruns, so each call is reduced exactly once (``Site.forward_hook`` in :mod:`.sites`).
Under ``torch.distributed`` each rank probes its own batches and :func:`.merge.merge_ranks` combines
the ranks after the last one (:mod:`domlora_kernels.distributed`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed as dd
from ..lora_init import lora_scaling
from ..scores import ModuleInfo, PageScores
from . import experts, packing
from .candidates import find_candidates, peft_base_model
from .checks import (ESTIMATORS, PROJECTIONS, check_autograd, check_backend, check_batch, check_causal, check_ids,
                     check_loss_count, check_losses, embedding_limits, input_device_dtype, validate,
                     warn_padding_targets)
from .frozen import adapters_disabled, frozen_eval, quantised_state_kept
from .losses import causal_lm_losses, default_labels, mask_padding_targets
from .merge import merge_ranks, status_row
from .shared import SharedInputs
from .sites import ExpertSite, Site
from .stopping import StopRule, should_stop

__all__ = ["page_scores", "PROJECTIONS", "ESTIMATORS", "LossFn"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Probe:
    def __init__(self, rank, seeds, projection, estimator, scaling, backend):
        self.rank, self.seeds, self.projection = rank, seeds, projection
        self.estimator, self.scaling, self.backend = estimator, scaling, backend
        self.active = False
        self.batch_size = 0  # samples in the batch being backpropagated
        # (samples, rows) of the batch's tokens flattened: [B*T, n] rows are then T per sample, in order
        self.flat_views: set[tuple[int, int]] = set()
        self.anchor = torch.zeros((), requires_grad=True)
        self.shared = SharedInputs()  # its groups are guessed once the sites exist
        self.limits: tuple = (None, None)  # the model's vocabulary and position limit (checks.embedding_limits)
        self.energy_mask: torch.Tensor | None = None  # [B, T] of the current batch: positions in the energies
        self.stop: StopRule | None = None  # early stopping (stopping.py); None: read every batch
        self.stopped = False
        self.stability_trace: list[tuple[int, float]] = []  # (samples seen, stability) after each batch


def _default_loss(model: nn.Module, batch: Mapping[str, Any], device: torch.device, first_sample: int, index: int):
    """Forward the batch and return the per-row causal-LM losses ``[B]``.

    Targets are the labels (default: the ids) at attended positions whose previous position is
    attended too (:func:`.losses.mask_padding_targets`); without a mask, a batch that looks
    padded is warned about (:func:`.checks.warn_padding_targets`).
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if mask is None:
        warn_padding_targets(ids if labels is None else labels, model, index)
    labels = default_labels(ids, mask) if labels is None else mask_padding_targets(labels, mask)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    if getattr(model, "config", None) is not None:
        kwargs.setdefault("use_cache", False)
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    return causal_lm_losses(logits, labels, first_sample)  # the batch's labels: checked where they are



def page_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    rank: int = 8,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    projection: str = "A",
    estimator: str = "fisher",
    seed: int | Sequence[int] = 0,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    loss_fn: LossFn | None = None,
    backend: str = "auto",
    progress: bool = True,
    process_group: Any = None,
    stop: StopRule | None = None,
) -> PageScores:
    """Measure PAGE (projected adapter gradient energy) for every candidate module.

    One forward and one backward per batch, weights frozen, no weight gradient formed.

    Args:
        model: any ``nn.Module``; Hugging Face causal LMs work out of the box. Left exactly as
            found (weights, ``requires_grad``, train/eval mode, hooks, ``.grad``, bitsandbytes
            4-bit layers' packed weights and quant state), also on error. It runs in eval mode
            during the probe (no dropout), so scores are deterministic. Without ``loss_fn`` a
            model that is no causal LM (encoder-only such as ``BertForMaskedLM``, or an
            encoder-decoder) is refused. A model that already carries peft adapters (a
            ``PeftModel`` or injected LoRA layers) is probed as its base model: adapters off,
            candidates named as in the base model, never a ``lora_A``/``lora_B`` module;
            merged adapters are refused.
        batches: iterable of dicts with ``input_ids`` ``[B, T]``, optional ``attention_mask``,
            ``energy_mask`` (bool ``[B, T]``: only these positions' inputs and output gradients
            enter the energies; not passed to the model) and ``labels`` (``-100`` ignored; default: ``input_ids``). A token is a target only
            where it and the position before it are attended, with or without labels, so left
            and right padding agree. Token ids must lie in the model's vocabulary and, for a
            learned position embedding (GPT-2), sequences within its positions; without
            mask and labels, a batch whose rows start or end with ``config.pad_token_id``
            warns (:class:`~.checks.PaddingTargetsWarning`). Other keys are passed to the
            model. Anything else when ``loss_fn`` is given.
        rank: LoRA rank ``r`` of the probe adapter.
        target_modules / exclude_modules: peft's forms: ``"all-linear"`` (``nn.Linear`` and
            ``Conv1D`` except the output embedding, and the expert weights of transformers'
            mixture-of-experts blocks, e.g. ``model.layers.3.mlp.experts.down_proj``), a list of
            names or dotted suffixes (``"experts.down_proj"``), or a regex matching whole names.
            A 3D weight of unknown layout in the selection raises an error naming it.
        projection: ``"A"`` (energy of ``dL/dB`` at peft's default init), ``"B"`` (energy of
            ``dL/dA`` for a random nonzero B), ``"AB"`` (both), ``"expected"`` (expectation over
            A: ``r / (3n) ||G||^2``).
        estimator: ``"fisher"`` (mean over samples of the per-sample squared norm) or
            ``"gradient"`` (squared norm of the mean gradient).
        seed: seed of the A (and B) draws; a sequence of seeds probes them all in the same
            backward pass, and ``scores`` is then their mean (``by_seed`` has each).
        lora_alpha / use_rslora: scaling ``alpha / r`` (``alpha / sqrt(r)``); None means 1.
        loss_fn: ``callable(model, batch) -> losses [B]`` (one per sample, not reduced): as many
            as the batch's ``input_ids`` rows where it has them; for another batch type the
            losses returned are taken as its samples.
        backend: ``"auto"`` or one of :data:`domlora_kernels.ops.BACKENDS`.
        progress: show a progress bar (on rank 0 only when distributed).
        stop: a :class:`~domlora_kernels.probe.stopping.StopRule`: stop after the first batch at
            which the decision it names (the top-k modules, or a budget plan) is stable under
            bootstrap resampling of the samples seen; ``batches`` is then a cap. The scores are
            those of the batches read; ``meta`` records ``stopped_early``, ``stability`` and the
            stability after each batch. Estimator "fisher", one process.
        process_group: when ``torch.distributed`` is initialised, the data-parallel group whose
            ranks each pass their own shard of the batches (:func:`domlora_kernels.distributed.shard`);
            default: the world group (a DDP model's own group). Every rank then returns the
            scores of all ranks' batches together, ``per_sample`` columns rank-major. A DDP
            wrapper is probed through its ``.module``; an FSDP2 model needs the same number of
            batches on every rank. See :mod:`domlora_kernels.distributed`.

    Returns:
        :class:`PageScores`. An expert weight's score is the sum over its experts (what one
        peft ``target_parameters`` adapter on it gets); ``by_expert`` has each expert's.

    Example:
        >>> scores = page_scores(model, [{"input_ids": ids}], rank=8)  # doctest: +SKIP
        >>> scores.dominant_module                                     # doctest: +SKIP
        'model.layers.3.mlp.down_proj'
    """
    seeds = validate(rank, projection, estimator, backend, seed, lora_alpha, batches, loss_fn)
    model, process_group = dd.unwrap(model, process_group)
    model = peft_base_model(model)
    check_autograd(model)
    check_causal(model, loss_fn)
    world_rank, world = dd.rank_and_world(process_group)
    if world > 1:
        dd.check_equal_batch_counts(model, batches, process_group)
    candidates = find_candidates(model, target_modules, exclude_modules)
    device, dtype = input_device_dtype(model)
    check_backend(backend, device, dtype)
    scaling = lora_scaling(rank, lora_alpha, use_rslora)
    probe = Probe(rank, seeds, projection, estimator, scaling, backend)
    probe.limits = embedding_limits(model)
    probe.stop = _check_stop(stop, estimator, world)
    sites = [(ExpertSite if c.parameter is not None else Site)(c, probe) for c in candidates]
    probe.shared = SharedInputs(sites)
    bar = _progress_bar(batches) if progress and world_rank == 0 else None
    num_samples, num_batches, elapsed = _run_all_ranks(model, batches, sites, loss_fn, device, bar, process_group)
    if num_batches == 0:
        raise ValueError("batches is empty: give at least one batch of calibration samples")
    if world_rank == 0:
        _warn_idle(sites)
    config = {
        "rank": rank, "projection": projection, "estimator": estimator, "seeds": seeds,
        "lora_alpha": lora_alpha, "use_rslora": use_rslora, "scaling": scaling, "backend": backend,
        "target_modules": _as_given(target_modules), "exclude_modules": _as_given(exclude_modules),
    }
    meta = {"probe_seconds": elapsed, "num_batches": num_batches, "torch": torch.__version__}
    if stop is not None:
        meta.update({"stopped_early": probe.stopped, "stability": probe.stability_trace[-1][1],
                     "stability_trace": probe.stability_trace, "stop_rule": dataclasses.asdict(stop)})
    if world > 1:
        meta.update({"world_size": world, "sample_order": "rank-major"})
    return _collect(sites, num_samples, config, meta)


def _run_all_ranks(model, batches, sites, loss_fn, device, bar, group) -> tuple[int, int, float]:
    """:func:`_run` on this rank, then the ranks merged: ``(samples, batches, seconds)`` of all."""
    world = dd.rank_and_world(group)[1]
    probe = sites[0].probe
    t0 = time.perf_counter()
    try:
        num_samples, num_batches = _run(model, batches, sites, probe, loss_fn, device, bar)
    except BaseException:  # Ctrl-C too: the other ranks stop with an error instead of waiting for this one
        if world > 1:
            dd.gather_ints(status_row(sites, failed=True), group)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if world > 1:
        return merge_ranks(sites, probe, num_samples, num_batches, elapsed, group)
    return num_samples, num_batches, elapsed


def _warn_idle(sites) -> None:
    idle = [s.cand.name for s in sites if not s.got_grad]
    if idle:
        warnings.warn(
            f"{len(idle)} candidate module(s) got no gradient (never ran, or off the loss path) and score 0: "
            f"{', '.join(idle[:5])}{', ...' if len(idle) > 5 else ''}",
            stacklevel=3,
        )


def _as_given(spec):
    """A module selection as the config records it: a string (or None) as is, else a list."""
    return spec if spec is None or isinstance(spec, str) else list(spec)


def _progress_bar(batches):
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None  # a generator has no length
    return tqdm(total=total, desc="PAGE probe", unit="batch", leave=False)


def _run(model, batches, sites, probe, loss_fn, device, bar) -> tuple[int, int]:
    """Forward and backward every batch with the hooks on; returns ``(samples, batches)``."""
    num_samples = num_batches = 0
    with quantised_state_kept(model), adapters_disabled(model), frozen_eval(model), torch.enable_grad(), \
            experts.routed_experts(_expert_taps(sites)):
        handles = [s.cand.module.register_forward_hook(s.forward_hook) for s in sites if not isinstance(s, ExpertSite)]
        try:
            probe.active = True
            for i, batch in enumerate(batches):
                probe.flat_views = set()
                batch, probe.energy_mask = _energy_mask(batch, i)
                losses = _batch_losses(model, batch, i, loss_fn, device, num_samples, probe.limits)
                check_losses(losses, i)
                if loss_fn is not None:
                    check_loss_count(losses, batch, i)
                probe.batch_size = losses.numel()
                losses.sum().backward()  # sum, not mean: row b gets exactly d loss_b / d Y_b
                _end_batch(sites, losses.detach(), num_samples)
                probe.shared.end_batch()
                num_samples += losses.numel()
                num_batches += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(samples=num_samples)
                if probe.stop is not None and _stable_now(sites, probe, num_samples):
                    break
        finally:
            probe.active = False
            for h in handles:
                h.remove()
    return num_samples, num_batches


def _energy_mask(batch: Any, index: int) -> tuple[Any, torch.Tensor | None]:
    """The batch without its optional ``energy_mask`` ``[B, T]`` (positions whose input and output
    gradient enter the energies; the loss is the labels' business), and the mask."""
    if not isinstance(batch, Mapping) or "energy_mask" not in batch:
        return batch, None
    mask = batch["energy_mask"]
    ids = batch.get("input_ids")
    if not isinstance(mask, torch.Tensor) or not isinstance(ids, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(f"batch {index}: energy_mask must be a tensor of the shape of input_ids "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else '?'}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    rest = {k: v for k, v in batch.items() if k != "energy_mask"}
    if packing.is_packed(rest):
        raise ValueError(f"batch {index} is packed; energy_mask needs one sample per row (domlora_kernels.probe."
                         f"packing.unpack)")
    return rest, mask.bool()


def _check_stop(stop: Any, estimator: str, world: int) -> StopRule | None:
    if stop is None:
        return None
    if not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a domlora_kernels.probe.stopping.StopRule or None, got {type(stop).__name__}")
    if estimator != "fisher":
        raise ValueError("stop= resamples the per-sample energies, which estimator='gradient' does not keep; "
                         "use estimator='fisher'")
    if world > 1:
        raise ValueError("stop= decides on one process's samples; under torch.distributed probe without it")
    return stop


def _stable_now(sites, probe: Probe, num_samples: int) -> bool:
    """After a batch: is the stop rule's decision stable on the samples so far? Recorded in the probe."""
    k = len(probe.seeds)
    # each module's per-sample energy (mean over seeds; an expert weight's summed over its experts)
    per = torch.stack([torch.cat(s.sample_energies, dim=1).view(k, -1, num_samples).sum(dim=1).mean(dim=0)
                       for s in sites])
    infos = [ModuleInfo(s.cand.layer, s.cand.type, s.cand.in_features, s.cand.out_features, s.cand.num_experts,
                        s.cand.parameter is not None) for s in sites]
    stop, value = should_stop(per, probe.stop, infos)
    probe.stability_trace.append((num_samples, None if value != value else value))  # None: not checked yet (JSON has no NaN)
    probe.stopped = stop
    return stop


def _expert_taps(sites) -> dict[nn.Module, experts.Tap]:
    """The tap of each experts module with a probed weight: to that weight's site, if any."""
    by_module: dict[nn.Module, dict[str, ExpertSite]] = {}
    for s in sites:
        if isinstance(s, ExpertSite):
            by_module.setdefault(s.cand.module, {})[s.cand.parameter] = s

    def tap_of(weights: dict[str, ExpertSite]) -> experts.Tap:
        def tap(name: str, y: torch.Tensor, x: torch.Tensor, routing: experts.Routing) -> torch.Tensor:
            site = weights.get(name)
            return y if site is None or not site.probe.active else site.tap(y, x, routing)
        return tap

    return {mod: tap_of(weights) for mod, weights in by_module.items()}


def _batch_losses(model, batch, index: int, loss_fn, device, first_sample: int, limits=(None, None)) -> torch.Tensor:
    """The batch's per-sample losses: ``loss_fn``'s, or the causal-LM losses of the batch,
    whose packed rows (several samples per row) are measured as the samples they hold."""
    if loss_fn is not None:
        if isinstance(batch, Mapping) and packing.is_packed(batch):
            raise ValueError(
                f"batch {index} is packed (position_ids restart inside a row) and a loss_fn was given: the probe "
                f"measures one sample per row, so give loss_fn one sample per row (domlora_kernels.packing.unpack "
                f"does that), or drop loss_fn and let the probe unpack the batch itself"
            )
        return loss_fn(model, batch)
    check_batch(batch, index)
    check_ids(batch, index, limits)
    if packing.is_packed(batch):
        batch = packing.unpack(batch, index)
    return _default_loss(model, batch, device, first_sample, index)


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """float64 CPU copies of ``tensors``, in one transfer per device (one sync on a GPU)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.float64) for i in idx]).cpu()
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def _end_batch(sites, losses: torch.Tensor, first_sample: int) -> None:
    """Check the batch's losses and energies (or gradient sums) in one host copy, then keep them."""
    host = _to_host([losses] + [s.batch_check(losses.numel()) for s in sites])
    bad = (~torch.isfinite(host[0])).nonzero().flatten()
    if bad.numel():
        raise FloatingPointError(
            f"non-finite loss {float(host[0][bad[0]])} for sample {first_sample + int(bad[0])}: the model's weights hold "
            f"NaN or inf, or its activations overflow in this dtype; check the checkpoint (torch.isfinite on its "
            f"weights), or load it in float32"
        )
    for s, h in zip(sites, host[1:]):
        if s.probe.estimator == "fisher" and not torch.isfinite(h).all():
            sample = first_sample + int((~torch.isfinite(h)).nonzero()[0, 1])
            raise FloatingPointError(
                f"non-finite PAGE energy for module {s.cand.name} at sample {sample}: the model's "
                f"activations or gradients overflow there (try float32, or drop that sample)"
            )
        if s.probe.estimator == "gradient" and not bool(h[0]):
            raise FloatingPointError(
                f"non-finite summed gradient for module {s.cand.name} in the batch starting at sample "
                f"{first_sample}: the model's gradients overflow (try float32, or find the sample with estimator='fisher')"
            )
        s.end_batch(h)


def _collect(sites, num_samples: int, config: dict, meta: dict) -> PageScores:
    """The :class:`PageScores` of the sites' sums (merged over ranks already)."""
    seeds = config["seeds"]
    by_seed: dict[int, dict[str, float]] = {s: {} for s in seeds}
    per_sample: dict[str, torch.Tensor] | None = {} if config["estimator"] == "fisher" else None
    for site in sites:
        vals, per = site.results(num_samples)
        for j, s in enumerate(seeds):
            by_seed[s][site.cand.name] = float(vals[j])
        if per_sample is not None:
            per_sample[site.cand.name] = per
    names = [s.cand.name for s in sites]
    scores = {n: float(sum(by_seed[s][n] for s in seeds) / len(seeds)) for n in names}
    modules = {s.cand.name: ModuleInfo(s.cand.layer, s.cand.type, s.cand.in_features, s.cand.out_features,
                                       s.cand.num_experts, s.cand.parameter is not None) for s in sites}
    by_expert = {s.cand.name: s.by_expert.mean(dim=0).tolist() for s in sites if isinstance(s, ExpertSite)}
    out = PageScores(scores, by_seed, per_sample, modules, num_samples, config, meta, by_expert)
    if config["estimator"] == "gradient":
        out.mean_gradient = {s.cand.name: mean_gradient(s, num_samples, config["scaling"]) for s in sites}
        # Adam's first step moves every entry by -lr sign(g): the loss falls by lr ||g||_1 (first order)
        out.signals["adam"] = {n: float(g.abs().flatten(1).sum(dim=1).mean()) for n, g in out.mean_gradient.items()}
    return out


def mean_gradient(site: Site, num_samples: int, scaling: float) -> torch.Tensor:
    """A site's mean projected gradient over the samples, scaled: ``[k, ...]`` float64 CPU, the
    factors of all its projections side by side (zeros for a module that got no gradient)."""
    shapes = site.grad_shapes()
    parts = [site.grad_sum[key].to("cpu", torch.float64) if key in site.grad_sum
             else torch.zeros(shape, dtype=torch.float64) for key, shape in shapes.items()]
    return torch.cat([p.flatten(1) for p in parts], dim=1) * (scaling / num_samples)
