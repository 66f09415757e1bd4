"""Carry out a pruning plan: ``mask`` (gates, reversible) or ``remove`` (slice the weights: really smaller).

Removal slices the weights with :func:`slimformer.layout.slice_model`: the q/k/v output rows and the attention output
projection's input columns of every pruned head, the FFN up projection's rows and down projection's columns of every
pruned neuron, and whole layers; a layer left with no heads gets an :class:`~slimformer.layout.EmptyAttention`. The
result is an ordinary transformers model whose config records the per-layer shapes (``slimformer_layout``) so that
:func:`slimformer.load_model` can rebuild it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from transformers import PreTrainedModel

from slimformer.gates import Gates, gated
from slimformer.layout import slice_hidden, slice_model
from slimformer.prune.plan import PlanError, PruningPlan


# masking ----------------------------------------------------------------------------------------------------
def plan_gates(model: PreTrainedModel, plan: PruningPlan) -> Gates:
    """0/1 gates that mask what ``plan`` prunes (dropped layers are skipped via layer gates)."""
    plan.validate(model)
    gates = Gates.ones(model, layers=bool(plan.dropped_layers), hidden=plan.kept_hidden is not None)
    for layer, (heads, neurons) in enumerate(zip(plan.kept_heads, plan.kept_neurons, strict=True)):
        gates.heads[layer].zero_()[heads] = 1.0
        gates.neurons[layer].zero_()[neurons] = 1.0
    if gates.layers is not None:
        gates.layers[plan.dropped_layers] = 0.0
    if gates.hidden is not None:
        gates.hidden.zero_()[plan.kept_hidden] = 1.0
    return gates


@contextmanager
def masked(model: PreTrainedModel, plan: PruningPlan) -> Iterator[Gates]:
    """Mask what ``plan`` prunes inside a ``with`` block; the model is unchanged afterwards."""
    with gated(model, plan_gates(model, plan)) as gates:
        yield gates


def silence(model: PreTrainedModel, plan: PruningPlan) -> None:
    """Zero, in place, the attention-output columns of every head and the down-projection columns of every neuron
    that ``plan`` prunes: those units then add nothing to the residual stream, exactly as if removed, while the
    model keeps its shape (stepwise budget pruning measures its next Fisher on it). Heads and neurons only."""
    import torch

    from slimformer.arch import layer_views

    if plan.dropped_layers or plan.kept_hidden is not None:
        raise PlanError("silence() handles pruned heads and neurons only, not dropped layers or hidden dimensions.")
    gates = plan_gates(model, plan)  # validates the plan; 0 marks what it prunes
    with torch.no_grad():
        for view, heads, neurons in zip(layer_views(model), gates.heads, gates.neurons, strict=True):
            for head in (heads == 0).nonzero().flatten().tolist():
                view.attn_out.weight[:, head * view.head_size : (head + 1) * view.head_size] = 0.0
            view.ffn_down.weight[:, (neurons == 0).to(view.ffn_down.weight.device)] = 0.0


# physical removal -------------------------------------------------------------------------------------------
def remove(model: PreTrainedModel, plan: PruningPlan) -> PreTrainedModel:
    """Physically remove what ``plan`` prunes, in place; returns ``model`` (now smaller and faster)."""
    plan.validate(model)
    slice_model(model, plan.kept_heads, plan.kept_neurons, plan.dropped_layers)
    if plan.kept_hidden is not None and len(plan.kept_hidden) < plan.layout.hidden:
        slice_hidden(model, plan.kept_hidden)
    return model


def apply_plan(model: PreTrainedModel, plan: PruningPlan, mode: Literal["mask", "remove"] = "remove"):
    """``remove``: prune in place and return the model. ``mask``: return a :class:`MaskHandle` whose
    ``remove()`` (or ``with`` exit) takes the masks off again."""
    if mode == "remove":
        return remove(model, plan)
    if mode == "mask":
        return MaskHandle(model, plan)
    raise PlanError(f"mode must be 'mask' or 'remove', not {mode!r}")


class MaskHandle:
    """Masks installed until :meth:`remove` is called (also usable as a context manager)."""

    def __init__(self, model: PreTrainedModel, plan: PruningPlan) -> None:
        self._context = masked(model, plan)
        self.gates = self._context.__enter__()

    def remove(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
