"""The PAGE probe: per-sample projected adapter gradient energy inside one backward pass.

How it works (docs/design.md). Every weight is frozen, so no weight gradient is ever
formed. A forward hook on each candidate module keeps what the energy needs from its input
(``P = X A^T``, ``[B, T, r]``, for projection "A"; ``X`` itself for "B" and "expected") and
passes the module's output through ``_Tap``, an identity autograd function whose backward
receives ``D = dL/dY`` and reduces the per-sample energy at once through
:mod:`domlora_kernels.ops`. A frozen model has no tensor that requires grad, so each tap
also takes ``anchor``, a scalar leaf that requires grad: the outputs of the taps then carry
the graph, and backward stops at the first tapped modules instead of running to the
embeddings. The losses of the rows are summed, not averaged, so row ``b`` receives exactly
``d loss_b / d Y_b``: the per-sample gradients come out of one ordinary backward pass.

Activation checkpointing reruns a module's forward; hooks that fire inside the backward pass
are recognised as such reruns, so each call is reduced exactly once (``_Site.forward_hook``).
Under ``torch.distributed`` each rank probes its own batches and ``_merge_ranks`` combines
the ranks after the last one (:mod:`domlora_kernels.distributed`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import ops
from .losses import causal_lm_losses, default_labels
from .lora_init import draw_lora_A, draw_lora_B, lora_scaling
from .candidates import Candidate, find_candidates
from .scores import ModuleInfo, PageScores
from .state import frozen_eval

PROJECTIONS = ("A", "B", "AB", "expected")
ESTIMATORS = ("fisher", "gradient")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _Tap(torch.autograd.Function):
    """Identity on a module's output whose backward hands ``D`` to the site's reducer.

    The output is returned as the same tensor, marked dirty, rather than as a clone: a clone
    would copy every module output of the model (``T x m`` each), the largest cost the probe
    could add to a forward pass. Marking it dirty (instead of returning a view) keeps later
    in-place ops on the output legal, as they are without the probe.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor, call: "_Call") -> torch.Tensor:
        ctx.call = call
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, d: torch.Tensor):
        if ctx.call is not None:  # None: a checkpoint recompute's tap, never reduced
            ctx.call.reduce(d)
        ctx.call = None  # free P / X as soon as the energy is known
        return d, None, None


class _Call:
    """One forward call of one candidate module: what it kept, and where its energy goes."""

    __slots__ = ("site", "kept", "batch")

    def __init__(self, site: "_Site", kept: torch.Tensor, batch: int):
        self.site, self.kept, self.batch = site, kept, batch

    def reduce(self, d: torch.Tensor) -> None:
        self.site.reduce(self.kept, d, self.batch)
        self.kept = None


class _Site:
    """Per-module state of the probe: the probe matrices and the running sums."""

    def __init__(self, cand: Candidate, probe: "_Probe"):
        self.cand, self.probe = cand, probe
        self.calls = 0  # forward calls in the current batch
        self.deferred = 0  # no-grad forward calls a reentrant checkpoint will rerun in backward
        self.batch_energy: torch.Tensor | None = None  # [k, B] of the current batch
        self.sample_energies: list[torch.Tensor] = []  # fisher: [k, B] per batch
        self.grad_sum: dict[str, torch.Tensor] = {}  # gradient: "A" -> [k, m, r], "B" -> [k, r, n]
        self._mats: dict[tuple, torch.Tensor] = {}
        self.reached = False

    # Probe matrices, drawn on the CPU once (deterministic) and cached per device and dtype.
    def mat(self, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (which, device, dtype)
        if key not in self._mats:
            p = self.probe
            if which == "A":  # [k * r, n]: all seeds stacked, one matmul in the forward
                t = torch.cat([draw_lora_A(self.cand.name, p.rank, self.cand.in_features, s) for s in p.seeds])
            else:  # [k, m, r]
                t = torch.stack([draw_lora_B(self.cand.name, p.rank, self.cand.out_features, s) for s in p.seeds])
            self._mats[key] = t.to(device=device, dtype=dtype)
        return self._mats[key]

    def forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        p = self.probe
        if not p.active:
            return None
        # Activation checkpointing runs a module's forward twice per batch. Non-reentrant: the
        # first run has grad on and is tapped; the rerun, inside backward, only rebuilds saved
        # tensors, so its tap reduces nothing (two would count the energy twice) but must exist:
        # without it a frozen model's rerun saves no tensors and the checkpoint refuses the
        # mismatch. Reentrant: the first run is under no_grad (no graph, no tap: counted in
        # `deferred`) and the rerun builds the graph that is backpropagated, so it is tapped.
        if _in_backward():
            if not torch.is_grad_enabled():
                return None
            if self.deferred == 0:
                return _Tap.apply(output, p.anchor, None)
            self.deferred -= 1
        elif not torch.is_grad_enabled():
            self.deferred += 1
            return None
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{self.cand.name}: expected a tensor input and output, got {type(output).__name__}")
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                f"{self.cand.name} ran {self.calls} times in one forward pass; PAGE of a module whose weight "
                f"is applied more than once per sample is not defined by per-call energies. Exclude it with "
                f"exclude_modules=[{self.cand.name!r}]"
            )
        x = args[0].detach()
        if x.dim() < 2 or x.shape[-1] != self.cand.in_features:
            raise ValueError(f"{self.cand.name}: input of shape {tuple(x.shape)} is not [B, ..., {self.cand.in_features}]")
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1])
        if p.projection in ("A", "AB"):
            with torch.no_grad():
                # [B, T, n] @ [n, k*r] -> [B, T, k*r]
                proj = x3 @ self.mat("A", x.device, x.dtype).T
            kept = proj if p.projection == "A" else (proj, x3)
        else:
            kept = x3
        return _Tap.apply(output, p.anchor, _Call(self, kept, batch))

    def reduce(self, kept, d: torch.Tensor, batch: int) -> None:
        p = self.probe
        self.reached = True
        m, r, k = self.cand.out_features, p.rank, len(p.seeds)
        d3 = d.reshape(batch, -1, m)
        if p.projection == "A":
            proj, x3 = kept, None
        elif p.projection == "AB":
            proj, x3 = kept
        else:
            proj, x3 = None, kept
        s2 = p.scaling**2
        if p.estimator == "fisher":
            e = torch.zeros(k, batch, dtype=torch.float64, device=d.device)
            if proj is not None:
                for j in range(k):  # ||D_b^T P_b||^2 for each seed's slice of P
                    e[j] += ops.projected_energy(d3, proj[..., j * r:(j + 1) * r], backend=p.backend)
            if p.projection in ("B", "AB"):
                bmat = self.mat("B", d.device, d.dtype)
                for j in range(k):  # ||(D_b B)^T X_b||^2: u = X, v = D B ([B, T, m] @ [m, r])
                    e[j] += ops.projected_energy(x3, d3 @ bmat[j], backend=p.backend)
            if p.projection == "expected":
                # E_A ||G A^T||^2 = r / (3n) ||G||^2 for A ~ U(-1/sqrt(n), 1/sqrt(n))
                g2 = ops.weight_grad_energy(d3, x3, backend=p.backend)
                e += g2.to(torch.float64) * (r / (3.0 * self.cand.in_features))
            self.batch_energy = e * s2
            return
        # estimator "gradient": accumulate the summed projected gradients, square at the end
        acc = torch.float64 if d.dtype == torch.float64 else torch.float32
        d2 = d3.reshape(-1, m).to(acc)
        if proj is not None:
            # [m, N] @ [N, k*r] -> [m, k*r] -> [k, m, r]
            g = (d2.T @ proj.reshape(-1, proj.shape[-1]).to(acc)).view(m, k, r).permute(1, 0, 2)
            self._add("A", g)
        if p.projection in ("B", "AB"):
            bmat = self.mat("B", d.device, acc)  # cached per dtype: no conversion per backward call
            x2 = x3.reshape(-1, x3.shape[-1]).to(acc)
            g = torch.stack([(d2 @ bmat[j]).T @ x2 for j in range(k)])  # [k, r, n]
            self._add("B", g)

    def _add(self, key: str, g: torch.Tensor) -> None:
        if key in self.grad_sum:
            self.grad_sum[key] += g
        else:
            self.grad_sum[key] = g.clone()

    def end_batch(self, batch: int, first_sample: int) -> None:
        if self.probe.estimator == "fisher":
            if self.batch_energy is None:  # module off the loss path (or not run) this batch
                self.batch_energy = torch.zeros(len(self.probe.seeds), batch, dtype=torch.float64)
            e = self.batch_energy.detach()
            if not torch.isfinite(e).all():
                bad = int((~torch.isfinite(e)).nonzero()[0, 1])
                raise FloatingPointError(
                    f"non-finite PAGE energy for module {self.cand.name} at sample {first_sample + bad}: "
                    f"the model's activations or gradients overflow there (try float32, or drop that sample)"
                )
            self.sample_energies.append(e)
        elif self.grad_sum and not all(torch.isfinite(g).all() for g in self.grad_sum.values()):
            raise FloatingPointError(
                f"non-finite summed gradient for module {self.cand.name} in the batch starting at sample "
                f"{first_sample}: the model's gradients overflow (try float32, or find the sample with estimator='fisher')"
            )
        self.calls = self.deferred = 0
        self.batch_energy = None

    def results(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([k] PAGE per seed, [k, N] per-sample energies or None)`` as float64 CPU."""
        k = len(self.probe.seeds)
        if self.probe.estimator == "fisher":
            per = torch.cat([e.cpu() for e in self.sample_energies], dim=1)
            return per.mean(dim=1), per
        val = torch.zeros(k, dtype=torch.float64)
        for g in self.grad_sum.values():
            val += (g.to(torch.float64).cpu() / num_samples).square().sum(dim=(1, 2))
        return val * self.probe.scaling**2, None


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (where checkpoints recompute)."""
    return torch._C._current_graph_task_id() != -1


def _keep_checkpointing(model: nn.Module) -> int:
    """Leave transformers' checkpointed layers in training mode; returns how many.

    transformers checkpoints a layer only while ``layer.training`` is True, and the probe puts
    the model in eval mode, which would silently drop the activation memory savings that a
    big model needs. Only the layer's own flag is set: its submodules (attention, dropout)
    stay in eval, so no dropout runs. Called inside ``frozen_eval``, which restores the flags.
    """
    import sys

    layers = sys.modules.get("transformers.modeling_layers")  # never import transformers here
    cls = getattr(layers, "GradientCheckpointingLayer", None)
    if cls is None:
        return 0
    kept = 0
    for m in model.modules():
        if isinstance(m, cls) and getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
            kept += 1
    return kept


class _Probe:
    def __init__(self, rank, seeds, projection, estimator, scaling, backend):
        self.rank, self.seeds, self.projection = rank, seeds, projection
        self.estimator, self.scaling, self.backend = estimator, scaling, backend
        self.active = False
        self.anchor = torch.zeros((), requires_grad=True)


def _merge_ranks(sites, probe, num_samples, num_batches, elapsed, group) -> tuple[int, int, float]:
    """Replace each site's sums by those of all ranks (see :mod:`domlora_kernels.distributed`).

    Returns ``(samples, batches, seconds of the slowest rank)`` over the group. Three
    collectives in all, whatever the number of modules: the counts, then one gather or one
    all-reduce of every module's energies packed in one buffer.
    """
    from . import distributed as dd

    row = [0, num_samples, num_batches, int(elapsed * 1e6)] + [int(s.reached) for s in sites]
    table = dd.gather_ints(row, group)  # [world, 4 + S]
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed during the probe (see their error); stopping this rank too")
    counts = table[:, 1].tolist()
    for i, s in enumerate(sites):
        s.reached = bool(table[:, 4 + i].any())
    k = len(probe.seeds)
    if probe.estimator == "fisher":
        local = torch.zeros(len(sites), k, num_samples, dtype=torch.float64)
        for i, s in enumerate(sites):
            if s.sample_energies:
                local[i] = torch.cat([e.cpu() for e in s.sample_energies], dim=1)
        merged = dd.gather_columns(local, counts, group)  # [S, k, N], rank-major
        for i, s in enumerate(sites):
            s.sample_energies = [merged[i]]
    else:
        keys = {"A": ["A"], "B": ["B"], "AB": ["A", "B"]}[probe.projection]
        shapes = {"A": lambda c: (k, c.out_features, probe.rank), "B": lambda c: (k, probe.rank, c.in_features)}
        parts = []
        for s in sites:  # a module this rank never reached contributes zeros
            for key in keys:
                g = s.grad_sum.get(key)
                parts.append(g.detach().to("cpu", torch.float64).flatten() if g is not None
                             else torch.zeros(shapes[key](s.cand), dtype=torch.float64).flatten())
        total = dd.all_reduce_sum(torch.cat(parts), group)
        offset = 0
        for s in sites:
            for key in keys:
                shape = shapes[key](s.cand)
                n = math.prod(shape)
                s.grad_sum[key] = total[offset:offset + n].view(shape)
                offset += n
    return sum(counts), int(table[:, 2].sum()), float(table[:, 3].max()) / 1e6


def _validate(rank, projection, estimator, backend, seed, lora_alpha) -> list[int]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(ops.BACKENDS)}")
    if projection == "expected" and estimator == "gradient":
        raise ValueError(
            "projection='expected' with estimator='gradient' would need the full m x n mean gradient "
            "(the weight gradient this probe exists to avoid); use estimator='fisher', or projection='A'"
        )
    seeds = [seed] if isinstance(seed, int) and not isinstance(seed, bool) else list(seed) if isinstance(seed, Sequence) else None
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a non-empty sequence of ints, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if projection == "expected" and len(seeds) > 1:
        raise ValueError("projection='expected' draws no A, so several seeds would give identical scores; pass one seed")
    if lora_alpha is not None and (not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0):
        raise ValueError(f"lora_alpha must be a positive number or None, got {lora_alpha!r}")
    return seeds


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _default_loss(model: nn.Module, batch: Mapping[str, Any], device: torch.device, first_sample: int):
    """Forward the batch and return the per-row causal-LM losses ``[B]``."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(ids, mask)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
    if getattr(model, "config", None) is not None:
        kwargs.setdefault("use_cache", False)
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    return causal_lm_losses(logits, labels.to(logits.device), first_sample)


def _check_batch(batch: Any, index: int) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch {index} is a {type(batch).__name__}; each batch must be a dict with 'input_ids' [B, T] "
            f"(and optionally 'attention_mask', 'labels'), or pass loss_fn=callable(model, batch) -> losses [B]"
        )
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(
            f"batch {index} has no 'input_ids' tensor (keys: {sorted(batch)}); give input_ids [B, T] or "
            f"pass loss_fn=callable(model, batch) -> per-sample losses [B]"
        )
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch {index}: input_ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
    for key in ("attention_mask", "labels"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != ids.shape):
            raise ValueError(
                f"batch {index}: {key} must be a tensor of the same shape as input_ids {tuple(ids.shape)}, "
                f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )


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
) -> PageScores:
    """Measure PAGE (projected adapter gradient energy) for every candidate module.

    One forward and one backward per batch, weights frozen, no weight gradient formed.

    Args:
        model: any ``nn.Module``; Hugging Face causal LMs work out of the box. Left exactly as
            found (weights, ``requires_grad``, train/eval mode, hooks, ``.grad``), also on error.
            It runs in eval mode during the probe (no dropout), so scores are deterministic.
        batches: iterable of dicts with ``input_ids`` ``[B, T]``, optional ``attention_mask``
            and ``labels`` (``-100`` ignored; default: ``input_ids`` where attended). Other
            keys are passed to the model. Anything else when ``loss_fn`` is given.
        rank: LoRA rank ``r`` of the probe adapter.
        target_modules / exclude_modules: peft's forms: ``"all-linear"`` (``nn.Linear`` and
            ``Conv1D`` except the output embedding), a list of names or dotted suffixes, or a
            regex matching whole names.
        projection: ``"A"`` (energy of ``dL/dB`` at peft's default init), ``"B"`` (energy of
            ``dL/dA`` for a random nonzero B), ``"AB"`` (both), ``"expected"`` (expectation over
            A: ``r / (3n) ||G||^2``).
        estimator: ``"fisher"`` (mean over samples of the per-sample squared norm) or
            ``"gradient"`` (squared norm of the mean gradient).
        seed: seed of the A (and B) draws; a sequence of seeds probes them all in the same
            backward pass, and ``scores`` is then their mean (``by_seed`` has each).
        lora_alpha / use_rslora: scaling ``alpha / r`` (``alpha / sqrt(r)``); None means 1.
        loss_fn: ``callable(model, batch) -> losses [B]`` (one per sample, not reduced).
        backend: ``"auto"`` or one of :data:`domlora_kernels.ops.BACKENDS`.
        progress: show a progress bar (on rank 0 only when distributed).
        process_group: when ``torch.distributed`` is initialised, the data-parallel group whose
            ranks each pass their own shard of the batches (:func:`domlora_kernels.distributed.shard`);
            default: the world group (a DDP model's own group). Every rank then returns the
            scores of all ranks' batches together, ``per_sample`` columns rank-major. A DDP
            wrapper is probed through its ``.module``; an FSDP2 model needs the same number of
            batches on every rank. See :mod:`domlora_kernels.distributed`.

    Returns:
        :class:`PageScores`.

    Example:
        >>> scores = page_scores(model, [{"input_ids": ids}], rank=8)  # doctest: +SKIP
        >>> scores.dominant_module                                     # doctest: +SKIP
        'model.layers.3.mlp.down_proj'
    """
    seeds = _validate(rank, projection, estimator, backend, seed, lora_alpha)
    if isinstance(batches, Mapping):
        raise TypeError("batches must be an iterable of batch dicts; wrap a single batch in a list: [batch]")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> losses [B], got {type(loss_fn).__name__}")
    from . import distributed as dd

    model, process_group = dd.unwrap(model, process_group)
    world_rank, world = dd.rank_and_world(process_group)
    if world > 1 and dd.has_fsdp(model) and hasattr(batches, "__len__"):
        counts = dd.gather_ints([len(batches)], process_group)[:, 0].tolist()
        if len(set(counts)) > 1:
            raise ValueError(
                f"FSDP runs collectives in every forward, so every rank must probe the same number of batches; "
                f"got {counts} per rank. Give each rank an equal share (e.g. a calibration set whose size "
                f"divides by world_size x batch_size)"
            )
    candidates = find_candidates(model, target_modules, exclude_modules)
    scaling = lora_scaling(rank, lora_alpha, use_rslora)
    probe = _Probe(rank, seeds, projection, estimator, scaling, backend)
    sites = [_Site(c, probe) for c in candidates]
    device = _model_device(model)

    total = len(batches) if hasattr(batches, "__len__") else None
    bar = None
    if progress and world_rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="PAGE probe", unit="batch", leave=False)
    t0 = time.perf_counter()
    num_samples = 0
    num_batches = 0
    try:
        with frozen_eval(model), torch.enable_grad():
            _keep_checkpointing(model)
            handles = [s.cand.module.register_forward_hook(s.forward_hook) for s in sites]
            try:
                probe.active = True
                for i, batch in enumerate(batches):
                    if loss_fn is None:
                        _check_batch(batch, i)
                        losses = _default_loss(model, batch, device, num_samples)
                    else:
                        losses = loss_fn(model, batch)
                    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
                        raise ValueError(
                            f"batch {i}: the loss must be a 1-D tensor with one loss per sample [B], got "
                            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
                        )
                    bad = (~torch.isfinite(losses.detach())).nonzero().flatten()
                    if bad.numel():
                        raise FloatingPointError(
                            f"non-finite loss {float(losses.detach()[bad[0]])} for sample {num_samples + int(bad[0])}"
                        )
                    if not losses.requires_grad:
                        raise RuntimeError(
                            "the loss does not depend on any probed module output (did loss_fn run the model "
                            "under torch.no_grad, or detach its result?)"
                        )
                    losses.sum().backward()  # sum, not mean: row b gets exactly d loss_b / d Y_b
                    b = losses.numel()
                    for s in sites:
                        s.end_batch(b, num_samples)
                    num_samples += b
                    num_batches += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(samples=num_samples)
            finally:
                probe.active = False
                for h in handles:
                    h.remove()
    except Exception:
        if world > 1:  # let the other ranks stop with an error instead of waiting for this one
            dd.gather_ints([1, 0, 0, 0] + [0] * len(sites), process_group)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if world > 1:
        num_samples, num_batches, elapsed = _merge_ranks(sites, probe, num_samples, num_batches, elapsed, process_group)
    if num_batches == 0:
        raise ValueError("batches is empty: give at least one batch of calibration samples")

    idle = [s.cand.name for s in sites if not s.reached]
    if idle and world_rank == 0:
        warnings.warn(
            f"{len(idle)} candidate module(s) got no gradient (never ran, or off the loss path) and score 0: "
            f"{', '.join(idle[:5])}{', ...' if len(idle) > 5 else ''}",
            stacklevel=2,
        )
    by_seed: dict[int, dict[str, float]] = {s: {} for s in seeds}
    per_sample: dict[str, torch.Tensor] | None = {} if estimator == "fisher" else None
    for site in sites:
        vals, per = site.results(num_samples)
        for j, s in enumerate(seeds):
            by_seed[s][site.cand.name] = float(vals[j])
        if per_sample is not None:
            per_sample[site.cand.name] = per
    names = [s.cand.name for s in sites]
    scores = {n: float(sum(by_seed[s][n] for s in seeds) / len(seeds)) for n in names}
    modules = {c.name: ModuleInfo(c.layer, c.type, c.in_features, c.out_features) for c in candidates}
    config = {
        "rank": rank, "projection": projection, "estimator": estimator, "seeds": seeds,
        "lora_alpha": lora_alpha, "use_rslora": use_rslora, "scaling": scaling, "backend": backend,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "exclude_modules": exclude_modules if exclude_modules is None or isinstance(exclude_modules, str)
        else list(exclude_modules),
    }
    meta = {"probe_seconds": elapsed, "num_batches": num_batches, "torch": torch.__version__}
    if world > 1:
        meta.update({"world_size": world, "sample_order": "rank-major"})
    return PageScores(scores, by_seed, per_sample, modules, num_samples, config, meta)
