"""Which modules of a model are PAGE candidates, and what their names say.

Candidates are the modules a LoRA adapter can sit on: ``nn.Linear`` and transformers'
``Conv1D`` (GPT-2 family, weight stored ``[in, out]``), minus the output embedding, which
is peft's meaning of ``target_modules="all-linear"``. Selection by name follows peft too:
a list matches a full name exactly or as a dotted suffix; a string other than
"all-linear" is a regular expression that must match the whole name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Candidate:
    """One module the probe measures."""

    name: str  # full dotted name in the model
    module: nn.Module
    in_features: int  # n
    out_features: int  # m

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def type(self) -> str:
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


def find_candidates(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
) -> list[Candidate]:
    """The candidate modules of ``model`` in definition order.

    Args:
        target_modules: ``"all-linear"``, a list of full names or dotted suffixes
            (``["q_proj", "v_proj"]``), or a regex matched against whole names.
        exclude_modules: the same forms, removed from the selection.

    Raises:
        ValueError: when nothing matches; the message lists the linear modules available.
    """
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError('target_modules is empty; use "all-linear", a list of names, or a regex')
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be non-empty strings; got {target_modules!r}")
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)

    out_emb = _output_embedding(model)
    linear: list[Candidate] = []
    for name, mod in model.named_modules():
        shape = _linear_shape(mod)
        if shape is None or not name:
            continue
        if mod is out_emb:
            continue
        linear.append(Candidate(name, mod, *shape))

    if target_modules == "all-linear":
        chosen = list(linear)
    else:
        chosen = [c for c in linear if _matches(c.name, target_modules)]
    if exclude_modules is not None:
        chosen = [c for c in chosen if not _matches(c.name, exclude_modules)]
    if not chosen:
        types = sorted({c.type for c in linear})
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"linear module; candidates are: {', '.join(types) or '(none: the model has no nn.Linear/Conv1D)'}"
            + (f" (e.g. {linear[0].name})" if linear else "")
        )
    return chosen
