"""Retraining-free pruning to a FLOPs or latency budget (after Kwon et al. 2022, "A Fast Post-Training Pruning
Framework for Transformers"): Fisher of the masks on a calibration set -> mask search under the constraint ->
mask rearrangement per layer -> layer-wise least-squares reconstruction (all kept output/down-projection
weights by default, as in ZipLM; Kwon's one scale per unit with tune="scales") -> folded into the weights and
physically removed, so the result is an ordinary pruned model (slimformer's format), really smaller and faster.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimformer.budget.fisher import collect_mask_gradients
from slimformer.budget.search import UnitCosts, pruned_fisher, rearrange, search_masks
from slimformer.budget.tune import fold_scales, reconstruct_weights, tune_masks
from slimformer.errors import SlimformerError
from slimformer.evaluation import evaluate_model, headline_score
from slimformer.folders import save_model_folder
from slimformer.importance import importance_sample
from slimformer.measure import count_parameters, flops, measure_latency
from slimformer.models import load_model
from slimformer.prune.apply import masked, remove
from slimformer.prune.plan import Layout, PruningPlan
from slimformer.tasks import TaskData, load_task

# what --tune does after the search: its description in the report
TUNING = {
    "weights": " + least-squares reconstruction of the output/down projections (ZipLM-style, all weights)",
    "scales": " + least-squares mask tuning (Kwon et al., one scale per unit)",
    "none": "",
}


@dataclass
class BudgetResult:
    """The pruned model (in memory), where it was saved, its plan and the report written as metrics.json."""

    out_dir: Path | None
    plan: PruningPlan
    report: dict[str, Any] = field(default_factory=dict)
    model: Any = None


def _check_budget(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise SlimformerError(
            f"--budget-{name} {value:g} is impossible: it is the fraction of the dense model's {name} to keep, "
            "in (0, 1] (for example 0.5 for half)."
        )


def plan_for_budget(
    model,
    gradients,
    *,
    budget_flops: float | None = None,
    budget_latency: float | None = None,
    seq_len: int = 128,
    latency_table=None,
) -> tuple[PruningPlan, dict[str, Any]]:
    """The Fisher mask search under a FLOPs budget, or under a latency budget predicted by a lookup table.

    For latency, the FLOPs search is run at the largest FLOPs fraction whose plan the table predicts to meet the
    latency budget (bisection), since latency is monotone in the units kept but not linear in them.
    """
    layout = Layout.of(model)
    costs = UnitCosts.flops(layout, seq_len)
    heads, neurons = gradients.head_fisher(), gradients.neuron_fisher()
    model_type = model.config.model_type
    if budget_flops is not None:
        return search_masks(layout, heads, neurons, budget_flops, costs, model_type=model_type), {}
    if latency_table is None:
        raise SlimformerError("A latency budget needs a latency lookup table.")
    dense_ms = latency_table.model_ms(layout)
    allowed_ms = budget_latency * dense_ms
    low, high = 1e-4, 1.0
    best = search_masks(layout, heads, neurons, low, costs, model_type=model_type)
    if latency_table.model_ms(best.result_layout()) > allowed_ms:
        raise SlimformerError(
            f"--budget-latency {budget_latency:g} cannot be met: even an almost empty encoder is predicted to take "
            f"{latency_table.model_ms(best.result_layout()):.1f} ms of the dense {dense_ms:.1f} ms (embeddings "
            "and classifier stay). Choose a larger budget."
        )
    for _ in range(30):
        middle = (low + high) / 2
        plan = search_masks(layout, heads, neurons, middle, costs, model_type=model_type)
        if latency_table.model_ms(plan.result_layout()) <= allowed_ms:
            low, best = middle, plan
        else:
            high = middle
    predicted = latency_table.model_ms(best.result_layout())
    best.meta.update(budget_latency=budget_latency, flops_fraction_found=low)
    return best, {"predicted_dense_ms": dense_ms, "predicted_pruned_ms": predicted, "flops_fraction": low}


def _fisher_loss(gradients, plan: PruningPlan) -> float:
    """Sum over layers of 1_P^T I 1_P: the second-order loss-increase estimate the rearrangement minimises."""
    pairs = [
        *zip(gradients.heads, plan.kept_heads, strict=True),
        *zip(gradients.neurons, plan.kept_neurons, strict=True),
    ]
    return sum(pruned_fisher(gradients.block(grads), kept) for grads, kept in pairs)


def budget_prune(
    model: str | os.PathLike[str],
    task: str | TaskData,
    out_dir: str | os.PathLike[str] | None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    budget_flops: float | None = None,
    budget_latency: float | None = None,
    n_calibration: int = 2048,
    batch_size: int = 32,
    max_length: int = 128,
    seq_len: int = 128,
    label_free: bool = False,
    rearrange_masks: bool = True,
    tune: str = "weights",
    evaluate: bool = True,
    measure: bool = True,
    latency_batch_size: int = 32,
    threads: int = 2,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> BudgetResult:
    """Prune ``model`` without retraining so that it keeps ``budget_flops`` of its encoder FLOPs (counted at
    ``seq_len`` tokens) or ``budget_latency`` of its latency (batch ``latency_batch_size`` x ``seq_len``,
    ``threads`` CPU threads), and save it to ``out_dir`` with its plan and a report of scores, sizes, measured
    latency and the time each phase took.
    """
    if (budget_flops is None) == (budget_latency is None):
        raise SlimformerError("Give exactly one of --budget-flops and --budget-latency.")
    if tune not in TUNING:
        raise SlimformerError(f"Unknown --tune {tune!r}: choose one of {', '.join(TUNING)}.")
    _check_budget("flops", budget_flops)
    _check_budget("latency", budget_latency)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and out_dir.exists() and not overwrite:
        raise SlimformerError(f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite.")
    phases: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = round(now - clock, 2)
        clock = now

    data = task if isinstance(task, TaskData) else load_task(task, data_dir, seed=seed)
    loaded = load_model(model, data.spec)
    net, tokenizer = loaded.model, loaded.tokenizer
    lap("load")
    # length-grouped batches: per-example Fisher and least squares do not depend on batching, padding costs time
    sample = importance_sample(
        tokenizer,
        data,
        n_examples=n_calibration,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        length_grouped=True,
    )
    gradients = collect_mask_gradients(net, sample.batches, label_free=label_free, progress=progress)
    lap("fisher")
    table, latency_info = None, {}
    if budget_latency is not None:
        from slimformer.budget.latency_table import latency_table

        table = latency_table(
            net, cache_dir=cache_dir, batch_size=latency_batch_size, seq_len=seq_len, threads=threads, progress=progress
        )
        lap("latency_table")
    plan, latency_info = plan_for_budget(
        net,
        gradients,
        budget_flops=budget_flops,
        budget_latency=budget_latency,
        seq_len=seq_len,
        latency_table=table,
    )
    lap("search")
    searched = plan
    if rearrange_masks:
        plan = rearrange(plan, gradients.heads, gradients.neurons)
    lap("rearrange")
    fisher_loss = {"searched": _fisher_loss(gradients, searched), "rearranged": _fisher_loss(gradients, plan)}
    dense = copy.deepcopy(net) if (evaluate or measure) else None
    tuning = None
    if tune == "weights":
        tuning = reconstruct_weights(net, plan, sample.batches, progress=progress)
    elif tune == "scales":
        gates, tuning = tune_masks(net, plan, sample.batches, progress=progress)
        fold_scales(net, gates)
    lap("tune")
    remove(net, plan)
    lap("remove")
    pruning_seconds = round(sum(phases.values()), 2)

    report: dict[str, Any] = {
        "task": data.spec.name,
        "model": str(model),
        "method": "Kwon et al. 2022: Fisher mask search"
        + (" + rearrangement" if rearrange_masks else "")
        + TUNING[tune],
        "budget": {"flops": budget_flops, "latency": budget_latency, "seq_len": seq_len, **latency_info},
        "calibration": {**sample.description, "label_free": label_free},
        "summary": plan.summary(dense if dense is not None else net, seq_len=seq_len) if dense is not None else None,
        "fisher_loss_estimate": fisher_loss,
        "tuning": tuning.layers if tuning else None,
        "params": count_parameters(net).as_dict(),
        "encoder_flops": {
            "dense": flops(dense, seq_len=seq_len).encoder if dense is not None else None,
            "pruned": flops(net, seq_len=seq_len).encoder,
        },
        "pruning_seconds": pruning_seconds,
        "phases_seconds": dict(phases),
    }
    if evaluate:
        metric = data.spec.primary_metric
        dense_eval = evaluate_model(dense, tokenizer, data, max_length=max_length, progress=progress)
        pruned_eval = evaluate_model(net, tokenizer, data, max_length=max_length, progress=progress)
        report["eval"] = {"dense": dense_eval, "pruned": pruned_eval}
        report["score"] = {
            "metric": metric,
            "dense": headline_score(dense_eval, metric),
            "pruned": headline_score(pruned_eval, metric),
        }
        if tune == "none":
            with masked(dense, plan):
                report["eval"]["masked"] = evaluate_model(
                    dense, tokenizer, data, max_length=max_length, progress=progress
                )
        lap("evaluate")
    if measure:
        stats = {}
        for name, candidate in (("dense", dense), ("pruned", net), ("dense_again", dense)):
            stats[name] = measure_latency(
                candidate, batch_size=latency_batch_size, seq_len=seq_len, threads=threads, repeats=10, warmup=3
            ).as_dict()
        dense_ms = min(stats["dense"]["median_ms"], stats["dense_again"]["median_ms"])
        report["latency"] = {
            **stats,
            "speedup": dense_ms / stats["pruned"]["median_ms"],
        }
        lap("measure")
    report["phases_seconds"] = dict(phases)
    if out_dir is not None:
        save_model_folder(
            net,
            tokenizer,
            out_dir,
            plan=plan,
            overwrite=overwrite,
            json_files={"plan.json": plan.to_dict(), "metrics.json": report},
        )
    return BudgetResult(out_dir=out_dir, plan=plan, report=report, model=net)
