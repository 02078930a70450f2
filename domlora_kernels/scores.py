"""The result of a probe: PAGE per module, per sample and per A seed, and its JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lora_init import draw_lora_A, draw_lora_B

SCHEMA = "domlora_kernels.page_scores/1"


@dataclass
class ModuleInfo:
    """What the report needs to know of a candidate module (or expert weight)."""

    layer: int | None
    type: str
    in_features: int  # of each expert, for an expert weight
    out_features: int
    num_experts: int = 1
    expert_weight: bool = False  # a 3D expert parameter, which peft adapts through target_parameters


@dataclass
class PageScores:
    """PAGE of every candidate module of one probe.

    Attributes:
        scores: full module name -> PAGE (float). With several seeds, the mean over seeds.
        by_seed: seed -> (name -> PAGE) for each A draw.
        per_sample: name -> float64 tensor ``[num_seeds, num_samples]`` of per-sample
            energies ``e_b`` (estimator "fisher" only; ``None`` for "gradient").
        modules: name -> :class:`ModuleInfo` (layer index, type, shape), in model order.
        num_samples: calibration samples seen.
        config: the probe's settings (rank, projection, estimator, seeds, scaling, ...).
        meta: free-form provenance (model, data, timings).
        by_expert: expert weight name -> the PAGE of each of its experts (mean over seeds);
            they sum to the weight's PAGE. Empty for a model without expert weights.
        signals: signal name -> (module name -> value): other per-module measurements the
            placement strategies rank by (:mod:`domlora_kernels.placement.strategies`), e.g.
            ``"adam"``, Adam's first-step loss decrease per unit learning rate, which the
            "gradient" estimator records. Saved in the JSON.
        mean_gradient: estimator "gradient" only, in memory (not saved): module name -> the
            mean projected gradient over the samples, scaled, float64 ``[num_seeds, P]``: each
            seed's adapter-factor gradients flattened (``dL/dB``, ``m r`` entries, for projection
            "A"; ``E m r`` for an expert weight; both factors side by side for "AB").
    """

    scores: dict[str, float]
    by_seed: dict[int, dict[str, float]]
    per_sample: dict[str, torch.Tensor] | None
    modules: dict[str, ModuleInfo]
    num_samples: int
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    by_expert: dict[str, list[float]] = field(default_factory=dict)
    signals: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_gradient: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    # ----------------------------------------------------------------- views
    def ranked(self) -> list[tuple[str, float]]:
        """``[(name, PAGE), ...]``, highest first (ties keep model order)."""
        return sorted(self.scores.items(), key=lambda kv: -kv[1])

    @property
    def dominant_module(self) -> str:
        """Full name of the module with the highest PAGE (the dominant adaptation module)."""
        return self.ranked()[0][0]

    @property
    def total(self) -> float:
        return float(sum(self.scores.values()))

    @property
    def shares(self) -> dict[str, float]:
        """name -> PAGE / total PAGE (all zero if the total is zero)."""
        tot = self.total
        return {k: (v / tot if tot > 0 else 0.0) for k, v in self.scores.items()}

    @property
    def rank(self) -> int:
        return int(self.config["rank"])

    @property
    def seeds(self) -> list[int]:
        return list(self.config["seeds"])

    @property
    def lora_A(self) -> dict[str, torch.Tensor]:
        """name -> the ``[rank, in_features]`` A the probe used (first seed), float32 CPU; for an
        expert weight peft's ``lora_A`` layout ``[rank * E, in_features]`` (expert ``e``: rows
        ``e*rank:(e+1)*rank``), ready to copy into the adapter.

        Re-derived from ``(seed, name)``: the draw is deterministic, so nothing is stored.
        Empty for projections that use no A ("B", "expected").
        """
        if self.config["projection"] not in ("A", "AB"):
            return {}
        s = self.seeds[0]
        return {n: draw_lora_A(n, self.rank * i.num_experts, i.in_features, s) for n, i in self.modules.items()}

    @property
    def lora_B(self) -> dict[str, torch.Tensor]:
        """name -> the nonzero ``[out_features, rank]`` probe B (projections "B" and "AB"); for an
        expert weight peft's ``lora_B`` layout ``[out_features, rank * E]`` (expert ``e``: columns ``e::E``)."""
        if self.config["projection"] not in ("B", "AB"):
            return {}
        s = self.seeds[0]
        return {n: draw_lora_B(n, self.rank * i.num_experts, i.out_features, s) for n, i in self.modules.items()}

    def table(self, top: int = 10) -> str:
        """A plain-text table of the ``top`` modules: rank, share, layer, type, PAGE, name.

        An expert weight's type reads ``experts.down_proj`` and its name ends with ``[E experts]``.
        """
        shares = self.shares
        ranked = self.ranked()[:top]
        width = max([12] + [len(self.modules[n].type) for n, _ in ranked])
        rows = [f"{'#':>3}  {'share':>7}  {'layer':>5}  {'type':<{width}} {'PAGE':>11}  module"]
        for i, (name, val) in enumerate(ranked, 1):
            info = self.modules[name]
            layer = "-" if info.layer is None else str(info.layer)
            experts = f"  [{info.num_experts} experts]" if info.expert_weight else ""
            rows.append(f"{i:>3}  {100 * shares[name]:>6.2f}%  {layer:>5}  {info.type:<{width}} {val:>11.4e}  {name}{experts}")
        return "\n".join(rows)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "config": self.config,
            "num_samples": self.num_samples,
            "dominant_module": self.dominant_module,
            "modules": [
                {"name": n, "layer": i.layer, "type": i.type, "in_features": i.in_features,
                 "out_features": i.out_features, "page": self.scores[n], "share": self.shares[n],
                 **({"num_experts": i.num_experts, "experts": self.by_expert[n]} if i.expert_weight else {})}
                for n, i in self.modules.items()
            ],
            "by_seed": {str(s): v for s, v in self.by_seed.items()},
            "per_sample": None if self.per_sample is None
            else {n: t.tolist() for n, t in self.per_sample.items()},
            "meta": self.meta,
            **({"signals": self.signals} if self.signals else {}),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the report (schema ``domlora_kernels.page_scores/1``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PageScores":
        schema = d.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"not a PAGE report of schema {SCHEMA!r} (found {schema!r})")
        modules = {
            m["name"]: ModuleInfo(m["layer"], m["type"], m["in_features"], m["out_features"], m.get("num_experts", 1),
                                  "experts" in m)
            for m in d["modules"]
        }
        per_sample = d.get("per_sample")
        return cls(
            scores={m["name"]: float(m["page"]) for m in d["modules"]},
            by_seed={int(s): {k: float(v) for k, v in sc.items()} for s, sc in d["by_seed"].items()},
            per_sample=None if per_sample is None
            else {n: torch.tensor(v, dtype=torch.float64) for n, v in per_sample.items()},
            modules=modules,
            num_samples=int(d["num_samples"]),
            config=d["config"],
            meta=d.get("meta", {}),
            by_expert={m["name"]: [float(v) for v in m["experts"]] for m in d["modules"] if "experts" in m},
            signals={k: {n: float(v) for n, v in vals.items()} for k, vals in d.get("signals", {}).items()},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "PageScores":
        """Read a report written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        top = self.dominant_module
        return (f"PageScores({len(self.scores)} modules, {self.num_samples} samples, "
                f"projection={self.config['projection']!r}, dominant={top!r} "
                f"share={100 * self.shares[top]:.1f}%)")

