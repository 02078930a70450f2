"""The result of a probe: PAGE per module, per sample and per A seed, and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import write_text_atomic
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
        """Write the report (schema ``domlora_kernels.page_scores/1``); returns the path.

        Atomic: the JSON goes to a temporary file in the same folder, which then replaces
        ``path`` (``os.replace``), so a write that fails midway (a full disk, Ctrl-C) leaves any
        previous report at ``path`` intact.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give the report a file name, e.g. {path / 'page_scores.json'}")
        for parent in (path.parent, *path.parent.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder")
                break
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PageScores":
        """A report from its dict form (:meth:`to_dict`), every field checked.

        Raises:
            ValueError: naming the field: not a dict, another schema, a missing key, a null, a
                list where a dict belongs, a PAGE (or per-sample energy, by_seed or expert
                value) that is NaN, infinite or negative, a signal that is not a finite number,
                module names that disagree between the sections.
        """
        d = _as_dict(d, "the report")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"not a PAGE report of schema {SCHEMA!r} (found {schema!r})")
        config = _read_config(_field(d, "config", ""))
        num_samples = _as_int(_field(d, "num_samples", ""), "num_samples", 1)
        modules, scores, by_expert = _read_modules(_field(d, "modules", ""))
        meta = d.get("meta")
        return cls(
            scores=scores,
            by_seed=_read_by_seed(_field(d, "by_seed", ""), list(modules), config["seeds"]),
            per_sample=_read_per_sample(d.get("per_sample"), list(modules), len(config["seeds"]), num_samples),
            modules=modules,
            num_samples=num_samples,
            config=config,
            meta=_as_dict({} if meta is None else meta, "meta"),
            by_expert=by_expert,
            signals=_read_signals(d.get("signals", {})),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "PageScores":
        """Read a report written by :meth:`to_json`.

        Raises:
            ValueError: naming the file: not UTF-8, not JSON (or nested too deeply), or not a
                valid report (:meth:`from_dict` names the field).
        """
        path = Path(path)
        data = path.read_bytes()
        try:
            d = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): not a PAGE report (a JSON file)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}): not a PAGE report") from None
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise ValueError(f"{path}: not a PAGE report: its JSON cannot be read ({why})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        top = self.dominant_module
        return (f"PageScores({len(self.scores)} modules, {self.num_samples} samples, "
                f"projection={self.config['projection']!r}, dominant={top!r} "
                f"share={100 * self.shares[top]:.1f}%)")


# ---------------------------------------------------------------- reading a report: every field checked
# (PageScores.from_dict; each error names the field, from_json adds the file)
_PROJECTIONS = ("A", "B", "AB", "expected")  # probe.checks.PROJECTIONS / ESTIMATORS (the probe is a layer up)
_ESTIMATORS = ("fisher", "gradient")


def _invalid(where: str, what: str, got: Any = ...) -> ValueError:
    if got is ...:
        shown = ""
    else:
        shown = ", got " + ("null" if got is None else type(got).__name__ if isinstance(got, (dict, list)) else repr(got))
    return ValueError(f"not a valid PAGE report: {where} must be {what}{shown}")


def _field(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"not a valid PAGE report: {where}{'.' if where else ''}{key} is missing")
    return obj[key]


def _as_dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise _invalid(where, "an object (a dict)", v)
    return v


def _as_list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise _invalid(where, "a list", v)
    return v


def _as_int(v: Any, where: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise _invalid(where, "an integer" + (f" >= {lo}" if lo is not None else ""), v)
    return v


def _as_str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _invalid(where, "a non-empty string", v)
    return v


def _as_float(v: Any, where: str, nonneg: bool = True) -> float:
    """A finite number (>= 0 for energies); NaN, inf, null, strings and booleans are refused."""
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    except OverflowError:  # an integer beyond float's range
        ok = False
    if not ok or (nonneg and v < 0):
        raise _invalid(where, "a finite number" + (" >= 0" if nonneg else ""), v)
    return float(v)


def _read_config(config: Any) -> dict:
    config = _as_dict(config, "config")
    _as_int(_field(config, "rank", "config"), "config.rank", 1)
    if _field(config, "projection", "config") not in _PROJECTIONS:
        raise _invalid("config.projection", f"one of {', '.join(_PROJECTIONS)}", config["projection"])
    if _field(config, "estimator", "config") not in _ESTIMATORS:
        raise _invalid("config.estimator", f"one of {', '.join(_ESTIMATORS)}", config["estimator"])
    seeds = _as_list(_field(config, "seeds", "config"), "config.seeds")
    if not seeds or len({_as_int(s, f"config.seeds[{i}]") for i, s in enumerate(seeds)}) != len(seeds):
        raise _invalid("config.seeds", "a non-empty list of distinct integers", seeds)
    return config


def _read_modules(items: Any) -> tuple[dict[str, ModuleInfo], dict[str, float], dict[str, list[float]]]:
    modules: dict[str, ModuleInfo] = {}
    scores: dict[str, float] = {}
    by_expert: dict[str, list[float]] = {}
    for i, m in enumerate(_as_list(items, "modules")):
        at = f"modules[{i}]"
        m = _as_dict(m, at)
        name = _as_str(_field(m, "name", at), f"{at}.name")
        at = f"modules[{i}] ({name!r})"
        if name in modules:
            raise ValueError(f"not a valid PAGE report: {at} appears twice")
        layer = _field(m, "layer", at)
        if layer is not None:
            _as_int(layer, f"{at}.layer", 0)
        info = ModuleInfo(layer, _as_str(_field(m, "type", at), f"{at}.type"),
                          _as_int(_field(m, "in_features", at), f"{at}.in_features", 1),
                          _as_int(_field(m, "out_features", at), f"{at}.out_features", 1),
                          _as_int(m.get("num_experts", 1), f"{at}.num_experts", 1), "experts" in m)
        scores[name] = _as_float(_field(m, "page", at), f"{at}.page")
        if "experts" in m:
            vals = _as_list(m["experts"], f"{at}.experts")
            if len(vals) != info.num_experts:
                raise _invalid(f"{at}.experts", f"a list of num_experts = {info.num_experts} values", vals)
            by_expert[name] = [_as_float(v, f"{at}.experts[{j}]") for j, v in enumerate(vals)]
        modules[name] = info
    if not modules:
        raise _invalid("modules", "a non-empty list (the report has no module)")
    return modules, scores, by_expert


def _same_names(got: dict, names: list[str], where: str) -> None:
    if set(got) != set(names):
        extra, missing = sorted(set(got) - set(names)), sorted(set(names) - set(got))
        raise ValueError(f"not a valid PAGE report: {where} names other modules than 'modules' "
                         f"(missing: {missing[:3]}, unknown: {extra[:3]})")


def _read_by_seed(obj: Any, names: list[str], seeds: list[int]) -> dict[int, dict[str, float]]:
    by_seed: dict[int, dict[str, float]] = {}
    for key, vals in _as_dict(obj, "by_seed").items():
        try:
            seed = int(key)
        except ValueError:
            raise _invalid("by_seed", "keyed by seeds (integers)", key) from None
        vals = _as_dict(vals, f"by_seed[{key!r}]")
        _same_names(vals, names, f"by_seed[{key!r}]")
        by_seed[seed] = {n: _as_float(vals[n], f"by_seed[{key!r}][{n!r}]") for n in names}
    if sorted(by_seed) != sorted(seeds):
        raise ValueError(f"not a valid PAGE report: by_seed has seeds {sorted(by_seed)}, config.seeds {seeds}")
    return by_seed


def _read_per_sample(obj: Any, names: list[str], num_seeds: int, num_samples: int) -> dict[str, torch.Tensor] | None:
    if obj is None:
        return None
    obj = _as_dict(obj, "per_sample")
    _same_names(obj, names, "per_sample")
    out: dict[str, torch.Tensor] = {}
    for n in names:
        rows = _as_list(obj[n], f"per_sample[{n!r}]")
        if len(rows) != num_seeds or not all(isinstance(r, list) and len(r) == num_samples for r in rows):
            raise _invalid(f"per_sample[{n!r}]", f"{num_seeds} list(s) (one per seed) of num_samples = {num_samples} "
                           "energies")
        for j, r in enumerate(rows):
            for k, v in enumerate(r):
                _as_float(v, f"per_sample[{n!r}][{j}][{k}]")
        out[n] = torch.tensor(rows, dtype=torch.float64)
    return out


def _read_signals(obj: Any) -> dict[str, dict[str, float]]:
    """signal name -> (module name -> finite number; a signal may be negative)."""
    return {key: {n: _as_float(v, f"signals[{key!r}][{n!r}]", nonneg=False)
                  for n, v in _as_dict(vals, f"signals[{key!r}]").items()}
            for key, vals in _as_dict(obj, "signals").items()}
