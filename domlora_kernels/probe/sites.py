"""Per-module state of the probe: a candidate module's hooks, probe matrices and running sums.

:class:`Site` is a module (an ``nn.Linear`` or ``Conv1D``) tapped by a forward hook;
:class:`ExpertSite` an expert weight of a MoE block, fed by the routed forward of
:func:`~domlora_kernels.probe.experts.routed_forward`. The arithmetic lives in
:mod:`~domlora_kernels.probe.energies`; a site feeds it and keeps what it returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import energies, experts
from ..lora_init import draw_lora_A, draw_lora_B
from .candidates import Candidate
from .tap import VIEW_OUTPUT_LAYERS, Call, Tap, in_backward, tap

if TYPE_CHECKING:
    from .api import Probe

class Site:
    """Per-module state of the probe: its hooks, probe matrices and running sums.

    The arithmetic lives in :mod:`domlora_kernels.energies`; a site only feeds it and keeps
    what it returns.
    """

    def __init__(self, cand: Candidate, probe: "Probe"):
        self.cand, self.probe = cand, probe
        self.clone_output = type(cand.module).__name__ in VIEW_OUTPUT_LAYERS
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
        if in_backward():
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
            return None if mode == "skip" else tap(output, p.anchor, None, self.clone_output)
        x = args[0].detach()
        if x.dim() < 2 or x.shape[-1] != n:
            raise ValueError(f"{name}: input of shape {tuple(x.shape)} is not [B, ..., {n}]")
        rows = x.shape[0]  # samples, unless the module runs on a flattened activation (reduce checks)
        x3 = x.reshape(rows, -1, n)
        proj = p.shared.project(self, args[0], x3) if p.projection in ("A", "AB") else None
        kept = energies.keep(x3, p.projection, proj)
        if p.energy_mask is not None:
            kept = self._masked(kept, p.energy_mask)
        flat = flattened_batch(args[0])
        if flat is not None:
            p.flat_views.add((flat, rows))
        return tap(output, p.anchor, Call(self, kept, rows), self.clone_output)

    def _masked(self, kept: energies.Kept, mask: torch.Tensor) -> energies.Kept:
        """The kept rows with the positions outside ``energy_mask`` zeroed: a zero row of ``X``
        (or ``P = X A^T``) drops that position's term ``d_t p_t^T`` from every energy."""
        rows = kept.proj if kept.proj is not None else kept.x
        if tuple(rows.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"{self.cand.name}: its rows {tuple(rows.shape[:2])} are not the batch's [B, T] "
                             f"{tuple(mask.shape)}, so energy_mask cannot be applied to it; exclude it with "
                             f"exclude_modules=[{self.cand.name!r}] or drop energy_mask")
        m = mask.to(device=rows.device, dtype=rows.dtype).unsqueeze(-1)
        return energies.Kept(None if kept.proj is None else kept.proj * m, None if kept.x is None else kept.x * m)

    def reduce(self, kept: energies.Kept, d: torch.Tensor, rows: int) -> None:
        """Add one call's energy (fisher) or gradient sums (gradient), given ``D = dL/dY``."""
        p = self.probe
        self.got_grad = True
        batch = p.batch_size
        if rows != batch:
            # Rows of the batch's tokens flattened ([B*T, n], T each in sample order: a MoE block's
            # shared expert); at batch one every row is sample 0's, whatever its layout.
            if batch != 1 and (batch, rows) not in p.flat_views:
                raise ValueError(rows_error(self.cand.name, rows, batch))
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


class ExpertSite(Site):
    """An expert weight: all ``E`` experts of one 3D parameter, fed by the routed forward.

    Fisher keeps ``[k*E, B]`` energies per batch (every expert of every seed), gradient sums
    ``[k, E, ...]``; :meth:`results` reduces them to the parameter's PAGE (the sum over its
    experts, what one peft adapter on the parameter gets) and sets :attr:`by_expert`.
    """

    def __init__(self, cand: Candidate, probe: "Probe"):
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
            return y if mode == "skip" else Tap.apply(y, p.anchor, None)
        if p.energy_mask is not None:
            raise ValueError(f"{self.cand.name}: energy_mask is not supported on expert weights (their rows are "
                             f"routed tokens); exclude them with exclude_modules or drop energy_mask")
        x = x.detach()
        a_cat = self.mat("A", x.device, x.dtype) if p.projection in ("A", "AB") else None
        kept = experts.keep_routed(x, routing, p.projection, a_cat)
        return Tap.apply(y, p.anchor, Call(self, kept, x.shape[0]))

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


def rows_error(name: str, rows: int, batch: int) -> str:
    return (
        f"{name} received {rows} rows for a batch of {batch} samples: its rows are tokens gathered or "
        f"copied out of the batch (as the experts of a MoE block in remote code are fed), not the samples "
        f"nor a flat view of them (h.view(-1, n), which is recognised), so its per-sample PAGE cannot be "
        f"told apart. Exclude it with exclude_modules=[{name!r}], or probe with batches of one sample "
        f"(then every row is that sample's)"
    )


def flattened_batch(x: torch.Tensor) -> int | None:
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
