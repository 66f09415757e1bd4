"""m-pruning (Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning"):
iterative global magnitude pruning of the encoder's weight matrices.

The weights pruned are the six linear weight matrices of every encoder layer (query, key, value, attention
output, FFN up and down; biases, LayerNorms, embeddings, pooler and classifier are never touched), found through
:func:`slimformer.arch.layer_views`. Each step masks the ``step`` fraction (10%) of the *remaining* weights with
the smallest absolute value, ranked globally across all those matrices; the masks are applied with
:mod:`torch.nn.utils.prune` (``weight = weight_orig * weight_mask``), so a masked weight is exactly zero in
every forward pass and gets no gradient: it stays zero while the model trains. The masks and their handling are
the sparse-pruning code's (:mod:`slimformer.sparse.masks`); this module adds the step-by-step search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from slimformer.analyze.common import AnalyzeError
from slimformer.evaluation import Evaluator
from slimformer.prune.iterative import prune_until_score
from slimformer.sparse.masks import (  # noqa: F401  (re-exported: the lottery analysis and its tests use them)
    HEAD_PARTS,
    PARTS,
    MaskedWeights,
    WeightMasks,
    dense_weight,
    encoder_linears,
    masked_weights,
)


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
                torch.where(
                    masks.masks[n].to(dense_weight(linears[n]).device), dense_weight(linears[n]).abs(), math.inf
                )
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
