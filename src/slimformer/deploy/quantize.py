"""``slimformer.quantize``: a (pruned) model to an int8 artifact folder that runs without slimformer.

One path, like pruning: load model and task -> calibration examples from the task's training split -> int8 with the
runtime's own quantizer (ONNX Runtime: our ONNX export, which handles unevenly pruned layers, then
:mod:`slimformer.deploy.onnxrt`; OpenVINO: ``openvino.convert_model`` and NNCF, :mod:`slimformer.deploy.openvino`)
-> evaluate the int8 model *through the runtime* on dev and the PyTorch model it came from by the same evaluation
-> interleaved latency of both -> save -> one report.

The folder holds the int8 model (``model.onnx``, or the OpenVINO IR ``model.xml`` + ``model.bin``), the tokenizer,
``config.json``, ``slimformer.json`` (what was done: quantization settings, calibration size, the source model's
shape and plan), ``metrics.json`` and a README with the plain onnxruntime / openvino code that runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimformer.configs import ConfigError
from slimformer.errors import SlimformerError
from slimformer.io import atomic_directory, write_json_atomic
from slimformer.report import METRICS_FILE, build_report, interleaved_latency, model_stats

ONNX_FILE = "model.onnx"
IR_FILE = "model.xml"
# the modes each runtime offers; the first is the default
RUNTIME_MODES = {"onnxruntime": ("dynamic", "static"), "openvino": ("static",)}
RUNTIMES = tuple(RUNTIME_MODES)
MODES = ("dynamic", "static")


@dataclass(frozen=True)
class Quantize:
    """int8 post-training quantization on a runtime.

    ``runtime``: ``onnxruntime`` or ``openvino``. ``mode``: ``dynamic`` (ONNX Runtime only: int8 weights,
    activations quantized per batch at run time, no calibration) or ``static`` (activation ranges calibrated on
    ``calibration_examples`` training examples: QDQ on ONNX Runtime, NNCF's FakeQuantize on OpenVINO); default:
    the runtime's first (dynamic on ONNX Runtime, static on OpenVINO). ``per_channel``: one weight scale per
    output channel (more accurate than one per tensor, at no speed cost; NNCF always does this).
    ``fp32_outlier_ratio`` (ONNX Runtime): keep in fp32 every linear layer whose input's largest magnitude exceeds
    this many times its root mean square on the calibration examples (which dynamic int8 then reads too): one
    int8 scale per activation tensor cannot hold both (all-mpnet-base-v2 needs it, around 100; see
    :mod:`slimformer.deploy.onnxrt`). NNCF's SmoothQuant handles such inputs on OpenVINO.
    """

    runtime: str = "onnxruntime"
    mode: str | None = None
    calibration_examples: int = 256
    per_channel: bool = True
    seed: int = 0
    fp32_outlier_ratio: float | None = None

    method = "quantize"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"Unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}.")
        if self.mode is None:
            object.__setattr__(self, "mode", RUNTIME_MODES[self.runtime][0])
        if self.mode not in RUNTIME_MODES[self.runtime]:
            if self.mode not in MODES:
                raise ConfigError(f"Unknown quantization mode {self.mode!r}; choose one of: {', '.join(MODES)}.")
            raise ConfigError(
                f"{self.runtime} has no {self.mode} int8 for these models; choose --mode "
                f"{' or '.join(RUNTIME_MODES[self.runtime])}."
            )
        if self.calibration_examples < 1:
            raise ConfigError(f"calibration_examples must be at least 1, got {self.calibration_examples}.")
        if self.fp32_outlier_ratio is not None:
            if self.runtime != "onnxruntime":
                raise ConfigError(
                    f"fp32_outlier_ratio is for ONNX Runtime; {self.runtime}'s quantizer handles outliers itself."
                )
            if not self.fp32_outlier_ratio > 1:
                raise ConfigError(
                    f"fp32_outlier_ratio compares an input's largest value with its root mean square, so it must "
                    f"be above 1, got {self.fp32_outlier_ratio}."
                )

    @property
    def calibrates(self) -> bool:
        """Whether the quantizer reads calibration examples (static ranges, or finding outlier inputs)."""
        return self.mode == "static" or self.fp32_outlier_ratio is not None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": 1, **asdict(self)}


@dataclass
class DeployResult:
    """The int8 model (run by its runtime: :class:`~slimformer.deploy.runtime.OnnxClassifier` or
    :class:`~slimformer.deploy.runtime.OpenVinoClassifier`), its report and folder."""

    model: Any
    report: dict[str, Any]
    out_dir: Path | None

    @property
    def score(self) -> float | None:
        return self.report["score"]["after"]


QuantizeResult = DeployResult  # what quantize returns


def _calibration_feeds(tokenizer, data, config: Quantize, max_length: int) -> list[dict[str, Any]]:
    from slimformer.importance import importance_sample

    split = "train" if "train" in data.splits else None
    sample = importance_sample(
        tokenizer,
        data,
        n_examples=config.calibration_examples,
        batch_size=16,
        max_length=max_length,
        seed=config.seed,
        split=split,
    )
    return [
        {name: tensor.numpy().astype("int64") for name, tensor in batch.items() if name != "labels"}
        for batch in sample.batches
    ]


_HOW_TO_RUN_OPENVINO = """## How to run it (openvino only)

```python
import openvino as ov
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{location}")
# f32 around the int8 layers, as slimformer scored it (bf16-capable CPUs would otherwise default to bf16)
model = ov.Core().compile_model("{location}/model.xml", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})
batch = tokenizer(["a gripping, funny film"], return_tensors="np")
# one output: the logits (a task model) or the sentence embedding (an embedding model)
output = model({{p.get_any_name(): batch[p.get_any_name()].astype("int64") for p in model.inputs}})[0]
```
"""

_HOW_TO_RUN = """## How to run it (onnxruntime only)

```python
import onnxruntime as ort
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{location}")
session = ort.InferenceSession("{location}/model.onnx", providers=["CPUExecutionProvider"])
batch = tokenizer(["a gripping, funny film"], return_tensors="np")
names = [i.name for i in session.get_inputs()]
# one output: "logits" (a task model) or "sentence_embedding" (an embedding model)
output = session.run(None, {{n: batch[n].astype("int64") for n in names}})[0]
```
"""


def quantize(
    model,
    config: Quantize | None = None,
    data=None,
    *,
    out: str | os.PathLike[str] | None = None,
    tokenizer=None,
    data_dir: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    evaluate: bool = True,
    measure: bool = True,
    seq_len: int = 128,
    threads: int | None = 2,
    overwrite: bool = False,
    progress: bool = True,
    calibration_file: str | os.PathLike[str] | None = None,
) -> DeployResult:
    """Quantize ``model`` (folder, hub id, alias, loaded or transformers model) to int8 on ``config.runtime``;
    score it through the runtime on the task's dev split (``data``, else the task the folder remembers), time it
    against the PyTorch fp32 model (interleaved, batch 32 x ``seq_len``, ``threads`` threads) and, with ``out``,
    save the artifact folder atomically. ``calibration_file`` (sentence-embedding tasks, static int8): a plain
    text file, one sentence per line, whose sentences the activation ranges are calibrated on instead of the
    task's training texts."""
    from slimformer.api import _loaded, _task_record, check_label_set, resolve_data
    from slimformer.evaluation import evaluate_model

    config = config or Quantize()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not overwrite:
        raise SlimformerError(f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite.")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    needs_data = config.calibrates or evaluate
    task = (
        resolve_data(model, data, data_dir=data_dir, required=config.calibrates, max_eval_samples=max_eval_samples)
        if needs_data
        else None
    )
    if calibration_file is not None:
        if not config.calibrates:
            raise SlimformerError(
                "calibration_file gives the texts int8 calibrates on (static ranges, or fp32_outlier_ratio); "
                f"{config.mode} int8 without fp32_outlier_ratio reads none."
            )
        from slimformer.tasks import with_calibration_texts

        task = with_calibration_texts(task, calibration_file)
    loaded = _loaded(model, tokenizer, task)
    net, tokenizer = loaded.model.eval(), loaded.tokenizer
    if tokenizer is None and (config.calibrates or (evaluate and task is not None)):
        raise SlimformerError(
            "quantize needs the model's tokenizer to read calibration or evaluation texts: pass tokenizer=..., "
            "or the model's folder or a LoadedModel instead of the bare model."
        )
    if task is not None:
        check_label_set(net, task)
    seconds["load"] = round(time.perf_counter() - clock, 2)

    work = Path(tempfile.mkdtemp(prefix="slimformer-quantize-"))
    try:
        feeds = _calibration_feeds(tokenizer, task, config, max_length) if config.calibrates else None
        int8, info, fp32_bytes = _quantize_on_runtime(net, config, feeds, work, seconds, threads, progress)
        info["calibration_examples"] = sum(len(f["input_ids"]) for f in feeds) if feeds else 0
        if calibration_file is not None:
            info["calibration_file"] = str(Path(calibration_file).expanduser().resolve())

        def evaluation(target) -> dict[str, dict[str, float]] | None:
            if not evaluate or task is None or not task.dev:
                return None
            return evaluate_model(target, tokenizer, task, max_length=max_length, progress=progress)

        clock = time.perf_counter()
        eval_before, eval_after = evaluation(net), evaluation(int8)
        seconds["evaluate"] = round(time.perf_counter() - clock, 2)
        before_stats = model_stats(net, seq_len=seq_len)
        after_stats = {**before_stats, "disk_bytes": sum(p.stat().st_size for p in _model_files(int8.path))}
        before_stats["disk_bytes"] = fp32_bytes
        latency = None
        if measure:
            clock = time.perf_counter()
            latency = interleaved_latency({"before": net, "after": int8}, seq_len=seq_len, threads=threads)
            latency["speedup"] = latency["speedup"]["after"]
            latency["runtimes"] = {"before": "pytorch fp32", "after": f"{config.runtime} int8 ({config.mode})"}
            seconds["measure"] = round(time.perf_counter() - clock, 2)
        record = _task_record(task, model)
        report = build_report(
            "quantize",
            model=str(loaded.source),
            task=record,
            primary_metric=task.spec.primary_metric if task is not None else None,
            config=config.to_dict(),
            before=before_stats,
            after=after_stats,
            eval_before=eval_before,
            eval_after=eval_after,
            latency=latency,
            seconds=seconds,
            details={"quantization": info},
            seq_len=seq_len,
        )
        if out_dir is not None:
            _save_artifact(int8.path, config.runtime, net, tokenizer, out_dir, report, info, record, overwrite)
            int8.path = out_dir / int8.path.name  # the runtime already holds the graph; the work copy goes below
        else:
            int8.open()  # unsaved: its file goes with the work folder below, so the open session must hold it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DeployResult(model=int8, report=report, out_dir=out_dir)


def _model_files(path: Path) -> list[Path]:
    """The files of a runtime model: the ``.onnx`` file, or an OpenVINO IR's ``.xml`` and ``.bin``."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def _quantize_on_runtime(net, config: Quantize, feeds, work: Path, seconds: dict[str, float], threads, progress):
    """The int8 model in ``work``, wrapped for evaluation and latency, what became int8, and the size of the fp32
    model in the same runtime's format."""
    from slimformer.deploy.onnxrt import quantize_onnx_file
    from slimformer.deploy.runtime import OnnxClassifier, OpenVinoClassifier
    from slimformer.embedding import is_sentence_embedder
    from slimformer.export import export_onnx

    embedding = is_sentence_embedder(net)
    clock = time.perf_counter()
    if config.runtime == "openvino":
        from slimformer.deploy.openvino import quantize_openvino, without_zero_width_layers

        # both runtimes start from the one checked export
        fp32 = export_onnx(without_zero_width_layers(net), work / "fp32.onnx", check=False)
        seconds["export"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        info = quantize_openvino(fp32.path, work / IR_FILE, calibration=feeds or [], progress=progress)
        seconds["quantize"] = round(time.perf_counter() - clock, 2)
        return (
            OpenVinoClassifier(work / IR_FILE, net.config, threads=threads, embedding=embedding),
            info,
            fp32.size_bytes,
        )
    fp32 = export_onnx(net, work / "fp32.onnx", check=False)
    seconds["export"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    info = quantize_onnx_file(
        fp32.path,
        work / ONNX_FILE,
        mode=config.mode,
        calibration=feeds,
        per_channel=config.per_channel,
        fp32_outlier_ratio=config.fp32_outlier_ratio,
    )
    seconds["quantize"] = round(time.perf_counter() - clock, 2)
    return OnnxClassifier(work / ONNX_FILE, net.config, threads=threads, embedding=embedding), info, fp32.size_bytes


def _save_artifact(model_path: Path, runtime, net, tokenizer, out_dir: Path, report, info, task, overwrite) -> None:
    from slimformer.embedding import is_sentence_embedder
    from slimformer.folders import MANIFEST, model_record

    file_format = "openvino" if runtime == "openvino" else "onnx"
    manifest = {
        **model_record(net),
        "format": file_format,
        "model_file": model_path.name,
        "model_kind": "sentence-embedding" if is_sentence_embedder(net) else "task-model",
        "pooling": net.pooling.to_dict() if is_sentence_embedder(net) else None,
        "quantization": info,
        "task": task,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        for path in _model_files(model_path):
            shutil.copyfile(path, staging / path.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config = net.config.to_dict()
        config.pop("auto_map", None)  # no PyTorch weights here: nothing for remote code to load
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        write_json_atomic(staging / MANIFEST, manifest)
        write_json_atomic(staging / METRICS_FILE, report)
        write_artifact_card(staging, out_dir, file_format)


def write_artifact_card(folder: Path, location: Path, file_format: str) -> None:
    """The README of an artifact folder, from its manifest and report, with the runtime's own loading code."""
    from slimformer.card import CARD_FILE, render_card

    how_to_run = (_HOW_TO_RUN_OPENVINO if file_format == "openvino" else _HOW_TO_RUN).format(location=location)
    (folder / CARD_FILE).write_text(render_card(folder, location=str(location), how_to_load=how_to_run))


__all__ = ["IR_FILE", "ONNX_FILE", "RUNTIMES", "DeployResult", "Quantize", "QuantizeResult", "quantize"]
