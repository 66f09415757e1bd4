"""Handlers of the sparse configs (:class:`~slimformer.configs.Magnitude`,
:class:`~slimformer.configs.GradualMagnitude`, :class:`~slimformer.configs.Movement`): each leaves the pruned
weights as exact zeros in the model and returns the plan that removes whatever heads and neurons ended empty;
:func:`slimformer.prune` removes them, evaluates, measures and saves."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from slimformer.arch import layer_views
from slimformer.configs import GradualMagnitude, Magnitude, Movement, PruneContext, PruneOutcome, register_handler
from slimformer.errors import SlimformerError
from slimformer.sparse.masks import Granularity, WeightMasks, apply_masks, magnitude_masks
from slimformer.sparse.schedule import CubicSchedule
from slimformer.sparse.structure import removable_units


def sparsity_details(model: PreTrainedModel, masks: WeightMasks, granularity: Granularity) -> dict[str, Any]:
    """What the report says of a sparse model: weights kept, per matrix, and the density of every head and FFN
    block (the share of its weights left; read like Joniak & Aizawa 2022's head maps)."""
    head_size = layer_views(model)[0].head_size
    heads, ffn = masks.survival(head_size)
    return {
        "granularity": str(granularity),
        "linear_weights": masks.total,
        "linear_weights_kept": masks.kept,
        "sparsity": round(masks.sparsity, 6),
        "per_matrix_kept": {name: round(value, 6) for name, value in masks.per_matrix().items()},
        "head_density": [[round(v, 6) for v in row] for row in heads],
        "ffn_density": [round(v, 6) for v in ffn],
    }


def _finish(model: PreTrainedModel, masks: WeightMasks, config, details: dict[str, Any], seconds: dict[str, float]):
    started = time.perf_counter()
    plan, counts = removable_units(model)
    seconds["structure"] = round(time.perf_counter() - started, 2)
    details = {"sparse": {**sparsity_details(model, masks, Granularity.parse(config.granularity)), **counts, **details}}
    return PruneOutcome(plan=plan, details=details, seconds=seconds)


@register_handler(Magnitude)
def prune_magnitude(model, tokenizer, config: Magnitude, ctx: PruneContext) -> PruneOutcome:
    started = time.perf_counter()
    masks = magnitude_masks(model, config.sparsity, granularity=config.granularity, scope=config.scope)
    apply_masks(model, masks)
    seconds = {"magnitude": round(time.perf_counter() - started, 2)}
    return _finish(model, masks, config, {}, seconds)


# --------------------------------------------------------------------------------------------- while training


def _train_set(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data, config):
    from slimformer.distill.pipeline import MODEL_INPUTS, sentence_train_set
    from slimformer.tasks import tokenize_task
    from slimformer.train import require_train_split

    if data is None:
        raise SlimformerError(f"{config.method} trains on the task: pass one (--task, or data= in Python).")
    require_train_split(data)
    if data.spec.is_embedding:
        train = sentence_train_set(data, tokenizer, config.max_length)
    else:
        train = tokenize_task(data, tokenizer, max_length=config.max_length)["train"]
    if config.max_train_samples is not None and config.max_train_samples < len(train):
        train = train.shuffle(seed=config.seed).select(range(config.max_train_samples))
    return train.select_columns([c for c in MODEL_INPUTS if c in train.column_names])


def _extra_objectives(model, tokenizer, config, ctx: PruneContext):
    """The debiasing and adversarial terms the config asks for (see :class:`~slimformer.configs.Movement`)."""
    from slimformer.adversarial import counterfactual_pairs, embedding_scale, gender_swap_map, swap_table
    from slimformer.sparse.training import ExtraObjectives

    extra = ExtraObjectives(debias_weight=config.debias_weight, adversarial_weight=config.adversarial_weight)
    if config.debias_weight > 0:
        mapping = gender_swap_map(tokenizer, counterfactual_pairs(config.debias_names))
        if not mapping:
            raise SlimformerError("No gendered word pair is a single token of this tokenizer: nothing to swap.")
        extra.swap_table = swap_table(mapping, max(len(tokenizer), *mapping) + 1)
    if config.adversarial_weight > 0:
        spec = ctx.data.spec
        if spec.is_regression or spec.is_embedding:
            raise SlimformerError(
                f"adversarial_weight needs a classification task (the attack raises the task loss); {spec.name} is "
                "not one."
            )
        extra.radius = config.adversarial_epsilon * embedding_scale(model)
        extra.steps = config.adversarial_steps
    return extra


def _fisher_start(model: PreTrainedModel, tokenizer, config: Movement, ctx: PruneContext) -> dict:
    """Start scores of whole-head movement from Kwon et al. 2022's importance: the diagonal Fisher of every head
    and neuron mask on ``RANKING_EXAMPLES`` training examples, spread by rank (:func:`rank_scores`)."""
    from slimformer.budget.fisher import ranking_mask_gradients
    from slimformer.sparse.masks import Granularity, group_sizes, score_pools
    from slimformer.sparse.training import fisher_importance, rank_scores

    gradients = ranking_mask_gradients(
        model, tokenizer, ctx.data, batch_size=config.batch_size, max_length=config.max_length, seed=config.seed,
        progress=ctx.progress,
    )  # fmt: skip
    granularity = Granularity.parse(config.granularity)
    pools = score_pools(list(group_sizes(model, granularity)), granularity, config.scope)
    return rank_scores(fisher_importance(model, gradients.head_fisher(), gradients.neuron_fisher()), pools)


def train_sparse(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: GradualMagnitude | Movement,
    ctx: PruneContext,
) -> tuple[WeightMasks, dict[str, Any], dict[str, float]]:
    """Prune ``model`` in place while it trains on the task and distils from a frozen copy of itself; returns the
    final masks (already applied as zeros), the report details and seconds per phase."""
    from slimformer.distill.pipeline import TEACHER_LOGITS, DistillationModel, DistillConfig, teacher_logits
    from slimformer.sparse.training import (
        SparseController,
        SparseTrainingModel,
        SparseTrainingState,
        SparsityCallback,
        sawtooth_lambda,
        score_optimizer,
    )
    from slimformer.train import TrainConfig, train_resumably

    seconds: dict[str, float] = {}
    set_seed(config.seed)
    started = time.perf_counter()
    train = _train_set(model, tokenizer, ctx.data, config)
    distill_settings = DistillConfig(alpha=config.distill_alpha, temperature=config.temperature)
    if ctx.data.spec.is_embedding:
        distill_settings.alpha = 1.0  # no labels: the embeddings are the whole target
    # the dense model is the teacher: its outputs on the training set, once, before any weight is masked
    logits = teacher_logits(model.eval(), tokenizer, train, cache=False, progress=ctx.progress)
    train = train.add_column(TEACHER_LOGITS, [row.tolist() for row in logits])
    seconds["teacher_logits"] = round(time.perf_counter() - started, 2)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = max(1, math.ceil(config.epochs * math.ceil(len(train) / (config.batch_size * world))))
    if isinstance(config, GradualMagnitude):
        mode = "magnitude"
        schedule = CubicSchedule(
            final=config.sparsity,
            total=steps,
            initial=config.initial_sparsity,
            start=config.prune_start,
            end=config.prune_end,
            steps=config.pruning_events,
        )
    else:
        mode = "soft" if config.soft else "topk"
        schedule = CubicSchedule(final=config.sparsity, total=steps, start=config.prune_start, end=config.prune_end)
    # GMP* has no scores: its controller's start is unused
    score_start = config.score_start if isinstance(config, Movement) else "zero"
    score_init: float | str | dict = "magnitude" if score_start == "magnitude" else float(mode == "soft")
    if score_start == "fisher":
        started = time.perf_counter()
        score_init = _fisher_start(model, tokenizer, config, ctx)
        seconds["fisher"] = round(time.perf_counter() - started, 2)
    controller = SparseController(
        model, mode=mode, granularity=config.granularity, scope=config.scope, score_init=score_init
    )
    controller.install()
    state = SparseTrainingState()
    distillation = DistillationModel(model, None, distill_settings, [])
    wrapper = SparseTrainingModel(distillation, controller, _extra_objectives(model, tokenizer, config, ctx))
    optimizer = score_optimizer(
        wrapper,
        learning_rate=config.learning_rate,
        score_learning_rate=config.score_learning_rate if isinstance(config, Movement) else config.learning_rate,
        weight_decay=0.01,
    )
    scheduler = None
    if isinstance(config, GradualMagnitude) and config.rewarm:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sawtooth_lambda(schedule))
    train_config = TrainConfig(
        max_length=config.max_length,
        batch_size=config.batch_size,
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        seed=config.seed,
        save_steps=config.save_steps,
        logging_steps=50,
        group_by_length=True,  # batches of similar lengths: far less padding (about twice as fast on STS-B)
    )
    output, train_seconds, checkpoint = train_resumably(
        wrapper,
        tokenizer,
        train,
        ctx.work_dir,
        train_config,
        {"config": config.to_dict(), "examples": len(train)},
        callbacks=[SparsityCallback(controller, schedule, state)],
        optimizers=(optimizer, scheduler),
    )
    seconds["train"] = round(train_seconds, 2)
    if mode == "magnitude" and controller.target < config.sparsity:
        controller.prune_by_magnitude(config.sparsity)  # a run shorter than the schedule still reaches the target
    controller.target = config.sparsity
    reached = controller.sparsity()
    if mode == "soft" and abs(reached - config.sparsity) > 0.01:
        # the steered penalty missed the target (short runs): keep the top learned scores at the target instead
        controller.mode = "topk"
    masks = controller.bake()
    model.eval()
    details = {
        "schedule": schedule.describe(),
        "train": {
            "examples": len(train),
            "steps": output.global_step,
            "loss": float(output.training_loss),
            "resumed_from": str(checkpoint) if checkpoint else None,
            "distill": asdict(distill_settings),
        },
        "sparsity_curve": state.curve,
    }
    if mode != "magnitude":
        details["score_init"] = score_start
    if mode == "soft":
        details["soft"] = {
            "final_penalty": float(controller.penalty),
            "sparsity_reached": round(reached, 6),
            "projected_to_target": controller.mode == "topk",
        }
    return masks, details, seconds


@register_handler(GradualMagnitude)
@register_handler(Movement)
def prune_while_training(model, tokenizer, config, ctx: PruneContext) -> PruneOutcome:
    masks, details, seconds = train_sparse(model, tokenizer, config, ctx)
    return _finish(model, masks, config, details, seconds)
