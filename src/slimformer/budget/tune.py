"""Layer-wise least-squares reconstruction after the mask search, folded into the weights (Kwon et al. 2022,
"A Fast Post-Training Pruning Framework for Transformers", §4.3).

All supported families are post-LN, so a sub-layer's output before its LayerNorm is ``x + b + P u``: the residual
input, the output projection's bias and the projection P (attention output or FFN down) applied to the kept
units ``u`` (heads' contexts or neurons' activations). The target is the dense model's own sub-layer output (on
its own hidden states), so the fit also corrects errors that earlier pruned layers pass on. Layers are fitted in
order, attention before FFN, each on inputs that already include the fitted earlier parts. Two ways:

- :func:`tune_masks` (Kwon et al.): one real-valued scale m per kept unit; the output is linear in m, so m solves
  the normal equations (A^T A) m = A^T r with ``torch.linalg.lstsq``; the scales are then multiplied into the
  projection's columns (:func:`fold_scales`).
- :func:`reconstruct_weights` (slimformer's default): every weight of the kept columns, and the bias, is free,
  as in the structured OBS-style weight updates of ZipLM (Kurtic et al. 2023). It is the same kind of
  least-squares problem with more unknowns (hidden x kept instead of kept), still solved in closed form, and on
  MiniLM-L6 it keeps SST-2 accuracy at 40% of the FLOPs where scales lose 5 points (bench/results/budget.md).

Either way the result is an ordinary physically pruned model in slimformer's format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimformer.arch import LayerView, layer_views
from slimformer.budget.stream import (
    DenseTargets,
    MemoryBudget,
    SublayerBatch,
    head_columns,
    output_layer,
    projection,
    walk_sublayers,
)
from slimformer.gates import Gates
from slimformer.prune.apply import plan_gates
from slimformer.prune.plan import PruningPlan


@dataclass
class TuningReport:
    """Per sub-layer: relative reconstruction error with all-ones masks and with the tuned masks; ``memory``: what
    the streamed activations took (peak bytes in RAM, bytes spilled to disk, the budget)."""

    layers: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    plan: PruningPlan | None = None  # the plan applied: the input plan, or the units ``choose_units`` chose


def _setup(model: PreTrainedModel, plan: PruningPlan) -> tuple[torch.device, Gates]:
    """The model's device and the plan's 0/1 gates on it."""
    device = next(model.parameters()).device
    gates = plan_gates(model, plan)
    return device, Gates(heads=[g.to(device) for g in gates.heads], neurons=[g.to(device) for g in gates.neurons])


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Per-batch products in float32 (float64 for a float64 model); they are summed over batches in float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _memory_report(report: TuningReport):
    def record(budget: MemoryBudget) -> None:
        report.memory = {"peak_bytes_in_ram": budget.peak, "bytes_spilled": budget.spilled, "limit": budget.limit}

    return record


def tune_masks(
    model: PreTrainedModel,
    plan: PruningPlan,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    damping: float = 1e-2,
    clamp: float = 10.0,
    target: str = "global",
    max_memory: int | None = None,
    progress: bool = True,
) -> tuple[Gates, TuningReport]:
    """Real-valued gates for ``plan`` (kept units scaled, pruned units 0) that best reconstruct each sub-layer.

    ``target="global"``: the dense model's own sub-layer output; ``"local"``: the dense sub-layer applied to the
    pruned model's own input (every unit at 1), which needs no dense stream."""
    device, gates = _setup(model, plan)
    report = TuningReport()
    was_training = model.training
    model.eval()
    steps = walk_sublayers(
        model,
        gates,
        batches,
        device,
        dense_targets=target == "global",
        max_memory=max_memory,
        on_budget=_memory_report(report),
    )
    try:
        bar = tqdm(
            total=2 * len(plan.kept_heads), desc="mask tuning (least squares)", disable=not progress, leave=False
        )
        for view, part, source in steps:
            bar.update()
            kept = plan.kept_heads[view.index] if part == "attention" else plan.kept_neurons[view.index]
            if not kept:
                continue
            gram, rhs, residual_sq, signal_sq = _normal_equations(view, part, kept, source())
            ridge = damping * float(gram.diagonal().mean().clamp_min(1e-12))
            # ridge towards the untuned masks (all ones), not towards zero
            system = gram + ridge * torch.eye(len(kept), dtype=gram.dtype)
            scales = torch.linalg.lstsq(system, (rhs + ridge).unsqueeze(1)).solution.squeeze(1)
            scales = scales.clamp(-clamp, clamp)
            ones = torch.ones(len(kept), dtype=gram.dtype)
            error_ones = float(ones @ gram @ ones - 2 * ones @ rhs + residual_sq)
            error_tuned = float(scales @ gram @ scales - 2 * scales @ rhs + residual_sq)
            if error_tuned >= error_ones:  # never make a sub-layer worse on the calibration set
                scales = ones
                error_tuned = error_ones
            gate = gates.heads[view.index] if part == "attention" else gates.neurons[view.index]
            gate[kept] = scales.to(gate.dtype).to(device)  # later sub-layers see the tuned scales
            report.layers.append(
                {
                    "layer": view.index,
                    "part": part,
                    "units": len(kept),
                    "relative_error_ones": error_ones / max(signal_sq, 1e-30),
                    "relative_error_tuned": error_tuned / max(signal_sq, 1e-30),
                    "scale_min": float(scales.min()),
                    "scale_max": float(scales.max()),
                }
            )
        bar.close()
    finally:
        steps.close()
        model.train(was_training)
    return gates, report


def _normal_equations(
    view: LayerView, part: str, kept: list[int], data: Iterable[SublayerBatch]
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """A^T A, A^T r, r^T r (float64) and the squared norm of the targets (for a relative error), accumulated
    over the calibration batches of one sub-layer."""
    n = len(kept)
    gram = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, dtype=torch.float64)
    residual_sq = signal_sq = 0.0
    index = torch.tensor(kept, dtype=torch.long)
    proj = projection(view, part)
    dtype = _compute_dtype(proj.weight)  # the activations come in the model's dtype too
    weight = proj.weight.detach().to("cpu", dtype)  # [hidden, width]
    bias = proj.bias.detach().to("cpu", dtype) if proj.bias is not None else 0.0
    for batch in data:
        units, x = batch.units.to("cpu", dtype), batch.x.to("cpu", dtype)
        # global: the dense model's own sub-layer output, which also corrects earlier layers' drift;
        # local: the dense sub-layer applied to the pruned model's own input (every unit at 1)
        residual = units @ weight.T if batch.target is None else batch.target.to("cpu", dtype) - x - bias
        if part == "attention":
            size = view.head_size
            columns = head_columns(index, size)
            context = batch.kept_units(columns).to("cpu", dtype).reshape(units.shape[0], -1, size)  # [tokens, n, size]
            w = weight.reshape(weight.shape[0], -1, size)[:, index]  # [hidden, n, size]
            terms = torch.einsum("tns,dns->tnd", context, w)  # each kept head's output, [tokens, n, hidden]
            gram += torch.einsum("tnd,tmd->nm", terms, terms).double()
            rhs += torch.einsum("tnd,td->n", terms, residual).double()
        else:
            act = batch.kept_units(index).to("cpu", dtype)  # [tokens, n]
            w = weight[:, index]  # [hidden, n]
            gram += ((act.T @ act) * (w.T @ w)).double()
            rhs += (act * (residual @ w)).sum(0).double()
        residual_sq += float(residual.pow(2).sum(dtype=torch.float64))
        signal = residual if batch.target is None else batch.target
        signal_sq += float(signal.pow(2).sum(dtype=torch.float64))
    return gram, rhs, residual_sq, signal_sq


def fold_scales(model: PreTrainedModel, gates: Gates) -> None:
    """Multiply each head's output-projection columns and each neuron's down-projection column by its scale."""
    with torch.no_grad():
        for view, head_scale, neuron_scale in zip(layer_views(model), gates.heads, gates.neurons, strict=True):
            if view.num_heads:
                columns = head_scale.to(view.attn_out.weight.dtype).repeat_interleave(view.head_size)
                view.attn_out.weight.mul_(columns.to(view.attn_out.weight.device)[None, :])
            if view.ffn_size:
                view.ffn_down.weight.mul_(neuron_scale.to(view.ffn_down.weight.dtype).to(view.ffn_down.weight.device))


def reconstruct_weights(
    model: PreTrainedModel,
    plan: PruningPlan,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    damping: float = 1e-2,
    fit_bias: bool = True,
    fit_head: bool = False,
    last_layer_rows: str = "all",
    max_memory: int | None = None,
    dense: DenseTargets | None = None,
    row_scaled_ridge: bool = True,
    choose_units: bool = False,
    candidates: PruningPlan | None = None,
    progress: bool = True,
) -> TuningReport:
    """Refit, in place, the kept columns (and the bias) of every output and down projection by least squares, so
    that each pruned sub-layer reproduces the dense model's output on the calibration set.

    The same layer-wise reconstruction as :func:`tune_masks` (Kwon et al. 2022, §4.3), with every weight of the
    projection free instead of one scale per unit, as in the structured OBS-style weight updates of ZipLM (Kurtic
    et al. 2023): with X the kept units' outputs (contexts or activations) and R the target residual, the
    projection becomes W^T = (X^T X + lambda I)^-1 (X^T R + lambda W0^T), a ridge towards the original W0.
    The pruned columns are untouched: physically removing them afterwards (``remove(model, plan)``) gives the
    final model. The calibration set is streamed layer by layer (:func:`~slimformer.budget.stream.walk_sublayers`):
    O(L) layer passes, at most ``max_memory`` bytes of activations in RAM (default: half the available memory).

    ``fit_head`` also refits the task head's output layer (the one computing the logits) the same way, on one row
    per example: its input in the pruned model against the dense model's logits. The sub-layer fits weigh every
    token alike while the head reads one pooled vector, so what they leave on that vector reaches the logits
    uncorrected; with many classes close together that costs accuracy (bench/results/many_class.md).

    ``last_layer_rows="first"`` fits the last layer on each example's first token only: what a classification
    head (or [CLS] pooling) reads of it; the other positions reach no output.

    ``dense``: the dense targets recorded during an earlier pass over ``batches`` (the Fisher's); without them the
    refit runs the dense model beside the pruned one.

    ``choose_units``: keep the plan's number of heads and neurons per sub-layer, but choose which ones by the refit
    itself (:func:`least_error_units`: the units whose removal the least-squares refit makes up for best, measured
    on the pruned model's own inputs, as ZipLM does) instead of the plan's Fisher ranking, among the units
    ``candidates`` keeps (default: all). ``report.plan`` gives the plan that was applied.

    ``row_scaled_ridge``: each output row's ridge grows with its share of the target's energy (:func:`row_scales`),
    so that the few residual-stream dimensions with massive activations (Kovaleva et al. 2021, "BERT Busters";
    Sun et al. 2024, "Massive Activations") are fitted on their relative error like every other row. With one ridge
    for all rows their least-squares rows gain large weights that cancel on the calibration set and amplify any
    change of the input: all-mpnet-base-v2 at 50% FLOPs lost 12.8 STS-B points under dynamic int8 on ONNX Runtime
    with the same ridge for every row, 0.02 with a ridge per row (bench/results/embeddings.md). On MiniLM-L6 the
    change is mixed, -0.7 to +0.1 (bench/results/refit_ridge.md).
    """
    device, gates = _setup(model, plan)
    report = TuningReport()
    chosen = {"attention": [list(k) for k in plan.kept_heads], "ffn": [list(k) for k in plan.kept_neurons]}
    pool_plan = candidates if candidates is not None else PruningPlan.keep_all(model)
    alive = {"attention": pool_plan.kept_heads, "ffn": pool_plan.kept_neurons}
    was_training = model.training
    model.eval()
    steps = walk_sublayers(
        model,
        gates,
        batches,
        device,
        dense_targets=dense if dense is not None else True,
        max_memory=max_memory,
        on_budget=_memory_report(report),
        head=fit_head,
        last_layer_rows=last_layer_rows,
    )
    try:
        total = 2 * len(plan.kept_heads) + int(fit_head)
        bar = tqdm(total=total, desc="weight reconstruction (least squares)", disable=not progress, leave=False)
        for view, part, source in steps:
            bar.update()
            choose = None
            if part == "classifier":
                proj = output_layer(model)
                kept = columns = torch.arange(proj.in_features)
            else:
                kept = chosen[part][view.index]
                if not kept:
                    continue
                proj = projection(view, part)
                pool = alive[part][view.index]
                if choose_units and len(kept) < len(pool):
                    # every candidate's columns enter the statistics; the choice then keeps len(kept) of them
                    choose, kept = len(kept), pool
                    gate = gates.heads[view.index] if part == "attention" else gates.neurons[view.index]
                    gate[torch.tensor(pool, dtype=torch.long, device=gate.device)] = 1.0
            if part == "attention":
                columns = head_columns(kept, view.head_size)
            elif part == "ffn":
                columns = torch.tensor(kept, dtype=torch.long)
            with_bias = fit_bias and proj.bias is not None
            gram, cross, residual_rows, signal_sq = _regression_statistics(proj, columns, source(), with_bias)
            residual_sq = float(residual_rows.sum())
            w0 = proj.weight.detach().double().cpu()[:, columns]  # [hidden, n]
            start = torch.cat([w0.T, torch.zeros(1, w0.shape[0], dtype=w0.dtype)]) if with_bias else w0.T
            if choose is not None:
                width = view.head_size if part == "attention" else 1
                groups = [torch.arange(i * width, (i + 1) * width) for i in range(len(kept))]
                weights = 1.0 / row_scales(residual_rows) if row_scaled_ridge else None
                penalty = _ridge_penalty(gram, damping, with_bias)
                positions, _ = least_error_units(gram, cross, start, penalty, groups, choose, weights)
                kept = [kept[i] for i in positions]
                chosen_columns = torch.cat([groups[i] for i in positions])
                rows = torch.cat([chosen_columns, torch.tensor([gram.shape[0] - 1])]) if with_bias else chosen_columns
                gram, cross, start, columns = gram[rows][:, rows], cross[rows], start[rows], columns[chosen_columns]
                gate.zero_()
                gate[torch.tensor(kept, dtype=torch.long, device=gate.device)] = 1.0
                chosen[part][view.index] = kept
            penalty = _ridge_penalty(gram, damping, with_bias)
            error_start = float((start * (gram @ start)).sum() - 2 * (start * cross).sum() + residual_sq)
            solution = ridge_solution(
                gram, cross, start, penalty, row_scales(residual_rows) if row_scaled_ridge else None
            )
            error_fit = float((solution * (gram @ solution)).sum() - 2 * (solution * cross).sum() + residual_sq)
            if error_fit < error_start:
                with torch.no_grad():
                    new = solution.T.to(proj.weight.dtype)
                    proj.weight[:, columns.to(proj.weight.device)] = new[:, : len(columns)].to(proj.weight.device)
                    if with_bias:
                        proj.bias.add_(new[:, -1].to(proj.bias.device))
            else:
                error_fit = error_start
            report.layers.append(
                {
                    "layer": "head" if view is None else view.index,
                    "part": part,
                    "units": len(kept),
                    "relative_error_ones": error_start / max(signal_sq, 1e-30),
                    "relative_error_tuned": error_fit / max(signal_sq, 1e-30),
                }
            )
        bar.close()
    finally:
        steps.close()
        model.train(was_training)
    report.plan = replace(plan, kept_heads=chosen["attention"], kept_neurons=chosen["ffn"]) if choose_units else plan
    return report


def _ridge_penalty(gram: torch.Tensor, damping: float, with_bias: bool) -> torch.Tensor:
    """The refit's ridge per input column: ``damping`` times the Gram's mean diagonal, the bias nearly free."""
    ridge = damping * float(gram.diagonal().mean().clamp_min(1e-12))
    penalty = torch.full((gram.shape[0],), ridge, dtype=gram.dtype)
    if with_bias:
        penalty[-1] = ridge * 1e-3
    return penalty


def row_scales(residual_rows: torch.Tensor) -> torch.Tensor:
    """How much stronger each output row's ridge is: its residual energy over the median row's, at least 1.

    Dividing a row's least-squares objective by its energy shows why: the row is then fitted on its relative
    error, with the same price for moving its weights as an ordinary row. The median, not the mean, is the ordinary
    row: one massive row can carry most of the energy (it would set the mean). Rows below the median keep the
    plain ridge (their relative errors would otherwise buy large weights the other way). Measured on
    all-mpnet-base-v2 at 50% FLOPs (STS-B dev Spearman, fp32 / simulated int8): one ridge 86.65 / 72.8; scaled
    by the mean row 87.39 / 87.11; by the median row 87.58 / 87.48. Scaling only the rows more than k times above
    the median (ratio / k) did worse than both extremes on MiniLM-L6 / STS-B at 40% (one ridge 84.01, k = 1
    83.30, k = 10 80.87, k = 100 81.79): a partial rule is not a compromise.
    """
    ordinary = residual_rows.median().clamp_min(1e-30)
    return (residual_rows / ordinary).clamp_min(1.0)


def ridge_solution(
    gram: torch.Tensor,
    cross: torch.Tensor,
    start: torch.Tensor,
    penalty: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """W^T solving (X^T X + s_j P) w_j = X^T r_j + s_j P w0_j for every output row j, P = diag(``penalty``), s_j =
    ``scales[j]`` (1 for every row when None: one linear solve).

    Per-row ridges share one eigendecomposition: with D = P^(1/2) and D^-1 X^T X D^-1 = Q diag(e) Q^T,
    w_j = D^-1 Q (diag(e) + s_j I)^-1 Q^T D^-1 (X^T r_j + s_j P w0_j).
    """
    if scales is None:
        return torch.linalg.solve(gram + torch.diag(penalty), cross + penalty[:, None] * start)
    root = penalty.sqrt()
    eigenvalues, vectors = torch.linalg.eigh(gram / root[:, None] / root[None, :])
    rhs = (cross + penalty[:, None] * start * scales[None, :]) / root[:, None]
    rotated = (vectors.T @ rhs) / (eigenvalues[:, None] + scales[None, :])
    return (vectors @ rotated) / root[:, None]


def _regression_statistics(
    proj: torch.nn.Linear, columns: torch.Tensor, data: Iterable[SublayerBatch], with_ones: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """X^T X, X^T R, ||R_j||^2 per output row j and ||targets||^2 (float64) over the real tokens, with X the kept
    columns of the projection's input (plus a column of ones when ``with_ones``) and R = dense output - residual
    input - bias."""
    n = len(columns) + (1 if with_ones else 0)
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(n, proj.out_features, dtype=torch.float64)
    residual_rows = torch.zeros(proj.out_features, dtype=torch.float64)
    signal_sq = 0.0
    dtype = _compute_dtype(proj.weight)  # the activations come in the model's dtype too
    bias = proj.bias.detach().to("cpu", dtype) if proj.bias is not None else 0.0
    for batch in data:
        features = batch.kept_units(columns).to("cpu", dtype)
        if with_ones:
            features = torch.cat([features, torch.ones(features.shape[0], 1, dtype=dtype)], dim=1)
        residual = batch.target.to("cpu", dtype) - bias
        if batch.x is not None:  # a sub-layer with a residual connection (not the task head)
            residual = residual - batch.x.to("cpu", dtype)
        target = batch.target
        if batch.weights is not None:  # a weighted fit: each row scaled by the root of its weight
            root = batch.weights.to("cpu", dtype).sqrt()[:, None]
            features, residual, target = features * root, residual * root, target.to("cpu", dtype) * root
        gram += (features.T @ features).double()
        cross += (features.T @ residual).double()
        # squares summed in float64 without a float64 copy of the batch
        residual_rows += residual.pow(2).sum(dim=0, dtype=torch.float64)
        signal_sq += float(target.pow(2).sum(dtype=torch.float64))
    return gram, cross, residual_rows, signal_sq


# least_error_units removes this share of the units still to go at each step (at least one): a step is one
# pass over H^-1, so removing one unit at a time would cost one pass per unit (MiniLM-L6's FFN: 19 s a layer)
REMOVAL_SHARE = 0.125


def least_error_units(
    gram: torch.Tensor,
    cross: torch.Tensor,
    start: torch.Tensor,
    penalty: torch.Tensor,
    groups: Sequence[torch.Tensor],
    keep: int,
    row_weights: torch.Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """The ``keep`` units whose least-squares refit leaves the least error, found by greedy backward elimination
    with Optimal Brain Surgeon updates (Hassibi & Stork 1993), structured as in ZipLM (Kurtic et al. 2023).

    The refit problem is :func:`ridge_solution`'s with one ridge for every output row: minimise
    sum_j w_j (||X W_j - R_j||^2 + sum_c penalty_c (W_cj - W0_cj)^2) over the kept columns, with
    H = X^T X + diag(penalty) and the optimum W* = H^-1 (X^T R + diag(penalty) W0). Each unit is a group of the
    projection's input columns (``groups[u]``: one head's context columns, or one neuron's). Zeroing a set S of
    columns of the current optimum and refitting the rest raises the error by sum_j w_j W*_Sj^T [(H^-1)_SS]^-1
    W*_Sj, less the ridge the removed columns no longer pay. Each step ranks the units by their own rise, removes
    the ``REMOVAL_SHARE`` of those still to go that rise least (at least one), updates W* and H^-1 in closed form
    (block elimination) and drops their rows, until ``keep`` remain. Columns in no group (the bias's column of ones)
    always stay.

    Returns the kept units (sorted) and the rise of the error at each step, in order: the refit's error on the
    units left is the full refit's plus their sum.
    """
    penalty = penalty.double()
    weights = torch.ones(cross.shape[1], dtype=torch.float64) if row_weights is None else row_weights.double()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram.double() + torch.diag(penalty)))
    optimum = inverse @ (cross.double() + penalty[:, None] * start.double())
    # what the ridge charges a group for leaving its start: paid while the group is kept, not once it is gone
    ridge_cost = torch.stack([((penalty[g, None] * start[g].double().pow(2)) * weights).sum() for g in groups])
    width = len(groups[0]) if groups else 0
    if any(len(g) != width for g in groups):
        raise ValueError("every unit must have as many columns")
    # where each alive unit's columns are now (rows of the shrinking H^-1 and W*): [units, width]
    alive = torch.arange(len(groups))
    where = torch.stack(list(groups)) if groups else torch.zeros(0, 0, dtype=torch.long)
    rises: list[float] = []
    while len(alive) > keep:
        if width == 1:  # every unit's rise at once
            rows = where[:, 0]
            rise = (optimum[rows].pow(2) @ weights) / inverse[rows, rows]
        else:
            rise = torch.stack(
                [(optimum[r] * torch.linalg.solve(inverse[r][:, r], optimum[r])).sum(0) @ weights for r in where]
            )
        rise = rise - ridge_cost[alive]
        count = max(1, int((len(alive) - keep) * REMOVAL_SHARE))
        going = torch.topk(rise, count, largest=False).indices
        drop = where[going].flatten()
        column = inverse[:, drop]
        block = torch.linalg.inv(inverse[drop][:, drop])
        weight_rows = optimum[drop]
        rises.append(float((weight_rows * (block @ weight_rows)).sum(0) @ weights - ridge_cost[alive[going]].sum()))
        optimum = optimum - column @ (block @ weight_rows)
        inverse = inverse - column @ (block @ inverse[drop, :])
        # drop the removed rows and columns; the others' positions shift down
        stays = torch.ones(inverse.shape[0], dtype=torch.bool)
        stays[drop] = False
        inverse, optimum = inverse[stays][:, stays], optimum[stays]
        shift = torch.cumsum(stays.long(), 0) - 1
        remaining = torch.ones(len(alive), dtype=torch.bool)
        remaining[going] = False
        alive, where = alive[remaining], shift[where[remaining]]
    return sorted(alive.tolist()), rises
