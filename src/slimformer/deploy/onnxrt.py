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
  ONNX Runtime's int8 kernels are for matrix products;
- with ``fp32_outlier_ratio``, a linear layer whose input has outliers stays fp32: one scale covers a whole
  activation tensor, so when a few of its values are hundreds of times its root mean square (all-mpnet-base-v2's
  FFN-down inputs in several layers reach 200x; MiniLM-L6's stay under 90x) everything else rounds to a handful of
  levels. The ratio (largest magnitude over RMS) is measured on the calibration examples by ONNX Runtime itself.
  Keeping such layers in higher precision is the mixed-precision remedy of LLM.int8() (Dettmers et al. 2022) at
  the granularity of whole layers.

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


def input_outlier_ratios(
    model_path: str | os.PathLike[str], node_names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Per node of ``node_names``: the largest magnitude of its activation input (its first input) over the
    ``feeds``, divided by that input's root mean square over the same feeds, as ONNX Runtime computes it."""
    onnx = _require("onnx", "int8 quantization")
    ort = _require("onnxruntime", "int8 quantization")

    model = onnx.load(str(model_path))
    wanted = {node.name: node.input[0] for node in model.graph.node if node.name in set(node_names)}
    existing = {output.name for output in model.graph.output}
    tensors = sorted(set(wanted.values()))
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    largest = dict.fromkeys(tensors, 0.0)
    squares = dict.fromkeys(tensors, 0.0)
    counts = dict.fromkeys(tensors, 0)
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            if value.size:
                largest[name] = max(largest[name], float(np.abs(value).max()))
                squares[name] += float(np.square(value, dtype=np.float64).sum())
                counts[name] += value.size
    ratios = {}
    for node, tensor in wanted.items():
        rms = (squares[tensor] / counts[tensor]) ** 0.5 if counts[tensor] else 0.0
        ratios[node] = largest[tensor] / rms if rms > 0 else 0.0
    return ratios


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
    fp32_outlier_ratio: float | None = None,
) -> dict[str, Any]:
    """Quantize an fp32 ONNX file to int8 into ``out_path``; ``calibration`` (input feeds) is needed for ``static``
    and for ``fp32_outlier_ratio`` (linear layers whose input's largest magnitude exceeds that many times its root
    mean square on the calibration feeds stay fp32). Returns which nodes were quantized and which stayed fp32 (and
    why)."""
    onnx = _require("onnx", "int8 quantization")
    quantization = _require("onnxruntime.quantization", "int8 quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static', not {mode!r}")
    if mode == "static" and not calibration:
        raise ValueError("static quantization needs calibration examples")
    if fp32_outlier_ratio is not None and not calibration:
        raise ValueError("finding outlier inputs (fp32_outlier_ratio) needs calibration examples")
    with tempfile.TemporaryDirectory(prefix="slimformer-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        nodes = linear_nodes(model)
        outliers: dict[str, float] = {}
        if fp32_outlier_ratio is not None:
            ratios = input_outlier_ratios(prepared, nodes["quantize"], calibration or [])
            outliers = {name: ratio for name, ratio in ratios.items() if ratio > fp32_outlier_ratio}
            nodes["quantize"] = [name for name in nodes["quantize"] if name not in outliers]
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
    info: dict[str, Any] = {
        "runtime": "onnxruntime",
        "mode": mode,
        "per_channel": per_channel,
        "quantized_nodes": len(nodes["quantize"]),
        "fp32_nodes": {
            "attention products (two activations)": len(nodes["activations"]),
            "zero-width linear layers (no weights)": len(nodes["empty"]),
        },
    }
    if fp32_outlier_ratio is not None:
        info["fp32_nodes"][f"linear layers with outlier inputs (max / RMS > {fp32_outlier_ratio:g})"] = len(outliers)
        info["fp32_outlier_ratio"] = fp32_outlier_ratio
        info["outlier_inputs"] = {name: round(ratio, 1) for name, ratio in outliers.items()}
        info["largest_int8_input_ratio"] = round(
            max((r for n, r in ratios.items() if n not in outliers), default=0.0), 1
        )
    return info


__all__ = ["input_outlier_ratios", "linear_nodes", "quantize_onnx_file"]
