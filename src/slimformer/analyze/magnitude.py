"""m-pruning (Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning"):
iterative global magnitude pruning of the encoder's weight matrices.

The weights pruned are the six linear weight matrices of every encoder layer (query, key, value, attention
output, FFN up and down; biases, LayerNorms, embeddings, pooler and classifier are never touched), found through
:func:`slimformer.arch.layer_views`. Each step masks the ``step`` fraction (10%) of the *remaining* weights with
the smallest absolute value, ranked globally across all those matrices; the masks are applied with
:mod:`torch.nn.utils.prune` (``weight = weight_orig * weight_mask``), so a masked weight is exactly zero in
every forward pass and gets no gradient: it stays zero while the model trains.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import PreTrainedModel

from slimformer.analyze.common import AnalyzeError
from slimformer.arch import layer_views
from slimformer.evaluation import Evaluator
from slimformer.io import atomic_file
from slimformer.prune.iterative import prune_until_score

PARTS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")
HEAD_PARTS = ("query", "key", "value")  # a head owns head_size rows of these, and head_size columns of attn_out


def encoder_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """``"<layer>.<part>"`` -> the encoder's linear modules whose weights m-pruning masks, in layer order."""
    return {f"{view.index}.{part}": getattr(view, part) for view in layer_views(model) for part in PARTS}


@dataclass
class WeightMasks:
    """Boolean keep-masks (True = the weight survives) for the encoder's linear weights, by ``"<layer>.<part>"``."""

    masks: dict[str, torch.Tensor]

    @classmethod
    def ones(cls, model: PreTrainedModel) -> WeightMasks:
        return cls({name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in encoder_linears(model).items()})

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    def check(self, model: PreTrainedModel) -> None:
        linears = encoder_linears(model)
        if set(linears) != set(self.masks):
            raise AnalyzeError(
                f"The weight masks cover {len(self.masks)} matrices, the model has {len(linears)}: they were made "
                "for a model of another shape."
            )
        for name, module in linears.items():
            if tuple(self.masks[name].shape) != tuple(module.weight.shape):
                raise AnalyzeError(
                    f"Weight mask {name} has shape {tuple(self.masks[name].shape)}, the model's weight "
                    f"{tuple(module.weight.shape)}: the masks were made for a model of another shape."
                )

    def per_matrix(self) -> dict[str, float]:
        """Fraction of each matrix's weights that survive."""
        return {name: float(m.float().mean()) for name, m in self.masks.items()}

    def survival(self, head_size: int) -> tuple[list[list[float]], list[float]]:
        """Fraction of surviving weights per head (its query/key/value rows and attention-output columns) and per
        MLP (its whole FFN up and down matrices)."""
        layers = sorted({int(name.split(".")[0]) for name in self.masks})
        heads, mlps = [], []
        for layer in layers:
            qkv = [self.masks[f"{layer}.{part}"] for part in HEAD_PARTS]
            out = self.masks[f"{layer}.attn_out"]
            n_heads = qkv[0].shape[0] // head_size
            row = []
            for head in range(n_heads):
                rows = slice(head * head_size, (head + 1) * head_size)
                kept = sum(int(m[rows].sum()) for m in qkv) + int(out[:, rows].sum())
                size = sum(m[rows].numel() for m in qkv) + out[:, rows].numel()
                row.append(kept / size if size else 0.0)
            heads.append(row)
            up, down = self.masks[f"{layer}.ffn_up"], self.masks[f"{layer}.ffn_down"]
            size = up.numel() + down.numel()
            mlps.append((int(up.sum()) + int(down.sum())) / size if size else 0.0)
        return heads, mlps

    def save(self, path: str | os.PathLike[str]) -> Path:
        """A compressed .npz of bit-packed masks (about 1/8 byte per weight), written atomically."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for index, mask in enumerate(self.masks.values()):
            arrays[f"bits{index}"] = np.packbits(mask.cpu().numpy().reshape(-1))
            arrays[f"shape{index}"] = np.asarray(mask.shape, dtype=np.int64)
        arrays["names"] = np.asarray(list(self.masks), dtype=str)
        with atomic_file(path, binary=True) as handle:
            np.savez_compressed(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WeightMasks:
        with np.load(path) as data:
            names = [str(n) for n in data["names"]]
            masks = {}
            for index, name in enumerate(names):
                shape = tuple(int(s) for s in data[f"shape{index}"])
                bits = np.unpackbits(data[f"bits{index}"])[: math.prod(shape)]
                masks[name] = torch.from_numpy(bits.astype(bool).reshape(shape))
        return cls(masks)


def _weight(module: nn.Linear) -> torch.Tensor:
    """The unmasked weight, also while a torch.nn.utils.prune mask is installed."""
    return getattr(module, "weight_orig", module.weight)


def magnitude_step(model: PreTrainedModel, masks: WeightMasks, fraction: float = 0.1) -> WeightMasks:
    """``masks`` with the ``fraction`` of the remaining weights of smallest magnitude (ranked globally) removed.

    Exactly ``round(fraction * remaining)`` weights (at least one while any remain) are removed; ties go to the
    weight that comes first (matrix order, then row-major), so the result is deterministic.
    """
    if not 0.0 < fraction < 1.0:
        raise AnalyzeError(f"The magnitude pruning step must be between 0 and 1, got {fraction}.")
    linears = encoder_linears(model)
    masks.check(model)
    names = list(linears)
    with torch.no_grad():
        values = torch.cat(
            [
                torch.where(masks.masks[n].to(_weight(linears[n]).device), _weight(linears[n]).abs(), math.inf)
                .float()
                .reshape(-1)
                .cpu()
                for n in names
            ]
        )
    remaining = masks.kept
    n_prune = min(remaining, max(1, round(fraction * remaining))) if remaining else 0
    flat_keep = torch.cat([masks.masks[n].reshape(-1).cpu() for n in names])
    if n_prune:
        order = torch.argsort(values, stable=True)
        flat_keep[order[:n_prune]] = False
    new, start = {}, 0
    for name in names:
        size = masks.masks[name].numel()
        new[name] = flat_keep[start : start + size].reshape(masks.masks[name].shape).clone()
        start += size
    return WeightMasks(new)


class MaskedWeights:
    """Weight masks installed with :func:`torch.nn.utils.prune.custom_from_mask`; :meth:`set` swaps the masks in
    place (no re-installing), for many evaluations of one model."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules

    def set(self, masks: WeightMasks) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                buffer = module.weight_mask
                buffer.copy_(masks.masks[name].to(buffer.device, buffer.dtype))


@contextmanager
def masked_weights(model: PreTrainedModel, masks: WeightMasks, *, restore: bool = True) -> Iterator[MaskedWeights]:
    """Apply ``masks`` to the encoder's weights for the ``with`` block (training included).

    On exit the masks are taken off again (``prune.remove``). With ``restore=True`` (for evaluations) the weights
    get their original values back, so the model is exactly as before; with ``restore=False`` (after training)
    the trained weights stay, with the masked entries zero.
    """
    masks.check(model)
    linears = encoder_linears(model)
    originals = {n: m.weight.detach().clone() for n, m in linears.items()} if restore else {}
    installed = []
    try:
        for name, module in linears.items():
            prune.custom_from_mask(module, "weight", masks.masks[name].to(module.weight.device))
            installed.append(name)
        yield MaskedWeights(linears)
    finally:
        for name in installed:
            module = linears[name]
            prune.remove(module, "weight")
            if restore:
                with torch.no_grad():
                    module.weight.copy_(originals[name])


@dataclass
class MagnitudeResult:
    """The last masks that kept the score, the dense and final scores and one curve point per step."""

    masks: WeightMasks
    dense_score: float
    final_score: float
    curve: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_score": self.dense_score,
            "final_score": self.final_score,
            "sparsity": self.masks.sparsity,
            "weights_total": self.masks.total,
            "weights_kept": self.masks.kept,
            "curve": self.curve,
            "meta": self.meta,
        }


def magnitude_prune(
    model: PreTrainedModel,
    evaluator: Evaluator,
    *,
    step: float = 0.1,
    keep_score: float = 0.9,
    max_iterations: int | None = None,
    progress: bool = True,
) -> MagnitudeResult:
    """m-pruning: remove ``step`` of the remaining encoder weights by magnitude per iteration until the dev score
    falls below ``keep_score`` x the unpruned score; return the last masks that kept it (never the one that broke
    it). No retraining between steps. The model is unchanged afterwards."""
    if not 0.0 < keep_score <= 1.0:
        raise AnalyzeError(f"keep_score must be in (0, 1], got {keep_score}.")
    if max_iterations is not None and max_iterations < 1:
        raise AnalyzeError(f"max_iterations must be at least 1, got {max_iterations}.")
    masks = WeightMasks.ones(model)
    dense = evaluator.score(model)
    if not dense > 0:
        raise AnalyzeError(
            f"The unpruned model scores {dense:g} on dev, so 'keep {keep_score:g} of the score' means nothing. "
            "Fine-tune the model on the task first."
        )
    threshold = keep_score * dense
    with masked_weights(model, masks) as handle:

        def score(candidate: WeightMasks) -> float:
            handle.set(candidate)  # swap the masks in place: no re-installing per step
            return evaluator.score(model)

        found = prune_until_score(
            masks,
            dense,
            threshold,
            has_more=lambda current: current.kept > 0,
            propose=lambda current, iteration: (magnitude_step(model, current, step), {}),
            score=score,
            describe=lambda current: {"sparsity": current.sparsity},
            max_iterations=max_iterations,
            postfix=lambda current: {"sparsity": f"{current.sparsity:.2f}"},
            progress=progress,
            description="m-pruning",
        )
    masks = found.state
    meta = {
        "step": step,
        "keep_score": keep_score,
        "threshold": threshold,
        "iterations": found.iterations,
        "stop_reason": found.stop_reason,
        "per_matrix_kept": masks.per_matrix(),
    }
    return MagnitudeResult(masks=masks, dense_score=dense, final_score=found.score, curve=found.curve, meta=meta)
