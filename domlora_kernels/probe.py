"""The PAGE probe: per-sample projected adapter gradient energy inside one backward pass.

How it works (docs/design.md). Every weight is frozen, so no weight gradient is ever
formed. A forward hook on each candidate module keeps what the energy needs from its input
(``P = X A^T``, ``[B, T, r]``, for projection "A"; ``X`` itself for "B" and "expected") and
passes the module's output through ``_Tap``, an identity autograd function whose backward
receives ``D = dL/dY`` and reduces the per-sample energy at once; the formulas are in
:mod:`domlora_kernels.energies`, the reductions in :mod:`domlora_kernels.ops`. A frozen model has no tensor that requires grad, so each tap
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
are recognised as such reruns, so each call is reduced exactly once (``_Site.forward_hook``).
Under ``torch.distributed`` each rank probes its own batches and ``_merge_ranks`` combines
the ranks after the last one (:mod:`domlora_kernels.distributed`).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import energies, experts, ops, packing
from .frozen import frozen_eval
from .losses import causal_lm_losses, default_labels
from .candidates import Candidate, find_candidates
from .lora_init import draw_lora_A, draw_lora_B, lora_scaling
from .scores import ModuleInfo, PageScores

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


# Layers whose output is a view made inside their own autograd Function, which autograd refuses
# to mark dirty (and after a refused attempt, to clone): the tap takes a clone of their output.
# bitsandbytes' 8-bit layer is one; only such layers pay for the copy.
_VIEW_OUTPUT_LAYERS = ("Linear8bitLt",)


def _tap(output: torch.Tensor, anchor: torch.Tensor, call: "_Call | None", clone: bool) -> torch.Tensor:
    return _Tap.apply(output.clone() if clone else output, anchor, call)


class _Call:
    """One forward call of one candidate module: what it kept, and where its energy goes."""

    __slots__ = ("site", "kept", "rows")

    def __init__(self, site: "_Site", kept, rows: int):
        self.site, self.kept, self.rows = site, kept, rows

    def reduce(self, d: torch.Tensor) -> None:
        self.site.reduce(self.kept, d, self.rows)
        self.kept = None


class _Site:
    """Per-module state of the probe: its hooks, probe matrices and running sums.

    The arithmetic lives in :mod:`domlora_kernels.energies`; a site only feeds it and keeps
    what it returns.
    """

    def __init__(self, cand: Candidate, probe: "_Probe"):
        self.cand, self.probe = cand, probe
        self.clone_output = type(cand.module).__name__ in _VIEW_OUTPUT_LAYERS
        self.calls = 0  # forward calls in the current batch
        self.deferred = 0  # no-grad forward calls a reentrant checkpoint will rerun in backward
        self.batch_energy: torch.Tensor | None = None  # fisher: unscaled [k, B] of the current batch
        self.sample_energies: list[torch.Tensor] = []  # fisher: unscaled [k, B] per batch, CPU
        self.grad_sum: dict[str, torch.Tensor] = {}  # gradient: energies.grad_sum_shapes
        self._mats: dict[tuple, torch.Tensor] = {}
        self.got_grad = False

    def mat(self, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Every seed's probe matrix side by side, drawn on the CPU once (deterministic) and
        cached per device and dtype: ``"A"``: ``[k*r, n]``; ``"B"``: ``[m, k*r]``."""
        key = (which, device, dtype)
        if key not in self._mats:
            p, c = self.probe, self.cand
            if which == "A":
                t = torch.cat([draw_lora_A(c.name, p.rank, c.in_features, s) for s in p.seeds])
            else:  # [k, m, r] -> [m, k, r] -> [m, k*r]
                t = torch.stack([draw_lora_B(c.name, p.rank, c.out_features, s) for s in p.seeds])
                t = t.permute(1, 0, 2).reshape(c.out_features, -1)
            self._mats[key] = t.to(device=device, dtype=dtype)
        return self._mats[key]

    def call_mode(self) -> str:
        """How the current forward call is tapped: "skip" (not at all), "rerun" (a tap that
        reduces nothing) or "tap"; counts the call.

        Activation checkpointing runs a module's forward twice per batch. Non-reentrant: the
        first run has grad on and is tapped; the rerun, inside backward, only rebuilds saved
        tensors, so its tap reduces nothing (two would count the energy twice) but must exist:
        without it a frozen model's rerun saves no tensors and the checkpoint refuses the
        mismatch. Reentrant: the first run is under no_grad (no graph, no tap: counted in
        `deferred`) and the rerun builds the graph that is backpropagated, so it is tapped.
        """
        if _in_backward():
            if not torch.is_grad_enabled():
                return "skip"
            if self.deferred == 0:
                return "rerun"
            self.deferred -= 1
        elif not torch.is_grad_enabled():
            self.deferred += 1
            return "skip"
        self.calls += 1
        if self.calls > 1:
            name = self.cand.name
            raise RuntimeError(
                f"{name} ran {self.calls} times in one forward pass; PAGE of a module whose weight "
                f"is applied more than once per sample is not defined by per-call energies. Exclude it with "
                f"exclude_modules=[{name!r}]"
            )
        return "tap"

    def forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        p = self.probe
        if not p.active:
            return None
        name, n = self.cand.name, self.cand.in_features
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{name}: expected a tensor input and output, got {type(output).__name__}")
        mode = self.call_mode()
        if mode != "tap":
            return None if mode == "skip" else _tap(output, p.anchor, None, self.clone_output)
        x = args[0].detach()
        if x.dim() < 2 or x.shape[-1] != n:
            raise ValueError(f"{name}: input of shape {tuple(x.shape)} is not [B, ..., {n}]")
        rows = x.shape[0]  # samples, unless the module runs on a flattened activation (reduce checks)
        x3 = x.reshape(rows, -1, n)
        proj = p.shared.project(self, args[0], x3) if p.projection in ("A", "AB") else None
        kept = energies.keep(x3, p.projection, proj)
        flat = _flattened_batch(args[0])
        if flat is not None:
            p.flat_views.add((flat, rows))
        return _tap(output, p.anchor, _Call(self, kept, rows), self.clone_output)

    def reduce(self, kept: energies.Kept, d: torch.Tensor, rows: int) -> None:
        """Add one call's energy (fisher) or gradient sums (gradient), given ``D = dL/dY``."""
        p = self.probe
        self.got_grad = True
        batch = p.batch_size
        if rows != batch:
            # Rows of the batch's tokens flattened ([B*T, n], T each in sample order: a MoE block's
            # shared expert); at batch one every row is sample 0's, whatever its layout.
            if batch != 1 and (batch, rows) not in p.flat_views:
                raise ValueError(_rows_error(self.cand.name, rows, batch))
            kept = kept.regroup(batch)
        d3 = d.reshape(batch, -1, self.cand.out_features)
        k, needs_b = len(p.seeds), p.projection in ("B", "AB")
        if p.estimator == "fisher":
            b_cat = self.mat("B", d.device, d.dtype) if needs_b else None
            self.batch_energy = energies.sample_energies(kept, d3, p.projection, b_cat, p.rank, k, p.backend)
            return
        # cached in the accumulation dtype: no conversion per backward call
        b_cat = self.mat("B", d.device, energies.accumulation_dtype(d.dtype)) if needs_b else None
        for key, g in energies.gradient_sums(kept, d3, p.projection, b_cat, p.rank, k).items():
            if key in self.grad_sum:
                self.grad_sum[key] += g
            else:
                self.grad_sum[key] = g.clone()

    @property
    def energy_rows(self) -> int:
        """Rows of the fisher energies per sample: one per seed."""
        return len(self.probe.seeds)

    def grad_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of :attr:`grad_sum` (estimator "gradient")."""
        c, p = self.cand, self.probe
        return energies.grad_sum_shapes(p.projection, len(p.seeds), c.out_features, p.rank, c.in_features)

    def batch_check(self, batch: int) -> torch.Tensor:
        """What :func:`_end_batch` copies to the host for this site: fisher: the batch's
        energies ``[energy_rows, B]``; gradient: whether the sums so far are finite (``[1]``)."""
        if self.probe.estimator == "fisher":
            if self.batch_energy is None:  # module off the loss path (or not run) this batch
                return torch.zeros(self.energy_rows, batch, dtype=torch.float64)
            return self.batch_energy.detach()
        flags = [torch.isfinite(g).all() for g in self.grad_sum.values()]
        return torch.stack(flags).all().reshape(1) if flags else torch.ones(1, dtype=torch.bool)

    def end_batch(self, host: torch.Tensor) -> None:
        if self.probe.estimator == "fisher":
            self.sample_energies.append(host)
        self.calls = self.deferred = 0
        self.batch_energy = None

    def results(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([k] PAGE per seed, [k, N] per-sample energies or None)`` as float64 CPU."""
        p = self.probe
        parts = self.sample_energies if p.estimator == "fisher" else self.grad_sum
        return energies.page_values(p.estimator, parts, num_samples, p.scaling, len(p.seeds))


class _ExpertSite(_Site):
    """An expert weight: all ``E`` experts of one 3D parameter, fed by the routed forward.

    Fisher keeps ``[k*E, B]`` energies per batch (every expert of every seed), gradient sums
    ``[k, E, ...]``; :meth:`results` reduces them to the parameter's PAGE (the sum over its
    experts, what one peft adapter on the parameter gets) and sets :attr:`by_expert`.
    """

    def __init__(self, cand: Candidate, probe: "_Probe"):
        super().__init__(cand, probe)
        self.by_expert: torch.Tensor | None = None  # [k, E] after results()

    @property
    def energy_rows(self) -> int:
        return len(self.probe.seeds) * self.cand.num_experts

    def mat(self, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``"A"``: ``[E, k*r, n]``; ``"B"``: ``[E, m, k*r]`` (peft's layouts, :mod:`~domlora_kernels.experts`)."""
        key = (which, device, dtype)
        if key not in self._mats:
            c, p = self.cand, self.probe
            features = c.in_features if which == "A" else c.out_features
            t = experts.expert_mats(which, c.name, p.rank, c.num_experts, features, p.seeds)
            self._mats[key] = t.to(device=device, dtype=dtype)
        return self._mats[key]

    def tap(self, y: torch.Tensor, x: torch.Tensor, routing: experts.Routing) -> torch.Tensor:
        """The weight's output rows ``y`` ``[S, m]`` from its input rows ``x`` ``[S, n]``, tapped."""
        p = self.probe
        mode = self.call_mode()
        if mode != "tap":
            return y if mode == "skip" else _Tap.apply(y, p.anchor, None)
        x = x.detach()
        a_cat = self.mat("A", x.device, x.dtype) if p.projection in ("A", "AB") else None
        kept = experts.keep_routed(x, routing, p.projection, a_cat)
        return _Tap.apply(y, p.anchor, _Call(self, kept, x.shape[0]))

    def reduce(self, kept: experts.RoutedKept, d: torch.Tensor, rows: int) -> None:
        p = self.probe
        self.got_grad = True
        k, needs_b = len(p.seeds), p.projection in ("B", "AB")
        with energies.ieee_fp32():
            if p.estimator == "fisher":
                b_cat = self.mat("B", d.device, d.dtype) if needs_b else None
                e = experts.routed_sample_energies(kept, d, p.projection, b_cat, p.rank, k, p.batch_size, p.backend)
                self.batch_energy = e.reshape(self.energy_rows, -1)  # [k*E, B]
                return
            b_cat = self.mat("B", d.device, energies.accumulation_dtype(d.dtype)) if needs_b else None
            sums = experts.routed_gradient_sums(kept, d, p.projection, b_cat, p.rank, k)
        for key, g in sums.items():
            self.grad_sum[key] = self.grad_sum[key] + g if key in self.grad_sum else g

    def grad_shapes(self) -> dict[str, tuple[int, ...]]:
        c, p = self.cand, self.probe
        flat = energies.grad_sum_shapes(p.projection, len(p.seeds), c.out_features, p.rank, c.in_features)
        return {key: (shape[0], c.num_experts) + shape[1:] for key, shape in flat.items()}

    def results(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.probe
        k, s2 = len(p.seeds), p.scaling**2
        if p.estimator == "fisher":
            per = torch.cat(self.sample_energies, dim=1).view(k, self.cand.num_experts, -1) * s2  # [k, E, N]
            self.by_expert = per.mean(dim=2)
            return self.by_expert.sum(dim=1), per.sum(dim=1)
        self.by_expert = torch.zeros(k, self.cand.num_experts, dtype=torch.float64)
        for g in self.grad_sum.values():  # [k, E, a, b]
            self.by_expert += (g.to("cpu", torch.float64) / num_samples).square().sum(dim=(2, 3)) * s2
        return self.by_expert.sum(dim=1), None


def _rows_error(name: str, rows: int, batch: int) -> str:
    return (
        f"{name} received {rows} rows for a batch of {batch} samples: its rows are tokens gathered or "
        f"copied out of the batch (as the experts of a MoE block in remote code are fed), not the samples "
        f"nor a flat view of them (h.view(-1, n), which is recognised), so its per-sample PAGE cannot be "
        f"told apart. Exclude it with exclude_modules=[{name!r}], or probe with batches of one sample "
        f"(then every row is that sample's)"
    )


def _flattened_batch(x: torch.Tensor) -> int | None:
    """The leading size of the activation ``x`` is a flat view of, else None.

    ``x`` ``[rows, n]`` viewing all of a contiguous tensor of 3 or more dims (``h.view(-1, n)``
    of ``h`` ``[B, T, n]``, as MoE blocks feed their shared expert and router) holds that
    tensor's rows in order: row ``i`` is sample ``i // T`` when the leading size is the batch.
    A copy, or a subset of the tokens, is no view of it and gets None.
    """
    base = x._base
    if x.dim() != 2 or base is None or base.dim() < 3 or x.numel() != base.numel():
        return None
    if not (x.is_contiguous() and base.is_contiguous()) or x.data_ptr() != base.data_ptr():
        return None
    return int(base.shape[0])


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (where checkpoints recompute)."""
    return torch._C._current_graph_task_id() != -1


class _SharedInputs:
    """Projects an input that several modules read (q/k/v, gate/up) once for all of them.

    The first site of a group computes ``X [A_1; A_2; ...]^T`` in one matmul and each site takes
    its columns: the same numbers as one matmul per site, with ``X`` read once. On the first batch
    of a call the groups are a guess from the model's structure (sibling modules of equal input
    width, as q/k/v and gate/up are), while the probe learns which sites are really called one
    after another on the same input tensor (the same object, unmodified); the learned groups
    serve every later batch. A site whose input is not its group's (a wrong guess, or control
    flow that changed) projects on its own, so a wrong guess costs time, never correctness.
    Every call makes the same choices, so a repeated call gives bit-identical scores.
    """

    def __init__(self, sites: list["_Site"] = ()):
        self.learning = True
        self.run: list = []  # first batch: [input, its version, sites called on it in a row]
        self.runs: list[list["_Site"]] = []
        self.groups = self.guess(sites)  # first site -> its group, in call order
        self.live: tuple | None = None  # (input, version, {site: its columns of P})
        self._a: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def guess(sites) -> dict["_Site", list["_Site"]]:
        """Sibling linear sites (same parent module) of equal input width, in model order."""
        by_parent: dict[tuple, list] = {}
        for site in sites:
            c = site.cand
            if c.parameter is None:
                by_parent.setdefault((c.name.rpartition(".")[0], c.in_features), []).append(site)
        return {g[0]: g for g in by_parent.values() if len(g) > 1}

    def project(self, site: "_Site", x: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        if self.learning:
            if self.run and self.run[0] is x and self.run[1] == x._version:
                self.run[2].append(site)
            else:
                self.run = [x, x._version, [site]]
                self.runs.append(self.run[2])
        live = self.live
        if live is not None and live[0] is x and live[1] == x._version and site in live[2]:
            return live[2].pop(site)
        group = self.groups.get(site)
        if group is None:
            return energies.project(x3, site.mat("A", x3.device, x3.dtype))
        proj = energies.project(x3, self._stacked(group, x3.device, x3.dtype))
        width = proj.shape[-1] // len(group)
        cols = {s: proj[..., i * width:(i + 1) * width] for i, s in enumerate(group)}
        self.live = (x, x._version, cols)
        return cols.pop(site)

    def _stacked(self, group: list["_Site"], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(group), device, dtype)
        if key not in self._a:
            self._a[key] = torch.cat([s.mat("A", device, dtype) for s in group])
        return self._a[key]

    def end_batch(self) -> None:
        """After a batch's backward: the first one fixes the groups; no input is held on to."""
        if self.learning:
            self.groups = {g[0]: g for g in self.runs if len(g) > 1}
            self.learning = False
        self.run, self.runs, self.live = [], [], None


class _Probe:
    def __init__(self, rank, seeds, projection, estimator, scaling, backend):
        self.rank, self.seeds, self.projection = rank, seeds, projection
        self.estimator, self.scaling, self.backend = estimator, scaling, backend
        self.active = False
        self.batch_size = 0  # samples in the batch being backpropagated
        # (samples, rows) of the batch's tokens flattened: [B*T, n] rows are then T per sample, in order
        self.flat_views: set[tuple[int, int]] = set()
        self.anchor = torch.zeros((), requires_grad=True)
        self.shared = _SharedInputs()  # its groups are guessed once the sites exist


# Each rank's status row for _merge_ranks: these four columns, then one got-gradient flag per site.
_FAILED, _SAMPLES, _BATCHES, _MICROSECONDS = range(4)


def _status_row(sites, num_samples: int = 0, num_batches: int = 0, elapsed: float = 0.0,
                failed: bool = False) -> list[int]:
    """The row a rank sends to the others after its last batch, or on failure (``failed``)."""
    flags = [0 if failed else int(s.got_grad) for s in sites]
    return [int(failed), num_samples, num_batches, int(elapsed * 1e6)] + flags


def _merge_ranks(sites, probe, num_samples, num_batches, elapsed, group) -> tuple[int, int, float]:
    """Replace each site's sums by those of all ranks (see :mod:`domlora_kernels.distributed`).

    Returns ``(samples, batches, seconds of the slowest rank)`` over the group. Three
    collectives in all, whatever the number of modules: the counts, then one gather or one
    all-reduce of every module's energies packed in one buffer.
    """
    from . import distributed as dd

    table = dd.gather_ints(_status_row(sites, num_samples, num_batches, elapsed), group)  # [world, 4 + S]
    failed = table[:, _FAILED].nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed during the probe (see their error); stopping this rank too")
    counts = table[:, _SAMPLES].tolist()
    for i, s in enumerate(sites):
        s.got_grad = bool(table[:, 4 + i].any())
    if probe.estimator == "fisher":
        _merge_sample_energies(sites, probe, num_samples, counts, group)
    else:
        _merge_grad_sums(sites, probe, group)
    return sum(counts), int(table[:, _BATCHES].sum()), float(table[:, _MICROSECONDS].max()) / 1e6


def _merge_sample_energies(sites, probe, num_samples, counts, group) -> None:
    from . import distributed as dd

    sizes = [s.energy_rows for s in sites]
    local = torch.zeros(sum(sizes), num_samples, dtype=torch.float64)
    for s, rows in zip(sites, local.split(sizes)):
        if s.sample_energies:
            rows.copy_(torch.cat(s.sample_energies, dim=1))
    merged = dd.gather_columns(local, counts, group)  # [sum of rows, N], rank-major
    for s, rows in zip(sites, merged.split(sizes)):
        s.sample_energies = [rows]


def _merge_grad_sums(sites, probe, group) -> None:
    from . import distributed as dd

    shapes = [s.grad_shapes() for s in sites]
    parts = []
    for s, sh in zip(sites, shapes):  # a module this rank never reached contributes zeros
        for key, shape in sh.items():
            g = s.grad_sum.get(key)
            parts.append(torch.zeros(shape, dtype=torch.float64) if g is None else g.detach().to("cpu", torch.float64))
    total = dd.all_reduce_sum(torch.cat([t.flatten() for t in parts]), group)
    offset = 0
    for s, sh in zip(sites, shapes):
        for key, shape in sh.items():
            n = math.prod(shape)
            s.grad_sum[key] = total[offset:offset + n].view(shape)
            offset += n


def _validate(rank, projection, estimator, backend, seed, lora_alpha, batches, loss_fn) -> list[int]:
    """The arguments of :func:`page_scores` that need no model; returns the seeds as a list."""
    if isinstance(batches, Mapping):
        raise TypeError("batches must be an iterable of batch dicts; wrap a single batch in a list: [batch]")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> losses [B], got {type(loss_fn).__name__}")
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


def _input_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the batches go, and the model's activation dtype.

    The input embedding's device, not the first parameter's: a model offloaded with accelerate
    keeps offloaded weights on ``meta`` and its hooks name the device they compute on.
    Fallbacks: the embedding's (or the model's) accelerate execution device, then the first
    parameter or buffer that is not on ``meta``, then the CPU.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    weight = getattr(emb, "weight", None)
    floats = [t for t in model.parameters() if t.is_floating_point()]
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else floats[0].dtype if floats else torch.float32
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device, dtype
    for mod in (emb, model):
        dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev), dtype
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device, dtype
    return torch.device("cpu"), dtype


def _check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse backend='triton' before any forward pass when the kernels cannot take this
    model's tensors (a CPU model without TRITON_INTERPRET=1, float64, no triton): one launch
    on a 1-element input runs the op's own checks."""
    if backend == "triton":
        u = torch.zeros(1, 1, 1, device=device, dtype=dtype)
        ops.projected_energy(u, u, backend=backend)


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
    return causal_lm_losses(logits, labels, first_sample)  # the batch's labels: checked where they are


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
            and ``labels`` (``-100`` ignored; default: ``input_ids`` where attended and
            preceded by an attended token, so left and right padding agree). Other
            keys are passed to the model. Anything else when ``loss_fn`` is given.
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
        :class:`PageScores`. An expert weight's score is the sum over its experts (what one
        peft ``target_parameters`` adapter on it gets); ``by_expert`` has each expert's.

    Example:
        >>> scores = page_scores(model, [{"input_ids": ids}], rank=8)  # doctest: +SKIP
        >>> scores.dominant_module                                     # doctest: +SKIP
        'model.layers.3.mlp.down_proj'
    """
    seeds = _validate(rank, projection, estimator, backend, seed, lora_alpha, batches, loss_fn)
    from . import distributed as dd

    model, process_group = dd.unwrap(model, process_group)
    world_rank, world = dd.rank_and_world(process_group)
    if world > 1:
        dd.check_equal_batch_counts(model, batches, process_group)
    candidates = find_candidates(model, target_modules, exclude_modules)
    device, dtype = _input_device_dtype(model)
    _check_backend(backend, device, dtype)
    scaling = lora_scaling(rank, lora_alpha, use_rslora)
    probe = _Probe(rank, seeds, projection, estimator, scaling, backend)
    sites = [(_ExpertSite if c.parameter is not None else _Site)(c, probe) for c in candidates]
    probe.shared = _SharedInputs(sites)
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
    if world > 1:
        meta.update({"world_size": world, "sample_order": "rank-major"})
    return _collect(sites, num_samples, config, meta)


def _run_all_ranks(model, batches, sites, loss_fn, device, bar, group) -> tuple[int, int, float]:
    """:func:`_run` on this rank, then the ranks merged: ``(samples, batches, seconds)`` of all."""
    from . import distributed as dd

    world = dd.rank_and_world(group)[1]
    probe = sites[0].probe
    t0 = time.perf_counter()
    try:
        num_samples, num_batches = _run(model, batches, sites, probe, loss_fn, device, bar)
    except BaseException:  # Ctrl-C too: the other ranks stop with an error instead of waiting for this one
        if world > 1:
            dd.gather_ints(_status_row(sites, failed=True), group)
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if world > 1:
        return _merge_ranks(sites, probe, num_samples, num_batches, elapsed, group)
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
    with frozen_eval(model), torch.enable_grad(), experts.routed_experts(_expert_taps(sites)):
        handles = [s.cand.module.register_forward_hook(s.forward_hook) for s in sites if not isinstance(s, _ExpertSite)]
        try:
            probe.active = True
            for i, batch in enumerate(batches):
                probe.flat_views = set()
                losses = _batch_losses(model, batch, i, loss_fn, device, num_samples)
                _check_losses(losses, i)
                probe.batch_size = losses.numel()
                losses.sum().backward()  # sum, not mean: row b gets exactly d loss_b / d Y_b
                _end_batch(sites, losses.detach(), num_samples)
                probe.shared.end_batch()
                num_samples += losses.numel()
                num_batches += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(samples=num_samples)
        finally:
            probe.active = False
            for h in handles:
                h.remove()
    return num_samples, num_batches


def _expert_taps(sites) -> dict[nn.Module, experts.Tap]:
    """The tap of each experts module with a probed weight: to that weight's site, if any."""
    by_module: dict[nn.Module, dict[str, _ExpertSite]] = {}
    for s in sites:
        if isinstance(s, _ExpertSite):
            by_module.setdefault(s.cand.module, {})[s.cand.parameter] = s

    def tap_of(weights: dict[str, _ExpertSite]) -> experts.Tap:
        def tap(name: str, y: torch.Tensor, x: torch.Tensor, routing: experts.Routing) -> torch.Tensor:
            site = weights.get(name)
            return y if site is None or not site.probe.active else site.tap(y, x, routing)
        return tap

    return {mod: tap_of(weights) for mod, weights in by_module.items()}


def _batch_losses(model, batch, index: int, loss_fn, device, first_sample: int) -> torch.Tensor:
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
    _check_batch(batch, index)
    if packing.is_packed(batch):
        batch = packing.unpack(batch, index)
    return _default_loss(model, batch, device, first_sample)


def _check_losses(losses: Any, index: int) -> None:
    """Shape and graph of a batch's losses (no device sync; their values are checked after
    backward, in :func:`_end_batch`)."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(
            f"batch {index}: the loss must be a 1-D tensor with one loss per sample [B], got "
            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
        )
    if not losses.requires_grad:
        raise RuntimeError(
            "the loss does not depend on any probed module output (did loss_fn run the model "
            "under torch.no_grad, or detach its result?)"
        )


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
        raise FloatingPointError(f"non-finite loss {float(host[0][bad[0]])} for sample {first_sample + int(bad[0])}")
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
    by_expert = {s.cand.name: s.by_expert.mean(dim=0).tolist() for s in sites if isinstance(s, _ExpertSite)}
    return PageScores(scores, by_seed, per_sample, modules, num_samples, config, meta, by_expert)
