"""Rebuild a pruned model's per-layer shapes with nothing but torch: the part of loading a pruned folder that must
also work where slimformer is not installed.

transformers builds every layer of a model from one config, so a model whose layers kept different numbers of
heads or FFN neurons (or whose heads were pruned at all: BERT-family configs derive the head size from hidden size /
head count) cannot be built by ``from_pretrained`` alone. Its config records the shapes as ``slimformer_layout``
(``heads``, ``ffn`` and ``head_ids`` per layer); :func:`reshape_to_layout` resizes a freshly built dense model to
them, after which its weights load strictly.

slimformer uses this module when it loads a folder, and copies its source verbatim into every saved folder whose
layout plain transformers cannot build, as the first part of ``modeling_slimformer.py`` (see
:mod:`slimformer.remote_code`), so that ``from_pretrained(folder, trust_remote_code=True)`` rebuilds the same shapes
by the same code. That is why it imports nothing but torch (``tests/test_structure.py`` checks it) and reaches model
internals only through the dotted paths of a family's spec, passed in as a plain dict.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class EmptyAttention(nn.Module):
    """Stands in for an attention module whose heads were all removed.

    It keeps the (zero-width) projections under their original names, so the state dict has the same keys as
    any other pruned layer, and returns a zero-width context; if the family's output projection lives inside the
    attention module (DistilBERT, MPNet) it is applied, which adds its bias. This is exactly what masking every
    head gives.
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


def resolve_path(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path (digits index module lists)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent_path, _, name = path.rpartition(".")
    parent = resolve_path(root, parent_path) if parent_path else root
    setattr(parent, name, module)


def relative_path(path: str, prefix: str) -> str | None:
    """``path`` relative to ``prefix``, or None when it does not lie under it."""
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else None


def empty_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` of the given shape, on ``like``'s device and dtype, with uninitialised weights: they are
    about to be overwritten by a checkpoint, so initialising them would be wasted time."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        new = nn.Linear(in_features, out_features, bias=like.bias is not None, dtype=like.weight.dtype)
    return new.to_empty(device=like.weight.device)


def set_head_count(attention: nn.Module, heads: int, head_size: int) -> None:
    """Keep an attention module's own bookkeeping truthful after its heads changed (families reshape with it)."""
    for attr in ("num_attention_heads", "n_heads"):
        if hasattr(attention, attr):
            setattr(attention, attr, heads)
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = heads * head_size


def empty_attention(layer: nn.Module, spec: dict[str, str]) -> EmptyAttention:
    """An :class:`EmptyAttention` holding the layer's current projections that live inside its attention module."""
    projections = {}
    for name in ("query", "key", "value", "attn_out"):
        relative = relative_path(spec[name], spec["attention"])
        if relative is not None:
            projections[relative] = resolve_path(layer, spec[name])
    return EmptyAttention(projections, relative_path(spec["attn_out"], spec["attention"]))


def stream_parts(model: nn.Module, spec: dict[str, Any]) -> list[tuple[nn.Module, str, str]]:
    """Every module that holds the residual stream's dimensions, as (parent, path from it, how it holds them):
    ``embedding`` tables and ``norm`` LayerNorms hold them as their width, ``rows`` Linears write them (their
    output rows), ``cols`` Linears read them (their input columns). Slicing all of them alike removes hidden
    dimensions."""
    base = model.base_model
    entry_path = None
    for path in spec["stream_entry"]:
        try:
            entry = resolve_path(base, path)
        except AttributeError:
            continue
        if isinstance(entry, (nn.LayerNorm, nn.Linear)):
            entry_path = path
            break
    if entry_path is None:
        raise ValueError(f"none of {spec['stream_entry']} starts the residual stream of {type(model).__name__}")
    parts: list[tuple[nn.Module, str, str]] = []
    if isinstance(entry, nn.LayerNorm):
        embeddings = resolve_path(base, spec["embeddings"])
        parts += [
            (embeddings, name, "embedding")
            for name, child in embeddings.named_children()
            if isinstance(child, nn.Embedding)
        ]
        parts.append((base, entry_path, "norm"))
    else:  # a projection of narrower embeddings (ELECTRA): the stream starts at its output
        parts.append((base, entry_path, "rows"))
    for layer in resolve_path(base, spec["layers"]):
        parts += [(layer, spec[name], "cols") for name in ("query", "key", "value", "ffn_up")]
        parts += [(layer, spec[name], "rows") for name in ("attn_out", "ffn_down")]
        parts += [(layer, spec[name], "norm") for name in ("attn_norm", "ffn_norm")]
    try:  # a base model's pooler reads the stream too, whether the task head uses it (BERT) or not (RoBERTa)
        pooler = resolve_path(base, "pooler.dense")
    except AttributeError:  # built without one
        pooler = None
    if isinstance(pooler, nn.Linear):
        parts.append((base, "pooler.dense", "cols"))
    if model.base_model is not model and getattr(model, "has_task_head", True):
        parts += [(model, path, "cols") for path in spec["head_inputs"] if not path.startswith("base_model.")]
    return parts


def _sliced(module: nn.Module, kind: str, keep: torch.Tensor) -> nn.Module:
    if kind == "embedding":
        weight = module.weight.detach().index_select(1, keep)
        return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=module.padding_idx)
    if kind == "norm":
        new = nn.LayerNorm(
            len(keep),
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device=keep.device,
            dtype=module.weight.dtype,
        )
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(module, name) is not None:
                    getattr(new, name).copy_(getattr(module, name).index_select(0, keep))
        return new
    weight = module.weight.detach()
    bias = module.bias.detach() if module.bias is not None else None
    if kind == "rows":
        weight = weight.index_select(0, keep)
        bias = bias.index_select(0, keep) if bias is not None else None
    else:
        weight = weight.index_select(1, keep)
    new = empty_linear(module, weight.shape[1], weight.shape[0])
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def slice_stream(model: nn.Module, spec: dict[str, Any], keep: list[int]) -> nn.Module:
    """Keep only the residual-stream dimensions ``keep`` (indices into the current stream), in place, in every
    module that holds them (:func:`stream_parts`). The config's hidden size is left alone: transformers derives the
    head size from it, and heads keep their size."""
    parts = stream_parts(model, spec)
    device = next(model.parameters()).device
    index = torch.tensor(keep, dtype=torch.long, device=device)
    for parent, path, kind in parts:
        module = resolve_path(parent, path)
        new = _sliced(module, kind, index.to(module.weight.device))
        new.train(module.training)
        set_path(parent, path, new)
    return model


def reshape_to_layout(
    model: nn.Module,
    layout: dict[str, Any],
    spec: dict[str, str],
    on_heads_pruned: Callable[[nn.Module, list[int]], None] | None = None,
) -> nn.Module:
    """Resize every layer of a freshly built dense ``model`` to ``layout`` (``heads``, ``ffn`` and optionally
    ``head_ids`` per layer; optionally ``hidden_ids``, the residual-stream dimensions kept), in place; its weights
    must be loaded afterwards.

    ``spec`` holds the family's dotted paths (``layers`` and ``embeddings`` from ``model.base_model``; ``attention``,
    ``query``, ``key``, ``value``, ``attn_out``, ``ffn_up``, ``ffn_down`` from a layer) and the config keys
    ``heads_key`` and ``hidden_key``. ``on_heads_pruned`` is the family's per-head bookkeeping, called with a
    layer's attention module and the original ids of the heads it keeps.
    """
    config = model.config
    head_size = getattr(config, spec["hidden_key"]) // getattr(config, spec["heads_key"])
    if layout.get("hidden_ids") is not None:  # removed hidden dimensions: the dense build has them all, in order
        slice_stream(model, spec, list(layout["hidden_ids"]))
    layers = resolve_path(model.base_model, spec["layers"])
    heads, ffn = layout["heads"], layout["ffn"]
    head_ids = layout.get("head_ids") or [list(range(n)) for n in heads]
    if not len(heads) == len(ffn) == len(head_ids) == len(layers):
        raise ValueError(f"slimformer_layout lists {len(heads)} layers; the config builds {len(layers)}.")
    for layer, kept_heads, kept_neurons, ids in zip(layers, heads, ffn, head_ids, strict=True):
        width = kept_heads * head_size
        for name in ("query", "key", "value"):
            old = resolve_path(layer, spec[name])
            set_path(layer, spec[name], empty_linear(old, old.in_features, width))
        old = resolve_path(layer, spec["attn_out"])
        set_path(layer, spec["attn_out"], empty_linear(old, width, old.out_features))
        old = resolve_path(layer, spec["ffn_up"])
        set_path(layer, spec["ffn_up"], empty_linear(old, old.in_features, kept_neurons))
        old = resolve_path(layer, spec["ffn_down"])
        set_path(layer, spec["ffn_down"], empty_linear(old, kept_neurons, old.out_features))
        if kept_heads == 0:
            set_path(layer, spec["attention"], empty_attention(layer, spec))
            continue
        attention = resolve_path(layer, spec["attention"])
        set_head_count(attention, kept_heads, head_size)
        if on_heads_pruned is not None:
            on_heads_pruned(attention, list(ids))
    return model
