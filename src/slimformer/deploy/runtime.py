"""A deployed model seen through PyTorch's eyes, so that evaluation and latency have one path for every runtime.

:class:`OnnxClassifier` wraps an ONNX Runtime session in an ``nn.Module`` whose ``forward`` takes the tokenizer's
tensors and returns ``.logits``, exactly what :mod:`slimformer.evaluation` and
:func:`slimformer.measure.measure_latency` call on a transformers model: the scores are computed by the runtime
itself, and the latency is the runtime's (plus a copy of the inputs to numpy, microseconds). ONNX Runtime keeps its
own thread pool: ``threads`` is fixed when the session is made.
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


class OnnxClassifier(nn.Module):
    """An ONNX sequence classifier (inputs ``input_ids``, ``attention_mask`` [, ``token_type_ids``]; output
    ``logits``) run by ONNX Runtime on CPU with ``threads`` intra-op threads."""

    def __init__(self, path: str | os.PathLike[str], config: PretrainedConfig, *, threads: int | None = 2) -> None:
        super().__init__()
        ort = _require("onnxruntime", "Running an ONNX model")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = config
        self.threads = threads
        # evaluation and latency read the device from the first parameter; the runtime lives on the CPU
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs: Any):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        if "token_type_ids" in self.input_names and feed.get("token_type_ids") is None:
            feed["token_type_ids"] = torch.zeros_like(input_ids)
        arrays = {name: np.asarray(feed[name].cpu().numpy(), dtype=np.int64) for name in self.input_names}
        (logits,) = self.session.run(["logits"], arrays)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def load_onnx_folder(folder: str | os.PathLike[str], *, threads: int | None = 2):
    """A :class:`~slimformer.models.LoadedModel` for an artifact folder written by :func:`slimformer.quantize`."""
    import json

    from transformers import AutoConfig, AutoTokenizer

    from slimformer.arch import get_spec
    from slimformer.errors import ModelLoadError
    from slimformer.folders import MANIFEST
    from slimformer.models import LoadedModel

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    onnx_file = folder / manifest.get("onnx_file", "model.onnx")
    if not onnx_file.is_file():
        raise ModelLoadError(f"{folder} is an ONNX artifact folder but has no {onnx_file.name}.")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = OnnxClassifier(onnx_file, config, threads=threads)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=get_spec(config), source=str(folder))


__all__ = ["OnnxClassifier", "load_onnx_folder"]
