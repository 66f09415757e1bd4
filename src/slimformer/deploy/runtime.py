"""A deployed model seen through PyTorch's eyes, so that evaluation and latency have one path for every runtime.

:class:`OnnxClassifier` (an ONNX Runtime session) and :class:`OpenVinoClassifier` (an OpenVINO compiled model) are
``nn.Module`` s whose ``forward`` takes the tokenizer's tensors and returns ``.logits``, exactly what
:mod:`slimformer.evaluation` and :func:`slimformer.measure.measure_latency` call on a transformers model: the scores
are computed by the runtime itself, and the latency is the runtime's (plus a copy of the inputs to numpy,
microseconds). Both runtimes keep their own thread pools: ``threads`` is fixed when the session is made.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from slimformer.export import _require


class _RuntimeClassifier(nn.Module):
    """What both runtime wrappers share: the config, the input names, the thread count, a CPU anchor."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: PretrainedConfig,
        *,
        threads: int | None = 2,
        embedding: bool = False,
    ) -> None:
        super().__init__()
        # a sentence-embedding model's graph returns the embedding where a classifier's returns logits
        self.is_sentence_embedder = embedding
        self.path = Path(path)
        self.config = config
        self.threads = threads
        # evaluation and latency read the device from the first parameter; the runtime lives on the CPU
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.is_open = False
        self._open()
        self.is_open = True

    def _open(self) -> None:
        """Load ``self.path`` into the runtime and set ``self.input_names``."""
        raise NotImplementedError

    def _close(self) -> None:
        """Drop the runtime's session and its thread pool."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the runtime (its session and threads) until the next ``forward`` opens it again.

        Interleaved latency closes a runtime model after its turn: an idle ONNX Runtime session's worker threads
        keep spin-waiting for work, and on a 2-core machine they took turns with the next model's threads (samples
        of one int8 MiniLM at 1 x 32 alternated between 2 and 7 ms while four other sessions were open). A model
        whose file is gone (an unsaved result, its work folder removed) stays open: its session is all there is."""
        if self.is_open and self.path.is_file():
            self._close()
            self.is_open = False

    def open(self) -> None:
        """Open the runtime's session if it is closed (``forward`` does this by itself)."""
        if not self.is_open:
            self._open()
            self.is_open = True

    def _arrays(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inputs: dict[str, Any]):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        if "token_type_ids" in self.input_names and feed.get("token_type_ids") is None:
            feed["token_type_ids"] = torch.zeros_like(input_ids)
        return {name: np.asarray(feed[name].cpu().numpy(), dtype=np.int64) for name in self.input_names}


class OnnxClassifier(_RuntimeClassifier):
    """An ONNX sequence classifier (inputs ``input_ids``, ``attention_mask`` [, ``token_type_ids``]; output
    ``logits``) run by ONNX Runtime on CPU with ``threads`` intra-op threads."""

    def _open(self) -> None:
        threads, path = self.threads, self.path
        ort = _require("onnxruntime", "Running an ONNX model")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _close(self) -> None:
        self.session = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs: Any):
        self.open()
        # the graph's one output: logits, or an embedding model's sentence_embedding (older exports: logits)
        logits = self.session.run(None, self._arrays(input_ids, attention_mask, inputs))[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


class OpenVinoClassifier(_RuntimeClassifier):
    """An OpenVINO IR sequence classifier (same inputs, output ``logits``) compiled for the CPU with ``threads``
    inference threads, one stream, latency hint: what a single service process would run."""

    def _open(self) -> None:
        from slimformer.deploy.openvino import require

        threads, path = self.threads, self.path
        ov = require("openvino", "Running an OpenVINO model")
        # f32 pinned: on CPUs with bf16 units (AVX-512 BF16, AMX) OpenVINO otherwise runs every float operation in
        # bf16 by default (seen with 2026.4), and the model scored would differ from machine to machine
        properties: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"
        }  # fmt: skip
        if threads is not None:
            properties["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", properties)
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self._request = self.compiled.create_infer_request()

    def _close(self) -> None:
        self._request = self.compiled = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs: Any):
        self.open()
        outputs = self._request.infer(self._arrays(input_ids, attention_mask, inputs))
        logits = next(iter(outputs.values()))
        return SimpleNamespace(logits=torch.from_numpy(np.array(logits)))


ARTIFACT_FORMATS = ("onnx", "openvino")


def is_runtime_model(model: Any) -> bool:
    """True for a model run by ONNX Runtime or OpenVINO (an artifact folder), not by PyTorch."""
    return isinstance(model, _RuntimeClassifier)


def shape_skeleton(config: PretrainedConfig, embedding: bool = False) -> nn.Module:
    """The PyTorch model an artifact was made from, as shapes only (on the meta device: no memory, no weights), so
    that its parameters and FLOPs come from the same formulas as every other model's (``embedding``: a
    sentence-embedding model, i.e. the encoder without a head)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from slimformer.layout import LAYOUT_KEY, rebuild_layout

    with torch.device("meta"):
        model = (AutoModel if embedding else AutoModelForSequenceClassification).from_config(config)
    layout = getattr(config, LAYOUT_KEY, None)
    if layout:
        rebuild_layout(model, layout)
    if embedding:
        from slimformer.embedding import SentenceEmbedder

        return SentenceEmbedder(model)
    return model


def load_artifact_folder(folder: str | os.PathLike[str], *, threads: int | None = 2):
    """A :class:`~slimformer.models.LoadedModel` for an artifact folder written by :func:`slimformer.quantize`
    (ONNX Runtime or OpenVINO), its model run by that runtime."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from slimformer.arch import get_spec
    from slimformer.errors import ModelLoadError
    from slimformer.folders import MANIFEST
    from slimformer.models import LoadedModel

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    runtime = manifest.get("format")
    if runtime not in ARTIFACT_FORMATS:
        raise ModelLoadError(f"{folder}: unknown artifact format {runtime!r}; expected one of {ARTIFACT_FORMATS}.")
    model_file = folder / manifest.get("model_file", manifest.get("onnx_file", "model.onnx"))
    if not model_file.is_file():
        raise ModelLoadError(f"{folder} is a {runtime} artifact folder but has no {model_file.name}.")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    wrapper = OnnxClassifier if runtime == "onnx" else OpenVinoClassifier
    model = wrapper(model_file, config, threads=threads, embedding=manifest.get("model_kind") == "sentence-embedding")
    return LoadedModel(model=model, tokenizer=tokenizer, spec=get_spec(config), source=str(folder))


__all__ = [
    "ARTIFACT_FORMATS",
    "OnnxClassifier",
    "OpenVinoClassifier",
    "is_runtime_model",
    "load_artifact_folder",
    "shape_skeleton",
]
