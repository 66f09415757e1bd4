"""The density map of a sparse model: the share of weights left in every head and every layer's FFN."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from slimformer.plots import _colormap, save_png_atomic


def plot_density(details: dict[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Heads (layers x heads heatmap, annotated) and FFN blocks (one bar per layer) coloured by the fraction of
    their weights that survive, from the ``sparse`` details of a pruning report."""
    heads = details["head_density"]
    width = max((len(row) for row in heads), default=0)
    matrix = np.full((len(heads), max(width, 1)), np.nan)
    for layer, row in enumerate(heads):
        matrix[layer, : len(row)] = row
    ffn = np.asarray(details["ffn_density"], dtype=np.float64)
    figure = Figure(figsize=(max(6.0, 0.55 * width + 4.5), max(3.0, 0.45 * len(heads) + 1.5)))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [max(width, 1), 2]})
    image = left.imshow(np.ma.masked_invalid(matrix), cmap=_colormap("viridis"), vmin=0, vmax=1, aspect="auto")
    left.set_xlabel("head")
    left.set_ylabel("layer")
    left.set_yticks(range(len(heads)))
    left.set_title("weights left per head")
    if width <= 16 and len(heads) <= 16:
        for layer in range(len(heads)):
            for head in range(width):
                value = matrix[layer, head]
                if np.isfinite(value):
                    color = "black" if value > 0.5 else "white"
                    left.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    right.barh(range(len(ffn)), ffn, color="tab:green")
    right.set_xlim(0, 1)
    right.set_ylim(len(ffn) - 0.5, -0.5)
    right.set_yticks(range(len(ffn)))
    right.set_xlabel("FFN weights left")
    figure.colorbar(image, ax=left, label="fraction of weights left")
    sparsity = details.get("sparsity")
    figure.suptitle(
        title or f"Density after sparse pruning ({details.get('granularity', '')}, sparsity {sparsity:.2f})"
    )
    return save_png_atomic(figure, path)
