"""Model cards: the ``README.md`` in every model folder slimformer writes, in the Hugging Face model-card format.

A card is rendered from the folder alone (``config.json``, the ``slimformer.json`` manifest and ``metrics.json`` when
the command wrote one), so it can be written again later, e.g. with the hub id once the folder is pushed. It says
what the model descends from, what was done to it (shape kept per layer, the method's config, recovery), the
report's before / after table (score, parameters, FLOPs, measured latency with its shape and threads, size on disk),
how to load it with plain transformers and with slimformer, and the command that made it. The metadata header is
written with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData`, so the hub reads it as it reads any card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slimformer.folders import MANIFEST
from slimformer.report import METRICS_FILE, report_rows

CARD_FILE = "README.md"

_DONE_BY = {
    "finetune": "fine-tuned",
    "prune": "pruned",
    "distill": "distilled into a smaller student",
    "quantize": "quantized to int8",
    "compress": "pruned and quantized to int8",
}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _task_line(task: dict[str, Any] | None, metric: str | None) -> str | None:
    if not task:
        return None
    if task.get("kind") == "glue":
        what = f"GLUE {task['name'].upper().replace('STSB', 'STS-B').replace('SST2', 'SST-2')}"
    else:
        files = ", ".join(
            f"{split} `{task[key]}`" for split, key in (("train", "train_file"), ("dev", "dev_file")) if task.get(key)
        )
        what = f"custom task `{task.get('name')}` ({files})" if files else f"custom task `{task.get('name')}`"
    labels = task.get("label_names")
    if labels:
        what += f", labels {', '.join(map(str, labels))}"
    return what + (f"; scored by {metric}" if metric else "")


def _shape_lines(manifest: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    layers = manifest.get("layers") or []
    heads = [layer["heads"] for layer in layers]
    neurons = [layer["ffn"] for layer in layers]
    lines = [f"- Layers: {len(layers)}"]
    before = ((report or {}).get("models") or {}).get("before") or {}
    if before.get("heads") and before["heads"] != sum(heads):
        lines.append(f"- Attention heads kept: {sum(heads)} of {before['heads']}, per layer {heads}")
    else:
        lines.append(f"- Attention heads per layer: {heads}")
    if before.get("neurons") and before["neurons"] != sum(neurons):
        lines.append(f"- FFN neurons kept: {sum(neurons)} of {before['neurons']}, per layer {neurons}")
    else:
        lines.append(f"- FFN neurons per layer: {neurons}")
    plan = manifest.get("plan") or {}
    if plan.get("dropped_layers"):
        lines.append(f"- Layers dropped (original indices): {plan['dropped_layers']}")
    return lines


def _method_lines(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    config = report.get("config") or {}
    details = report.get("details") or {}
    lines = []
    method = config.get("method")
    if method and method not in ("finetune", "distill"):
        settings = ", ".join(
            f"{k}={v!r}" for k, v in config.items() if k not in ("method", "version") and v is not None
        )
        lines.append(f"- Method: `{method}`" + (f" ({settings})" if settings else ""))
    train = config.get("train") if method == "distill" else (config if method == "finetune" else None)
    if report.get("command") == "distill":
        student = details.get("student")
        lines.append(
            f"- Recovery: distillation from the teacher `{details.get('teacher')}`"
            + (f"; student: {student}" if student else "")
        )
    if train:
        shown = ("epochs", "learning_rate", "batch_size", "max_train_samples", "seed")
        settings = ", ".join(f"{k}={train[k]!r}" for k in shown if train.get(k) is not None)
        lines.append(f"- Training: {settings}")
    quantization = details.get("quantization")
    if quantization:
        kept = ", ".join(f"{n} {why}" for why, n in (quantization.get("fp32_nodes") or {}).items() if n)
        lines.append(
            f"- Quantization: {quantization.get('runtime')} int8, {quantization.get('mode')}"
            + (", per-channel weights" if quantization.get("per_channel") else "")
            + f"; {quantization.get('quantized_nodes')} matrix products in int8"
            + (f"; kept in fp32: {kept}" if kept else "")
        )
    return lines


def _results(report: dict[str, Any] | None) -> list[str]:
    rows = report_rows(report) if report else []
    if not rows:
        return []
    chosen = (report.get("latency") or {}).get("runtimes") or {}
    runtimes = f"before: {chosen['before']}, after: {chosen['after']}" if chosen else "PyTorch"
    lines = ["## Results", "", "| | before | after | after / before |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    lines += [
        "",
        "*Before* is the model the command started from (the dense model for pruning, the student before training "
        "for distillation). Scores are on the dev split; latency is the median of interleaved repeats on CPU "
        f"({runtimes}), measured when the model was made.",
        "",
    ]
    return lines


def _how_to_load(location: str, remote_code: bool) -> list[str]:
    flag = ", trust_remote_code=True" if remote_code else ""
    lines = [
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        f'model = AutoModelForSequenceClassification.from_pretrained("{location}"{flag})',
        "```",
        "",
    ]
    if remote_code:
        lines += [
            "Its layers keep different numbers of heads or FFN neurons, which transformers cannot build from the "
            "config alone: `trust_remote_code=True` runs `modeling_slimformer.py` from this folder (torch and "
            "transformers only; it resizes each layer before the weights load). Read it before you trust it.",
            "",
        ]
    lines += [f'With slimformer (no remote code): `slimformer.load_model("{location}")`.', ""]
    return lines


def _how_to_load_sparse(location: str) -> list[str]:
    return [
        "## How to load",
        "",
        "The sparse weight matrices are stored as a bitmask plus their non-zero values (`model.sparse.safetensors`),",
        "so this folder is small on disk; plain transformers does not read that file. With slimformer:",
        "",
        "```python",
        "import slimformer",
        "from slimformer.sparse.storage import expand_folder",
        "",
        f'loaded = slimformer.load_model("{location}")  # loaded.model, loaded.tokenizer',
        "# or write an ordinary folder (dense model.safetensors) for plain transformers:",
        f'expand_folder("{location}", "dense-copy")',
        "```",
        "",
        "The zeros give no speedup on dense kernels; only the heads and FFN neurons removed physically make it faster.",
        "",
    ]


def _how_made(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    invocation = report.get("invocation")
    command = report.get("command")
    lines = ["## How it was made", ""]
    if invocation:
        lines += ["```bash", invocation, "```", ""]
    else:
        lines += [f"With `slimformer.{command}(...)` from Python; the exact settings are in `metrics.json`.", ""]
    if command == "prune":
        lines += ["Repeat it with `slimformer prune --model BASE --config THIS_FOLDER`.", ""]
    return lines


def render_card(folder: str | os.PathLike[str], *, location: str | None = None, how_to_load: str | None = None) -> str:
    """The model card for ``folder``; ``location`` is what readers pass to ``from_pretrained`` (a hub id once
    pushed; the folder's path by default). ``how_to_load`` replaces the transformers loading section (an
    artifact for another runtime says how that runtime runs it)."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    location = location or str(folder)
    manifest = _read_json(folder / MANIFEST) or {}
    report = _read_json(folder / METRICS_FILE)
    config = _read_json(folder / "config.json") or {}
    remote_code = bool(manifest.get("remote_code")) or "slimformer_layout" in config
    task = manifest.get("task") or (report or {}).get("task")
    metric = (report or {}).get("primary_metric")
    base_model = manifest.get("base_model")
    command = (report or {}).get("command")

    data = ModelCardData(
        base_model=base_model,
        library_name=manifest.get("format") or "transformers",  # onnx, openvino or transformers
        pipeline_tag="text-classification",
        tags=["slimformer", *([_DONE_BY[command].split()[0]] if command in _DONE_BY else [])],
        datasets=["nyu-mll/glue"] if (task or {}).get("kind") == "glue" else None,
        metrics=[metric] if metric else None,
    )
    title = Path(location).name or location
    done = _DONE_BY.get(command or "") or ("pruned" if manifest.get("plan") else "saved")
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A transformer encoder"
    lines = [
        f"# {title}",
        "",
        f"{origin} {done} with slimformer {manifest.get('slimformer_version', '')}".rstrip() + ".",
        "",
        "## What was done",
        "",
    ]
    task_line = _task_line(task, metric)
    if task_line:
        lines.append(f"- Task: {task_line}")
    lines += _method_lines(report) + _shape_lines(manifest, report) + [""]
    loading = [how_to_load] if how_to_load else _how_to_load(location, remote_code)
    if str(manifest.get("weight_storage", "dense")).startswith("sparse-bitmask") and not how_to_load:
        loading = _how_to_load_sparse(location)
    lines += _results(report) + loading + _how_made(report)
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"


def write_card(folder: str | os.PathLike[str], *, location: str | None = None) -> Path:
    """Write (or rewrite) ``README.md`` in ``folder``."""
    path = Path(folder) / CARD_FILE
    path.write_text(render_card(folder, location=location))
    return path


__all__ = ["CARD_FILE", "render_card", "write_card"]
