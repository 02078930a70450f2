"""Deterministic draws of the LoRA matrices the probe measures with.

peft initialises ``lora_A`` with ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(n), 1/sqrt(n))``
for ``A: [r, n]``. The probe draws the same distribution, but from a generator seeded by
``(seed, module name)``: probing a subset of modules gives each the A it gets when probing all
of them, and two identical calls give bit-identical scores.

Projection "B" needs a nonzero ``B: [m, r]``; it is drawn the same way on its own fan-in
(``U(-1/sqrt(r), 1/sqrt(r))``), from a stream separate from A's.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch


def _generator(seed: int, name: str, what: str) -> torch.Generator:
    digest = hashlib.sha256(f"{int(seed)}\0{what}\0{name}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


@functools.lru_cache(maxsize=16384)
def _draw(name: str, what: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    # cached across calls (a probe repeated on the same model draws nothing again); never
    # handed out: the public functions return copies, so no caller can change the cache
    return _kaiming_uniform(shape, _generator(seed, name, what))


def draw_lora_A(name: str, rank: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """The probe's ``A: [rank, in_features]`` for module ``name`` (float32, CPU)."""
    return _draw(name, "A", (int(rank), int(in_features)), int(seed)).clone()


def draw_lora_B(name: str, rank: int, out_features: int, seed: int = 0) -> torch.Tensor:
    """The probe's nonzero ``B: [out_features, rank]`` for projection "B" (float32, CPU)."""
    return _draw(name, "B", (int(out_features), int(rank)), int(seed)).clone()


def lora_scaling(rank: int, lora_alpha: float | None, use_rslora: bool = False) -> float:
    """peft's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; 1.0 when alpha is None."""
    if lora_alpha is None:
        return 1.0
    return float(lora_alpha) / (math.sqrt(rank) if use_rslora else rank)
