"""Iterative pruning: mask the least important heads (and MLPs) a step at a time while the task score holds.

Michel et al. 2019, "Are Sixteen Heads Really Better than One?" (§4) prune heads step by step by their gradient
importance, re-scoring after each step; Prasanna et al. 2020, "When BERT Plays the Lottery, All Tickets Are
Winning", run the same loop ("s-pruning") on heads and whole MLPs, pruning 10% of the heads and one MLP per
iteration until the dev score falls below 90% of the full model's. Here each iteration re-scores importance with
the current mask in place, masks the lowest-scoring ``step`` fraction of the heads still present (at least one)
and, with ``prune_mlps``, the lowest-scoring MLP still present, and evaluates the masked model on the dev split.
The result is the last plan that kept the score, never the one that broke it.

Nothing is physically removed: every step runs through gates (:func:`~slimformer.prune.apply.masked`), and the
model is exactly as it was when the function returns. Carry out the plan with
:func:`~slimformer.prune.apply.remove` to make the model smaller.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimformer.evaluation import Evaluator
from slimformer.importance import METHODS, ImportanceScores, compute_importance, importance_sample
from slimformer.io import write_json_atomic
from slimformer.plots import plot_curve
from slimformer.prune.apply import masked, plan_gates
from slimformer.prune.plan import PlanError, PruningPlan
from slimformer.tasks import TaskData

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
CURVE_FILE = "curve.json"
CURVE_PNG = "curve.png"

State = TypeVar("State")  # what a pruning search prunes: a plan, weight masks, ...


@dataclass
class IterativeResult:
    """The pruning plan found, the dense and final dev scores, and one curve point per iteration.

    ``curve[0]`` is the dense model (iteration 0); each later point is one pruning step, with ``accepted`` False
    for the step that broke the bar (its plan is not the one returned).
    """

    plan: PruningPlan
    dense_score: float
    final_score: float
    curve: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_score": self.dense_score,
            "final_score": self.final_score,
            "curve": self.curve,
            "meta": self.meta,
            "plan": self.plan.to_dict(),
        }

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``plan.json``, ``curve.json`` and ``curve.png`` (score vs fraction of heads pruned) to ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.plan.save(out_dir / PLAN_FILE)
        curve = {k: v for k, v in self.to_dict().items() if k != "plan"}
        write_json_atomic(out_dir / CURVE_FILE, curve)
        metric = self.meta.get("metric", "score")
        plot_curve(
            [p["heads_pruned_fraction"] for p in self.curve],
            {f"dev {metric}": [p["score"] for p in self.curve]},
            out_dir / CURVE_PNG,
            xlabel="fraction of heads pruned",
            ylabel=metric,
            title=f"Iterative pruning ({self.meta.get('method', '')} importance)",
            hlines={f"{self.meta.get('keep_score', 0):g} x dense": self.meta.get("threshold", self.dense_score)},
        )
        return out_dir


@dataclass
class UntilResult(Generic[State]):
    """What :func:`prune_until_score` found: the last accepted state and its score, one curve point per step
    (``curve[0]`` is the unpruned start), the number of steps tried and why it stopped (``"nothing_left"``,
    ``"max_iterations"`` or ``"below_keep_score"``)."""

    state: State
    score: float
    curve: list[dict[str, Any]]
    iterations: int
    stop_reason: str


def prune_until_score(
    start: State,
    dense_score: float,
    threshold: float,
    *,
    has_more: Callable[[State], bool],
    propose: Callable[[State, int], tuple[State, dict[str, Any]]],
    score: Callable[[State], float],
    describe: Callable[[State], dict[str, Any]],
    max_iterations: int | None = None,
    on_step: Callable[[int, State, float, dict[str, Any]], None] | None = None,
    postfix: Callable[[State], dict[str, str]] | None = None,
    progress: bool = True,
    description: str = "pruning",
) -> UntilResult[State]:
    """The loop every prune-until-the-score-drops search shares: propose the next step from the last accepted
    state, score it, accept it if the score is still >= ``threshold``, else stop (the step that broke the bar is
    recorded in the curve but never returned).

    ``propose(state, iteration)`` returns the candidate and extra fields for its curve point; ``describe(state)``
    gives the fields every curve point has (how much is pruned); ``has_more(state)`` says whether anything is left
    to prune. ``on_step`` sees every scored step (for logging), ``postfix`` adds fields to the progress bar.
    """
    curve = [{"iteration": 0, **describe(start), "score": dense_score, "relative_score": 1.0, "accepted": True}]
    state, final, stop_reason, iteration = start, dense_score, "nothing_left", 0
    bar = tqdm(desc=description, unit="step", total=max_iterations, disable=not progress, leave=False)
    try:
        while has_more(state):
            if max_iterations is not None and iteration >= max_iterations:
                stop_reason = "max_iterations"
                break
            iteration += 1
            candidate, details = propose(state, iteration)
            value = score(candidate)
            accepted = value >= threshold
            point = {"iteration": iteration, **describe(candidate), "score": value}
            curve.append({**point, "relative_score": value / dense_score, "accepted": accepted, **details})
            if on_step is not None:
                on_step(iteration, candidate, value, details)
            bar.update(1)
            bar.set_postfix(score=f"{value:.4f}", **(postfix(candidate) if postfix is not None else {}))
            if not accepted:
                stop_reason = "below_keep_score"
                break
            state, final = candidate, value
    finally:
        bar.close()
    return UntilResult(state=state, score=final, curve=curve, iterations=iteration, stop_reason=stop_reason)


def _check_arguments(step: float, keep_score: float, method: str, max_iterations: int | None) -> None:
    if not isinstance(step, (int, float)) or math.isnan(step) or not 0.0 < step < 1.0:
        raise PlanError(
            f"step {step!r} is impossible: it is the fraction of the remaining heads pruned per iteration and must "
            "be between 0 and 1, exclusive (Michel et al. and Prasanna et al. use 0.1)."
        )
    if not isinstance(keep_score, (int, float)) or math.isnan(keep_score) or not 0.0 < keep_score <= 1.0:
        raise PlanError(
            f"keep_score {keep_score!r} is impossible: it is the fraction of the dense model's dev score the pruned "
            "model must keep, greater than 0 and at most 1 (for example 0.9 keeps 90%)."
        )
    if method not in METHODS:
        raise PlanError(f"Unknown importance method {method!r}; use one of: {', '.join(METHODS)}.")
    if max_iterations is not None and max_iterations < 1:
        raise PlanError(f"max_iterations must be at least 1 (or None for no limit), got {max_iterations}.")


def _eval_data(task_data: TaskData, max_samples: int | None, seed: int) -> TaskData:
    """The dev splits only (so the training split is not tokenized), each cut to a seeded subset if asked."""
    splits: dict[str, Dataset] = {}
    for name, dataset in task_data.dev.items():
        if max_samples is not None and max_samples < len(dataset):
            chosen = np.random.default_rng(seed).choice(len(dataset), size=max_samples, replace=False)
            dataset = dataset.select(sorted(int(i) for i in chosen))
        splits[name] = dataset
    if not splits:
        raise PlanError(f"Task {task_data.spec.name!r} from {task_data.source} has no dev split to evaluate on.")
    return TaskData(spec=task_data.spec, splits=splits, source=task_data.source)


def _evaluate(model: PreTrainedModel, evaluator: Evaluator) -> float:
    """The primary metric averaged over the dev splits, for the model as it is (masks included)."""
    return evaluator.score(model)


def _remaining_heads(plan: PruningPlan) -> list[tuple[int, int]]:
    return [(layer, head) for layer in plan.kept_layers for head in plan.kept_heads[layer]]


def _remaining_mlps(plan: PruningPlan) -> list[int]:
    return [layer for layer in plan.kept_layers if plan.kept_neurons[layer]]


def _next_plan(
    plan: PruningPlan, scores: ImportanceScores, step: float, prune_mlps: bool
) -> tuple[PruningPlan, list[tuple[int, int]], int | None]:
    """``plan`` with the lowest-scoring ``step`` fraction of its heads and (optionally) its weakest MLP masked."""
    heads = _remaining_heads(plan)
    n_heads = max(1, round(step * len(heads))) if heads else 0
    # ties go to the earlier layer and head, so that equal scores (e.g. all zero) prune deterministically
    ranked = sorted(heads, key=lambda lh: (float(scores.heads[lh[0]][lh[1]]), lh[0], lh[1]))
    pruned_heads = ranked[:n_heads]
    mlps = _remaining_mlps(plan) if prune_mlps else []
    pruned_mlp = min(mlps, key=lambda layer: (float(scores.mlps[layer]), layer)) if mlps else None
    kept_heads = [list(k) for k in plan.kept_heads]
    for layer, head in pruned_heads:
        kept_heads[layer].remove(head)
    kept_neurons = [list(k) for k in plan.kept_neurons]
    if pruned_mlp is not None:
        kept_neurons[pruned_mlp] = []
    new = PruningPlan(
        layout=plan.layout,
        kept_heads=kept_heads,
        kept_neurons=kept_neurons,
        dropped_layers=list(plan.dropped_layers),
        model_type=plan.model_type,
        meta=dict(plan.meta),
    )
    return new, pruned_heads, pruned_mlp


def iterative_prune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task_data: TaskData,
    *,
    step: float = 0.1,
    prune_mlps: bool = True,
    keep_score: float = 0.9,
    method: str = "gradient",
    n_examples: int | None = 256,
    batch_size: int = 32,
    max_length: int = 128,
    eval_max_samples: int | None = None,
    eval_batch_size: int = 64,
    label_free: bool = False,
    normalize: bool = True,
    seed: int = 0,
    max_iterations: int | None = None,
    progress: bool = True,
) -> IterativeResult:
    """Prune heads (and MLPs) iteratively by importance while the dev score stays >= ``keep_score`` x dense.

    Importance is computed on a seeded sample of ``n_examples`` training rows (the dev split when the task has no
    training split; ``meta["importance_split"]`` says which) in batches of ``batch_size``, re-scored every
    iteration with the current mask in place. The score is the task's primary metric averaged over its dev
    splits (``eval_max_samples`` rows of each, if given). Stops when the score falls below the bar (returning
    the previous plan), when nothing is left to prune, or after ``max_iterations``. The model is not changed.
    """
    _check_arguments(step, keep_score, method, max_iterations)
    started = time.perf_counter()
    plan = PruningPlan.keep_all(model)
    total_heads = sum(plan.layout.heads)
    total_mlps = len(_remaining_mlps(plan))

    eval_data = _eval_data(task_data, eval_max_samples, seed)
    # the dev data is tokenized and batched once, then scored after every step
    evaluator = Evaluator(tokenizer, eval_data, max_length=max_length, batch_size=eval_batch_size)
    dense_score = _evaluate(model, evaluator)
    if not dense_score > 0:
        raise PlanError(
            f"The unpruned model scores {dense_score:g} ({task_data.spec.primary_metric}) on the dev split, so "
            f"'keep {keep_score:g} of the dense score' means nothing. Fine-tune the model on the task first."
        )
    threshold = keep_score * dense_score

    has_train = task_data.train is not None
    sample = importance_sample(
        tokenizer, task_data, n_examples=n_examples, batch_size=batch_size, max_length=max_length, seed=seed
    )
    importance_split = sample.description["split"]
    if not has_train:
        logger.warning(
            "%s has no train split: importance is computed on %s, the split the pruned model is evaluated on",
            task_data.spec.name,
            importance_split,
        )

    def describe(current: PruningPlan) -> dict[str, Any]:
        heads_pruned = total_heads - len(_remaining_heads(current))
        return {
            "heads_pruned": heads_pruned,
            "heads_pruned_fraction": heads_pruned / total_heads if total_heads else 0.0,
            "mlps_pruned": total_mlps - len(_remaining_mlps(current)),
        }

    def propose(current: PruningPlan, iteration: int) -> tuple[PruningPlan, dict[str, Any]]:
        scores = compute_importance(
            model,
            sample.batches,
            method=method,
            label_free=label_free,
            normalize=normalize,
            base_gates=plan_gates(model, current),
            seed=seed + iteration,  # only the random baseline draws; a new draw per step
            progress=False,
        )
        candidate, pruned_heads, pruned_mlp = _next_plan(current, scores, step, prune_mlps)
        return candidate, {"pruned_heads": [list(lh) for lh in pruned_heads], "pruned_mlp": pruned_mlp}

    def score(candidate: PruningPlan) -> float:
        with masked(model, candidate):
            return _evaluate(model, evaluator)

    def log(iteration: int, candidate: PruningPlan, score: float, details: dict[str, Any]) -> None:
        logger.info(
            "iteration %d: %d heads and MLP %s pruned -> %s %.4f (%.1f%% of dense)",
            iteration,
            len(details["pruned_heads"]),
            details["pruned_mlp"],
            task_data.spec.primary_metric,
            score,
            100 * score / dense_score,
        )

    found = prune_until_score(
        plan,
        dense_score,
        threshold,
        has_more=lambda current: bool(_remaining_heads(current) or (prune_mlps and _remaining_mlps(current))),
        propose=propose,
        score=score,
        describe=describe,
        max_iterations=max_iterations,
        on_step=log,
        progress=progress,
        description="iterative pruning",
    )
    plan, final_score, curve = found.state, found.score, found.curve
    iteration, stop_reason = found.iterations, found.stop_reason

    meta = {
        "method": method,
        "step": step,
        "prune_mlps": prune_mlps,
        "keep_score": keep_score,
        "threshold": threshold,
        "metric": task_data.spec.primary_metric,
        "task": task_data.spec.name,
        "data_source": task_data.source,
        "importance_split": importance_split,
        "importance_sample": sample.description,
        "eval_splits": {name: len(dataset) for name, dataset in eval_data.splits.items()},
        "label_free": label_free,
        "normalize": normalize,
        "seed": seed,
        "max_iterations": max_iterations,
        "iterations": iteration,
        "stop_reason": stop_reason,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if not has_train:
        meta["note"] = f"no train split: importance computed on {importance_split}, also used for evaluation"
    plan.meta = {
        **plan.meta,
        "made_by": "iterative_prune",
        "dense_score": dense_score,
        "final_score": final_score,
        **{k: meta[k] for k in ("method", "step", "prune_mlps", "keep_score", "metric", "task", "iterations")},
    }
    return IterativeResult(plan=plan, dense_score=dense_score, final_score=final_score, curve=curve, meta=meta)


__all__ = ["IterativeResult", "UntilResult", "iterative_prune", "prune_until_score"]
