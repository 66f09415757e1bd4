"""Sparse training: gradual magnitude pruning and movement pruning while the model learns from its dense self.

Both run on the Hugging Face Trainer (checkpoints, resume, ``accelerate launch``) through the distillation model
of :mod:`slimformer.distill`: the model being pruned is the student, a frozen copy of it before pruning is the
teacher (logit distillation mixed with the task loss; for sentence-embedding models, the embedding distance).

A :class:`SparseController` holds the masks and installs them on the encoder's linear weights as
parametrizations (``weight = original * mask``), so a pruned weight is exactly zero in every forward pass:

* ``magnitude`` (GMP): fixed masks, recomputed at the schedule's pruning events from the magnitude of the
  surviving weights (Zhu & Gupta 2017; GMP*, Kurtic & Alistarh 2022);
* ``topk`` (movement pruning, Sanh et al. 2020): learned scores, the top ones kept; the mask passes its gradient
  straight through to the scores, so a score grows when its weight moves away from zero (``-W * dL/dW``);
* ``soft`` (soft movement pruning, same paper): a weight survives while its score is positive; an L1 penalty on
  the sigmoid of the scores pushes them down, its strength steered so that sparsity follows the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel, TrainerCallback

from slimformer.adversarial import embedding_offset, pgd_perturbation, swap_tokens
from slimformer.sparse.masks import (
    HEADS_UNIT,
    NEURONS_UNIT,
    Granularity,
    SparsityError,
    WeightMasks,
    dense_weight,
    encoder_linears,
    expand_masks,
    group_scores,
    group_sizes,
    keep_top,
    layer_unit_key,
    score_pools,
    unit_key,
)
from slimformer.sparse.schedule import CubicSchedule

MODES = ("magnitude", "topk", "soft")


def _safe(key: str) -> str:
    return key.replace(".", "_")  # ParameterDict / buffer names cannot hold dots


class _MaskedWeight(nn.Module):
    """The parametrization: the stored weight times the controller's current mask for this matrix."""

    def __init__(self, controller: SparseController, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "controller", controller)  # not a submodule: the controller is saved once
        self.name = name

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.controller.weight_mask(self.name).to(weight.dtype)


# Soft movement keeps a weight while its score is positive, so every pruned weight's score must cross zero under
# the penalty on sigmoid(score). At the full magnitude ratio (about 1, up to 3) the scores sit where sigmoid is
# flat and the penalty has little pull: on STS-B at 90% it reached 67% at its cap and the projection to 90%
# collapsed the model (9.87). A quarter of the ratio keeps magnitude's ranking where the penalty acts evenly:
# 84.45 (teacher 85.45; bench/results/sparse.md)
SOFT_MAGNITUDE_SCALE = 0.25


class SparseController(nn.Module):
    """Scores or masks of every group of the encoder's linear weights, and the current target sparsity.

    ``score_init``: a constant, a dict of start scores per group, or ``"magnitude"``, each score at its group's
    magnitude ratio. Started scores (dict or magnitude) are multiplied by ``start_scale`` (default:
    ``SOFT_MAGNITUDE_SCALE`` in soft mode, where the penalty must pull scores across zero; 1 in top-k mode).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        mode: str,
        granularity: str | Granularity = "weight",
        scope: str = "global",
        score_init: float | str | dict[str, torch.Tensor] = 0.0,
        start_scale: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise SparsityError(f"Unknown sparse training mode {mode!r}; choose one of {', '.join(MODES)}.")
        self.mode = mode
        self.granularity = Granularity.parse(granularity)
        self.linears = encoder_linears(model)
        object.__setattr__(self, "model", model)
        self.head_size = _head_size(model)
        self.sizes = group_sizes(model, self.granularity)
        self.keys = list(self.sizes)
        self.pools = score_pools(self.keys, self.granularity, scope)
        self.target = 0.0
        self._group_masks: dict[str, torch.Tensor] = {}
        if mode == "magnitude":
            for key in self.keys:
                self.register_buffer("mask_" + _safe(key), torch.ones_like(self.sizes[key], dtype=torch.bool))
        else:
            if isinstance(score_init, dict):  # given start scores, e.g. rank_scores of the Fisher
                missing = set(self.keys) - set(score_init)
                if missing or any(score_init[k].shape != self.sizes[k].shape for k in self.keys):
                    raise SparsityError(
                        f"Start scores must cover every group with its shape; missing {sorted(missing)[:3]}"
                    )
                start = {key: score_init[key].detach().float().clone() for key in self.keys}
            else:
                start = magnitude_scores(model, self.granularity, self.pools) if score_init == "magnitude" else None
            if start_scale is None:
                start_scale = SOFT_MAGNITUDE_SCALE if mode == "soft" else 1.0
            if start is not None and start_scale != 1.0:
                start = {key: value * start_scale for key, value in start.items()}
            self.scores = nn.ParameterDict(
                {
                    _safe(key): nn.Parameter(
                        start[key] if start is not None else torch.full_like(self.sizes[key], float(score_init))
                    )
                    for key in self.keys
                }
            )
        # the soft-movement penalty's strength: a buffer, so that a resumed run goes on with the value it had
        self.register_buffer("penalty", torch.zeros(()))

    # masks -------------------------------------------------------------------------------------------------
    def score(self, key: str) -> torch.Tensor:
        return self.scores[_safe(key)]

    def stored_mask(self, key: str) -> torch.Tensor:
        return getattr(self, "mask_" + _safe(key))

    def refresh(self) -> None:
        """Compute this step's group masks (movement: from the scores, with a straight-through gradient)."""
        if self.mode == "magnitude":
            self._group_masks = {key: self.stored_mask(key) for key in self.keys}
            return
        masks = {}
        if self.mode == "topk":
            keep = self._top_groups()
            for key in self.keys:
                score = self.score(key)
                masks[key] = keep[key].to(score.dtype) + score - score.detach()
        else:
            for key in self.keys:
                score = self.score(key)
                masks[key] = (score > 0).to(score.dtype) + score - score.detach()
        self._group_masks = masks

    def _top_groups(self) -> dict[str, torch.Tensor]:
        """Keep-masks of the top-scoring groups at the current target (a k-th value threshold per pool when its
        groups are of one size, which is the usual case, otherwise a size-aware ranking)."""
        if self.target <= 0:
            return {key: torch.ones_like(self.sizes[key], dtype=torch.bool) for key in self.keys}
        result: dict[str, torch.Tensor] = {}
        for pool in self.pools:
            sizes = torch.cat([self.sizes[k].reshape(-1) for k in pool])
            if bool((sizes == sizes[0]).all()):
                flat = torch.cat([self.score(k).detach().reshape(-1) for k in pool])
                n_prune = round(self.target * flat.numel())
                if n_prune == 0:
                    result.update({k: torch.ones_like(self.sizes[k], dtype=torch.bool) for k in pool})
                    continue
                threshold = torch.kthvalue(flat.float().cpu(), n_prune).values.to(flat.device)
                keep = flat > threshold
                # ties at the threshold: the first ones (in matrix order) fill the kept count exactly
                missing = flat.numel() - n_prune - int(keep.sum())
                if missing > 0:
                    keep[(flat == threshold).nonzero().flatten()[:missing]] = True
                start = 0
                for k in pool:
                    size = self.sizes[k].numel()
                    result[k] = keep[start : start + size].reshape(self.sizes[k].shape)
                    start += size
            else:
                scores = {k: self.score(k) for k in pool}
                result.update(keep_top(scores, self.sizes, self.target, [pool]))
        return result

    def weight_mask(self, name: str) -> torch.Tensor:
        key = unit_key(name) if self.granularity.kind == "head" else name
        if key not in self._group_masks:
            self.refresh()
        part = name.split(".")[1]
        shape = tuple(dense_weight(self.linears[name]).shape)
        return self.granularity.expand(self._group_masks[key], shape, part, self.head_size)

    def hard_group_masks(self) -> dict[str, torch.Tensor]:
        """The current binary masks over the groups (no gradient)."""
        if self.mode == "magnitude":
            return {key: self.stored_mask(key).clone() for key in self.keys}
        if self.mode == "topk":
            return self._top_groups()
        return {key: (self.score(key).detach() > 0) for key in self.keys}

    def weight_masks(self) -> WeightMasks:
        return expand_masks(self.model, self.hard_group_masks(), self.granularity)

    def sparsity(self) -> float:
        """Fraction of the encoder's linear weights the current masks remove."""
        kept = sum(float((mask.float() * self.sizes[key]).sum()) for key, mask in self.hard_group_masks().items())
        total = sum(float(size.sum()) for size in self.sizes.values())
        return 1.0 - kept / total

    # magnitude (GMP) ----------------------------------------------------------------------------------------
    def prune_by_magnitude(self, sparsity: float) -> None:
        """Recompute the stored masks: ``sparsity`` of the weights removed, smallest surviving magnitude first;
        weights already pruned stay pruned (they are zero)."""
        current = self.weight_masks()
        with torch.no_grad():
            magnitudes = {
                name: dense_weight(module).detach().abs() * current.masks[name].to(dense_weight(module).device)
                for name, module in self.linears.items()
            }
            keep = keep_top(group_scores(self.model, magnitudes, self.granularity), self.sizes, sparsity, self.pools)
            for key, mask in keep.items():
                self.stored_mask(key).copy_(mask.to(self.stored_mask(key).device))
        self.target = sparsity
        self._group_masks = {}

    # soft movement ---------------------------------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor:
        """Mean of sigmoid(score) over the weights (Sanh et al.'s L1 penalty on the soft mask)."""
        total = sum(float(size.sum()) for size in self.sizes.values())
        value = sum((torch.sigmoid(self.score(k)) * self.sizes[k].to(self.score(k).device)).sum() for k in self.keys)
        return value / total

    # installing ------------------------------------------------------------------------------------------------
    def install(self) -> None:
        for name, module in self.linears.items():
            parametrize.register_parametrization(module, "weight", _MaskedWeight(self, name))

    def bake(self) -> WeightMasks:
        """Take the parametrizations off, leaving the masked weights (exact zeros) in the model; returns the masks."""
        masks = self.weight_masks()
        self._group_masks = {key: mask.float() for key, mask in self.hard_group_masks().items()}
        for module in self.linears.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        # the product is computed in the weight's dtype: zeros are exact, survivors unchanged (times 1.0)
        return masks


def magnitude_scores(
    model: PreTrainedModel, granularity: Granularity, pools: list[list[str]]
) -> dict[str, torch.Tensor]:
    """Each group's mean |W| divided by the mean of that over its pool (so about 1): movement scores that rank
    the groups as magnitude pruning does before training moves them."""
    magnitudes = {name: dense_weight(module).detach().abs() for name, module in encoder_linears(model).items()}
    sums = group_scores(model, magnitudes, granularity)
    sizes = group_sizes(model, granularity)
    means = {key: sums[key] / sizes[key].to(sums[key].dtype).clamp_min(1) for key in sums}
    scores = {}
    for pool in pools:
        scale = torch.cat([means[key].reshape(-1) for key in pool]).mean().clamp_min(1e-12)
        scores.update({key: (means[key] / scale).float() for key in pool})
    return scores


def rank_scores(importance: dict[str, torch.Tensor], pools: list[list[str]]) -> dict[str, torch.Tensor]:
    """Scores spread evenly over (0, 2) by each group's rank of ``importance`` within its pool (mean 1, the scale of
    :func:`magnitude_scores`): top-k before any step keeps the most important groups, and movement can overtake a
    neighbour in the ranking in a comparable number of steps wherever it sits. Ranks rather than the importance
    itself, because the Fisher diagonal spans orders of magnitude and would freeze the top of the ranking."""
    scores = {}
    for pool in pools:
        flat = torch.cat([importance[key].reshape(-1).double() for key in pool])
        ranks = torch.empty_like(flat)
        ranks[torch.argsort(flat, stable=True)] = torch.arange(len(flat), dtype=flat.dtype)
        spread = (2 * (ranks + 0.5) / len(flat)).float()
        pieces = torch.split(spread, [importance[key].numel() for key in pool])
        scores.update(
            {key: piece.reshape(importance[key].shape).clone() for key, piece in zip(pool, pieces, strict=True)}
        )
    return scores


def fisher_importance(model: PreTrainedModel, head_fisher, neuron_fisher) -> dict[str, torch.Tensor]:
    """The Fisher diagonals of each layer's head and neuron masks keyed as the ``head`` granularity's groups."""
    from slimformer.arch import layer_views

    importance = {}
    for view, heads, neurons in zip(layer_views(model), head_fisher, neuron_fisher, strict=True):
        importance[layer_unit_key(view.index, HEADS_UNIT)] = torch.as_tensor(heads, dtype=torch.float64)
        importance[layer_unit_key(view.index, NEURONS_UNIT)] = torch.as_tensor(neurons, dtype=torch.float64)
    return importance


def _head_size(model: PreTrainedModel) -> int:
    from slimformer.arch import layer_views

    return layer_views(model)[0].head_size


@dataclass
class SparseTrainingState:
    """What the callback records for the report: the sparsity curve."""

    curve: list[dict[str, float]] = field(default_factory=list)


class SparsityCallback(TrainerCallback):
    """Moves the controller along the schedule at the start of every optimisation step (GMP: recompute masks at
    the pruning events; movement: set the target; soft movement: steer the penalty toward the target)."""

    def __init__(
        self, controller: SparseController, schedule: CubicSchedule, state: SparseTrainingState, *, log_every: int = 50
    ) -> None:
        self.controller = controller
        self.schedule = schedule
        self.state = state
        self.events = set(schedule.events()) if controller.mode == "magnitude" else set()
        self.log_every = log_every

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        target = self.schedule(step)
        controller = self.controller
        if controller.mode == "magnitude":
            if step in self.events or (target > 0 and controller.target < target and step >= self.schedule.start_step):
                controller.prune_by_magnitude(target)
        else:
            controller.target = target
        if controller.mode == "soft" and step % 10 == 0:
            # a proportional controller on the penalty's log-strength: too dense -> stronger, too sparse -> weaker
            error = target - controller.sparsity()
            strength = min(max(float(controller.penalty) * math.exp(20.0 * error), 1e-4), 1e3) if target > 0 else 0.0
            controller.penalty.fill_(strength)
        if step % self.log_every == 0:
            self.state.curve.append({"step": step, "target": round(target, 4), "sparsity": controller.sparsity()})
        controller._group_masks = {}
        return control


@dataclass
class ExtraObjectives:
    """Terms added to the distillation loss while pruning: counterfactual invariance to gendered words
    (``debias_weight``, with the token swap table) and the task loss under a PGD attack on the embeddings
    (``adversarial_weight``; ``radius`` in embedding units, ``steps``)."""

    debias_weight: float = 0.0
    swap_table: torch.Tensor | None = None
    adversarial_weight: float = 0.0
    radius: float = 0.0
    steps: int = 3


def counterfactual_loss(original: torch.Tensor, swapped: torch.Tensor, *, distributions: bool) -> torch.Tensor:
    """How much the output moves when gendered words are swapped: the symmetric KL of the two class
    distributions, or the squared distance for scores and embeddings."""
    if not distributions:
        return (original - swapped).pow(2).sum(-1).mean()
    p, q = original.log_softmax(-1), swapped.log_softmax(-1)
    return 0.5 * ((p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)).mean()


class SparseTrainingModel(nn.Module):
    """What the Trainer trains for sparse pruning: the distillation model (student = the model being pruned)
    plus the controller's scores; the soft-movement penalty and any extra objectives are added to the loss."""

    def __init__(
        self, distillation: nn.Module, controller: SparseController, extra: ExtraObjectives | None = None
    ) -> None:
        super().__init__()
        self.distillation = distillation
        self.controller = controller
        self.extra = extra or ExtraObjectives()

    def forward(self, **inputs: Any):
        self.controller.refresh()
        outputs = self.distillation(**inputs)
        if outputs.loss is None:
            return outputs
        if self.controller.mode == "soft" and float(self.controller.penalty) > 0:
            outputs.loss = outputs.loss + self.controller.penalty * self.controller.regularizer()
        extra = self.extra
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        student = self.distillation.student
        classes = not (self.distillation.regression or self.distillation.embedding)
        if extra.debias_weight > 0 and extra.swap_table is not None:
            swapped = swap_tokens(model_inputs["input_ids"], extra.swap_table)
            changed = (swapped != model_inputs["input_ids"]).any(-1)
            if bool(changed.any()):
                counter = {k: v[changed] for k, v in model_inputs.items()}
                counter["input_ids"] = swapped[changed]
                term = counterfactual_loss(outputs.logits[changed], student(**counter).logits, distributions=classes)
                outputs.loss = outputs.loss + extra.debias_weight * term
        if extra.adversarial_weight > 0:
            labels = inputs["labels"]
            delta = pgd_perturbation(student, model_inputs, labels, radius=extra.radius, steps=extra.steps)
            with embedding_offset(student, delta, model_inputs["attention_mask"]):
                attacked = student(**model_inputs).logits
            outputs.loss = outputs.loss + extra.adversarial_weight * nn.functional.cross_entropy(attacked, labels)
        return outputs


def score_optimizer(
    wrapper: SparseTrainingModel, *, learning_rate: float, score_learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW with the model's weights at ``learning_rate`` (no decay on biases and LayerNorms) and the movement
    scores at their own, much larger rate (Sanh et al. used 1e-2), without weight decay."""
    scores = {id(p) for p in wrapper.controller.parameters()}
    decay, no_decay = [], []
    for name, parameter in wrapper.named_parameters():
        if not parameter.requires_grad or id(parameter) in scores:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": learning_rate},
        {"params": no_decay, "weight_decay": 0.0, "lr": learning_rate},
    ]
    if scores:
        groups.append({"params": list(wrapper.controller.parameters()), "weight_decay": 0.0, "lr": score_learning_rate})
    return torch.optim.AdamW(groups, lr=learning_rate)


def sawtooth_lambda(schedule: CubicSchedule, *, warmup: int = 0):
    """GMP*'s learning-rate shape: linear decay to zero between pruning events, re-warmed to the full rate at each
    one (so the weights recover from every pruning step at a high rate), then one linear decay over the final
    phase."""
    events = schedule.events()

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        boundaries = [e for e in events if e <= step]
        begin = boundaries[-1] if boundaries else 0
        later = [e for e in events if e > step]
        end = later[0] if later else schedule.total
        return max(0.0, (end - step) / max(1, end - begin))

    return factor
