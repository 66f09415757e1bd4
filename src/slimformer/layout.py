"""A model's per-layer shapes: slice heads, FFN neurons and layers out of the weights, record the resulting layout in
the config, and rebuild a model of that layout when it is loaded again.

Slicing takes the q/k/v output rows and the attention output projection's input columns of every removed head,
the FFN up projection's rows and down projection's columns of every removed neuron, and drops whole layers from
the layer list; biases follow their rows. A layer left with no heads keeps running: its attention module is
replaced by :class:`EmptyAttention` (zero-width context, so the output projection adds only its bias), which is
exactly what masking every head gives. An FFN with no neurons needs nothing special: a zero-width matmul yields
zeros and the down projection adds its bias.

transformers builds every layer from one config (BERT-family configs derive the head size from hidden size / head
count), so a model whose layers differ or whose heads were removed records its shapes in the config as
``slimformer_layout``; :func:`rebuild_layout` reshapes a freshly built dense model to it before its weights are
loaded. This sits below :mod:`slimformer.prune` (which decides *what* to remove) so that loading a model folder
needs nothing from pruning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import ArchSpec, LayerView, get_spec, layer_list, layer_views, resolve
from slimformer.errors import ModelLoadError
from slimformer.portable import EmptyAttention, empty_attention, reshape_to_layout, set_head_count, slice_stream

LAYOUT_KEY = "slimformer_layout"


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
        _set(view.layer, spec.attention, empty_attention(view.layer, spec.paths()))
        return kept_ids
    set_head_count(attention, len(keep), size)
    if spec.on_heads_pruned is not None:
        spec.on_heads_pruned(attention, kept_ids)
    return kept_ids


def prune_layer_neurons(view: LayerView, spec: ArchSpec, keep: list[int]) -> None:
    index = torch.tensor(keep, dtype=torch.long)
    _set(view.layer, spec.ffn_up, _sliced_linear(view.ffn_up, rows=index))
    _set(view.layer, spec.ffn_down, _sliced_linear(view.ffn_down, cols=index))


def current_hidden_ids(model: PreTrainedModel) -> list[int] | None:
    """The original index of each residual-stream dimension still present; None while none was removed."""
    layout = getattr(model.config, LAYOUT_KEY, None)
    ids = layout.get("hidden_ids") if layout else None
    return list(ids) if ids is not None else None


def model_width(model: PreTrainedModel) -> int:
    """The width of the residual stream now (the config's hidden size keeps the original: heads keep their size)."""
    ids = current_hidden_ids(model)
    return len(ids) if ids is not None else get_spec(model).hidden_size(model.config)


def slice_hidden(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """Keep only the hidden dimensions ``keep`` (indices into the stream as it is now) in the embeddings, every
    projection that reads or writes the stream, every LayerNorm on it and the task head's input, in place; record
    them in the layout. Exactly what :func:`slimformer.gates.gated_layer_norm` computes with a 0/1 gate.

    Hidden-dimension removal is CoFi's (Xia et al. 2022, "Structured Pruning Learns Compact and Accurate Models").
    """
    spec = get_spec(model)
    width = model_width(model)
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= width:
        raise ValueError(f"hidden dimensions to keep must be a non-empty subset of 0..{width - 1}")
    if not getattr(model, "has_task_head", True):
        raise ValueError("hidden dimensions of an embedding model cannot be removed: its embeddings would change size")
    old_ids = current_hidden_ids(model) or list(range(width))
    slice_stream(model, spec.paths(), keep)
    record_layout(model, spec, current_head_ids(model), hidden_ids=[old_ids[i] for i in keep])
    return model


def current_head_ids(model: PreTrainedModel) -> list[list[int]]:
    """For each layer, the original index of each head still present (composes successive prunings)."""
    layout = getattr(model.config, LAYOUT_KEY, None)
    if layout and "head_ids" in layout:
        return [list(ids) for ids in layout["head_ids"]]
    return [list(range(v.num_heads)) for v in layer_views(model)]


def slice_model(
    model: PreTrainedModel,
    kept_heads: Sequence[Sequence[int]],
    kept_neurons: Sequence[Sequence[int]],
    dropped_layers: Sequence[int] = (),
) -> PreTrainedModel:
    """Keep ``kept_heads[l]`` / ``kept_neurons[l]`` (indices into layer ``l`` as it is now) and drop
    ``dropped_layers``, in place; record the new layout in the config. The indices are not checked here: callers
    check them (:meth:`slimformer.prune.PruningPlan.validate`)."""
    spec = get_spec(model)
    head_ids = current_head_ids(model)
    views = layer_views(model, spec)
    new_head_ids = []
    for view in views:
        index = view.index
        heads, neurons = list(kept_heads[index]), list(kept_neurons[index])
        if heads != list(range(view.num_heads)):
            new_head_ids.append(prune_layer_heads(view, spec, heads, head_ids[index]))
        else:
            new_head_ids.append(head_ids[index])
        if neurons != list(range(view.ffn_size)):
            prune_layer_neurons(view, spec, neurons)
    if dropped_layers:
        kept_layers = [i for i in range(len(views)) if i not in set(dropped_layers)]
        layers = layer_list(model, spec)
        kept = [layers[i] for i in kept_layers]
        _set(model.base_model, spec.layers, nn.ModuleList(kept))
        new_head_ids = [new_head_ids[i] for i in kept_layers]
        setattr(model.config, spec.layers_key, len(kept))
    record_layout(model, spec, new_head_ids)
    return model


_UNCHANGED: Any = object()


def record_layout(
    model: PreTrainedModel, spec: ArchSpec, head_ids: list[list[int]], *, hidden_ids: Any = _UNCHANGED
) -> None:
    """Write the per-layer shapes into the config; leave the config plain where transformers can rebuild it.
    ``hidden_ids`` (kept stream dimensions) stays what the config records unless given."""
    if hidden_ids is _UNCHANGED:
        hidden_ids = current_hidden_ids(model)
    views = layer_views(model, spec)
    heads = [v.num_heads for v in views]
    ffn = [v.ffn_size for v in views]
    config = model.config
    full_heads = spec.num_heads(config)
    if len(set(ffn)) == 1:
        setattr(config, spec.ffn_key, ffn[0])
    uniform_plain = all(h == full_heads for h in heads) and len(set(ffn)) == 1 and hidden_ids is None
    if uniform_plain:
        if hasattr(config, LAYOUT_KEY):
            delattr(config, LAYOUT_KEY)
        return
    layout: dict[str, Any] = {"heads": heads, "ffn": ffn, "head_ids": head_ids}
    if hidden_ids is not None:
        layout["hidden_ids"] = list(hidden_ids)
    setattr(config, LAYOUT_KEY, layout)


def rebuild_layout(model: PreTrainedModel, layout: dict[str, Any]) -> PreTrainedModel:
    """Reshape a freshly built dense model to a recorded ``slimformer_layout`` (weights are loaded after)."""
    views = layer_views(model)
    heads, ffn, head_ids = layout["heads"], layout["ffn"], layout.get("head_ids")
    if len(heads) != len(views) or len(ffn) != len(views):
        raise ModelLoadError(f"slimformer_layout lists {len(heads)} layers, the config builds {len(views)}.")
    too_wide = [i for i, view in enumerate(views) if heads[i] > view.num_heads or ffn[i] > view.ffn_size]
    if too_wide:
        raise ModelLoadError(
            f"slimformer_layout asks for more heads or neurons than the config builds in layers {too_wide}."
        )
    if head_ids is not None and [len(ids) for ids in head_ids] != list(heads):
        raise ModelLoadError("slimformer_layout's head_ids do not match its head counts.")
    hidden_ids = layout.get("hidden_ids")
    full = get_spec(model).hidden_size(model.config)
    if hidden_ids is not None and (
        not hidden_ids or len(set(hidden_ids)) != len(hidden_ids) or not all(0 <= i < full for i in hidden_ids)
    ):
        raise ModelLoadError(f"slimformer_layout's hidden_ids must be distinct dimensions of 0..{full - 1}.")
    spec = get_spec(model)
    reshape_to_layout(model, layout, spec.paths(), spec.on_heads_pruned)
    setattr(model.config, LAYOUT_KEY, dict(layout))
    return model


__all__ = [
    "LAYOUT_KEY",
    "EmptyAttention",
    "current_head_ids",
    "current_hidden_ids",
    "model_width",
    "prune_layer_heads",
    "prune_layer_neurons",
    "rebuild_layout",
    "record_layout",
    "slice_hidden",
    "slice_model",
]
