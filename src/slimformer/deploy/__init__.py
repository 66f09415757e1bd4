"""Deployment: int8 artifacts on a real runtime, stacked on pruning (ONNX Runtime and OpenVINO).

:func:`quantize` turns a (pruned) model into a folder that runs without slimformer (``model.onnx``, tokenizer,
config, manifest, report, README); :class:`~slimformer.deploy.runtime.OnnxClassifier` lets slimformer's one
evaluation and latency path run such a model through the runtime itself.
"""

from slimformer.deploy.compress import Compress, CompressResult, compress
from slimformer.deploy.quantize import ONNX_FILE, Quantize, QuantizeResult, quantize

__all__ = ["ONNX_FILE", "Compress", "CompressResult", "Quantize", "QuantizeResult", "compress", "quantize"]
