"""Plots of the analyses (matplotlib on the Agg canvas, no pyplot; written atomically like slimformer.plots)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from slimformer.plots import save_png_atomic

ANNOTATE_MAX = 16


def _cmap(name: str):
    return colormaps[name].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))


def _draw_heatmap(
    figure: Figure,
    axes,
    matrix: np.ndarray,
    *,
    xlabels: Sequence[str],
    ylabels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    cmap: str,
    center: float | None,
    vmin: float | None,
    vmax: float | None,
    colorbar_label: str,
    digits: int,
    scale: float,
) -> None:
    shown = matrix * scale
    finite = shown[np.isfinite(shown)]
    if center is not None and finite.size:
        reach = max(float(np.max(np.abs(finite - center * scale))), 1e-12)
        vmin, vmax = center * scale - reach, center * scale + reach
    elif vmin is not None or vmax is not None:
        vmin = None if vmin is None else vmin * scale
        vmax = None if vmax is None else vmax * scale
    image = axes.imshow(
        np.ma.masked_invalid(shown), cmap=_cmap(cmap), aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax
    )
    figure.colorbar(image, ax=axes, label=colorbar_label)
    rows, cols = shown.shape
    axes.set_xticks(range(cols), list(xlabels), rotation=90 if max((len(x) for x in xlabels), default=0) > 3 else 0)
    axes.set_yticks(range(rows), list(ylabels))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title, fontsize=10)
    if rows <= ANNOTATE_MAX and cols <= ANNOTATE_MAX and finite.size:
        low, high = image.get_clim()
        for r in range(rows):
            for c in range(cols):
                value = shown[r, c]
                if np.isfinite(value):
                    normalised = (value - low) / (high - low) if high > low else 0.5
                    if cmap in ("viridis", "magma"):  # dark at the low end only
                        color = "black" if normalised > 0.5 else "white"
                    else:  # diverging maps: dark at both ends
                        color = "white" if normalised < 0.2 or normalised > 0.8 else "black"
                    axes.text(c, r, f"{value:.{digits}f}", ha="center", va="center", fontsize=6.5, color=color)


def heatmap(
    matrix: np.ndarray | Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    xlabels: Sequence[str] | None = None,
    ylabels: Sequence[str] | None = None,
    xlabel: str = "head",
    ylabel: str = "layer",
    colorbar_label: str = "",
    cmap: str = "viridis",
    center: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    digits: int = 1,
    scale: float = 1.0,
) -> Path:
    """A heatmap PNG; ``center`` makes a diverging map symmetric about that value; NaN cells are blank."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    xlabels = list(xlabels) if xlabels is not None else [str(i) for i in range(cols)]
    ylabels = list(ylabels) if ylabels is not None else [str(i) for i in range(rows)]
    figure = Figure(figsize=(max(4.0, 0.5 * cols + 2.5), max(3.0, 0.42 * rows + 1.6)))
    axes = figure.add_subplot()
    _draw_heatmap(
        figure,
        axes,
        matrix,
        xlabels=xlabels,
        ylabels=ylabels,
        xlabel=xlabel,
        ylabel=ylabel,
        title=title,
        cmap=cmap,
        center=center,
        vmin=vmin,
        vmax=vmax,
        colorbar_label=colorbar_label,
        digits=digits,
        scale=scale,
    )
    return save_png_atomic(figure, path)


def survival_heatmap(
    heads: np.ndarray, mlps: np.ndarray, path: str | os.PathLike[str], *, title: str, label: str
) -> Path:
    """Heads (layers x heads) and MLPs (one column) side by side, values in [0, 1]."""
    heads = np.asarray(heads, dtype=np.float64)
    mlps = np.asarray(mlps, dtype=np.float64).reshape(-1, 1)
    rows, cols = heads.shape
    figure = Figure(figsize=(max(5.5, 0.5 * cols + 4.0), max(3.0, 0.42 * rows + 1.6)))
    grid = figure.add_gridspec(1, 2, width_ratios=[max(cols, 1), 2.2])
    common = {"cmap": "viridis", "center": None, "vmin": 0.0, "vmax": 1.0, "digits": 2, "scale": 1.0}
    _draw_heatmap(
        figure,
        figure.add_subplot(grid[0, 0]),
        heads,
        xlabels=[str(i) for i in range(cols)],
        ylabels=[str(i) for i in range(rows)],
        xlabel="head",
        ylabel="layer",
        title=f"{title}: heads",
        colorbar_label=label,
        **common,
    )
    _draw_heatmap(
        figure,
        figure.add_subplot(grid[0, 1]),
        mlps,
        xlabels=["MLP"],
        ylabels=[str(i) for i in range(rows)],
        xlabel="",
        ylabel="layer",
        title="MLPs",
        colorbar_label="",
        **common,
    )
    return save_png_atomic(figure, path)


def bar_chart(
    groups: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    ylabel: str,
    title: str = "",
    hlines: Mapping[str, float] | None = None,
    scale: float = 100.0,
) -> Path:
    """Grouped bars with error bars: ``groups[group][series] = (mean, std)``."""
    group_names = list(groups)
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    figure = Figure(figsize=(max(4.5, 1.2 * len(group_names) * max(1, len(series)) * 0.5 + 2.5), 3.8))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for index, name in enumerate(series):
        xs, means, stds = [], [], []
        for g, group in enumerate(group_names):
            if name in groups[group]:
                mean, std = groups[group][name]
                xs.append(g + (index - (len(series) - 1) / 2) * width)
                means.append(mean * scale)
                stds.append((std or 0.0) * scale)
        bars = axes.bar(xs, means, width=width, yerr=stds, capsize=3, label=name)
        axes.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2)
    for label, value in (hlines or {}).items():
        axes.axhline(value * scale, linestyle="--", linewidth=1, color="grey", label=label)
    axes.set_xticks(range(len(group_names)), group_names)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title, fontsize=10)
    values = [groups[g][s][0] * scale for g in groups for s in groups[g]] + [v * scale for v in (hlines or {}).values()]
    if values:
        low, high = min(values), max(values)
        margin = max(2.0, 0.15 * (high - low))
        bottom = low - margin if low < 0 else max(0.0, low - 4 * margin)
        axes.set_ylim(bottom, high + margin)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return save_png_atomic(figure, path)


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    hlines: Mapping[str, float] | None = None,
    yscale: float = 100.0,
) -> Path:
    """Lines with their own x values: ``series[label] = (xs, ys)``."""
    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.add_subplot()
    for label, (xs, ys) in series.items():
        axes.plot(list(xs), [y * yscale for y in ys], marker="o", markersize=3, label=label)
    for label, value in (hlines or {}).items():
        axes.axhline(value * yscale, linestyle="--", linewidth=1, color="grey", label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=7)
    return save_png_atomic(figure, path)


def pattern_grid(
    patterns: Sequence[np.ndarray], path: str | os.PathLike[str], *, size: int = 24, title: str = ""
) -> Path:
    """The top-left ``size`` x ``size`` corner of each head's constant attention pattern, one row per layer."""
    layers = len(patterns)
    heads = max((p.shape[0] for p in patterns), default=0)
    figure = Figure(figsize=(0.5 * max(heads, 1) + 0.4, 0.5 * max(layers, 1) + 0.6))
    for layer, pattern in enumerate(patterns):
        for head in range(pattern.shape[0]):
            axes = figure.add_subplot(layers, heads, layer * heads + head + 1)
            axes.imshow(pattern[head, :size, :size], cmap="magma", interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if layer == 0:
                axes.set_title(str(head), fontsize=7)
            if head == 0:
                axes.set_ylabel(str(layer), fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return save_png_atomic(figure, path)
