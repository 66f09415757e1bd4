"""Architecture specs: where each model family keeps its layers, attention projections and FFN.

Each family lives in one module of this package that defines ``SPEC = ArchSpec(...)``; the registry below
discovers them, so adding a family means adding one file (plus its tiny test config in ``tests/conftest.py``).
Everything else in slimformer reaches model internals only through :func:`get_spec` and :class:`LayerView`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from slimformer.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Declarative description of one model family.

    Paths are dotted attribute paths. ``layers`` and ``embeddings`` are relative to ``model.base_model``;
    the projection paths are relative to one layer of ``layers``; ``classifier`` is relative to the task model.
    ``attention`` is the module that maps hidden states to the attention output and returns ``(output,
    weights)``; it holds q, k and v, and in some families (DistilBERT, MPNet) also the output projection.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_up: str
    ffn_down: str
    embeddings: str = "embeddings"
    classifier: tuple[str, ...] = ("classifier",)
    # The residual stream (hidden dimensions), for hidden-dimension pruning: the LayerNorms after attention and
    # after the FFN (relative to a layer); the module that first writes the stream (relative to ``base_model``;
    # the first of these paths that exists: ELECTRA projects smaller embeddings up to the hidden size); and the
    # task head's linear layers that read the final stream (relative to the task model).
    attn_norm: str = "attention.output.LayerNorm"
    ffn_norm: str = "output.LayerNorm"
    # the FFN's activation module (between ``ffn_up`` and ``ffn_down``), relative to a layer: with the two norms, what
    # the refit needs to compute a layer's FFN from its attention contexts without running the attention again
    ffn_act: str = "intermediate.intermediate_act_fn"
    stream_entry: tuple[str, ...] = ("embeddings.LayerNorm",)
    head_inputs: tuple[str, ...] = ("classifier.dense",)
    # The sequence-classification head reads only the first token's final state (BERT's pooler, the [CLS] /
    # <s> features of RoBERTa, MPNet and ELECTRA heads, DistilBERT's pre-classifier): the last layer's other
    # positions reach no logit, so the refit of that layer fits the first token only.
    head_reads_first_token: bool = True
    heads_key: str = "num_attention_heads"
    ffn_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    # Family-specific bookkeeping after heads are physically removed: called with the attention module and the
    # original ids of the heads it keeps (MPNet slices its shared relative-position bias per layer). Idempotent.
    on_heads_pruned: Callable[[nn.Module, list[int]], None] | None = None

    def num_heads(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.heads_key))

    def ffn_size(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.ffn_key))

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.layers_key))

    def hidden_size(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.hidden_key))

    def head_size(self, config: PretrainedConfig) -> int:
        return self.hidden_size(config) // self.num_heads(config)

    def paths(self) -> dict[str, Any]:
        """The module paths and config keys as a plain dict: what :mod:`slimformer.portable` takes, and what a
        saved folder's ``modeling_slimformer.py`` carries."""
        names = (
            "layers",
            "embeddings",
            "attention",
            *_LINEAR_PARTS,
            "attn_norm",
            "ffn_norm",
            "stream_entry",
            "head_inputs",
            "heads_key",
            "ffn_key",
            "layers_key",
            "hidden_key",
        )
        return {name: getattr(self, name) for name in names}


@cache
def _registry() -> dict[str, ArchSpec]:
    """model_type -> spec, from every module of this package that defines ``SPEC``."""
    by_model_type: dict[str, ArchSpec] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, ArchSpec):
            for model_type in spec.model_types:
                if model_type in by_model_type:
                    raise RuntimeError(f"model_type {model_type!r} is claimed by two arch specs")
                by_model_type[model_type] = spec
    return by_model_type


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` slimformer knows, sorted."""
    return sorted(_registry())


def supported_families() -> list[str]:
    """Every family name, sorted (several model types may share one family, e.g. RoBERTa and XLM-R)."""
    return sorted({spec.family for spec in _registry().values()})


def get_spec(model_or_config: PreTrainedModel | PretrainedConfig | str) -> ArchSpec:
    """The spec for a model, a config or a ``model_type`` string; a clear error if unsupported."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None) or "<unknown>"
    try:
        return _registry()[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Model type {model_type!r} is not supported. Supported model types: "
            f"{', '.join(supported_model_types())}. To add a family, add one spec module to slimformer/arch/."
        ) from None


def resolve(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path from ``root``; a clear error naming the missing part."""
    module = root
    for part in path.split("."):
        if part.isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
            module = module[int(part)]
            continue
        if not hasattr(module, part):
            raise UnsupportedArchitectureError(
                f"{type(root).__name__} has no submodule {path!r} (missing {part!r} in "
                f"{type(module).__name__}); its arch spec does not match this model."
            )
        module = getattr(module, part)
    return module


@dataclass
class LayerView:
    """The modules of one transformer layer that pruning and measuring touch."""

    index: int
    layer: nn.Module
    attention: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ffn_up: nn.Linear
    ffn_down: nn.Linear
    head_size: int

    @property
    def num_heads(self) -> int:
        """Heads currently present (may be fewer than the config says after pruning)."""
        return self.query.out_features // self.head_size

    @property
    def ffn_size(self) -> int:
        """FFN neurons currently present."""
        return self.ffn_up.out_features


def layer_list(model: PreTrainedModel, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer layers."""
    spec = spec or get_spec(model)
    layers = resolve(model.base_model, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{spec.layers!r} of {type(model).__name__} is not a ModuleList")
    return layers


def layer_views(model: PreTrainedModel, spec: ArchSpec | None = None) -> list[LayerView]:
    """A :class:`LayerView` for every layer of ``model``, in order."""
    spec = spec or get_spec(model)
    head_size = spec.head_size(model.config)
    return [layer_view(layer, index, spec, head_size) for index, layer in enumerate(layer_list(model, spec))]


def layer_view(layer: nn.Module, index: int, spec: ArchSpec, head_size: int) -> LayerView:
    """The :class:`LayerView` of one layer module (also of a copy outside any model)."""
    parts = {name: resolve(layer, getattr(spec, name)) for name in _LINEAR_PARTS}
    for name, module in parts.items():
        if not isinstance(module, nn.Linear):
            raise UnsupportedArchitectureError(
                f"{spec.family} spec: layer {index} {name} ({getattr(spec, name)!r}) is "
                f"{type(module).__name__}, expected nn.Linear"
            )
    attention = resolve(layer, spec.attention)
    return LayerView(index=index, layer=layer, attention=attention, head_size=head_size, **parts)


_LINEAR_PARTS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")


def embeddings(model: PreTrainedModel, spec: ArchSpec | None = None) -> nn.Module:
    spec = spec or get_spec(model)
    return resolve(model.base_model, spec.embeddings)


def stream_entry(model: PreTrainedModel, spec: ArchSpec | None = None) -> tuple[str, nn.Module]:
    """(path from ``base_model``, module) of the module that first writes the residual stream: a LayerNorm (the
    stream starts normalised) or a Linear (ELECTRA's projection of smaller embeddings)."""
    spec = spec or get_spec(model)
    for path in spec.stream_entry:
        try:
            module = resolve(model.base_model, path)
        except UnsupportedArchitectureError:
            continue
        if isinstance(module, (nn.LayerNorm, nn.Linear)):
            return path, module
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: none of {spec.stream_entry} is a LayerNorm or Linear; its arch spec does not match."
    )


def stream_norms(model: PreTrainedModel, spec: ArchSpec | None = None) -> list[tuple[nn.Module, str, nn.LayerNorm]]:
    """(layer, path from the layer, LayerNorm) for every LayerNorm that re-normalises the residual stream, in
    order (after attention, after the FFN, layer by layer)."""
    spec = spec or get_spec(model)
    norms = []
    for layer in layer_list(model, spec):
        for path in (spec.attn_norm, spec.ffn_norm):
            module = resolve(layer, path)
            if not isinstance(module, nn.LayerNorm):
                raise UnsupportedArchitectureError(f"{spec.family} spec: {path!r} is not a LayerNorm")
            norms.append((layer, path, module))
    return norms


def head_inputs(model: PreTrainedModel, spec: ArchSpec | None = None) -> list[tuple[str, nn.Linear]]:
    """(path from the task model, Linear) of the task head's layers that read the final residual stream; none
    for a model without a task head."""
    if not getattr(model, "has_task_head", True):
        return []
    spec = spec or get_spec(model)
    readers = []
    for path in spec.head_inputs:
        module = resolve(model, path)
        if not isinstance(module, nn.Linear):
            raise UnsupportedArchitectureError(f"{spec.family} spec: head input {path!r} is not a Linear")
        readers.append((path, module))
    return readers


def classifier_modules(model: PreTrainedModel, spec: ArchSpec | None = None) -> list[nn.Module]:
    """The task head's modules; none for a model without one (a sentence-embedding model pools and normalises)."""
    if not getattr(model, "has_task_head", True):
        return []
    spec = spec or get_spec(model)
    return [resolve(model, path) for path in spec.classifier]


__all__ = [
    "ArchSpec",
    "LayerView",
    "classifier_modules",
    "embeddings",
    "get_spec",
    "head_inputs",
    "layer_list",
    "layer_views",
    "resolve",
    "stream_entry",
    "stream_norms",
    "supported_families",
    "supported_model_types",
]
