"""DomLoRA placement: a peft adapter on the highest-PAGE module(s), started from the probe's A.

:func:`domlora_config` turns a :class:`~domlora_kernels.scores.PageScores` into a peft config
that targets the ``top_k`` modules of highest PAGE and nothing else; :func:`apply_domlora`
wraps a model with it and copies the probe's ``A`` into each ``lora_A``, so that the first
gradient of every ``lora_B`` is exactly the one the probe measured (docs/design.md,
oracle 2).

Exact names. peft matches a *list* of target names as "equal, or a dotted suffix": the name
``model.layers.1.mlp.down_proj`` would also select ``encoder.model.layers.1.mlp.down_proj`` in
a model that nests a second one. A *string* is a regular expression peft matches against the
whole name (``re.fullmatch``), so the config carries one alternation of the escaped full names:
nothing but those modules can match. ``rank_pattern`` keys are regexes too, matched by peft as
``(.*\\.)?(key)$``; a leading ``^`` there keeps the optional prefix empty, so each key selects
exactly its own module as well.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .lora_init import draw_lora_A, lora_scaling
from .candidates import _linear_shape
from .scores import PageScores

VARIANTS = ("lora", "dora", "rslora", "adalora")

# set by DomLoRA itself from the scores and the arguments; passing them in **peft_kwargs is an error
_OWNED_KWARGS = ("target_modules", "r", "lora_alpha", "use_dora", "use_rslora", "rank_pattern", "target_r")


@dataclass
class Placement:
    """What :func:`apply_domlora` placed, and what it costs against vanilla LoRA.

    Attributes:
        variant: "lora", "dora", "rslora" or "adalora".
        targets: the adapted modules, highest PAGE first.
        ranks: name -> adapter rank (AdaLoRA: its ``init_r``; it prunes towards ``r`` in training).
        shares: name -> PAGE share of the module in the whole probe.
        r: the rank argument; vanilla LoRA is counted at this rank.
        trainable_params: parameters with ``requires_grad`` in the wrapped model (includes
            DoRA's magnitude vectors and AdaLoRA's ``lora_E``).
        vanilla_lora_params: ``sum r * (n + m)`` over every probed candidate module: vanilla
            LoRA on all linear modules at the same rank, counted arithmetically.
        num_candidates: modules the probe measured.
        copied_A: targets whose ``lora_A`` now holds the probe's A.
        kept_peft_init: target -> why its ``lora_A`` kept peft's initialisation.
        probe_scaling / adapter_scaling: the LoRA scaling the probe measured with and the
            adapter's; the first ``||lora_B.grad||^2`` equals the probe's energy times
            ``(adapter_scaling / probe_scaling) ** 2`` (1 when both use the same alpha).
    """

    variant: str
    targets: list[str]
    ranks: dict[str, int]
    shares: dict[str, float]
    r: int
    trainable_params: int
    vanilla_lora_params: int
    num_candidates: int
    copied_A: list[str] = field(default_factory=list)
    kept_peft_init: dict[str, str] = field(default_factory=dict)
    probe_scaling: float | None = None
    adapter_scaling: float | None = None

    @property
    def ratio(self) -> float:
        """``trainable_params / vanilla_lora_params``."""
        return self.trainable_params / self.vanilla_lora_params

    def summary(self) -> str:
        """Two or more lines: where the adapters sit and the trainable parameter count."""
        k = len(self.targets)
        lines = [
            f"DomLoRA ({self.variant}): {k} adapter{'s' if k > 1 else ''} on the top-{k} PAGE module{'s' if k > 1 else ''}"
        ]
        for name in self.targets:
            init = "probe A" if name in self.copied_A else "peft init"
            lines.append(f"  {name}: rank {self.ranks[name]}, PAGE share {100 * self.shares[name]:.1f}%, lora_A from {init}")
        lines.append(
            f"trainable parameters: {self.trainable_params:,} = {100 * self.ratio:.2f}% of vanilla LoRA on all "
            f"{self.num_candidates} linear modules at r={self.r} ({self.vanilla_lora_params:,})"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def exact_names_regex(names: list[str]) -> str:
    """A regex that ``re.fullmatch`` (peft's rule for a string ``target_modules``) matches
    against exactly the given full module names and nothing else.

    >>> exact_names_regex(["model.layers.1.mlp.down_proj"])
    '(?:model\\\\.layers\\\\.1\\\\.mlp\\\\.down_proj)'
    """
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _check_int(value: Any, what: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{what} must be an integer {rng}, got {value!r}")
    return value


def top_modules(scores: PageScores, top_k: int = 1) -> list[str]:
    """The ``top_k`` module names of highest PAGE, highest first (ties keep model order).

    Raises:
        ValueError: ``top_k`` outside ``1 .. number of probed modules``.
    """
    if not isinstance(scores, PageScores):
        raise TypeError(f"scores must be a PageScores (from page_scores or PageScores.from_json), got {type(scores).__name__}")
    _check_int(top_k, "top_k", 1, len(scores.scores))
    return [n for n, _ in scores.ranked()[:top_k]]


def page_rank_pattern(scores: PageScores, targets: list[str], r: int) -> dict[str, int]:
    """Ranks proportional to PAGE within ``targets``, each at least 1, summing to ``len(targets) * r``.

    The rule: every target gets 1, and the remaining ``len(targets) * (r - 1)`` ranks are
    apportioned by largest remainder in proportion to the targets' PAGE (a remainder tie goes
    to the higher PAGE). If the targets' PAGE sums to zero the split is even.

    >>> page_rank_pattern(scores, ["a", "b"], r=8)   # PAGE 3:1  # doctest: +SKIP
    {'a': 12, 'b': 4}
    """
    k = len(targets)
    extra = k * (r - 1)
    vals = [max(scores.scores[n], 0.0) for n in targets]
    tot = sum(vals)
    weights = [v / tot for v in vals] if tot > 0 else [1.0 / k] * k
    quotas = [extra * w for w in weights]
    ranks = [math.floor(q) for q in quotas]
    left = extra - sum(ranks)
    # targets are sorted by PAGE, so a stable sort on the remainder breaks ties towards higher PAGE
    order = sorted(range(k), key=lambda i: -(quotas[i] - ranks[i]))
    for i in order[:left]:
        ranks[i] += 1
    return {n: 1 + ri for n, ri in zip(targets, ranks)}


def _resolve_ranks(scores: PageScores, targets: list[str], r: int, rank_pattern: Any) -> dict[str, int]:
    if rank_pattern is None:
        return {n: r for n in targets}
    if isinstance(rank_pattern, str):
        if rank_pattern != "page":
            raise ValueError(f"rank_pattern must be None, 'page' or a dict name -> rank, got {rank_pattern!r}")
        return page_rank_pattern(scores, targets, r)
    if isinstance(rank_pattern, dict):
        unknown = [k for k in rank_pattern if k not in targets]
        if unknown:
            raise ValueError(
                f"rank_pattern names modules that are not among the top-{len(targets)} targets: {unknown}; "
                f"the targets are {targets}"
            )
        for k, v in rank_pattern.items():
            _check_int(v, f"rank_pattern[{k!r}]", 1)
        return {n: rank_pattern.get(n, r) for n in targets}
    raise ValueError(f"rank_pattern must be None, 'page' or a dict name -> rank, got {type(rank_pattern).__name__}")


def _validate(scores, r, lora_alpha, top_k, variant, rank_pattern, peft_kwargs) -> tuple[list[str], dict[str, int]]:
    targets = top_modules(scores, top_k)
    _check_int(r, "r", 1)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    owned = [k for k in _OWNED_KWARGS if k in peft_kwargs]
    if owned:
        raise ValueError(
            f"{', '.join(owned)} {'is' if len(owned) == 1 else 'are'} set by DomLoRA from the scores and the arguments "
            f"r, lora_alpha, top_k, variant, rank_pattern; remove {'it' if len(owned) == 1 else 'them'} from the keyword arguments"
        )
    if variant == "adalora":
        if rank_pattern is not None:
            raise ValueError("variant='adalora' allocates ranks itself during training; drop rank_pattern")
        if peft_kwargs.get("total_step") is None:
            raise ValueError(
                "variant='adalora' needs total_step=<number of training steps> (AdaLoRA prunes ranks on a schedule "
                "over the run), e.g. domlora_config(scores, variant='adalora', total_step=1000)"
            )
    ranks = _resolve_ranks(scores, targets, r, rank_pattern)
    return targets, ranks


def domlora_config(
    scores: PageScores,
    r: int = 8,
    lora_alpha: float = 16,
    top_k: int = 1,
    variant: str = "lora",
    rank_pattern: str | dict[str, int] | None = None,
    **peft_kwargs: Any,
):
    """The peft config that puts adapters on the ``top_k`` highest-PAGE modules, by exact full name.

    Args:
        scores: a probe result (:func:`~domlora_kernels.page_scores` or ``PageScores.from_json``).
        r: adapter rank (default 8). For "adalora" it is ``target_r``, the average rank
            AdaLoRA prunes towards; its starting rank ``init_r`` defaults to ``ceil(1.5 r)``
            (peft's own 12 for 8) unless given in ``peft_kwargs``.
        lora_alpha: LoRA alpha (default 16); scaling ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
        top_k: how many modules to adapt, highest PAGE first (default 1, the dominant module).
        variant: "lora" (``LoraConfig``), "dora" (``use_dora=True``), "rslora"
            (``use_rslora=True``) or "adalora" (``AdaLoraConfig``; requires ``total_step``).
        rank_pattern: None (every target gets ``r``), "page" (ranks proportional to PAGE within
            the top-k, at least 1 each, total ``top_k * r``; see :func:`page_rank_pattern`) or
            a dict ``{full name: rank}`` over the targets. Not for "adalora".
        **peft_kwargs: passed to the peft config (``lora_dropout``, ``bias``, ``total_step``,
            ``tinit``, ...). ``task_type`` defaults to "CAUSAL_LM".

    Returns:
        ``peft.LoraConfig`` or ``peft.AdaLoraConfig``; ``target_modules`` is a regex that peft
        fully matches against exactly the chosen names (see the module docstring).

    Raises:
        ValueError: ``top_k`` outside ``1 .. number of modules``, unknown variant, missing
            ``total_step`` for AdaLoRA, a bad ``rank_pattern``, or a keyword DomLoRA sets itself.

    Example:
        >>> cfg = domlora_config(scores, r=8, lora_alpha=16, top_k=1)    # doctest: +SKIP
        >>> model = peft.get_peft_model(model, cfg)                       # doctest: +SKIP
    """
    targets, ranks = _validate(scores, r, lora_alpha, top_k, variant, rank_pattern, peft_kwargs)
    import peft

    kwargs = dict(peft_kwargs)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    target = exact_names_regex(targets)
    if variant == "adalora":
        kwargs.setdefault("init_r", math.ceil(1.5 * r))
        return peft.AdaLoraConfig(target_modules=target, target_r=r, lora_alpha=lora_alpha, **kwargs)
    pattern = {"^" + re.escape(n): k for n, k in ranks.items() if k != r}
    return peft.LoraConfig(
        target_modules=target, r=r, lora_alpha=lora_alpha, use_dora=variant == "dora",
        use_rslora=variant == "rslora", rank_pattern=pattern, **kwargs,
    )


def _adapted_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """name -> peft LoRA layer carrying ``adapter_name`` (names as in the unwrapped model)."""
    out = {}
    for name, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in lora_a:
            out[name] = mod
    return out


def apply_domlora(
    model: nn.Module,
    scores: PageScores,
    r: int = 8,
    lora_alpha: float = 16,
    top_k: int = 1,
    variant: str = "lora",
    rank_pattern: str | dict[str, int] | None = None,
    adapter_name: str = "default",
    verbose: bool = True,
    **peft_kwargs: Any,
):
    """Wrap ``model`` with peft adapters on its ``top_k`` highest-PAGE modules, initialised from the probe.

    Like ``peft.get_peft_model``, this injects the adapters into ``model`` itself; ``scores``
    is not changed. For "lora", "dora" and "rslora", each target's ``lora_A`` (``[rank, n]``)
    is set to the A the probe measured with (``scores.lora_A[name]``, first seed) when the
    ranks agree; ``lora_B`` stays zero, so the model's output is unchanged and the first
    ``||lora_B.grad||^2`` of a sample is the probe's energy for it (scaled by
    ``(adapter_scaling / probe_scaling)^2`` when the alphas differ). Otherwise (rank differs,
    a projection without A, or AdaLoRA, whose ``lora_E = 0`` start sends the first gradient
    through E, not B) peft's initialisation is kept, with a warning naming the module except
    for AdaLoRA, where it is the documented behaviour.

    Args:
        model: the model that was probed (same module names), not already a PeftModel.
        scores, r, lora_alpha, top_k, variant, rank_pattern, **peft_kwargs: as in
            :func:`domlora_config`.
        adapter_name: peft adapter name (default "default").
        verbose: print :meth:`Placement.summary` (targets, trainable parameters and their
            ratio to vanilla LoRA on all probed modules).

    Returns:
        The ``peft.PeftModel``; its attribute ``domlora_placement`` is a :class:`Placement`.

    Example:
        >>> scores = page_scores(model, batches, rank=8, lora_alpha=16)   # doctest: +SKIP
        >>> pm = apply_domlora(model, scores, r=8, lora_alpha=16)          # doctest: +SKIP
        >>> pm.domlora_placement.ratio                                     # doctest: +SKIP
        0.0069
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "model already carries peft adapters; pass the base model that was probed "
            "(e.g. model.get_base_model() after merging or unloading the old adapters)"
        )
    cfg = domlora_config(scores, r=r, lora_alpha=lora_alpha, top_k=top_k, variant=variant,
                         rank_pattern=rank_pattern, **peft_kwargs)
    targets, ranks = _validate(scores, r, lora_alpha, top_k, variant, rank_pattern, peft_kwargs)
    named = dict(model.named_modules())
    for name in targets:
        info = scores.modules[name]
        mod = named.get(name)
        shape = None if mod is None else _linear_shape(mod)
        if shape != (info.in_features, info.out_features):
            found = "no such module" if mod is None else f"{type(mod).__name__} with (in, out) = {shape}"
            raise ValueError(
                f"the probe's module {name} (in {info.in_features}, out {info.out_features}) does not match this "
                f"model ({found}); apply the scores to the model they were measured on"
            )

    import peft
    import torch

    pm = peft.get_peft_model(model, cfg, adapter_name=adapter_name)
    layers = _adapted_layers(pm.get_base_model(), adapter_name)
    if sorted(layers) != sorted(targets):
        raise RuntimeError(f"peft adapted {sorted(layers)} instead of exactly {sorted(targets)}; please report this")

    copied, kept = [], {}
    probe_rank = scores.rank
    projection = scores.config.get("projection")
    seed = scores.seeds[0]
    for name in targets:
        layer = layers[name]
        if variant == "adalora":
            ranks[name] = int(layer.lora_A[adapter_name].shape[0])
            kept[name] = "AdaLoRA starts with lora_E = 0: the probe's A does not set its first gradient"
            continue
        weight = layer.lora_A[adapter_name].weight  # [rank, n]
        if projection not in ("A", "AB"):
            kept[name] = f"projection {projection!r} draws no A"
        elif weight.shape[0] != probe_rank:
            kept[name] = f"adapter rank {weight.shape[0]} differs from the probe's rank {probe_rank}"
        else:
            a = draw_lora_A(name, probe_rank, scores.modules[name].in_features, seed)
            with torch.no_grad():
                weight.copy_(a.to(device=weight.device, dtype=weight.dtype))
            copied.append(name)
            continue
        warnings.warn(f"{name}: lora_A keeps peft's initialisation ({kept[name]})", stacklevel=2)

    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    vanilla = sum(r * (i.in_features + i.out_features) for i in scores.modules.values())
    probe_scaling = scores.config.get("scaling")
    adapter_scaling = None if variant == "adalora" else lora_scaling(r, lora_alpha, variant == "rslora")
    placement = Placement(
        variant=variant, targets=targets, ranks=ranks, shares={n: scores.shares[n] for n in targets}, r=r,
        trainable_params=trainable, vanilla_lora_params=vanilla, num_candidates=len(scores.modules),
        copied_A=copied, kept_peft_init=kept, probe_scaling=probe_scaling, adapter_scaling=adapter_scaling,
    )
    pm.domlora_placement = placement
    if verbose:
        print(placement.summary())
    return pm
