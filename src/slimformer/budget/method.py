"""Handlers of :class:`~slimformer.configs.FlopsBudget` and :class:`~slimformer.configs.LatencyBudget`:
retraining-free pruning to a budget after Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for
Transformers"): Fisher of the masks on a calibration set -> mask search under the constraint -> mask
rearrangement per layer -> layer-wise least-squares refit (all kept output/down-projection weights by default, as
in ZipLM, Kurtic et al. 2023; Kwon's one scale per unit with ``tune="scales"``), folded into the weights. The front
door then removes what the plan prunes, so the result is an ordinary, physically smaller model.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

from slimformer.arch import get_spec
from slimformer.budget.fisher import (
    MaskGradients,
    calibration_mask_gradients,
    collect_mask_gradients,
    fisher_autocast,
)
from slimformer.budget.search import UnitCosts, rearrange, search_masks
from slimformer.budget.stream import DenseTargets
from slimformer.budget.tune import fold_scales, reconstruct_weights, tune_masks
from slimformer.configs import FlopsBudget, LatencyBudget, PruneContext, PruneOutcome, parse_memory, register_handler
from slimformer.embedding import is_sentence_embedder
from slimformer.errors import SlimformerError
from slimformer.gradients import is_regression
from slimformer.measure.memory import peak_resident_mib
from slimformer.prune.apply import silence
from slimformer.prune.plan import Layout, PruningPlan

# what tune does after the search: its description in the report
TUNING = {
    "weights": " + least-squares reconstruction of the output/down projections (ZipLM-style, all weights)",
    "scales": " + least-squares mask tuning (Kwon et al., one scale per unit)",
    "none": "",
}


def plan_for_budget(
    model,
    gradients: MaskGradients,
    *,
    budget_flops: float | None = None,
    budget_latency: float | None = None,
    seq_len: int = 128,
    latency_table=None,
    fisher_scale: str = "global",
    neuron_weight: float = 1.0,
    alive: PruningPlan | None = None,
) -> tuple[PruningPlan, dict[str, Any]]:
    """The Fisher mask search under a FLOPs budget, or under a latency budget predicted by a lookup table.

    ``fisher_scale="layer"`` scales each layer's head and neuron Fisher to sum 1 before the search, so that the
    search trades units across layers by their importance within their layer: a more even allocation. On
    sentence-embedding models, whose probe Fisher is far smaller in early layers, it keeps more of the embeddings
    at the same FLOPs (MiniLM-L6 at 50%: STS-B 85.8 instead of 84.4, retrieval nDCG@10 73.8 instead of 71.1).

    ``neuron_weight`` multiplies the neurons' Fisher (after the scaling) against the heads': below 1, removing
    neurons looks cheaper, as it is once the least-squares refit has recovered most of a pruned FFN's output.

    For latency, the FLOPs search is run at the largest FLOPs fraction whose plan the table predicts to meet the
    latency budget (bisection), since latency is monotone in the units kept but not linear in them. ``alive``: only
    the units this earlier round's plan keeps are candidates (stepwise pruning).
    """
    layout = Layout.of(model)
    costs = UnitCosts.flops(layout, seq_len)
    heads, neurons = gradients.head_fisher(), gradients.neuron_fisher()
    if fisher_scale == "layer":
        totals = [h.sum() + n.sum() for h, n in zip(heads, neurons, strict=True)]
        heads = [h / total if total > 0 else h for h, total in zip(heads, totals, strict=True)]
        neurons = [n / total if total > 0 else n for n, total in zip(neurons, totals, strict=True)]
    if neuron_weight != 1.0:
        neurons = [neuron_weight * n for n in neurons]
    model_type = model.config.model_type
    if budget_flops is not None:
        return search_masks(layout, heads, neurons, budget_flops, costs, model_type=model_type, alive=alive), {}
    if latency_table is None:
        raise SlimformerError("A latency budget needs a latency lookup table.")
    dense_ms = latency_table.model_ms(layout)
    allowed_ms = budget_latency * dense_ms
    low, high = 1e-4, 1.0
    best = search_masks(layout, heads, neurons, low, costs, model_type=model_type, alive=alive)
    if latency_table.model_ms(best.result_layout()) > allowed_ms:
        raise SlimformerError(
            f"A latency budget of {budget_latency:g} cannot be met: even an almost empty encoder is predicted to "
            f"take {latency_table.model_ms(best.result_layout()):.1f} ms of the dense {dense_ms:.1f} ms (embeddings "
            "and classifier stay). Choose a larger budget."
        )
    for _ in range(30):
        middle = (low + high) / 2
        plan = search_masks(layout, heads, neurons, middle, costs, model_type=model_type, alive=alive)
        if latency_table.model_ms(plan.result_layout()) <= allowed_ms:
            low, best = middle, plan
        else:
            high = middle
    predicted = latency_table.model_ms(best.result_layout())
    best.meta.update(budget_latency=budget_latency, flops_fraction_found=low)
    return best, {"predicted_dense_ms": dense_ms, "predicted_pruned_ms": predicted, "flops_fraction": low}


def last_layer_rows(model) -> str:
    """The rows of the last layer that reach the model's output: ``"first"`` when only the first token's final
    state is read (a sequence-classification head, or an embedding model that pools the [CLS] token), else
    ``"all"``. The refit fits the last layer on those rows only: on SST-2, STS-B and the 48-class article task
    at 40% of the FLOPs +0.46 / +0.31 / +0.24 points over fitting every token (bench/results/refit_rows.md)."""
    if is_sentence_embedder(model):
        return "first" if model.pooling.mode == "cls" else "all"
    return "first" if get_spec(model).head_reads_first_token else "all"


def default_neuron_weight(model, config: FlopsBudget | LatencyBudget) -> float:
    """0.5 for a sentence-embedding model refit by least squares: all-MiniLM-L6-v2 at 50% of the FLOPs kept
    retrieval nDCG@10 1.2 points higher and STS-B 0.2 higher over 3 calibration seeds, its plans keeping 49 of
    72 heads instead of 29 (bench/results/embedding_diagnosis.md); 1 for task models, where the same weight moved
    SST-2 and STS-B by less than the seeds' spread and cost the 48-class task 0.65 points at 50%
    (bench/results/head_neuron_balance.md)."""
    return 0.5 if is_sentence_embedder(model) and config.tune == "weights" else 1.0


# the refit's token weighting for sentence-embedding models (see default_token_weighting)
EMBEDDING_TOKEN_WEIGHTING = 0.5


def default_token_weighting(model, config: FlopsBudget | LatencyBudget) -> float:
    """``EMBEDDING_TOKEN_WEIGHTING`` (half uniform, half by each token's sensitivity) for a sentence-embedding model
    refit by least squares: all-MiniLM-L6-v2 at 50% of the FLOPs, 3 calibration seeds, STS-B 85.90 -> 86.39 and
    retrieval nDCG@10 75.97 -> 76.26 (by sensitivity alone: 86.70 / 76.07); at 40% the same direction; on
    all-mpnet-base-v2 at 50% (one seed) 88.22 -> 88.04 and 79.93 -> 79.63, within MiniLM's seed spread
    (bench/results/embedding_token_weighting.md). 0 for task models: on the 48-class task weighting by sensitivity
    alone cost 0.3 points at 50% and 40%, half of it moved the score within the seeds' spread
    (bench/results/many_class_token_weighting.md)."""
    return EMBEDDING_TOKEN_WEIGHTING if is_sentence_embedder(model) and config.tune == "weights" else 0.0


# from this many classes on, the budget pruner's Fisher is the model's own (see default_fisher)
MANY_CLASSES = 9


def default_unit_choice(model, config: FlopsBudget | LatencyBudget) -> str:
    """``"refit"`` for a sentence-embedding model refit by least squares, whose objective is the refit's own
    (keep the dense model's outputs): on all-MiniLM-L6-v2 at 50% of the FLOPs, over 3 calibration seeds, retrieval
    nDCG@10 76.06 instead of 74.88 and STS-B 85.87 instead of 85.94; at 40% (one seed) 74.90 / 85.80 instead of
    73.39 / 85.39 (bench/results/embedding_diagnosis.md). ``"fisher"`` for task models: on the 48-class task it
    moved the score within the seeds' spread (bench/results/many_class_diagnosis.md) at twice the refit time."""
    return "refit" if is_sentence_embedder(model) and config.tune == "weights" else "fisher"


def default_fisher(model) -> str:
    """``"model"`` for a classifier with many classes (``MANY_CLASSES`` or more), ``"empirical"`` otherwise.

    A converged classifier predicts its training examples with probability near 1, so their cross-entropy gradients
    (the empirical Fisher) nearly vanish and the few examples it is unsure of decide the ranking; the Fisher of the
    model's own distribution weighs every example by all its classes. On the 48-class article task it kept 0.84
    points more at 40% of the FLOPs (-2.68 +- 0.10 instead of -3.52 +- 0.43, 3 calibration seeds) and the same at
    50% (bench/results/many_class_diagnosis.md). Binary and regression tasks keep the empirical Fisher their
    defaults were tuned with."""
    if is_sentence_embedder(model):
        return "empirical"  # an embedding model's loss is its own probe either way
    classes = int(getattr(model.config, "num_labels", 2) or 2)
    return "model" if classes >= MANY_CLASSES and not is_regression(model) else "empirical"


def fisher_loss(gradients: MaskGradients, plan: PruningPlan) -> float:
    """Sum over layers of 1_P^T I 1_P: the second-order loss-increase estimate the rearrangement minimises."""
    pairs = [
        *zip(gradients.heads, plan.kept_heads, strict=True),
        *zip(gradients.neurons, plan.kept_neurons, strict=True),
    ]
    return sum(MaskGradients.pruned_loss(grads, kept) for grads, kept in pairs)


def _budget_prune(model, tokenizer, config: FlopsBudget | LatencyBudget, ctx: PruneContext) -> PruneOutcome:
    max_memory = parse_memory(config.max_memory)
    rows = last_layer_rows(model) if config.tune == "weights" else None
    weighting = default_token_weighting(model, config) if config.token_weighting is None else config.token_weighting
    # the Fisher's forward passes are the dense model's: they record the refit's targets, so the refit runs no
    # dense model of its own (MiniLM-L6 on 2,048 STS-B pairs: 12 s of 59 saved; bench/results/budget_scaling.md)
    recorder = (
        DenseTargets(
            model,
            last_layer_rows=rows,
            head=config.refit_head,
            max_memory=max_memory,
            token_weighting=weighting,
        )
        if config.tune == "weights"
        else nullcontext()
    )
    with recorder as recorded:
        return _budget_rounds(model, tokenizer, config, ctx, recorded, rows, max_memory)


def _budget_rounds(model, tokenizer, config, ctx: PruneContext, recorded, rows, max_memory) -> PruneOutcome:
    seconds: dict[str, float] = {}
    peak_mib: dict[str, float | None] = {}  # the process's high-water mark after each phase: which one set it
    clock = time.perf_counter()

    def lap(name: str) -> None:  # phases repeated by stepwise pruning add up
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock, 2)
        peak = peak_resident_mib()
        peak_mib[name] = round(peak, 1) if peak is not None else None
        clock = now

    autocast = fisher_autocast(model, config.fisher_precision)
    fisher = config.fisher or default_fisher(model)
    unit_choice = config.unit_choice or default_unit_choice(model, config)
    # least squares, like the Fisher, does not depend on batching: the refit reuses the length-grouped sample
    gradients, sample = calibration_mask_gradients(
        model,
        tokenizer,
        ctx.data,
        n_examples=config.calibration_examples,
        batch_size=config.batch_size,
        max_length=ctx.max_length,
        seed=config.seed,
        label_free=config.label_free,
        record=recorded,
        progress=ctx.progress,
        autocast=autocast,
        fisher=fisher,
    )
    lap("fisher")
    fisher_scale = config.fisher_scale or ("layer" if is_sentence_embedder(model) else "global")
    neuron_weight = default_neuron_weight(model, config) if config.neuron_weight is None else config.neuron_weight
    table = None
    latency = isinstance(config, LatencyBudget)
    if latency:
        from slimformer.budget.latency_table import table_for_config

        table = table_for_config(model, config, ctx)
        lap("latency_table")
    plan, rounds = None, []
    for step in range(1, config.steps + 1):
        if plan is not None:  # the last round's model, its pruned units silenced: what the next Fisher measures
            silence(model, plan)
            gradients = collect_mask_gradients(
                model,
                sample.batches,
                label_free=config.label_free,
                record=recorded,
                progress=ctx.progress,
                autocast=autocast,
                fisher=fisher,
            )
            lap("fisher")
        fraction = config.fraction ** (step / config.steps)
        alive = plan
        plan, latency_info = plan_for_budget(
            model,
            gradients,
            budget_flops=None if latency else fraction,
            budget_latency=fraction if latency else None,
            seq_len=config.seq_len,
            latency_table=table,
            fisher_scale=fisher_scale,
            neuron_weight=neuron_weight,
            alive=alive,
        )
        lap("search")
        searched = plan
        if config.rearrange and unit_choice == "fisher":  # a refit choice overrides what it would move
            plan = rearrange(plan, gradients.heads, gradients.neurons, alive=alive)
        lap("rearrange")
        loss_estimate = {"searched": fisher_loss(gradients, searched), "rearranged": fisher_loss(gradients, plan)}
        tuning = None
        if config.tune == "weights":
            tuning = reconstruct_weights(
                model,
                plan,
                sample.batches,
                fit_head=config.refit_head,
                last_layer_rows=rows,
                max_memory=max_memory,
                dense=recorded,
                choose_units=unit_choice == "refit",
                candidates=alive,
                progress=ctx.progress,
            )
            plan = tuning.plan
        elif config.tune == "scales":
            gates, tuning = tune_masks(model, plan, sample.batches, max_memory=max_memory, progress=ctx.progress)
            fold_scales(model, gates)
        lap("tune")
        rounds.append({"fraction": fraction, "fisher_loss_estimate": loss_estimate})
    details = {
        "description": "Kwon et al. 2022: Fisher mask search"
        + (" + rearrangement" if config.rearrange and unit_choice == "fisher" else "")
        + (" + units chosen by the refit (structured OBS, ZipLM)" if unit_choice == "refit" else "")
        + TUNING[config.tune]
        + (f", in {config.steps} steps (Fisher measured again on the pruned model)" if config.steps > 1 else ""),
        "budget": {config.method: config.fraction, "seq_len": config.seq_len, **latency_info},
        "fisher": fisher,
        "unit_choice": unit_choice,
        "fisher_scale": fisher_scale,
        "neuron_weight": neuron_weight,
        "fisher_precision": "float32" if autocast is None else str(autocast).removeprefix("torch."),
        "last_layer_rows": rows,
        "token_weighting": recorded.token_weighting if recorded is not None else None,
        # an embedding model's calibration reads texts only, whatever the option says
        "calibration": {**sample.description, "label_free": config.label_free or is_sentence_embedder(model)},
        "fisher_loss_estimate": loss_estimate,
        "steps": rounds if config.steps > 1 else None,
        "tuning": tuning.layers if tuning else None,
        "refit_memory": tuning.memory if tuning else None,
        "peak_memory_mib": peak_mib,
    }
    return PruneOutcome(plan=plan, details=details, seconds=seconds)


register_handler(FlopsBudget)(_budget_prune)
register_handler(LatencyBudget)(_budget_prune)
