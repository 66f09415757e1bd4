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


def reshape_to_layout(
    model: nn.Module,
    layout: dict[str, Any],
    spec: dict[str, str],
    on_heads_pruned: Callable[[nn.Module, list[int]], None] | None = None,
) -> nn.Module:
    """Resize every layer of a freshly built dense ``model`` to ``layout`` (``heads``, ``ffn`` and optionally
    ``head_ids`` per layer), in place; its weights must be loaded afterwards.

    ``spec`` holds the family's dotted paths (``layers`` and ``embeddings`` from ``model.base_model``; ``attention``,
    ``query``, ``key``, ``value``, ``attn_out``, ``ffn_up``, ``ffn_down`` from a layer) and the config keys
    ``heads_key`` and ``hidden_key``. ``on_heads_pruned`` is the family's per-head bookkeeping, called with a
    layer's attention module and the original ids of the heads it keeps.
    """
    config = model.config
    head_size = getattr(config, spec["hidden_key"]) // getattr(config, spec["heads_key"])
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
