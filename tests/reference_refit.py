"""The least-squares refit as it was before it streamed layer by layer (slimformer 243dd31): every sub-layer's
pruned input is recomputed from the embeddings and every dense sub-layer output is kept, O(L^2) layer passes.
Kept as the tests' oracle: the streaming refit must give the same weights. Casts to float32 removed so that it
runs in the model's own dtype (float64 in the equality tests)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimformer.arch import LayerView, layer_views
from slimformer.budget.tune import ridge_solution, row_scales
from slimformer.gates import Gates, gated
from slimformer.gradients import model_inputs
from slimformer.prune.apply import plan_gates
from slimformer.prune.plan import PruningPlan


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being tuned has been seen."""


@dataclass
class TuningReport:
    """Per sub-layer: relative reconstruction error with all-ones masks and with the tuned masks."""

    layers: list[dict] = field(default_factory=list)


def _capture(module: nn.Module, store: dict, key: str, *, output: bool = False, stop: bool = False):
    """Register a hook that stores the module's first input (or its output) in ``store[key]``."""
    if output:

        def hook(mod, args, result):
            store[key] = result[0] if isinstance(result, tuple) else result
            if stop:
                raise _Stop

        return module.register_forward_hook(hook)

    def pre_hook(mod, args, kwargs):
        store[key] = args[0] if args else kwargs["hidden_states"]

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _setup(model: PreTrainedModel, plan: PruningPlan) -> tuple[torch.device, Gates, list[tuple[LayerView, str]]]:
    """The model's device, the plan's 0/1 gates on it, and the sub-layers (view, part) in the order to fit."""
    views = layer_views(model)
    device = next(model.parameters()).device
    gates = plan_gates(model, plan)
    gates = Gates(heads=[g.to(device) for g in gates.heads], neurons=[g.to(device) for g in gates.neurons])
    return device, gates, [(view, part) for view in views for part in ("attention", "ffn")]


def _projection(view: LayerView, part: str) -> nn.Linear:
    """The sub-layer's output projection: attention output (o) or FFN down."""
    return view.attn_out if part == "attention" else view.ffn_down


def _sublayer_inputs(
    model: PreTrainedModel,
    view: LayerView,
    part: str,
    gates: Gates,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, for the real tokens: the sub-layer's residual input x and its projection's input (un-gated
    contexts or activations), from the pruned model (``gates``) run only up to that projection."""
    # sub-layer input: the layer's input (attention) or the FFN input; the projection: o or down
    entry, proj = (view.layer, view.attn_out) if part == "attention" else (view.ffn_up, view.ffn_down)
    for batch in batches:
        inputs = model_inputs(batch, device)
        valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        student: dict = {}
        # capture hooks are registered before the gates, so they see the un-gated context / activation
        handles = [_capture(entry, student, "x"), _capture(proj, student, "units")]
        handles.append(_capture(proj, student, "stop", output=True, stop=True))
        try:
            with gated(model, gates):
                _run(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        yield _select_tokens(student["x"], valid), _select_tokens(student["units"], valid)


def _run(model: PreTrainedModel, inputs: dict) -> None:
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass


def _select_tokens(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Real (unpadded) tokens only, as [tokens, width] on the CPU."""
    t = t[valid] if valid is not None else t.reshape(-1, t.shape[-1])
    return t.detach().cpu()


def dense_targets(
    model: PreTrainedModel, batches: Sequence[dict[str, torch.Tensor]], device: torch.device
) -> dict[tuple[int, str], list[torch.Tensor]]:
    """What every sub-layer of the dense model outputs before its LayerNorm (its residual input plus its
    projection's output), for the real tokens of each batch: ``{(layer, "attention" | "ffn"): [per batch]}``.
    One dense pass serves the tuning of every sub-layer."""
    targets: dict[tuple[int, str], list[torch.Tensor]] = {}
    for batch in batches:
        inputs = model_inputs(batch, device)
        valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        seen: dict = {}
        handles = []
        for view in layer_views(model):
            handles += [
                _capture(view.layer, seen, (view.index, "attention", "x")),
                _capture(view.attn_out, seen, (view.index, "attention", "out"), output=True),
                _capture(view.ffn_up, seen, (view.index, "ffn", "x")),
                _capture(view.ffn_down, seen, (view.index, "ffn", "out"), output=True),
            ]
        try:
            _run(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        for view in layer_views(model):
            for part in ("attention", "ffn"):
                total = seen[(view.index, part, "x")] + seen[(view.index, part, "out")]
                targets.setdefault((view.index, part), []).append(_select_tokens(total, valid))
    return targets


def tune_masks(
    model: PreTrainedModel,
    plan: PruningPlan,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    damping: float = 1e-2,
    clamp: float = 10.0,
    target: str = "global",
    progress: bool = True,
) -> tuple[Gates, TuningReport]:
    """Real-valued gates for ``plan`` (kept units scaled, pruned units 0) that best reconstruct each sub-layer."""
    device, gates, steps = _setup(model, plan)
    report = TuningReport()
    was_training = model.training
    model.eval()
    try:
        targets = dense_targets(model, batches, device) if target == "global" else None
        for view, part in tqdm(steps, desc="mask tuning (least squares)", disable=not progress, leave=False):
            kept = plan.kept_heads[view.index] if part == "attention" else plan.kept_neurons[view.index]
            if not kept:
                continue
            gram, rhs, residual_sq, signal_sq = _normal_equations(
                model,
                view,
                part,
                kept,
                gates,
                batches,
                targets[(view.index, part)] if targets else [None] * len(batches),
                device,
            )
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
            target = gates.heads[view.index] if part == "attention" else gates.neurons[view.index]
            target[kept] = scales.to(target.dtype).to(device)
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
    finally:
        model.train(was_training)
    return gates, report


def _normal_equations(
    model: PreTrainedModel,
    view: LayerView,
    part: str,
    kept: list[int],
    gates: Gates,
    batches: Sequence[dict[str, torch.Tensor]],
    targets: list[torch.Tensor] | list[None],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """A^T A, A^T r, r^T r (float64) and the squared norm of the targets (for a relative error), accumulated
    over the batches; the pruned model runs with ``gates`` only up to the sub-layer being tuned."""
    n = len(kept)
    gram = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, dtype=torch.float64)
    residual_sq = signal_sq = 0.0
    index = torch.tensor(kept, dtype=torch.long)
    proj = _projection(view, part)
    weight = proj.weight.detach().cpu()  # [hidden, width]
    bias = proj.bias.detach().cpu() if proj.bias is not None else 0.0
    for (x, units), target in zip(_sublayer_inputs(model, view, part, gates, batches, device), targets, strict=True):
        # global: the dense model's own sub-layer output, which also corrects earlier layers' drift;
        # local: the dense sub-layer applied to the pruned model's own input (every unit at 1)
        residual = units @ weight.T if target is None else target - x - bias  # [tokens, hidden]
        if part == "attention":
            size = view.head_size
            context = units.reshape(units.shape[0], -1, size)[:, index]  # [tokens, n, size]
            w = weight.reshape(weight.shape[0], -1, size)[:, index]  # [hidden, n, size]
            terms = torch.einsum("tns,dns->tnd", context, w)  # each kept head's output, [tokens, n, hidden]
            gram += torch.einsum("tnd,tmd->nm", terms, terms).double()
            rhs += torch.einsum("tnd,td->n", terms, residual).double()
        else:
            act = units[:, index]  # [tokens, n]
            w = weight[:, index]  # [hidden, n]
            gram += ((act.T @ act) * (w.T @ w)).double()
            rhs += (act * (residual @ w)).sum(0).double()
        residual_sq += float(residual.double().pow(2).sum())
        signal_sq += float((target if target is not None else residual).double().pow(2).sum())
    return gram, rhs, residual_sq, signal_sq


def reconstruct_weights(
    model: PreTrainedModel,
    plan: PruningPlan,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    damping: float = 1e-2,
    fit_bias: bool = True,
    row_scaled_ridge: bool = True,
    progress: bool = True,
) -> TuningReport:
    """Refit, in place, the kept columns (and the bias) of every output and down projection by least squares, so
    that each pruned sub-layer reproduces the dense model's output on the calibration set.

    The same layer-wise reconstruction as :func:`tune_masks` (Kwon et al. 2022, §4.3), with every weight of the
    projection free instead of one scale per unit, as in the structured OBS-style weight updates of ZipLM (Kurtic
    et al. 2023): with X the kept units' outputs (contexts or activations) and R the target residual, the
    projection becomes W^T = (X^T X + lambda I)^-1 (X^T R + lambda W0^T), a ridge towards the original W0.
    The pruned columns are untouched: physically removing them afterwards (``remove(model, plan)``) gives the
    final model.
    """
    device, gates, steps = _setup(model, plan)
    report = TuningReport()
    was_training = model.training
    model.eval()
    try:
        targets = dense_targets(model, batches, device)
        for view, part in tqdm(steps, desc="weight reconstruction (least squares)", disable=not progress, leave=False):
            kept = plan.kept_heads[view.index] if part == "attention" else plan.kept_neurons[view.index]
            if not kept:
                continue
            proj = _projection(view, part)
            if part == "attention":
                columns = torch.cat([torch.arange(h * view.head_size, (h + 1) * view.head_size) for h in kept])
            else:
                columns = torch.tensor(kept, dtype=torch.long)
            with_bias = fit_bias and proj.bias is not None
            gram, cross, residual_rows, signal_sq = _regression_statistics(
                model, view, part, columns, gates, batches, targets[(view.index, part)], device, with_bias
            )
            residual_sq = float(residual_rows.sum())
            w0 = proj.weight.detach().double().cpu()[:, columns]  # [hidden, n]
            start = torch.cat([w0.T, torch.zeros(1, w0.shape[0], dtype=w0.dtype)]) if with_bias else w0.T
            error_start = float((start * (gram @ start)).sum() - 2 * (start * cross).sum() + residual_sq)
            ridge = damping * float(gram.diagonal().mean().clamp_min(1e-12))
            penalty = torch.full((gram.shape[0],), ridge, dtype=gram.dtype)
            if with_bias:
                penalty[-1] = ridge * 1e-3  # the bias is nearly free
            scales = row_scales(residual_rows) if row_scaled_ridge else None
            solution = ridge_solution(gram, cross, start, penalty, scales)
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
                    "layer": view.index,
                    "part": part,
                    "units": len(kept),
                    "relative_error_ones": error_start / max(signal_sq, 1e-30),
                    "relative_error_tuned": error_fit / max(signal_sq, 1e-30),
                }
            )
    finally:
        model.train(was_training)
    return report


def _regression_statistics(
    model: PreTrainedModel,
    view: LayerView,
    part: str,
    columns: torch.Tensor,
    gates: Gates,
    batches: Sequence[dict[str, torch.Tensor]],
    targets: list[torch.Tensor],
    device: torch.device,
    with_ones: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """X^T X, X^T R, ||R_j||^2 per row and ||targets||^2 (float64) over the real tokens, with X the kept columns of the
    projection's input (plus a column of ones when ``with_ones``) and R = dense output - residual input - bias."""
    proj = _projection(view, part)
    n = len(columns) + (1 if with_ones else 0)
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(n, proj.out_features, dtype=torch.float64)
    residual_rows = torch.zeros(proj.out_features, dtype=torch.float64)
    signal_sq = 0.0
    bias = proj.bias.detach().cpu() if proj.bias is not None else 0.0
    for (x, units), target in zip(_sublayer_inputs(model, view, part, gates, batches, device), targets, strict=True):
        features = units[:, columns].double()
        if with_ones:
            features = torch.cat([features, torch.ones(features.shape[0], 1, dtype=features.dtype)], dim=1)
        residual = (target - x - bias).double()
        gram += features.T @ features
        cross += features.T @ residual
        residual_rows += residual.pow(2).sum(dim=0)
        signal_sq += float(target.double().pow(2).sum())
    return gram, cross, residual_rows, signal_sq
