"""The peft wiring of a placement plan: the peft config, the wrapped model, the probe's A copied in.

:func:`domlora_config` returns the peft config of a plan (:mod:`.plan`); :func:`apply_domlora`
wraps a model with it and copies the probe's ``A`` into each ``lora_A``, so that the first
gradient of every ``lora_B`` is exactly the one the probe measured (docs/design.md, oracle 2).
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import re
import warnings
from typing import Any

from torch import nn

from ..lora_init import draw_lora_A, lora_scaling
from ..probe.candidates import find_candidates
from ..scores import PageScores
from .budget import vanilla_lora_params
from .plan import Placement, Plan, exact_names_regex, make_plan


def peft_config(plan: Plan, as_list: bool = False):
    """The peft config of a plan: the user's config (copied) or a new one, targeting exactly ``plan.targets``.

    ``as_list``: the module targets as a list of full names instead of one exact-name regex. peft
    (0.21) turns a regex into a set of leaf names (``{"v_proj"}``, every layer's) on the
    mixture-of-experts models whose layout transformers 5 changed (Mixtral, Qwen2-MoE, ...); a list
    of full names survives that rewrite, and :func:`apply_domlora` falls back to it."""
    import peft

    modules = [n for n in plan.targets if n not in plan.expert_weights]
    # [] matches no module (None would mean peft's defaults)
    target = (list(modules) if as_list else exact_names_regex(modules)) if modules else []
    params = [n for n in plan.targets if n in plan.expert_weights] or None
    ranks = {"^" + re.escape(n): k for n, k in plan.ranks.items() if k != plan.r}
    alphas = {"^" + re.escape(n): a for n, a in plan.alphas.items()}
    if plan.config is not None:
        cfg = copy.deepcopy(plan.config)
        cfg.target_modules, cfg.target_parameters = target, params
        if ranks or alphas:
            cfg.rank_pattern, cfg.alpha_pattern = ranks, alphas
        return cfg
    kwargs = dict(plan.peft_kwargs)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    if plan.variant == "adalora":
        kwargs.setdefault("init_r", math.ceil(1.5 * plan.r))
        return peft.AdaLoraConfig(target_modules=target, target_r=plan.r, lora_alpha=plan.lora_alpha, **kwargs)
    if alphas:
        kwargs["alpha_pattern"] = alphas
    return peft.LoraConfig(
        target_modules=target, target_parameters=params, r=plan.r, lora_alpha=plan.lora_alpha,
        use_dora=plan.variant == "dora", use_rslora=plan.variant == "rslora", rank_pattern=ranks, **kwargs,
    )


# ------------------------------------------------------------------ public
def domlora_config(
    scores: PageScores,
    r: int | None = None,
    lora_alpha: float | None = None,
    top_k: int | None = None,
    variant: str | None = None,
    rank_pattern: str | dict[str, int] | None = None,
    *,
    budget: int | float | str | None = None,
    top_p: float | None = None,
    config: Any = None,
    strategy: str | None = None,
    **peft_kwargs: Any,
):
    """The peft config that puts adapters where a placement strategy says, by exact full name.

    By default (no ``strategy``, ``top_k``, ``top_p`` or ``rank_pattern``) the package's
    recommended strategy, ``"plop+types"``, fills ``budget`` (default ``"5%"`` of vanilla LoRA
    at rank ``r`` on every probed module): PLoP's types (v/o/down on every layer, one uniform
    rank) where the budget buys them, whole module types chosen by Adam's first-step gain below
    (:mod:`domlora_kernels.placement.strategies`; the evidence: the README). ``top_k``,
    ``top_p`` or ``rank_pattern`` without a strategy select by PAGE, the paper's rule
    (``strategy="page"``): ``top_k=1`` is the dominant module. A PAGE budget plan picks modules
    by PAGE per parameter, each at rank ``r`` except the last one, which gets what is left;
    ``alpha_pattern`` keeps every module's scaling at the base ``lora_alpha / r`` (``/ sqrt(r)``
    for rsLoRA).

    Args:
        scores: a probe result (:func:`~domlora_kernels.page_scores` or ``PageScores.from_json``).
        r: adapter rank (default 8); the rank cap of a budget plan. For "adalora" it is
            ``target_r``, the average rank AdaLoRA prunes towards; its starting rank ``init_r``
            defaults to ``ceil(1.5 r)`` (peft's own 12 for 8) unless given in ``peft_kwargs``.
        lora_alpha: LoRA alpha (default 16); scaling ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
        top_k: how many modules to adapt, highest PAGE (or the strategy's signal) first.
        variant: "lora" (default, ``LoraConfig``), "dora" (``use_dora=True``), "rslora"
            (``use_rslora=True``) or "adalora" (``AdaLoraConfig``; requires ``total_step``).
        rank_pattern: with ``top_k``: None (every target gets ``r``), "page" (ranks proportional
            to PAGE within the top-k, at least 1 each, total ``top_k * r``; see
            :func:`page_rank_pattern`) or a dict ``{full name: rank}`` over the targets. Not for "adalora".
        budget: trainable parameters for the adapters: an int (``20000``), a fraction of vanilla
            LoRA on all probed modules at rank ``r`` (``0.01``) or a percentage (``"1%"``). The
            plan never exceeds it (DoRA's magnitude vectors included).
        top_p: instead of a budget, the cheapest plan by the same rule whose adapters carry this
            fraction of the PAGE mass (``0.5``).
        config: a user's ``peft.LoraConfig`` (or ``AdaLoraConfig``), e.g. with
            ``init_lora_weights="eva"``, PiSSA or LoftQ: the result is a copy of it, with
            ``target_modules`` restricted to the chosen modules among those it targets (and
            ``rank_pattern`` / ``alpha_pattern`` for a budget plan); every other setting is kept
            and ``config`` itself is not changed. Its ``target_modules`` (None or "all-linear":
            every probed module) and ``exclude_modules`` bound the choice, by peft's own matching. ``r``, ``lora_alpha``, ``variant`` and
            ``peft_kwargs`` then come from the config and must not be passed.
        strategy: what the modules are ranked by (:mod:`domlora_kernels.placement.strategies`):
            None (the default: ``"plop+types"``, or ``"page"`` with ``top_k`` / ``top_p`` /
            ``rank_pattern``), "page" (PAGE, the paper's rule), "adam", "heldout", "pilot" (each
            needs its signal in ``scores``: :func:`~domlora_kernels.measure_signals`), "types",
            "plop" or "plop+types" (these three spread a ``budget`` over whole module types;
            "types", and "plop+types" below PLoP's threshold, need the "adam" signal: a probe
            with ``estimator="gradient"``).
        **peft_kwargs: passed to the peft config (``lora_dropout``, ``bias``, ``total_step``,
            ``tinit``, ...). ``task_type`` defaults to "CAUSAL_LM".

    Returns:
        ``peft.LoraConfig`` or ``peft.AdaLoraConfig``; ``target_modules`` is a regex that peft
        fully matches against exactly the chosen names (see the module docstring).

    Raises:
        ValueError: ``top_k`` outside ``1 .. number of modules``, more than one of ``top_k``,
            ``budget``, ``top_p``, a budget too small for one rank of the densest module,
            unknown variant, missing ``total_step`` for AdaLoRA, a bad ``rank_pattern``, or a
            keyword DomLoRA sets itself.

    Example:
        >>> cfg = domlora_config(scores)                                  # doctest: +SKIP
        >>> cfg = domlora_config(scores, r=8, lora_alpha=16, top_k=1)    # doctest: +SKIP
        >>> cfg = domlora_config(scores, budget="1%", strategy="page")   # doctest: +SKIP
        >>> cfg = domlora_config(scores, budget=20000, config=LoraConfig(init_lora_weights="eva", ...))  # doctest: +SKIP
        >>> model = peft.get_peft_model(model, cfg)                       # doctest: +SKIP
    """
    plan = make_plan(scores, r, lora_alpha, top_k, variant, rank_pattern, budget, top_p, config, peft_kwargs,
                     strategy)
    return peft_config(plan)


def _plan_as_config(scores: Any, args: tuple, kwargs: dict[str, Any]) -> Plan:
    """The plan of ``domlora_config(scores, *args, **kwargs)``: apply_domlora takes the same arguments."""
    try:
        given = inspect.signature(domlora_config).bind(scores, *args, **kwargs).arguments
    except TypeError as e:
        raise TypeError(f"apply_domlora(model, scores, ...) takes domlora_config's arguments after the model: {e}") from None
    names = ("r", "lora_alpha", "top_k", "variant", "rank_pattern", "budget", "top_p", "config")
    return make_plan(scores, *(given.get(n) for n in names), given.get("peft_kwargs", {}),
                     given.get("strategy"))


def adapted_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """name -> peft LoRA layer carrying ``adapter_name`` (names as in the unwrapped model)."""
    out = {}
    for name, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if isinstance(lora_a, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in lora_a:
            param = getattr(mod, "parameter_name", None)  # peft's ParamWrapper: nested per expert weight
            out[name if param is None else f"{name.replace('.base_layer', '')}.{param}"] = mod
    return out


def _check_model(model: Any, scores: PageScores, targets: list[str]) -> None:
    """``model`` is a bare torch model whose target modules have the probe's shapes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "model already carries peft adapters; pass the base model that was probed "
            "(e.g. model.get_base_model() after merging or unloading the old adapters)"
        )
    try:
        found = {c.name: c for c in find_candidates(model, exact_names_regex(targets))}
    except ValueError:  # none of the targets is a linear module of this model
        found = {}
    named = dict(model.named_modules())
    for name in targets:
        info, cand = scores.modules[name], found.get(name)
        shape = None if cand is None else (cand.in_features, cand.out_features)
        if shape != (info.in_features, info.out_features):
            what = ("no such module" if name not in named else f"a {type(named[name]).__name__}" if cand is None
                    else f"{type(cand.module).__name__} with (in, out) = {shape}")
            raise ValueError(
                f"the probe's module {name} (in {info.in_features}, out {info.out_features}) does not match this "
                f"model ({what}); apply the scores to the model they were measured on"
            )


def _get_peft_model(model: nn.Module, cfg: Any, adapter_name: str, expert_weights: frozenset[str]):
    import peft

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(model, cfg, adapter_name=adapter_name)
    expert_keys = {"^" + re.escape(n) for n in expert_weights}
    for w in seen:
        text = str(w.message)
        # peft 0.21's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5
        # deprecated for is_activation_checkpointing: the FutureWarning is peft's call, not ours or the user's
        if "`is_gradient_checkpointing` is deprecated" in text:
            continue
        # peft applies rank_pattern / alpha_pattern keys to target_parameters but checks them against
        # modules only, so it calls those of expert weights unmatched; _init_lora_A checks the ranks
        unmatched = re.fullmatch(r"The following (?:rank|alpha)_pattern keys did not match any targeted module "
                                 r"and were ignored: (\[.*\])\.", text)
        if unmatched and set(ast.literal_eval(unmatched.group(1))) <= expert_keys:
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pm


def _prepare_kbit(model: nn.Module) -> None:
    """Prepare a bitsandbytes 4-bit or 8-bit base for training as peft recommends
    (``peft.prepare_model_for_kbit_training``): freeze every base parameter and cast the
    non-quantised ones (norms, embeddings, head) from float16/bfloat16 to float32, so that
    their part of the backward pass does not lose the LoRA gradient to half precision.

    Gradient checkpointing, which that function switches on by default, is left off: it trades
    a second forward for activation memory, a choice for the training run (``Trainer``'s
    ``gradient_checkpointing=True``), not for the placement.
    """
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _init_lora_A(layers: dict[str, nn.Module], scores: PageScores, plan: Plan, adapter_name: str):
    """Copy the probe's A into each target's ``lora_A`` where that keeps the first-gradient identity.

    Returns ``(copied names, name -> why peft's init was kept, name -> the adapter's rank)``.
    """
    import torch

    copied, kept, ranks = [], {}, dict(plan.ranks)
    projection = scores.config.get("projection")
    for name in plan.targets:
        layer = layers[name]
        if plan.variant == "adalora":
            ranks[name] = int(layer.lora_A[adapter_name].shape[0])
            kept[name] = "AdaLoRA starts with lora_E = 0: the probe's A does not set its first gradient"
            continue
        weight = layer.lora_A[adapter_name].weight  # [rank, n]; [rank * E, n] on an expert weight
        experts = scores.modules[name].num_experts
        if weight.shape[0] != plan.ranks[name] * experts:
            raise RuntimeError(f"peft gave {name} rank {weight.shape[0] // experts} instead of the planned "
                               f"{plan.ranks[name]}; please report this")
        if plan.init_lora_weights is not True:
            kept[name] = f"init_lora_weights={plan.init_lora_weights!r} sets lora_A"
        elif projection not in ("A", "AB"):
            kept[name] = f"projection {projection!r} draws no A"
        elif weight.shape[0] != scores.rank * experts:
            kept[name] = f"adapter rank {weight.shape[0] // experts} differs from the probe's rank {scores.rank}"
        else:
            a = draw_lora_A(name, scores.rank * experts, scores.modules[name].in_features, scores.seeds[0])
            with torch.no_grad():
                weight.copy_(a.to(device=weight.device, dtype=weight.dtype))
            copied.append(name)
            continue
        # no surprise, so no warning: another init was asked for, or a budget plan cut this module's rank
        if plan.init_lora_weights is True and plan.rule == "top-k":
            warnings.warn(f"{name}: lora_A keeps peft's initialisation ({kept[name]})", stacklevel=3)
    return copied, kept, ranks


def apply_domlora(model: nn.Module, scores: PageScores, *args: Any, adapter_name: str = "default",
                  verbose: bool = True, **kwargs: Any):
    """Wrap ``model`` with peft adapters where :func:`domlora_config` places them, initialised from the probe.

    Like ``peft.get_peft_model``, this injects the adapters into ``model`` itself; ``scores``
    is not changed. For "lora", "dora" and "rslora", each target's ``lora_A`` (``[rank, n]``)
    is set to the A the probe measured with (``scores.lora_A[name]``, first seed) when the
    ranks agree; ``lora_B`` stays zero, so the model's output is unchanged and the first
    ``||lora_B.grad||^2`` of a sample is the probe's energy for it (scaled by
    ``(adapter_scaling / probe_scaling)^2`` when the alphas differ). Otherwise (rank differs,
    a projection without A, or AdaLoRA, whose ``lora_E = 0`` start sends the first gradient
    through E, not B) peft's initialisation is kept, with a warning naming the module except
    for AdaLoRA, where it is the documented behaviour, and for the module a budget plan gives
    a lower rank (the summary says "peft init"). An ``init_lora_weights`` other than peft's
    default (EVA, PiSSA, LoftQ, gaussian, ...) is kept without a warning.

    A bitsandbytes 4-bit (or 8-bit) base becomes a QLoRA model: before the adapters go in, it
    is prepared for k-bit training as peft recommends, without gradient checkpointing (see
    ``_prepare_kbit``). Its float16/bfloat16 norms, embeddings and head are then float32: on
    a float32 compute dtype (the CPU) nothing changes and the first-gradient identity holds
    as in float32; on a bfloat16 one it holds to bfloat16's rounding.

    Args:
        model: the model that was probed (same module names), not already a PeftModel.
        scores, *args, **kwargs: the arguments of :func:`domlora_config` (``r``, ``lora_alpha``,
            ``top_k``, ``variant``, ``rank_pattern``, ``budget``, ``top_p``, ``config``,
            ``**peft_kwargs``), with the same meaning and defaults.
        adapter_name: peft adapter name (default "default").
        verbose: print :meth:`Placement.summary` (targets, trainable parameters and their
            ratio to vanilla LoRA on all probed modules).

    Returns:
        The ``peft.PeftModel``; its attribute ``domlora_placement`` is a :class:`Placement`.

    Example:
        >>> scores = page_scores(model, batches, rank=8, lora_alpha=16)   # doctest: +SKIP
        >>> pm = apply_domlora(model, scores, r=8, lora_alpha=16)          # doctest: +SKIP
        >>> round(pm.domlora_placement.ratio, 4)                           # doctest: +SKIP
        0.0495
    """
    plan = _plan_as_config(scores, args, kwargs)
    _check_model(model, scores, plan.targets)
    _prepare_kbit(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    pm, layers = _wrap_exactly(model, plan, adapter_name)
    try:
        copied, kept, ranks = _init_lora_A(layers, scores, plan, adapter_name)
    except BaseException:
        _unwrap(pm, model, flags)
        raise
    placement = Placement(
        variant=plan.variant, targets=plan.targets, ranks=ranks, shares={n: scores.shares[n] for n in plan.targets},
        r=plan.r, trainable_params=sum(p.numel() for p in pm.parameters() if p.requires_grad),
        vanilla_lora_params=vanilla_lora_params(scores, plan.r), num_candidates=len(scores.modules),
        copied_A=copied, kept_peft_init=kept, probe_scaling=scores.config.get("scaling"),
        adapter_scaling=None if plan.variant == "adalora" else lora_scaling(plan.r, plan.lora_alpha, plan.use_rslora),
        rule=plan.rule, budget=plan.budget, top_p=plan.top_p, alphas=plan.alphas, strategy=plan.strategy,
        planned_by=plan.planned_by, plop_threshold=plan.plop_threshold,
    )
    pm.domlora_placement = placement
    if verbose:
        print(placement.summary())
    return pm


def _wrap_exactly(model: nn.Module, plan: Plan, adapter_name: str):
    """``(peft model, its adapted layers)`` with adapters on exactly ``plan.targets``: the exact-name
    regex first, the list of full names if peft rewrote the regex; the model as it was on failure."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for as_list in (False, True):
        pm = None
        try:
            pm = _get_peft_model(model, peft_config(plan, as_list), adapter_name, plan.expert_weights)
            layers = adapted_layers(pm.get_base_model(), adapter_name)
        except BaseException:
            _unwrap(pm, model, flags)
            raise
        if sorted(layers) == sorted(plan.targets):
            return pm, layers
        _unwrap(pm, model, flags)
    raise RuntimeError(f"peft adapted {sorted(layers)} instead of exactly {sorted(plan.targets)}, from an exact-name "
                       f"regex and from a list of the full names; the model is left as it was; please report this")


def _unwrap(pm, model: nn.Module, flags: list) -> None:
    """Take the adapters out again (``pm`` None: none went in): the base layers back in place, no
    peft config left on the model, every parameter's ``requires_grad`` as in ``flags``."""
    if pm is not None:
        pm.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    for p, flag in flags:
        p.requires_grad_(flag)


def _apply_signature() -> inspect.Signature:
    """``apply_domlora``'s signature as help() should show it: model, then domlora_config's, with its own two."""
    params = list(inspect.signature(domlora_config).parameters.values())
    own = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t)
           for n, d, t in (("adapter_name", "default", "str"), ("verbose", True, "bool"))]
    model = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module")
    return inspect.Signature([model, *params[:-1], *own, params[-1]])


apply_domlora.__signature__ = _apply_signature()
