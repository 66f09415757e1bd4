"""PNG plots: head-importance heatmaps and score-versus-fraction-pruned curves.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global state and no display needed) and
written atomically: to a temporary file next to the target, then renamed. Layers and heads are labelled from 0,
as in the importance JSON and in pruning plans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from slimformer.errors import SlimformerError
from slimformer.io import atomic_file

if TYPE_CHECKING:
    from slimformer.importance import ImportanceScores

# Heatmaps up to this many rows and columns get each cell's value written in it.
ANNOTATE_MAX = 16


def save_png_atomic(figure: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)  # attach the Agg canvas: savefig renders through it
    with atomic_file(path, binary=True) as handle:
        figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_head_importance(
    scores: np.ndarray | Sequence[Sequence[float]] | ImportanceScores,
    path: str | os.PathLike[str],
    *,
    title: str = "Head importance",
    colorbar_label: str = "importance",
    cmap: str = "viridis",
) -> Path:
    """A layers x heads heatmap of ``scores`` (a matrix, or :class:`ImportanceScores` via its head matrix) as a PNG.

    Rows are layers and columns heads, both numbered from 0. NaN cells (heads a layer no longer has, after
    uneven pruning) are left blank. Up to 16 x 16 cells, each cell shows its value.
    """
    if hasattr(scores, "head_matrix"):  # ImportanceScores
        scores = scores.head_matrix()
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise SlimformerError(f"Head importance must be a non-empty [layers, heads] matrix, got shape {matrix.shape}.")
    layers, heads = matrix.shape
    figure = Figure(figsize=(max(4.0, 0.55 * heads + 2.5), max(3.0, 0.45 * layers + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap=_colormap(cmap), aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=colorbar_label)
    axes.set_xticks(range(heads), [str(h) for h in range(heads)])
    axes.set_yticks(range(layers), [str(layer) for layer in range(layers)])
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title)
    if layers <= ANNOTATE_MAX and heads <= ANNOTATE_MAX:
        finite = matrix[np.isfinite(matrix)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for layer in range(layers):
            for head in range(heads):
                value = matrix[layer, head]
                if np.isfinite(value):
                    # dark text on the bright end of the colormap, light text on the dark end
                    color = "black" if value > middle else "white"
                    axes.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize=7, color=color)
    return save_png_atomic(figure, path)


def _colormap(name: str) -> Colormap:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))  # NaN (absent heads): blank


def plot_curve(
    xs: Sequence[float],
    ys_by_label: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    xlabel: str = "fraction pruned",
    ylabel: str = "score",
    title: str = "",
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of one or more series over the same ``xs`` (e.g. score vs fraction of heads pruned) as a PNG.

    ``hlines`` adds labelled dashed horizontal lines (e.g. the score a pruning run must keep).
    """
    xs = [float(x) for x in xs]
    if not ys_by_label:
        raise SlimformerError("plot_curve needs at least one series to draw.")
    for label, ys in ys_by_label.items():
        if len(ys) != len(xs):
            raise SlimformerError(f"Series {label!r} has {len(ys)} values for {len(xs)} x values.")
    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.add_subplot()
    for label, ys in ys_by_label.items():
        values = [np.nan if y is None else float(y) for y in ys]
        axes.plot(xs, values, marker="o", markersize=3, label=label)
    for label, value in (hlines or {}).items():
        axes.axhline(float(value), linestyle="--", linewidth=1, color="grey", label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return save_png_atomic(figure, path)


__all__ = ["plot_curve", "plot_head_importance"]
