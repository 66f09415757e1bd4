"""The pruning path end to end: load -> score importance -> plan -> remove -> evaluate and measure -> save.

The CLI's ``slimformer prune`` is a thin wrapper over :func:`prune_model`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slimformer.errors import SlimformerError
from slimformer.evaluation import evaluate_model, headline_score
from slimformer.folders import save_model_folder
from slimformer.measure import count_parameters, flops
from slimformer.models import load_model
from slimformer.prune.apply import masked, remove
from slimformer.prune.layers import choose_layers_to_drop, parse_drop_layers
from slimformer.prune.plan import PruningPlan, plan_from_scores
from slimformer.tasks import TaskData, load_task


@dataclass
class PruneResult:
    """Where the pruned model went, its plan, and scores and sizes before and after."""

    out_dir: Path
    plan: PruningPlan
    report: dict[str, Any] = field(default_factory=dict)


def prune_model(
    model: str | os.PathLike[str],
    task: str | TaskData,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    heads: float = 0.0,
    ffn: float = 0.0,
    plan: PruningPlan | str | os.PathLike[str] | None = None,
    iterative: bool = False,
    keep_score: float = 0.9,
    step: float = 0.1,
    method: str = "gradient",
    scope: Literal["global", "layer"] = "global",
    min_heads_per_layer: int = 0,
    min_neurons_per_layer: int = 0,
    ffn_multiple: int = 1,
    n_examples: int = 256,
    batch_size: int = 32,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    label_free: bool = False,
    drop_layers: str | None = None,
    evaluate: bool = True,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` for ``task`` and save the physically smaller model to ``out_dir``.

    Exactly one way to choose what to prune: fractions (``heads`` / ``ffn``, by importance ``method``), a
    ready ``plan`` (object or JSON file), or ``iterative`` pruning (Michel et al. 2019, Prasanna et al. 2020)
    down to ``keep_score`` x the dense dev score. The output folder holds the model, ``plan.json`` and
    ``metrics.json`` (dev score before and after, parameters, FLOPs).
    """
    ways = sum([plan is not None, iterative, heads > 0 or ffn > 0 or drop_layers is not None])
    if ways != 1:
        raise SlimformerError(
            "Say what to prune in exactly one way: --heads/--ffn fractions (and/or --drop-layers), --plan plan.json, "
            "or --iterative."
        )
    if drop_layers is not None:
        parse_drop_layers(drop_layers)  # fail on a malformed strategy before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SlimformerError(f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite.")
    started = time.perf_counter()
    data = (
        task if isinstance(task, TaskData) else load_task(task, data_dir, max_eval_samples=max_eval_samples, seed=seed)
    )
    loaded = load_model(model, data.spec)
    net, tokenizer = loaded.model, loaded.tokenizer
    timings: dict[str, float] = {}

    curve = None
    if plan is not None:
        chosen = plan if isinstance(plan, PruningPlan) else PruningPlan.load(plan)
        chosen.validate(net)
    elif iterative:
        from slimformer.prune.iterative import iterative_prune

        phase = time.perf_counter()
        result = iterative_prune(
            net,
            tokenizer,
            data,
            step=step,
            keep_score=keep_score,
            method=method,
            n_examples=n_examples,
            batch_size=batch_size,
            max_length=max_length,
            label_free=label_free,
            seed=seed,
            progress=progress,
        )
        timings["iterative_seconds"] = round(time.perf_counter() - phase, 2)
        chosen, curve = result.plan, result.curve
    else:
        from slimformer.importance import score_model

        dropped: list[int] = []
        if drop_layers is not None:
            dropped = choose_layers_to_drop(
                net,
                tokenizer,
                data,
                drop_layers,
                n_examples=n_examples,
                batch_size=batch_size,
                max_length=max_length,
                seed=seed,
            )
        if heads > 0 or ffn > 0:
            phase = time.perf_counter()
            scores = score_model(
                net,
                tokenizer,
                data,
                method=method,
                n_examples=n_examples,
                batch_size=batch_size,
                max_length=max_length,
                label_free=label_free,
                seed=seed,
                cache_dir=cache_dir,
                progress=progress,
            )
            timings["importance_seconds"] = round(time.perf_counter() - phase, 2)
            chosen = plan_from_scores(
                net,
                scores.heads,
                scores.neurons,
                heads=heads,
                ffn=ffn,
                scope=scope,
                min_heads_per_layer=min_heads_per_layer,
                min_neurons_per_layer=min_neurons_per_layer,
                ffn_multiple=ffn_multiple,
                drop_layers=dropped,
                meta={"method": method, "n_examples": n_examples, "label_free": label_free},
            )
        else:
            base = PruningPlan.keep_all(net)
            chosen = PruningPlan(
                layout=base.layout,
                kept_heads=base.kept_heads,
                kept_neurons=base.kept_neurons,
                dropped_layers=dropped,
                model_type=base.model_type,
                meta={"drop_layers": drop_layers},
            )

    report: dict[str, Any] = {"task": data.spec.name, "model": str(model), "primary_metric": data.spec.primary_metric}
    report["summary"] = chosen.summary(net, seq_len=max_length)
    if evaluate:
        dense = evaluate_model(net, tokenizer, data, max_length=max_length, progress=progress)
        with masked(net, chosen):
            masked_eval = evaluate_model(net, tokenizer, data, max_length=max_length, progress=progress)
    remove(net, chosen)
    if evaluate:
        pruned_eval = evaluate_model(net, tokenizer, data, max_length=max_length, progress=progress)
        metric = data.spec.primary_metric
        report["eval"] = {"dense": dense, "masked": masked_eval, "pruned": pruned_eval}
        report["score"] = {
            "dense": headline_score(dense, metric),
            "pruned": headline_score(pruned_eval, metric),
        }
    report["params"] = count_parameters(net).as_dict()
    report["encoder_flops"] = flops(net, seq_len=max_length).encoder
    if curve is not None:
        report["curve"] = curve
    report["timings"] = {**timings, "total_seconds": round(time.perf_counter() - started, 2)}
    save_model_folder(
        net,
        tokenizer,
        out_dir,
        plan=chosen,
        overwrite=overwrite,
        json_files={"plan.json": chosen.to_dict(), "metrics.json": report},
    )
    return PruneResult(out_dir=out_dir, plan=chosen, report=report)
