"""Carry out a pruning plan: ``mask`` (gates, reversible) or ``remove`` (slice the weights: really smaller).

Removal slices the q/k/v output rows and the attention output projection's input columns of every pruned head,
the FFN up projection's rows and down projection's columns of every pruned neuron, and drops whole layers from
the layer list; biases follow their rows. A layer left with no heads keeps running: its attention module is
replaced by :class:`EmptyAttention` (zero-width context, so the output projection adds only its bias), which is
exactly what masking every head gives. An FFN with no neurons needs nothing special: a zero-width matmul
yields zeros and the down projection adds its bias. The result is an ordinary transformers model whose config
records the per-layer shapes (``slimformer_layout``) so that :func:`slimformer.load_model` can rebuild it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import ArchSpec, LayerView, get_spec, layer_list, layer_views, resolve
from slimformer.gates import Gates, gated
from slimformer.prune.plan import PlanError, PruningPlan

LAYOUT_KEY = "slimformer_layout"


# masking ----------------------------------------------------------------------------------------------------
def plan_gates(model: PreTrainedModel, plan: PruningPlan) -> Gates:
    """0/1 gates that mask what ``plan`` prunes (dropped layers are skipped via layer gates)."""
    plan.validate(model)
    gates = Gates.ones(model, layers=bool(plan.dropped_layers))
    for layer, (heads, neurons) in enumerate(zip(plan.kept_heads, plan.kept_neurons, strict=True)):
        gates.heads[layer].zero_()[heads] = 1.0
        gates.neurons[layer].zero_()[neurons] = 1.0
    if gates.layers is not None:
        gates.layers[plan.dropped_layers] = 0.0
    return gates


@contextmanager
def masked(model: PreTrainedModel, plan: PruningPlan) -> Iterator[Gates]:
    """Mask what ``plan`` prunes inside a ``with`` block; the model is unchanged afterwards."""
    with gated(model, plan_gates(model, plan)) as gates:
        yield gates


# physical removal -------------------------------------------------------------------------------------------
class EmptyAttention(nn.Module):
    """Stands in for an attention module whose heads were all pruned.

    It keeps the (zero-width) projections under their original names, so the state dict has the same keys as
    any other pruned layer, and returns a zero-width context; if the family's output projection lives inside the
    attention module (DistilBERT, MPNet) it is applied, which adds its bias.
    """

    def __init__(self, projections: dict[str, nn.Linear], out_name: str | None) -> None:
        super().__init__()
        for name, module in projections.items():
            self.add_module(name, module)
        self.out_name = out_name

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
        context = hidden.new_zeros(*hidden.shape[:-1], 0)
        if self.out_name is not None:
            context = getattr(self, self.out_name)(context)
        return context, None


def _sliced_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    bias = linear.bias.detach() if linear.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    with torch.device("meta"), warnings.catch_warnings():  # allocate without the (pointless) random init
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    new = new.to_empty(device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


def _relative(path: str, prefix: str) -> str | None:
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else None


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = resolve(root, parent_path) if parent_path else root
    setattr(parent, name, module)


def prune_layer_heads(view: LayerView, spec: ArchSpec, keep: list[int], head_ids: list[int]) -> list[int]:
    """Slice one layer's heads to ``keep``; return the original ids of the heads that remain."""
    size = view.head_size
    rows = torch.tensor([h * size + i for h in keep for i in range(size)], dtype=torch.long)
    for name in ("query", "key", "value"):
        _set(view.layer, getattr(spec, name), _sliced_linear(getattr(view, name), rows=rows))
    _set(view.layer, spec.attn_out, _sliced_linear(view.attn_out, cols=rows))
    attention = resolve(view.layer, spec.attention)
    kept_ids = [head_ids[h] for h in keep]
    if not keep:
        names = ("query", "key", "value", "attn_out")
        projections = {}
        for name in names:
            relative = _relative(getattr(spec, name), spec.attention)
            if relative is not None:
                projections[relative] = resolve(view.layer, getattr(spec, name))
        out_name = _relative(spec.attn_out, spec.attention)
        _set(view.layer, spec.attention, EmptyAttention(projections, out_name))
        return kept_ids
    # keep the module's bookkeeping truthful (some families reshape with these)
    for attr in ("num_attention_heads", "n_heads"):
        if hasattr(attention, attr):
            setattr(attention, attr, len(keep))
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(keep) * size
    if spec.on_heads_pruned is not None:
        spec.on_heads_pruned(attention, kept_ids)
    return kept_ids


def prune_layer_neurons(view: LayerView, spec: ArchSpec, keep: list[int]) -> None:
    index = torch.tensor(keep, dtype=torch.long)
    _set(view.layer, spec.ffn_up, _sliced_linear(view.ffn_up, rows=index))
    _set(view.layer, spec.ffn_down, _sliced_linear(view.ffn_down, cols=index))


def current_head_ids(model: PreTrainedModel) -> list[list[int]]:
    """For each layer, the original index of each head still present (composes successive prunings)."""
    layout = getattr(model.config, LAYOUT_KEY, None)
    if layout and "head_ids" in layout:
        return [list(ids) for ids in layout["head_ids"]]
    return [list(range(v.num_heads)) for v in layer_views(model)]


def remove(model: PreTrainedModel, plan: PruningPlan) -> PreTrainedModel:
    """Physically remove what ``plan`` prunes, in place; returns ``model`` (now smaller and faster)."""
    plan.validate(model)
    spec = get_spec(model)
    head_ids = current_head_ids(model)
    views = layer_views(model, spec)
    new_head_ids = []
    for view in views:
        index = view.index
        if plan.kept_heads[index] != list(range(view.num_heads)):
            new_head_ids.append(prune_layer_heads(view, spec, plan.kept_heads[index], head_ids[index]))
        else:
            new_head_ids.append(head_ids[index])
        if plan.kept_neurons[index] != list(range(view.ffn_size)):
            prune_layer_neurons(view, spec, plan.kept_neurons[index])
    if plan.dropped_layers:
        layers = layer_list(model, spec)
        kept = [layers[i] for i in plan.kept_layers]
        _set(model.base_model, spec.layers, nn.ModuleList(kept))
        new_head_ids = [new_head_ids[i] for i in plan.kept_layers]
        setattr(model.config, spec.layers_key, len(kept))
    _record_layout(model, spec, new_head_ids)
    return model


def _record_layout(model: PreTrainedModel, spec: ArchSpec, head_ids: list[list[int]]) -> None:
    """Write the per-layer shapes into the config; leave the config plain where transformers can rebuild it."""
    views = layer_views(model, spec)
    heads = [v.num_heads for v in views]
    ffn = [v.ffn_size for v in views]
    config = model.config
    full_heads = spec.num_heads(config)
    if len(set(ffn)) == 1:
        setattr(config, spec.ffn_key, ffn[0])
    uniform_plain = all(h == full_heads for h in heads) and len(set(ffn)) == 1
    if uniform_plain:
        if hasattr(config, LAYOUT_KEY):
            delattr(config, LAYOUT_KEY)
        return
    setattr(config, LAYOUT_KEY, {"heads": heads, "ffn": ffn, "head_ids": head_ids})


def rebuild_layout(model: PreTrainedModel, layout: dict[str, Any]) -> PreTrainedModel:
    """Reshape a freshly built dense model to a recorded ``slimformer_layout`` (weights are loaded after)."""
    views = layer_views(model)
    heads, ffn, head_ids = layout["heads"], layout["ffn"], layout.get("head_ids")
    if len(heads) != len(views) or len(ffn) != len(views):
        raise PlanError(f"slimformer_layout lists {len(heads)} layers, the config builds {len(views)}.")
    # the weights are overwritten by the checkpoint, so which units are kept here does not matter
    config = model.config
    if hasattr(config, LAYOUT_KEY):
        delattr(config, LAYOUT_KEY)
    plan = PruningPlan.keep_all(model)
    plan.kept_heads = [list(range(n)) for n in heads]
    plan.kept_neurons = [list(range(n)) for n in ffn]
    plan.check()
    remove(model, plan)
    if head_ids is not None:
        # re-apply the family's per-head bookkeeping with the real original head ids
        spec = get_spec(model)
        if spec.on_heads_pruned is not None:
            for view, ids in zip(layer_views(model, spec), head_ids, strict=True):
                if ids:
                    spec.on_heads_pruned(resolve(view.layer, spec.attention), ids)
    setattr(config, LAYOUT_KEY, dict(layout))
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
