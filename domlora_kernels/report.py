"""Reports of a probe: the text summary, two PNG plots, and the comparison of two probes.

Plots are written atomically (a temporary file, then a rename). Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg on save)
rather than pyplot: no global backend is switched and no window opens, so they work the
same on a headless server and inside a notebook. matplotlib is imported on first use only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .confidence import Confidence
from .errors import MissingExtraError
from .scores import PageScores
from .stats import entropy_concentration, floor_percent, kendall_tau, spearman


# ------------------------------------------------------------------ text
def text_report(scores: PageScores, conf: Confidence | None = None, top: int = 15) -> str:
    """The ranked table of the ``top`` modules, the dominant module, concentration and confidence.

    Example:
        >>> print(text_report(scores, confidence(scores)))   # doctest: +SKIP
    """
    dom = scores.dominant_module
    info = scores.modules[dom]
    shares = scores.shares
    lines = [scores.table(top), ""]
    lines.append(f"dominant module: {dom} (layer {info.layer}, {info.type}, share {100 * shares[dom]:.1f}% of "
                 f"{len(scores.scores)} modules)")
    ent = entropy_concentration(list(scores.scores.values())) if conf is None else conf.entropy
    lines.append(f"concentration: top-1 share {100 * shares[dom]:.1f}%, normalised entropy {ent:.3f} (0 = all on one module, 1 = flat)")
    if conf is not None:
        lines.append(conf.sentence())
        if conf.seed_spearman is not None:
            lines.append(f"rank agreement between the {conf.num_seeds} A seeds: mean pairwise Spearman {conf.seed_spearman:.3f}")
        if conf.bootstrap_top1:
            others = sorted(((v, k) for k, v in conf.bootstrap_top1.items() if k != dom), reverse=True)[:3]
            if others:
                lines.append("other bootstrap winners: " + ", ".join(f"{k} {100 * v:.1f}%" for v, k in others))
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            "plots need matplotlib: pip install 'domlora_kernels[plot]' (or pip install matplotlib)"
        ) from e
    return Figure(**kwargs)


def _save(fig, path: Path) -> None:
    """Save the PNG atomically: a temporary file in the same folder, then ``os.replace``, so a
    failed save leaves an earlier plot at ``path`` intact."""
    import os
    import secrets

    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def share_grid(scores: PageScores) -> tuple[torch.Tensor, list[str], list[str]]:
    """``(grid [layers, types] of PAGE shares with NaN where no module, row labels, column labels)``.

    Rows are the layer indices in increasing order (modules without a layer index go to a last
    row "other"); columns are the module types in model order.
    """
    types: list[str] = []
    layers: list[int] = []
    other = False
    for info in scores.modules.values():
        if info.type not in types:
            types.append(info.type)
        if info.layer is None:
            other = True
        elif info.layer not in layers:
            layers.append(info.layer)
    layers.sort()
    rows = [str(x) for x in layers] + (["other"] if other else [])
    row_of = {x: i for i, x in enumerate(layers)}
    grid = torch.full((len(rows), len(types)), float("nan"), dtype=torch.float64)
    shares = scores.shares
    for name, info in scores.modules.items():
        i = len(layers) if info.layer is None else row_of[info.layer]
        j = types.index(info.type)
        # two modules of one type in one layer (e.g. nested blocks) share a cell: add them
        grid[i, j] = shares[name] if math.isnan(grid[i, j]) else grid[i, j] + shares[name]
    return grid, rows, types


def _title(scores: PageScores) -> str:
    c = scores.config
    model = scores.meta.get("model")
    head = f"{model}: " if model else ""
    return (f"{head}{scores.num_samples} samples, rank {c.get('rank')}, projection {c.get('projection')}, "
            f"{len(c.get('seeds', [])) or 1} seed(s)")


def plot_heatmap(scores: PageScores, path: str | Path, log_scale: bool = False, annotate: bool | None = None,
                 dpi: int = 120) -> Path:
    """PNG heatmap of PAGE share: layers (rows) x module types (columns), dominant cell outlined.

    Args:
        scores: a probe result.
        path: output ``.png`` (folders are created).
        log_scale: logarithmic colour scale, floored at 1e-4 of the largest share (PAGE often
            spans orders of magnitude across layers; linear shows only the top cells).
        annotate: write the share (%) in each cell; default when the grid has <= 64 rows and
            <= 16 columns.
        dpi: resolution (default 120: about 1000 x 1200 px for 30 layers x 7 types).

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> plot_heatmap(scores, "out/heatmap.png", log_scale=True)   # doctest: +SKIP
    """
    path = _png_path(path)
    grid, rows, cols = share_grid(scores)
    pct = grid * 100
    finite = pct[~torch.isnan(pct)]
    vmax = float(finite.max()) if finite.numel() else 1.0
    if annotate is None:
        annotate = len(rows) <= 64 and len(cols) <= 16

    width = 2.6 + 0.95 * len(cols)
    height = 1.9 + 0.28 * len(rows)
    fig = _figure(figsize=(width, height), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    import matplotlib
    import numpy as np
    from matplotlib import colors
    from matplotlib.patches import Rectangle

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no such module in that layer
    if log_scale and vmax > 0:
        norm = colors.LogNorm(vmin=vmax * 1e-4, vmax=vmax, clip=True)
    else:
        norm = colors.Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    data = pct.numpy().copy()
    if log_scale:
        data[data <= 0] = vmax * 1e-4  # zero-PAGE modules show at the floor of the scale
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 20 else 9)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
    cb.set_label("PAGE share (%)" + (", log scale" if log_scale else ""))
    if annotate:
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = pct[i, j].item()
                if math.isnan(v):
                    continue
                rgba = cmap(norm(max(v, vmax * 1e-4) if log_scale else v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                ax.text(j, i, f"{v:.1f}" if v >= 0.095 else f"{v:.1g}" if v > 0 else "0", ha="center", va="center", fontsize=6.5,
                        color="black" if light else "white")
    dom = scores.dominant_module
    info = scores.modules[dom]
    i = rows.index("other" if info.layer is None else str(info.layer))
    j = cols.index(info.type)
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e4002b", linewidth=2.2))
    ax.set_title(f"PAGE share per module; dominant (outlined): {dom} {100 * scores.shares[dom]:.1f}%\n{_title(scores)}",
                 fontsize=9)
    _save(fig, path)
    return path


def plot_top(scores: PageScores, path: str | Path, top: int = 15, conf: Confidence | None = None, dpi: int = 120) -> Path:
    """PNG bar chart of the ``top`` modules by PAGE share, highest at the top.

    With ``conf`` (from :func:`~domlora_kernels.confidence.confidence`), each bar gets its
    5-95% bootstrap interval as an error bar, and the modules that win bootstrap resamples
    are labelled with how often they do.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> plot_top(scores, "out/top.png", top=10, conf=confidence(scores))   # doctest: +SKIP
    """
    path = _png_path(path)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    ranked = scores.ranked()[:top]
    shares = scores.shares
    names = [n for n, _ in ranked]
    vals = [100 * shares[n] for n in names]
    fig = _figure(figsize=(8.5, 1.4 + 0.32 * len(names)), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(names)))[::-1]
    xerr = None
    if conf is not None and conf.share_interval is not None:
        lo = [max(v - 100 * conf.share_interval[n][0], 0.0) for n, v in zip(names, vals)]
        hi = [max(100 * conf.share_interval[n][1] - v, 0.0) for n, v in zip(names, vals)]
        xerr = [lo, hi]
    colors_ = ["#e4002b" if i == 0 else "#4c72b0" for i in range(len(names))]
    ax.barh(ys, vals, color=colors_, xerr=xerr, error_kw={"ecolor": "#333333", "capsize": 2, "linewidth": 0.8})
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel("PAGE share (%)" + ("; bars: 5-95% bootstrap interval" if xerr is not None else ""))
    right = max(vals) if vals else 1.0
    if xerr is not None:
        right = max(v + h for v, h in zip(vals, xerr[1]))
    ax.set_xlim(0, right * 1.3)
    if conf is not None and conf.bootstrap_top1:
        for y, n, v in zip(ys, names, vals):
            p = conf.bootstrap_top1.get(n)
            if p:
                ax.text(v + (xerr[1][names.index(n)] if xerr else 0) + right * 0.02, y,
                        f"top-1 in {floor_percent(p)}%", va="center", fontsize=7)
    title = f"Top {len(names)} of {len(scores.scores)} modules by PAGE share"
    if conf is not None:
        title += f"\n{conf.sentence()}"
    ax.set_title(title + f"\n{_title(scores)}", fontsize=8.5)
    _save(fig, path)
    return path


def plot_report(scores: PageScores, json_path: str | Path, conf: Confidence | None = None, top: int = 15,
                log_scale: bool = False) -> list[Path]:
    """Both plots next to a JSON report: ``<stem>_heatmap.png`` and ``<stem>_top.png``; returns the paths."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    return [
        plot_heatmap(scores, f"{stem}_heatmap.png", log_scale=log_scale),
        plot_top(scores, f"{stem}_top.png", top=top, conf=conf),
    ]


# ------------------------------------------------------------------ compare
@dataclass
class Comparison:
    """Agreement of two probes over the same modules (see :func:`compare`)."""

    label_a: str
    label_b: str
    dominant_a: str
    dominant_b: str
    share_a: float
    share_b: float
    spearman: float | None
    kendall: float | None
    top: int
    top_a: list[str]
    top_b: list[str]
    num_modules: int
    notes: list[str]

    @property
    def same_dominant(self) -> bool:
        return self.dominant_a == self.dominant_b

    @property
    def overlap(self) -> list[str]:
        """Modules in both top-``top`` lists, in a's order."""
        return [n for n in self.top_a if n in self.top_b]

    def text(self) -> str:
        fmt = lambda v: "undefined (constant scores)" if v is None else f"{v:.3f}"  # noqa: E731
        lines = [
            f"a: {self.label_a}: dominant {self.dominant_a} (share {100 * self.share_a:.1f}%)",
            f"b: {self.label_b}: dominant {self.dominant_b} (share {100 * self.share_b:.1f}%)",
            f"same dominant module: {'yes' if self.same_dominant else 'no'}",
            f"rank correlation over {self.num_modules} modules: Spearman {fmt(self.spearman)}, Kendall tau-b {fmt(self.kendall)}",
            f"top-{self.top} overlap: {len(self.overlap)}/{self.top}" + (f" ({', '.join(self.overlap)})" if self.overlap else ""),
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(same_dominant=self.same_dominant, overlap=self.overlap)
        return d


def compare(a: PageScores, b: PageScores, top: int = 5, label_a: str = "a", label_b: str = "b") -> Comparison:
    """Do two probes (say two tasks) agree? Same dominant module, rank correlations, top-``top`` overlap.

    Args:
        a, b: probe results over the same set of module names.
        top: size of the top lists whose overlap is counted (default 5; at most the module count).
        label_a, label_b: names used in :meth:`Comparison.text` (e.g. the file names).

    Returns:
        :class:`Comparison`: ``same_dominant``, ``spearman`` and ``kendall`` (tau-b) over all
        modules' PAGE, ``overlap`` of the two top lists. Differences in the probe settings
        (rank, projection, estimator) are listed in ``notes``: the ranking is comparable, the
        PAGE values may not be.

    Raises:
        ValueError: the module sets differ (the message gives counts and examples).

    Example:
        >>> print(compare(PageScores.from_json("math.json"), PageScores.from_json("code.json")).text())  # doctest: +SKIP
    """
    for s, what in ((a, "a"), (b, "b")):
        if not isinstance(s, PageScores):
            raise TypeError(f"{what} must be a PageScores, got {type(s).__name__}")
    only_a = [n for n in a.scores if n not in b.scores]
    only_b = [n for n in b.scores if n not in a.scores]
    if only_a or only_b:
        raise ValueError(
            f"the two probes cover different modules ({len(a.scores)} vs {len(b.scores)}; "
            f"only in {label_a}: {only_a[:3]}{' ...' if len(only_a) > 3 else ''}, only in {label_b}: "
            f"{only_b[:3]}{' ...' if len(only_b) > 3 else ''}); probe the same model with the same target_modules"
        )
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(a.scores):
        raise ValueError(f"top must be an integer between 1 and {len(a.scores)}, got {top!r}")
    names = list(a.scores)
    va = torch.tensor([a.scores[n] for n in names], dtype=torch.float64)
    vb = torch.tensor([b.scores[n] for n in names], dtype=torch.float64)
    notes = []
    for key in ("rank", "projection", "estimator", "lora_alpha", "use_rslora"):
        if a.config.get(key) != b.config.get(key):
            notes.append(f"probe settings differ: {key} {a.config.get(key)!r} vs {b.config.get(key)!r}")
    if len(names) < 2:
        rho = tau = None
    else:
        rho, tau = spearman(va, vb), kendall_tau(va, vb)
    return Comparison(
        label_a=label_a, label_b=label_b, dominant_a=a.dominant_module, dominant_b=b.dominant_module,
        share_a=a.shares[a.dominant_module], share_b=b.shares[b.dominant_module], spearman=rho, kendall=tau,
        top=top, top_a=[n for n, _ in a.ranked()[:top]], top_b=[n for n, _ in b.ranked()[:top]],
        num_modules=len(names), notes=notes,
    )
