"""Handlers of the structured pruning configs: fractions by importance, iterative pruning, layer dropping and
saved plans. Each returns a plan (what to keep); :func:`slimformer.prune` masks, removes, evaluates and saves."""

from __future__ import annotations

import time
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimformer.arch import layer_views
from slimformer.configs import (
    DropLayers,
    Fractions,
    Iterative,
    PlanFile,
    PruneContext,
    PruneOutcome,
    register_handler,
)
from slimformer.prune.layers import choose_layers_to_drop, layers_to_drop, parse_drop_layers
from slimformer.prune.plan import PruningPlan, plan_from_scores


def _dropped_layers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, strategy: str | None, n_examples: int, seed: int, ctx
) -> list[int]:
    if strategy is None:
        return []
    name, k = parse_drop_layers(strategy)
    if name != "contribution":  # fixed positions need no data
        return layers_to_drop(name, len(layer_views(model)), k)
    return choose_layers_to_drop(
        model, tokenizer, ctx.data, strategy, n_examples=n_examples, max_length=ctx.max_length, seed=seed
    )


def _keep_all_but_layers(model: PreTrainedModel, dropped: list[int], meta: dict[str, Any]) -> PruningPlan:
    base = PruningPlan.keep_all(model)
    return PruningPlan(
        layout=base.layout,
        kept_heads=base.kept_heads,
        kept_neurons=base.kept_neurons,
        dropped_layers=dropped,
        model_type=base.model_type,
        meta=meta,
    )


@register_handler(Fractions)
def prune_fractions(model, tokenizer, config: Fractions, ctx: PruneContext) -> PruneOutcome:
    from slimformer.importance import score_model

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    dropped = _dropped_layers(model, tokenizer, config.drop_layers, config.n_examples, config.seed, ctx)
    if config.heads == 0 and config.ffn == 0:
        plan = _keep_all_but_layers(model, dropped, {"drop_layers": config.drop_layers})
        seconds["choose_layers"] = round(time.perf_counter() - started, 2)
        return PruneOutcome(plan=plan, seconds=seconds)
    scores = score_model(
        model,
        tokenizer,
        ctx.data,
        method=config.importance,
        n_examples=config.n_examples,
        max_length=ctx.max_length,
        label_free=config.label_free,
        seed=config.seed,
        cache_dir=ctx.cache_dir,
        progress=ctx.progress,
    )
    seconds["importance"] = round(time.perf_counter() - started, 2)
    plan = plan_from_scores(
        model,
        scores.heads,
        scores.neurons,
        heads=config.heads,
        ffn=config.ffn,
        scope=config.scope,
        min_heads_per_layer=config.min_heads_per_layer,
        min_neurons_per_layer=config.min_neurons_per_layer,
        ffn_multiple=config.ffn_multiple,
        drop_layers=dropped,
        meta={"method": config.importance, "n_examples": config.n_examples, "label_free": config.label_free},
    )
    return PruneOutcome(plan=plan, seconds=seconds)


@register_handler(DropLayers)
def prune_layers(model, tokenizer, config: DropLayers, ctx: PruneContext) -> PruneOutcome:
    started = time.perf_counter()
    dropped = _dropped_layers(model, tokenizer, config.strategy, config.n_examples, config.seed, ctx)
    plan = _keep_all_but_layers(model, dropped, {"drop_layers": config.strategy})
    return PruneOutcome(plan=plan, seconds={"choose_layers": round(time.perf_counter() - started, 2)})


@register_handler(Iterative)
def prune_iteratively(model, tokenizer, config: Iterative, ctx: PruneContext) -> PruneOutcome:
    from slimformer.prune.iterative import iterative_prune

    started = time.perf_counter()
    result = iterative_prune(
        model,
        tokenizer,
        ctx.data,
        step=config.step,
        keep_score=config.keep_score,
        method=config.importance,
        n_examples=config.n_examples,
        max_length=ctx.max_length,
        label_free=config.label_free,
        seed=config.seed,
        progress=ctx.progress,
    )
    details: dict[str, Any] = {"curve": result.curve}
    return PruneOutcome(
        plan=result.plan, details=details, seconds={"iterative": round(time.perf_counter() - started, 2)}
    )


@register_handler(PlanFile)
def apply_plan_file(model, tokenizer, config: PlanFile, ctx: PruneContext) -> PruneOutcome:
    plan = PruningPlan.load(config.path)
    plan.validate(model)
    return PruneOutcome(plan=plan, details={"plan_file": config.path})
