"""PAGE for the experts of mixture-of-experts models, as peft's ``target_parameters`` LoRA sees them.

In transformers 5 an MoE block keeps its experts in one module (``MixtralExperts``,
``Qwen3MoeExperts``, ``GptOssExperts``, ...) holding 3D parameters: ``gate_up_proj`` (or
``up_proj``) and ``down_proj``, ``[E, out, in]``, or ``[E, in, out]`` where the module says
``is_transposed``. Every such class carries the flags of transformers'
``@use_experts_implementation`` (``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm``, ``_apply_gate``), which is what makes the layout known here.

peft's ``LoraConfig(target_parameters=[...])`` puts one adapter on a whole parameter:
``lora_A [r*E, in]``, expert ``e`` owning rows ``e*r:(e+1)*r``, and ``lora_B [out, r*E]``,
expert ``e`` owning the interleaved columns ``e::E``; the delta of expert ``e`` is
``s * B_e A_e``. So the gradient of ``lora_B`` at init holds, per expert, ``s * G_e A_e^T``
with ``G_e = D_e^T X_e`` over the tokens routed to ``e``, and its energy is the sum over
the experts. The probe's ``A`` of an expert parameter is drawn exactly like a module's
(:func:`~domlora_kernels.lora_init.draw_lora_A` on the parameter's name), at peft's shape
``[r*E, in]``, so placement can copy it into ``lora_A`` as is.

How the routed inputs and output gradients are captured. transformers runs the experts
through one of several implementations (``config._experts_implementation``): "eager" (a
Python loop over the experts hit), "batched_mm" (one bmm over a per-token copy of every
weight, ``[S, out, in]``), "grouped_mm" (``torch._grouped_mm`` over the tokens sorted by
expert). None exposes the per-expert activations to a hook: the weights are sliced or fed
whole to a kernel inside ``forward``. So for the duration of the probe each experts module
runs :func:`routed_forward` instead (an instance attribute, removed on exit, also on
error): one stable sort of the ``S = tokens * top_k`` routed rows by expert, then per
expert the same ``F.linear`` calls as "eager", concatenated into one ``[S, out]`` stream,
which is tapped once per parameter. Sorting stably keeps each expert's rows in token
order, hence in sample order, so the rows of (expert ``e``, sample ``b``) are one
contiguous segment and the per-sample, per-expert energies are one varlen call of
:mod:`domlora_kernels.ops` per parameter (``cu_seqlens`` of ``E*B`` segments), with no
padding and no ``[E, out, in]`` gradient. The routing weights, the gate and the final
per-token sum (``reshape + sum``, as "batched_mm" and "grouped_mm" do) are applied as in
transformers, so the model's output and every gradient upstream equal its own
implementation's to float rounding (the tests check it against each implementation).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from .energies import ieee_fp32
from ..lora_init import draw_lora_A, draw_lora_B

# The 3D weight parameters of a transformers experts module, in the order they run.
_UP_WEIGHTS = ("gate_up_proj", "up_proj")
_DOWN_WEIGHT = "down_proj"
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "num_experts")


@dataclass(frozen=True)
class ExpertWeight:
    """One 3D expert parameter the probe measures (all experts of one MoE block)."""

    name: str  # full parameter name: model.layers.0.mlp.experts.down_proj
    module: nn.Module  # the experts module owning it
    parameter: str  # gate_up_proj | up_proj | down_proj
    num_experts: int  # E
    in_features: int  # n of every expert
    out_features: int  # m of every expert


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module of a layout :func:`routed_forward` runs."""
    if not all(hasattr(module, f) for f in _FLAGS) or not callable(getattr(module, "_apply_gate", None)):
        return False
    up = _UP_WEIGHTS[0] if module.has_gate else _UP_WEIGHTS[1]
    params = dict(module.named_parameters(recurse=False))
    return all(isinstance(params.get(p), torch.Tensor) and params[p].dim() == 3 for p in (up, _DOWN_WEIGHT))


def _weight_names(module: nn.Module) -> tuple[str, str]:
    return (_UP_WEIGHTS[0] if module.has_gate else _UP_WEIGHTS[1]), _DOWN_WEIGHT


def find_expert_weights(model: nn.Module) -> list[ExpertWeight]:
    """The 3D expert parameters of ``model`` in definition order (up before down per block)."""
    found = []
    for mod_name, mod in model.named_modules():
        if not mod_name or not is_experts_module(mod):
            continue
        for pname in _weight_names(mod):
            w = getattr(mod, pname)
            e, a, b = w.shape
            n_in, n_out = (a, b) if mod.is_transposed else (b, a)
            found.append(ExpertWeight(f"{mod_name}.{pname}", mod, pname, int(e), int(n_in), int(n_out)))
    return found


def unknown_weights(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameters of 3 or more dimensions that are neither a known expert weight nor a convolution.

    Returns ``{full name: shape}``. Such weights may be experts in a layout the probe cannot
    run (remote code, fused or expert-parallel blocks); the caller must refuse them by name.
    """
    known = {w.name for w in find_expert_weights(model)}
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if p.dim() >= 3 and full not in known:
                out[full] = tuple(p.shape)
    return out


# ----------------------------------------------------------------- the probe's matrices
def draw_expert_A(name: str, rank: int, num_experts: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """The probe's A of an expert parameter, ``[E, rank, in]`` (float32, CPU).

    A view of ``draw_lora_A(name, rank * E, in, seed)``, which is peft's ``lora_A`` layout
    ``[r*E, in]`` (expert ``e``: rows ``e*r:(e+1)*r``).
    """
    return draw_lora_A(name, rank * num_experts, in_features, seed).view(num_experts, rank, in_features)


def draw_expert_B(name: str, rank: int, num_experts: int, out_features: int, seed: int = 0) -> torch.Tensor:
    """The probe's nonzero B of an expert parameter, ``[E, out, rank]`` (float32, CPU).

    From ``draw_lora_B(name, rank * E, out, seed)`` in peft's ``lora_B`` layout ``[out, r*E]``,
    where expert ``e`` owns the columns ``e::E``.
    """
    b = draw_lora_B(name, rank * num_experts, out_features, seed)
    return b.view(out_features, rank, num_experts).permute(2, 0, 1).contiguous()


def expert_mats(which: str, name: str, rank: int, num_experts: int, features: int, seeds: list[int]) -> torch.Tensor:
    """Every seed's probe matrix side by side per expert (float32, CPU): ``"A"``: ``[E, k*r, n]``
    (``features`` = n); ``"B"``: ``[E, m, k*r]`` (``features`` = m)."""
    if which == "A":
        return torch.cat([draw_expert_A(name, rank, num_experts, features, s) for s in seeds], dim=1)
    return torch.cat([draw_expert_B(name, rank, num_experts, features, s) for s in seeds], dim=2)


# ----------------------------------------------------------------- routing and forward
@dataclass
class Routing:
    """The ``S = tokens * top_k`` routed rows of one forward call, sorted by expert.

    Attributes:
        expert: ``[S]`` expert of each sorted row (non-decreasing).
        token: ``[S]`` token (row of the flattened ``[tokens, hidden]`` input) of each sorted row,
            increasing within each expert.
        counts: rows per expert (``E`` ints).
        offsets: int32 ``[E]`` end of each expert's rows (``grouped_mm``'s ``offs``), on the rows' device.
        num_tokens: tokens of the call (``batch * sequence``).
    """

    expert: torch.Tensor
    token: torch.Tensor
    counts: list[int]
    offsets: torch.Tensor
    num_tokens: int

    def cu_seqlens(self, batch: int) -> torch.Tensor:
        """int32 ``[E*batch + 1]`` offsets of the (expert, sample) segments of the sorted rows."""
        if batch < 1 or self.num_tokens % batch:
            raise ValueError(
                f"the experts saw {self.num_tokens} tokens, which do not split into {batch} samples of equal "
                f"length; the loss must return one loss per row of the [batch, sequence] input"
            )
        num_experts = len(self.counts)
        key = self.expert * batch + torch.div(self.token, self.num_tokens // batch, rounding_mode="floor")
        sizes = torch.bincount(key, minlength=num_experts * batch)
        return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).to(torch.int32)


def route(top_k_index: torch.Tensor, num_experts: int) -> tuple[Routing, torch.Tensor]:
    """``(routing, order)``: ``order[i]`` is the flat ``token * top_k + slot`` index of sorted row ``i``."""
    flat = top_k_index.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(
            f"expert indices must lie in [0, {num_experts}); got [{int(flat.min())}, {int(flat.max())}] "
            f"(expert-parallel sentinels are not supported by the probe)"
        )
    expert, order = torch.sort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=num_experts)
    token = torch.div(order, top_k_index.shape[-1], rounding_mode="floor")
    offsets = sizes.cumsum(0).to(torch.int32)
    return Routing(expert, token, sizes.tolist(), offsets, top_k_index.shape[0]), order


def expert_linear(x: torch.Tensor, weight: torch.Tensor, routing: Routing, transposed: bool,
                  bias: torch.Tensor | None = None, grouped: bool = False) -> torch.Tensor:
    """Rows sorted by expert (``routing.counts[e]`` each) through their expert's linear map.

    ``weight``: ``[E, out, in]`` (``[E, in, out]`` when ``transposed``); ``bias``: ``[E, out]``.
    Returns ``[S, out]``. ``grouped``: one ``grouped_mm`` over all experts (what transformers'
    "grouped_mm" implementation runs), else one ``F.linear`` per expert (its "eager" loop).
    """
    w_in_out = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    if grouped:
        out = _grouped_mm(x.to(weight.dtype), w_in_out, routing.offsets)
        return out if bias is None else out + bias[routing.expert]
    outs, start = [], 0
    for e, c in enumerate(routing.counts):
        if c:
            outs.append(F.linear(x[start:start + c], w_in_out[e].T, None if bias is None else bias[e]))
        start += c
    return torch.cat(outs) if outs else x.new_zeros(0, w_in_out.shape[-1])


def _grouped_mm(x: torch.Tensor, w_in_out: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w_in_out, offs=offsets)


# tap(weight name, output [S, out], input [S, in], routing) -> output, spliced into the graph
Tap = Callable[[str, torch.Tensor, torch.Tensor, Routing], torch.Tensor]


def routed_forward(module: nn.Module, tap: Tap, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts module's function, run expert by expert with each weight's output tapped.

    hidden: ``[tokens, hidden]``; top_k_index / top_k_weights: ``[tokens, top_k]``.
    Returns ``[tokens, hidden]`` in ``hidden``'s dtype.
    """
    if hidden.dim() != 2:
        raise ValueError(f"{type(module).__name__}: expected flattened hidden states [tokens, hidden], got {tuple(hidden.shape)}")
    up_name, down_name = _weight_names(module)
    routing, order = route(top_k_index, module.num_experts)
    bias = (lambda p: getattr(module, f"{p}_bias")) if module.has_bias else (lambda p: None)
    x = hidden[routing.token]  # [S, hidden]
    # The weights' matmuls as the model runs them: one grouped_mm over the sorted rows where the model
    # uses grouped_mm, else per expert. The per-expert loop ran 1.4-3x slower than grouped_mm on a
    # shared 2-core CPU (Mixtral-shaped, E=8, 1024 tokens): the probe must not pay that.
    grouped = getattr(getattr(module, "config", None), "_experts_implementation", None) == "grouped_mm"
    h = expert_linear(x, getattr(module, up_name), routing, module.is_transposed, bias(up_name), grouped)
    h = tap(up_name, h, x, routing)
    g = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = expert_linear(g, getattr(module, down_name), routing, module.is_transposed, bias(down_name), grouped)
    y = tap(down_name, y, g, routing)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    out = y[inverse].view(routing.num_tokens, top_k_index.shape[-1], -1).sum(dim=1)
    return out.to(hidden.dtype)


@contextlib.contextmanager
def routed_experts(modules: dict[nn.Module, Tap]) -> Iterator[None]:
    """Run each experts module through :func:`routed_forward` with its tap inside the block.

    The original ``forward`` (class attribute, or an instance attribute some library set) is
    back on exit, also on error.
    """
    saved = []
    try:
        for mod, tap in modules.items():
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = _bound_forward(mod, tap)
        yield
    finally:
        for mod, previous in reversed(saved):
            if previous is None:
                del mod.forward
            else:
                mod.forward = previous


def _bound_forward(module: nn.Module, tap: Tap) -> Callable[..., torch.Tensor]:
    # The experts forward is (hidden_states, top_k_index, top_k_weights) under each model's own
    # argument names (gpt-oss: router_indices, routing_weights): bind by position.
    sig = inspect.signature(type(module).forward)

    def forward(*args, **kwargs):
        bound = sig.bind(module, *args, **kwargs)
        bound.apply_defaults()
        values = list(bound.arguments.values())[1:4]
        if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values):
            raise TypeError(f"{type(module).__name__}.forward: expected (hidden_states, top_k_index, top_k_weights) tensors")
        return routed_forward(module, tap, *values)

    return forward


# ----------------------------------------------------------------- energies
@dataclass
class RoutedKept:
    """What one forward call of an expert weight keeps for its backward; rows sorted by expert.

    ``proj``: ``P = X_e A_e^T`` per row, ``[S, k*r]`` (projections "A", "AB"), else None.
    ``x``: the input rows ``[S, n]`` (projections "B", "AB", "expected"), else None.
    """

    proj: torch.Tensor | None
    x: torch.Tensor | None
    routing: Routing


def keep_routed(x: torch.Tensor, routing: Routing, projection: str, a_cat: torch.Tensor | None) -> RoutedKept:
    """What projection ``projection`` needs from the input rows ``x`` ``[S, n]``.

    ``a_cat``: every seed's A side by side per expert, ``[E, k*r, n]`` in ``x``'s dtype.
    """
    proj = None
    if projection in ("A", "AB"):
        with torch.no_grad(), ieee_fp32():
            proj = expert_linear(x, a_cat, routing, transposed=False)  # [S_e, n] @ [n, k*r]
    return RoutedKept(proj, x if projection != "A" else None, routing)


def routed_sample_energies(kept: RoutedKept, d: torch.Tensor, projection: str, b_cat: torch.Tensor | None,
                           rank: int, k: int, batch: int, backend: str = "auto") -> torch.Tensor:
    """Unscaled per-sample, per-expert energies of one call, ``[k, E, batch]`` float64.

    ``d``: the output gradient rows ``[S, m]``, sorted like ``kept``. ``b_cat``: every seed's
    probe B side by side per expert, ``[E, m, k*r]`` (projections "B", "AB"). The formulas
    of :func:`domlora_kernels.energies.sample_energies`, over the ``E*batch`` segments of the
    rows (expert ``e``, sample ``b``): one varlen call per seed, however many experts.
    """
    routing = kept.routing
    cu = routing.cu_seqlens(batch)
    e = torch.zeros(k, len(routing.counts) * batch, dtype=torch.float64, device=d.device)
    if kept.proj is not None:  # ||D_eb^T P_eb||^2
        for j in range(k):
            e[j] += ops.projected_energy(d, kept.proj[:, j * rank:(j + 1) * rank], cu, backend=backend).double()
    if projection in ("B", "AB"):  # ||(D_eb B_e)^T X_eb||^2
        v = expert_linear(d, b_cat, routing, transposed=True)  # [S_e, m] @ [m, k*r]
        for j in range(k):
            e[j] += ops.projected_energy(kept.x, v[:, j * rank:(j + 1) * rank], cu, backend=backend).double()
    if projection == "expected":  # E_A ||G A^T||^2 = r / (3n) ||G||^2
        n = kept.x.shape[-1]
        e += ops.weight_grad_energy(d, kept.x, cu, backend=backend).double() * (rank / (3.0 * n))
    return e.view(k, len(routing.counts), batch)


def routed_gradient_sums(kept: RoutedKept, d: torch.Tensor, projection: str, b_cat: torch.Tensor | None,
                         rank: int, k: int) -> dict[str, torch.Tensor]:
    """This call's unscaled summed projected gradients per expert: ``"A"``: ``[k, E, m, r]``
    (projections "A", "AB"), ``"B"``: ``[k, E, r, n]`` ("B", "AB"); float32 (float64 for float64)."""
    acc = torch.float64 if d.dtype == torch.float64 else torch.float32
    counts = kept.routing.counts
    num_experts, m = len(counts), d.shape[1]
    out = {}
    if projection in ("A", "AB"):
        out["A"] = d.new_zeros(num_experts, m, k * rank, dtype=acc)
    if projection in ("B", "AB"):
        v = expert_linear(d, b_cat, kept.routing, transposed=True).to(acc)  # [S, k*r]
        out["B"] = d.new_zeros(num_experts, k * rank, kept.x.shape[1], dtype=acc)
    start = 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        if c and "A" in out:
            out["A"][e] = d[rows].to(acc).T @ kept.proj[rows].to(acc)  # [m, S_e] @ [S_e, k*r]
        if c and "B" in out:
            out["B"][e] = v[rows].T @ kept.x[rows].to(acc)  # [k*r, S_e] @ [S_e, n]
        start += c
    if "A" in out:  # [E, m, k, r] -> [k, E, m, r]
        out["A"] = out["A"].view(num_experts, m, k, rank).permute(2, 0, 1, 3)
    if "B" in out:  # [E, k, r, n] -> [k, E, r, n]
        out["B"] = out["B"].view(num_experts, k, rank, -1).transpose(0, 1)
    return out
