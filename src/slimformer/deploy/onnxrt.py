"""int8 on ONNX Runtime: ``onnxruntime.quantization`` applied to slimformer's own ONNX export.

The libraries do the work: ``quant_pre_process`` (shape inference and ONNX Runtime's graph optimisations, which are
generic fusions that hold for unevenly pruned layers too), then ``quantize_dynamic`` (int8 weights, activations
quantized per batch at run time) or ``quantize_static`` (QDQ format, activation ranges calibrated on task examples
with ``CalibrationDataReader``; unsigned 8-bit activations, signed 8-bit weights). slimformer only chooses *which*
nodes become int8:

- the linear layers (``MatMul`` / ``Gemm`` with a weight initializer: q, k, v, attention output, FFN up and down,
  pooler, classifier) are quantized, with per-channel weight scales by default;
- the attention products (``MatMul`` of two activations: Q K^T and the weighted sum of V) stay fp32: both operands
  change with every input, and quantizing them costs accuracy for little time at these sizes;
- zero-width linear layers (a layer left with no heads, an FFN with no neurons) stay fp32: they hold no weights to
  quantize, and a scale of an empty tensor is undefined;
- everything else (embeddings' ``Gather``, ``LayerNormalization``, ``Softmax``, GELU, ``Add``) stays fp32, as
  ONNX Runtime's int8 kernels are for matrix products.

:func:`quantize_onnx_file` returns these lists so the report can say what stayed in fp32 and why.

ONNX Runtime's transformer-specific fusions (``onnxruntime.transformers.optimizer``, model type ``bert``) were tried
on MiniLM-L6 and left out: they found no attention pattern to fuse in the graph transformers v5 exports (only
SkipLayerNormalization and BiasGelu), gave no measurable speedup over the generic optimisations the session applies
(``ORT_ENABLE_ALL``), and their com.microsoft operators need extra options before the quantizer accepts them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.export import _require

LINEAR_OPS = ("MatMul", "Gemm")


def linear_nodes(model: Any) -> dict[str, list[str]]:
    """The graph's matrix products, sorted into ``quantize`` (linear layers with weights), ``empty`` (zero-width
    linear layers) and ``activations`` (products of two activations)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    constants = {output: node for node in model.graph.node if node.op_type == "Constant" for output in node.output}

    def weight(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            value = next((a for a in constants[name].attribute if a.name == "value"), None)
            return numpy_helper.to_array(value.t) if value is not None else None
        return None

    sorted_nodes: dict[str, list[str]] = {"quantize": [], "empty": [], "activations": []}
    for node in model.graph.node:
        if node.op_type not in LINEAR_OPS:
            continue
        array = weight(node.input[1]) if len(node.input) > 1 else None
        if array is None:
            sorted_nodes["activations"].append(node.name)
        elif array.size == 0:
            sorted_nodes["empty"].append(node.name)
        else:
            sorted_nodes["quantize"].append(node.name)
    return sorted_nodes


class _FeedReader:
    """``CalibrationDataReader`` over a list of input feeds (name -> int64 array)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_onnx_file(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mode: str = "dynamic",
    calibration: list[dict[str, np.ndarray]] | None = None,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Quantize an fp32 ONNX file to int8 into ``out_path``; ``calibration`` (input feeds) is needed for ``static``.
    Returns which nodes were quantized and which stayed fp32 (and why)."""
    onnx = _require("onnx", "int8 quantization")
    quantization = _require("onnxruntime.quantization", "int8 quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static', not {mode!r}")
    if mode == "static" and not calibration:
        raise ValueError("static quantization needs calibration examples")
    with tempfile.TemporaryDirectory(prefix="slimformer-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        nodes = linear_nodes(model)
        common = {
            "nodes_to_quantize": nodes["quantize"],
            "per_channel": per_channel,
            "weight_type": quantization.QuantType.QInt8,
        }
        if mode == "dynamic":
            quantization.quantize_dynamic(str(prepared), str(out_path), **common)
        else:
            quantization.quantize_static(
                str(prepared),
                str(out_path),
                _FeedReader(calibration or []),
                quant_format=quantization.QuantFormat.QDQ,
                # u8 activations x s8 weights: the int8 kernel every x86 CPU has (AVX2's vpmaddubsw); s8 x s8
                # has a fast kernel only with AVX-512 VNNI and made static int8 slower than fp32 on AVX2 machines
                activation_type=quantization.QuantType.QUInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
                **common,
            )
    return {
        "runtime": "onnxruntime",
        "mode": mode,
        "per_channel": per_channel,
        "quantized_nodes": len(nodes["quantize"]),
        "fp32_nodes": {
            "attention products (two activations)": len(nodes["activations"]),
            "zero-width linear layers (no weights)": len(nodes["empty"]),
        },
    }


__all__ = ["linear_nodes", "quantize_onnx_file"]
