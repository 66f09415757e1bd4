"""int8 on OpenVINO: ``openvino.convert_model`` of slimformer's ONNX export, then NNCF's post-training quantization.

The libraries do the work. ``openvino.convert_model`` reads the graph of :func:`slimformer.export.export_onnx`
(unevenly pruned layers, layers without heads and FFNs without neurons are plain nodes there). It could trace the
PyTorch model itself, but that trace freezes the same Python branch of transformers' attention mask that our
exporter already works around and checks (a batch without padding drops the mask), so both runtimes start from
the one checked export. Zero-width linear layers are the one thing OpenVINO cannot read or run; the export for
it replaces them by what they compute (:func:`without_zero_width_layers`). ``nncf.quantize`` with
``model_type=ModelType.TRANSFORMER`` inserts FakeQuantize nodes (int8 weights, per channel; int8 activations with
ranges calibrated on task examples), applies SmoothQuant and bias correction, and keeps in floating point what
its transformer preset knows costs accuracy (layer norms, softmax, GELU, the attention scores' inputs where the
preset says so). OpenVINO has no run-time ("dynamic") activation quantization for such models, so the only mode
here is ``static``.

The result is an OpenVINO IR pair (``model.xml`` + ``model.bin``) that ``openvino.Core().compile_model`` runs
without slimformer or NNCF.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from copy import deepcopy
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.export import _require

INSTALL_HINT = "pip install slimformer[openvino]"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``openvino`` or ``nncf``, or say which install line fixes it."""
    return _require(module, purpose, install=INSTALL_HINT)


class _BiasOnly(nn.Module):
    """A linear layer with no inputs (every neuron or head feeding it was pruned): its output is its bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*inputs.shape[:-1], self.bias.shape[0])


class _PassOn(nn.Module):
    """A linear layer with no outputs: what it feeds is a :class:`_BiasOnly` that reads only the leading shape,
    so any tensor of that shape will do; passing the input on avoids a zero-width tensor."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs


def without_zero_width_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing the same function without zero-width linear layers, which OpenVINO cannot
    run (its ONNX reader takes an empty weight for a scalar; its CPU plugin has no empty matrix product).

    A linear layer with no inputs becomes its bias; one with no outputs (an FFN's up-projection with no neurons
    left, whose only reader is the down-projection with no inputs) passes its input on unchanged.
    """
    copy = deepcopy(model)
    for name, module in list(copy.named_modules()):
        if not isinstance(module, nn.Linear) or (module.in_features and module.out_features):
            continue
        replacement = _BiasOnly(module) if module.in_features == 0 else _PassOn()
        parent_name, _, child = name.rpartition(".")
        setattr(copy.get_submodule(parent_name) if parent_name else copy, child, replacement)
    return copy


def quantize_openvino(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    calibration: list[dict[str, np.ndarray]],
    progress: bool = True,
) -> dict[str, Any]:
    """Convert the fp32 ONNX model and quantize it to int8 with NNCF on ``calibration`` (input feeds: batches of
    int64 arrays); write the IR to ``out_path`` (``.xml``, with its ``.bin``). Returns what became int8."""
    ov = require("openvino", "OpenVINO int8 quantization")
    nncf = require("nncf", "OpenVINO int8 quantization")
    if not calibration:
        raise ValueError("OpenVINO int8 quantization needs calibration examples")
    converted = ov.convert_model(str(onnx_path))
    names = [port.get_any_name() for port in converted.inputs]
    feeds = [{n: np.asarray(batch[n], dtype=np.int64) for n in names if n in batch} for batch in calibration]
    missing = [name for name in names if name not in feeds[0]]
    if missing:
        raise SlimformerError(f"The calibration batches lack the model inputs {missing}.")
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    if not progress:
        nncf_logger.setLevel(logging.ERROR)
    try:
        quantized = nncf.quantize(
            converted,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),  # every calibration batch (NNCF counts dataset items, here batches)
        )
    finally:
        nncf_logger.setLevel(level)
    ov.save_model(quantized, str(out_path), compress_to_fp16=False)
    return {"runtime": "openvino", "mode": "static", "per_channel": True, **fake_quantize_summary(quantized)}


def fake_quantize_summary(model: Any) -> dict[str, Any]:
    """Which matrix products of an NNCF-quantized OpenVINO model got int8 inputs (FakeQuantize nodes in front)
    and which stayed in floating point."""
    quantized, fp32 = Counter(), Counter()
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        fed_by_fake_quantize = [
            source.get_node().get_type_name() in ("FakeQuantize", "Convert", "Multiply", "Subtract")
            and _upstream_fake_quantize(source.get_node())
            for source in (port.get_source_output() for port in op.inputs())
        ]
        with_weights = any(_is_weight(port.get_source_output().get_node()) for port in op.inputs())
        kind = "linear layers" if with_weights else "attention products (two activations)"
        (quantized if all(fed_by_fake_quantize) else fp32)[kind] += 1
    return {"quantized_nodes": sum(quantized.values()), "int8_nodes": dict(quantized), "fp32_nodes": dict(fp32)}


def _upstream_fake_quantize(node: Any, depth: int = 4) -> bool:
    """True when a FakeQuantize (or NNCF's compressed int8 weight: Constant -> Convert -> Subtract/Multiply) feeds
    ``node`` within a few steps."""
    if node.get_type_name() == "FakeQuantize":
        return True
    if node.get_type_name() == "Constant":
        return node.get_element_type().get_type_name() in ("i8", "u8")
    if depth == 0:
        return False
    return any(_upstream_fake_quantize(port.get_source_output().get_node(), depth - 1) for port in node.inputs())


def _is_weight(node: Any, depth: int = 4) -> bool:
    """True when ``node`` is a constant, possibly behind conversions and scales (a weight, not an activation)."""
    if node.get_type_name() == "Constant":
        return True
    if depth == 0 or node.get_type_name() not in ("Convert", "Multiply", "Subtract", "FakeQuantize", "Transpose"):
        return False
    return all(_is_weight(port.get_source_output().get_node(), depth - 1) for port in node.inputs()[:1])


__all__ = [
    "INSTALL_HINT",
    "fake_quantize_summary",
    "quantize_openvino",
    "require",
    "without_zero_width_layers",
]
