"""Pruning plans: a small, serialisable statement of which heads, FFN neurons and layers a model keeps.

A plan is made for a model *layout* (heads and FFN neurons present in each layer), so it also applies to a model
that was pruned before. Indices refer to the units present in that layout. Plans are made from importance
scores by :func:`plan_from_scores`, checked against a model by :meth:`PruningPlan.validate`, and carried out by
:mod:`slimformer.prune.apply` (mask or physically remove).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedModel

from slimformer.arch import get_spec, layer_list, layer_views, resolve
from slimformer.errors import SlimformerError
from slimformer.io import write_json_atomic
from slimformer.layout import model_width
from slimformer.measure.flops import encoder_flops
from slimformer.portable import stream_parts

PLAN_VERSION = 1


class PlanError(SlimformerError):
    """A plan that is malformed, impossible, or made for another model."""


@dataclass(frozen=True)
class Layout:
    """Heads and FFN neurons present in each layer of a model, plus the shapes that do not change."""

    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    head_size: int
    hidden: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> Layout:
        views = layer_views(model)
        spec = get_spec(model)
        return cls(
            heads=tuple(v.num_heads for v in views),
            ffn=tuple(v.ffn_size for v in views),
            head_size=spec.head_size(model.config),
            hidden=model_width(model),
        )

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": list(self.heads), "ffn": list(self.ffn), "head_size": self.head_size, "hidden": self.hidden}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        return cls(tuple(data["heads"]), tuple(data["ffn"]), int(data["head_size"]), int(data["hidden"]))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PruningPlan:
    """Which heads and FFN neurons each layer keeps, which layers are dropped, and which hidden dimensions stay.

    ``kept_heads[l]`` and ``kept_neurons[l]`` are sorted indices into layer ``l`` of ``layout``;
    ``dropped_layers`` are layer indices of ``layout`` removed whole; ``kept_hidden`` (None: all) are the indices
    of the residual-stream dimensions kept, shared by every layer. ``meta`` records how the plan was made.
    """

    layout: Layout
    kept_heads: list[list[int]]
    kept_neurons: list[list[int]]
    dropped_layers: list[int] = field(default_factory=list)
    model_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    kept_hidden: list[int] | None = None

    def __post_init__(self) -> None:
        self.kept_heads = [sorted(int(i) for i in layer) for layer in self.kept_heads]
        self.kept_neurons = [sorted(int(i) for i in layer) for layer in self.kept_neurons]
        self.dropped_layers = sorted(int(i) for i in self.dropped_layers)
        if self.kept_hidden is not None:
            self.kept_hidden = sorted(int(i) for i in self.kept_hidden)
        self.check()

    # construction -------------------------------------------------------------------------------------------
    @classmethod
    def keep_all(cls, model: PreTrainedModel) -> PruningPlan:
        layout = Layout.of(model)
        return cls(
            layout=layout,
            kept_heads=[list(range(h)) for h in layout.heads],
            kept_neurons=[list(range(f)) for f in layout.ffn],
            model_type=model.config.model_type,
        )

    # checks -------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Internal consistency: one entry per layer, indices in range and unique."""
        layout = self.layout
        for name, kept, sizes in (
            ("kept_heads", self.kept_heads, layout.heads),
            ("kept_neurons", self.kept_neurons, layout.ffn),
        ):
            if len(kept) != layout.num_layers:
                raise PlanError(f"{name} lists {len(kept)} layers, the layout has {layout.num_layers}.")
            for layer, (indices, size) in enumerate(zip(kept, sizes, strict=True)):
                if len(set(indices)) != len(indices):
                    duplicates = sorted({i for i in indices if indices.count(i) > 1})
                    raise PlanError(f"{name}[{layer}] has duplicate indices {duplicates}.")
                bad = [i for i in indices if not 0 <= i < size]
                if bad:
                    raise PlanError(f"{name}[{layer}] has indices {bad} out of range: layer {layer} has {size}.")
        bad_layers = [i for i in self.dropped_layers if not 0 <= i < layout.num_layers]
        if bad_layers or len(set(self.dropped_layers)) != len(self.dropped_layers):
            raise PlanError(
                f"dropped_layers {self.dropped_layers} must be distinct indices in 0..{layout.num_layers - 1}."
            )
        if len(self.dropped_layers) == layout.num_layers:
            raise PlanError("The plan drops every layer; keep at least one.")
        hidden = self.kept_hidden
        if hidden is not None and (
            not hidden or len(set(hidden)) != len(hidden) or not all(0 <= i < layout.hidden for i in hidden)
        ):
            raise PlanError(f"kept_hidden must be distinct indices in 0..{layout.hidden - 1}, at least one.")

    def validate(self, model: PreTrainedModel) -> None:
        """Raise :class:`PlanError` unless this plan was made for ``model``'s family and current layout."""
        if self.model_type and self.model_type != model.config.model_type:
            raise PlanError(f"This plan was made for a {self.model_type!r} model, not {model.config.model_type!r}.")
        actual = Layout.of(model)
        if actual != self.layout:
            raise PlanError(
                "This plan was made for a model with another shape: plan layout "
                f"{self.layout.to_dict()}, model layout {actual.to_dict()}. Make the plan from this model."
            )

    # views ----------------------------------------------------------------------------------------------------
    @property
    def hidden_after(self) -> int:
        return self.layout.hidden if self.kept_hidden is None else len(self.kept_hidden)

    @property
    def kept_layers(self) -> list[int]:
        return [i for i in range(self.layout.num_layers) if i not in self.dropped_layers]

    def result_layout(self) -> Layout:
        """The layout of the model after :func:`~slimformer.prune.apply.remove` with this plan."""
        keep = self.kept_layers
        return Layout(
            heads=tuple(len(self.kept_heads[i]) for i in keep),
            ffn=tuple(len(self.kept_neurons[i]) for i in keep),
            head_size=self.layout.head_size,
            hidden=self.hidden_after,
        )

    def head_mask(self) -> np.ndarray:
        """[layers, max heads] array: 1 for kept heads, 0 for pruned ones (and for dropped layers)."""
        mask = np.zeros((self.layout.num_layers, max(self.layout.heads, default=0)), dtype=np.float32)
        for layer in self.kept_layers:
            mask[layer, self.kept_heads[layer]] = 1
        return mask

    def summary(self, model: PreTrainedModel, seq_len: int = 128) -> dict[str, Any]:
        """Heads, neurons, parameters and encoder FLOPs (one sequence of ``seq_len``) before and after.

        Computed from the plan's shapes alone (not by pruning a copy), so that tests can check it against
        :func:`slimformer.measure.count_parameters` and :func:`slimformer.measure.flops` on the pruned model;
        the FLOPs come from the same formula (:func:`slimformer.measure.encoder_flops` on the layout).
        """
        self.validate(model)
        layout = self.layout
        views = layer_views(model)
        hidden = self.hidden_after
        shrink = hidden / layout.hidden  # the share of every hidden-sized vector that stays
        linear = {"query", "key", "value", "attn_out", "ffn_up", "ffn_down"}
        norms = stream_norm_params(model)
        fixed_per_layer = [  # layer norms (which shrink with the stream) and anything else pruning leaves alone
            sum(p.numel() for p in v.layer.parameters())
            - sum(p.numel() for name in linear for p in getattr(v, name).parameters())
            - norms[v.index]
            + round(norms[v.index] * shrink)
            for v in views
        ]
        total_params = sum(p.numel() for p in model.parameters())
        encoder_params = sum(p.numel() for v in views for p in v.layer.parameters())

        def layer_params(layer: int, heads: int, neurons: int) -> int:
            width = heads * layout.head_size
            params = 3 * (hidden * width + width) + (width * hidden + hidden)
            return params + (hidden * neurons + neurons) + (neurons * hidden + hidden) + fixed_per_layer[layer]

        # a dropped layer keeps nothing: 0 heads and 0 neurons, which cost 0 FLOPs
        heads_kept = [len(self.kept_heads[i]) if i in self.kept_layers else 0 for i in range(layout.num_layers)]
        neurons_kept = [len(self.kept_neurons[i]) if i in self.kept_layers else 0 for i in range(layout.num_layers)]
        kept_params = total_params - encoder_params - outside_stream_params(model, 1.0)
        kept_params += outside_stream_params(model, shrink)
        kept_params += sum(layer_params(i, heads_kept[i], neurons_kept[i]) for i in self.kept_layers)
        shapes = {"head_size": layout.head_size, "seq_len": seq_len}
        dense_flops = encoder_flops(layout.heads, layout.ffn, hidden=layout.hidden, **shapes)
        kept_flops = encoder_flops(heads_kept, neurons_kept, hidden=hidden, **shapes)
        heads_before, neurons_before = sum(layout.heads), sum(layout.ffn)
        heads_after, neurons_after = sum(heads_kept), sum(neurons_kept)
        return {
            "layers": {"before": layout.num_layers, "after": len(self.kept_layers)},
            "heads": {"before": heads_before, "after": heads_after},
            "neurons": {"before": neurons_before, "after": neurons_after},
            "hidden": {"before": layout.hidden, "after": hidden},
            "heads_per_layer": heads_kept,
            "neurons_per_layer": neurons_kept,
            "params": {"before": total_params, "after": kept_params, "ratio": kept_params / total_params},
            "encoder_flops": {
                "seq_len": seq_len,
                "before": dense_flops,
                "after": kept_flops,
                "ratio": kept_flops / dense_flops if dense_flops else 1.0,
            },
        }

    # serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "slimformer_plan": PLAN_VERSION,
            "model_type": self.model_type,
            "layout": self.layout.to_dict(),
            "kept_heads": self.kept_heads,
            "kept_neurons": self.kept_neurons,
            "dropped_layers": self.dropped_layers,
            "kept_hidden": self.kept_hidden,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        if not isinstance(data, dict) or data.get("slimformer_plan") != PLAN_VERSION:
            raise PlanError(
                f"Not a slimformer pruning plan (version {PLAN_VERSION}): expected a JSON object with "
                f'"slimformer_plan": {PLAN_VERSION}.'
            )
        try:
            return cls(
                layout=Layout.from_dict(data["layout"]),
                kept_heads=data["kept_heads"],
                kept_neurons=data["kept_neurons"],
                dropped_layers=data.get("dropped_layers", []),
                model_type=data.get("model_type"),
                meta=data.get("meta", {}),
                kept_hidden=data.get("kept_hidden"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"Malformed pruning plan: {error!r}") from error

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"Plan file {path} does not exist.") from None
        except ValueError as error:
            raise PlanError(f"Plan file {path} is not valid JSON: {error}") from error
        return cls.from_dict(data)


def stream_norm_params(model: PreTrainedModel) -> list[int]:
    """Per layer: the parameters of its LayerNorms on the residual stream."""
    spec = get_spec(model)
    return [
        sum(p.numel() for path in (spec.attn_norm, spec.ffn_norm) for p in resolve(v.layer, path).parameters())
        for v in layer_views(model, spec)
    ]


def outside_stream_params(model: PreTrainedModel, shrink: float) -> int:
    """Parameters outside the layers that hold the residual stream's dimensions (embedding tables, the stream's
    first LayerNorm or projection, the task head's input), when a ``shrink`` share of the dimensions stays."""
    spec = get_spec(model)
    width = model_width(model)
    kept = round(width * shrink)
    layers = {id(layer) for layer in layer_list(model, spec)}
    total = 0
    for parent, path, kind in stream_parts(model, spec.paths()):
        if id(parent) in layers:
            continue
        module = resolve(parent, path)
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        if kind == "embedding":
            total += module.num_embeddings * kept
        elif kind == "norm":
            total += round((module.weight.numel() + bias) * shrink)
        elif kind == "rows":
            total += (module.in_features + 1) * kept if bias else module.in_features * kept
        else:
            total += kept * module.out_features + bias
    return total


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise PlanError(
            f"--{name} {value:g} is impossible: it is the fraction of {name} to prune and must be between 0 and 1 "
            f"(for example 0.5 prunes half)."
        )


def _select(
    scores: list[np.ndarray],
    prune_fraction: float,
    scope: Literal["global", "layer"],
    min_per_layer: int,
) -> list[list[int]]:
    """Indices to keep per layer: drop the lowest-scoring ``prune_fraction`` of units, globally or per layer."""
    sizes = [len(s) for s in scores]
    if scope == "layer":
        kept = []
        for layer_scores in scores:
            n_keep = max(len(layer_scores) - round(prune_fraction * len(layer_scores)), 0)
            n_keep = min(max(n_keep, min_per_layer), len(layer_scores))
            order = np.argsort(-layer_scores, kind="stable")
            kept.append(sorted(order[:n_keep].tolist()))
        return kept
    if scope != "global":
        raise PlanError(f"scope must be 'global' or 'layer', not {scope!r}")
    total = sum(sizes)
    n_prune = round(prune_fraction * total)
    # the minimum per layer is protected first; the rest compete globally
    protected = [set(np.argsort(-s, kind="stable")[: min(min_per_layer, len(s))].tolist()) for s in scores]
    candidates = [
        (float(s[i]), layer, i) for layer, s in enumerate(scores) for i in range(len(s)) if i not in protected[layer]
    ]
    if n_prune > len(candidates):
        raise PlanError(f"Cannot prune {n_prune} of {total} units while keeping at least {min_per_layer} per layer.")
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    pruned = {(layer, i) for _, layer, i in candidates[:n_prune]}
    return [sorted(i for i in range(size) if (layer, i) not in pruned) for layer, size in enumerate(sizes)]


def _round_to_multiple(kept: list[int], scores: np.ndarray, multiple: int) -> list[int]:
    """Round a layer's kept count to the nearest multiple (fast matrix shapes), keeping the best units."""
    if multiple <= 1 or not kept:
        return kept
    target = min(max(multiple, round(len(kept) / multiple) * multiple), len(scores))
    order = np.argsort(-scores, kind="stable")
    return sorted(order[:target].tolist())


def plan_from_scores(
    model: PreTrainedModel,
    head_scores: np.ndarray | list[np.ndarray] | None = None,
    neuron_scores: np.ndarray | list[np.ndarray] | None = None,
    *,
    heads: float = 0.0,
    ffn: float = 0.0,
    scope: Literal["global", "layer"] = "global",
    min_heads_per_layer: int = 0,
    min_neurons_per_layer: int = 0,
    ffn_multiple: int = 1,
    drop_layers: list[int] | None = None,
    meta: dict[str, Any] | None = None,
) -> PruningPlan:
    """Keep the highest-scoring heads and FFN neurons.

    ``heads`` and ``ffn`` are the fractions to prune (0.5 prunes half); ``scope="global"`` ranks units across
    layers (Michel et al. 2019 prune globally after normalising scores per layer), ``"layer"`` prunes the same
    fraction in every layer. ``ffn_multiple`` rounds each layer's kept FFN width to a multiple of 8/16/32/64,
    which matrix kernels run faster on. Scores are arrays [layers, units] or one array per layer.
    """
    _check_fraction("heads", heads)
    _check_fraction("ffn", ffn)
    if ffn_multiple not in (1, 8, 16, 32, 64):
        raise PlanError(f"ffn_multiple must be one of 1, 8, 16, 32, 64, not {ffn_multiple}.")
    base = PruningPlan.keep_all(model)
    layout = base.layout
    head_list = _per_layer("head", head_scores, layout.heads, needed=heads > 0)
    neuron_list = _per_layer("neuron", neuron_scores, layout.ffn, needed=ffn > 0 or ffn_multiple > 1)
    kept_heads = _select(head_list, heads, scope, min_heads_per_layer) if heads > 0 else base.kept_heads
    kept_neurons = _select(neuron_list, ffn, scope, min_neurons_per_layer) if ffn > 0 else base.kept_neurons
    if ffn_multiple > 1:
        kept_neurons = [_round_to_multiple(k, s, ffn_multiple) for k, s in zip(kept_neurons, neuron_list, strict=True)]
    return PruningPlan(
        layout=layout,
        kept_heads=kept_heads,
        kept_neurons=kept_neurons,
        dropped_layers=drop_layers or [],
        model_type=model.config.model_type,
        meta={"heads": heads, "ffn": ffn, "scope": scope, "ffn_multiple": ffn_multiple, **(meta or {})},
    )


def _per_layer(
    kind: str, scores: np.ndarray | list[np.ndarray] | None, sizes: tuple[int, ...], needed: bool
) -> list[np.ndarray]:
    if scores is None:
        if needed:
            raise PlanError(f"Pruning {kind}s needs {kind} importance scores.")
        return [np.zeros(n) for n in sizes]
    rows = [np.asarray(row, dtype=np.float64).reshape(-1) for row in scores]
    if len(rows) != len(sizes) or any(len(r) < n for r, n in zip(rows, sizes, strict=False)):
        raise PlanError(f"{kind} scores have shape {[len(r) for r in rows]}, the model has {list(sizes)}.")
    # a [layers, max units] array may be padded for uneven layers: drop the padding
    return [r[:n] for r, n in zip(rows, sizes, strict=True)]
