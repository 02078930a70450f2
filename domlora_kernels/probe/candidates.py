"""Which modules of a model are PAGE candidates, and what their names say.

Candidates are the weights a LoRA adapter can sit on: ``nn.Linear`` and transformers'
``Conv1D`` (GPT-2 family, weight stored ``[in, out]``), minus the output embedding, which
is peft's meaning of ``target_modules="all-linear"``; and the 3D expert weights of
transformers' mixture-of-experts blocks (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``),
which peft adapts through ``LoraConfig(target_parameters=[...])`` (:mod:`domlora_kernels.experts`).
An expert weight's name is its parameter's full name. Routers are no candidates (they are
no ``nn.Linear``; peft leaves them out too). Selection by name follows peft: a list matches
a full name exactly or as a dotted suffix; a string other than "all-linear" is a regular
expression that must match the whole name.

Weights of 3 or more dimensions in a layout the probe does not know are never skipped
silently: selecting them (``all-linear`` does, unless excluded) raises an error naming them.

A model that already carries peft adapters (a ``PeftModel``, or LoRA layers injected into a
plain model) is probed as its base model: a ``PeftModel`` is unwrapped to the model it wraps
(:func:`peft_base_model`), each peft layer counts as its base layer under the layer's own name
(``model.layers.0.self_attn.q_proj``, the name the base model has), the adapters' own modules
(``lora_A``, ``lora_B``, ``lora_embedding_*``, ``lora_magnitude_vector``, a
``modules_to_save`` copy) are never candidates, and the adapters are off during the probe
(:func:`~domlora_kernels.probe.frozen.adapters_disabled`). Merged adapters are refused: turning
them off would unmerge them, changing the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .experts import find_expert_weights, unknown_weights

_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Candidate:
    """One module (or one expert weight) the probe measures."""

    name: str  # full dotted name in the model (of the parameter, for an expert weight)
    module: nn.Module  # the module, or the experts module owning the expert weight
    in_features: int  # n (of each expert)
    out_features: int  # m (of each expert)
    parameter: str | None = None  # expert weights: the 3D parameter of `module` (gate_up_proj, down_proj)
    num_experts: int = 1

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def weight(self) -> torch.Tensor:
        """The adapted weight: the module's ``weight``, or the expert parameter (``[E, ., .]``)."""
        return getattr(self.module, self.parameter or "weight")

    @property
    def type(self) -> str:
        """``down_proj``; ``experts.down_proj`` for an expert weight (apart from a shared expert's)."""
        if self.parameter is not None:
            return ".".join(self.name.rsplit(".", 2)[-2:])
        return module_type(self.name)


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted name (``model.layers.11.mlp.down_proj`` -> 11)."""
    m = _LAYER_RE.search("." + name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The last component of a dotted name (``down_proj``)."""
    return name.rsplit(".", 1)[-1]


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # transformers.pytorch_utils.Conv1D, recognised by name so transformers stays optional
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _matches(name: str, spec: str | Iterable[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def check_selection(target_modules, exclude_modules=None) -> None:
    """A regex given as ``target_modules`` / ``exclude_modules`` compiles (``re.error`` otherwise)."""
    for what, spec in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(spec, str) and spec != "all-linear":
            try:
                re.compile(spec)
            except re.error as e:
                raise ValueError(
                    f"{what}={spec!r} is not a valid regular expression ({e}); a string is matched as a regex "
                    f"against whole module names: escape special characters (\\.) or give a list of names"
                ) from None


def is_peft_wrapper(module: nn.Module) -> bool:
    """A peft layer that wraps a base module: a tuner layer (LoRA's ``lora.Linear``, ...) or a
    ``ModulesToSaveWrapper``; both switch their adapters off through ``_disable_adapters``."""
    return (type(module).__module__.startswith("peft.") and hasattr(module, "_disable_adapters")
            and (hasattr(module, "get_base_layer") or hasattr(module, "original_module")))


def peft_base(module: nn.Module) -> nn.Module | None:
    """The module a peft wrapper runs when its adapters are off (nested wrappers unwrapped)."""
    get = getattr(module, "get_base_layer", None)
    base = get() if callable(get) else getattr(module, "original_module", None)
    while base is not None and is_peft_wrapper(base):
        get = getattr(base, "get_base_layer", None)
        base = get() if callable(get) else getattr(base, "original_module", None)
    return base


def peft_base_model(model: nn.Module) -> nn.Module:
    """The model to probe: a ``PeftModel``'s base model, else ``model``; refuses merged adapters.

    Names are then the base model's (``model.layers.0.mlp.down_proj``, not
    ``base_model.model.model.layers...``), which ``apply_domlora`` on the base model expects.
    """
    if type(model).__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None)):
        cfgs = getattr(model, "peft_config", {}) or {}
        if any(getattr(c, "is_adaption_prompt", False) for c in cfgs.values()):
            raise ValueError(
                "this PeftModel carries adaption-prompt adapters, which replace the attention modules; the probe "
                "measures a plain model: probe the base model before get_peft_model"
            )
        model = model.get_base_model()
    merged = [n for n, m in model.named_modules() if is_peft_wrapper(m) and getattr(m, "merged", False)]
    if merged:
        raise ValueError(
            f"{len(merged)} peft layer(s) have their adapters merged into the weights (e.g. {merged[0]}): the probe "
            f"measures the base model with the adapters off, and turning merged adapters off would unmerge them, "
            f"changing the weights; call model.unmerge_adapter() first, or probe the model returned by "
            f"merge_and_unload() (its merged weights are then the base)"
        )
    return model


def find_candidates(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
) -> list[Candidate]:
    """The candidates of ``model`` (linear modules and expert weights) in definition order.

    Args:
        target_modules: ``"all-linear"`` (every linear module but the output embedding, and
            every expert weight), a list of full names or dotted suffixes (``["q_proj",
            "experts.down_proj"]``), or a regex matched against whole names.
        exclude_modules: the same forms, removed from the selection.

    Raises:
        ValueError: when nothing matches (the message lists the candidates available), or when
            the selection takes in a weight of 3 or more dimensions whose layout is unknown
            (the message names them and the ``exclude_modules`` that leaves them out).

    Example:
        >>> [c.name for c in find_candidates(mixtral, ["experts.down_proj"])]  # doctest: +SKIP
        ['model.layers.0.mlp.experts.down_proj', 'model.layers.1.mlp.experts.down_proj']
    """
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError('target_modules is empty; use "all-linear", a list of names, or a regex')
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be non-empty strings; got {target_modules!r}")
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)
    check_selection(target_modules, exclude_modules)

    linear = _all_candidates(model)
    if target_modules == "all-linear":
        chosen = list(linear)
    else:
        chosen = [c for c in linear if _matches(c.name, target_modules)]
    if exclude_modules is not None:
        chosen = [c for c in chosen if not _matches(c.name, exclude_modules)]
    _refuse_unknown_layouts(model, target_modules, exclude_modules)
    if not chosen:
        types = sorted({c.type for c in linear})
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"linear module; candidates are: {', '.join(types) or '(none: the model has no nn.Linear/Conv1D)'}"
            + (f" (e.g. {linear[0].name})" if linear else "")
        )
    return chosen


def _all_candidates(model: nn.Module) -> list[Candidate]:
    """Every linear module and expert weight, in model order; inside a peft wrapper only its
    base layer, under the wrapper's name."""
    out_emb = _output_embedding(model)
    experts: dict[int, list[Candidate]] = {}
    for w in find_expert_weights(model):
        experts.setdefault(id(w.module), []).append(
            Candidate(w.name, w.module, w.in_features, w.out_features, w.parameter, w.num_experts))
    wrapper, base = None, None  # the peft wrapper being walked (modules come depth first) and its base module
    found: list[Candidate] = []
    for name, mod in model.named_modules():
        if wrapper is not None and name.startswith(wrapper + "."):
            if mod is base:  # the base layer, named as the base model names it (the wrapper's name)
                found.extend(Candidate(f"{wrapper}.{c.parameter}", c.module, c.in_features, c.out_features,
                                       c.parameter, c.num_experts) for c in experts.get(id(mod), []))
                shape = _linear_shape(mod)
                if shape is not None:
                    found.append(Candidate(wrapper, mod, *shape))
            continue  # lora_A / lora_B / lora_magnitude_vector / modules_to_save copies: never candidates
        wrapper = base = None
        if is_peft_wrapper(mod):
            wrapper, base = name, (None if mod is out_emb else peft_base(mod))
            if base is out_emb:
                base = None
            continue
        found.extend(experts.get(id(mod), []))
        shape = _linear_shape(mod)
        if shape is None or not name or mod is out_emb:
            continue
        found.append(Candidate(name, mod, *shape))
    return found


def _refuse_unknown_layouts(model: nn.Module, target_modules, exclude_modules) -> None:
    unknown = unknown_weights(model)
    named = [n for n in unknown if (target_modules == "all-linear" or _matches(n, target_modules))
             and not (exclude_modules is not None and _matches(n, exclude_modules))]
    if not named:
        return
    listed = ", ".join(f"{n} {list(unknown[n])}" for n in named[:6]) + (", ..." if len(named) > 6 else "")
    suffixes = sorted({".".join(n.rsplit(".", 2)[-2:]) for n in named})
    raise ValueError(
        f"{len(named)} weight(s) of 3 or more dimensions are in a layout the probe does not know, so it cannot "
        f"measure them: {listed}. They are usually mixture-of-experts weights outside transformers' experts "
        f"modules (remote code, fused or expert-parallel blocks). To probe the rest of the model, exclude "
        f"them: exclude_modules={suffixes!r}"
    )
