"""Shared pieces of the analyses: errors, seeds and mean ± std, data subsets, argument parsing, model loading with a
task-head check, and markdown helpers. (The analyses evaluate with :class:`slimformer.evaluation.Evaluator`.)"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedModel

from slimformer.errors import SlimformerError
from slimformer.io import atomic_directory, write_json_atomic
from slimformer.models import LoadedModel, load_model
from slimformer.tasks import TaskData, TaskSpec, get_task_spec, load_task

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


class AnalyzeError(SlimformerError):
    """An analysis asked for something impossible: bad seeds, layers, heads, inputs or models."""


# ------------------------------------------------------------------------------------------------ seeds and stats


def seed_list(seed: int, seeds: int) -> list[int]:
    """``seeds`` consecutive seeds starting at ``seed`` (``--seed 0 --seeds 3`` runs seeds 0, 1 and 2)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise AnalyzeError(f"--seeds must be a whole number of at least 1, got {seeds!r}.")
    return [seed + i for i in range(seeds)]


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof=1; 0 for a single value) and the values themselves."""
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size), "values": array.tolist()}


def matrix_stat(matrices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise mean and sample std (0 for one matrix) of same-shaped matrices (NaN cells stay NaN)."""
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in matrices])
    mean = stack.mean(axis=0)
    std = stack.std(axis=0, ddof=1) if len(stack) > 1 else np.where(np.isnan(mean), np.nan, 0.0)
    return mean, std


def fmt(value: float | None, *, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:+.{digits}f}" if signed else f"{value * scale:.{digits}f}"


def fmt_stat(entry: dict[str, Any], *, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` (scaled, e.g. to points) when there are several seeds, else just the value."""
    text = fmt(entry.get("mean"), scale=scale, digits=digits, signed=signed)
    if entry.get("n", 0) > 1 and entry.get("std") is not None:
        text += f" ± {entry['std'] * scale:.{digits}f}"
    return text


# ------------------------------------------------------------------------------------------------ data


def task_spec_of(task: str | TaskSpec | TaskData) -> TaskSpec:
    if isinstance(task, TaskData):
        return task.spec
    return get_task_spec(task)


def load_task_data(
    task: str | TaskData,
    data_dir: str | os.PathLike[str] | None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    need_train: bool = False,
) -> TaskData:
    """The task's splits, each cut to a subset seeded by ``seed`` if asked (also when ``task`` is TaskData)."""
    if isinstance(task, TaskData):
        splits: dict[str, Dataset] = {}
        for name, dataset in task.splits.items():
            limit = max_train_samples if name == "train" else max_eval_samples
            splits[name] = _subset(dataset, limit, seed)
        data = TaskData(spec=task.spec, splits=splits, source=task.source)
    else:
        data = load_task(
            task, data_dir, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, seed=seed
        )
    if not data.dev:
        raise AnalyzeError(f"Task {data.spec.name!r} from {data.source} has no dev split to evaluate on.")
    if need_train and data.train is None:
        raise AnalyzeError(f"Task {data.spec.name!r} from {data.source} has no train split to train or sample from.")
    return data


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise AnalyzeError(f"Sample limits must be at least 1, got {limit}.")
    chosen = np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False)
    return dataset.select(sorted(int(i) for i in chosen))


# ------------------------------------------------------------------------------------------------ models


def has_task_head(model: PreTrainedModel) -> bool:
    """True when the model was saved with a sequence-classification head (i.e. fine-tuned for a task)."""
    return any(str(a).endswith("ForSequenceClassification") for a in (model.config.architectures or []))


def load_analysis_model(
    model: str | os.PathLike[str] | LoadedModel, spec: TaskSpec, *, require_head: bool, what: str = "--model"
) -> LoadedModel:
    """Load ``model`` for ``spec``'s task; with ``require_head``, refuse a model that was not fine-tuned for it.

    A folder with a head of another size fails in :func:`slimformer.models.load_model`; a headless pre-trained
    model would get a random head, which makes every analysis of a fine-tuned model meaningless.
    """
    if isinstance(model, LoadedModel):
        loaded = model
        if loaded.model.config.num_labels != spec.num_labels:
            raise AnalyzeError(
                f"{what} has {loaded.model.config.num_labels} outputs but {spec.name} needs {spec.num_labels}."
            )
        return loaded
    loaded = load_model(model, spec)
    if require_head and not has_task_head(loaded.model):
        raise AnalyzeError(
            f"{what} {model} has no fine-tuned classification head (its config lists architectures "
            f"{loaded.model.config.architectures}), so it would be analysed with a random head. Pass a model "
            f"fine-tuned on {spec.name} (e.g. the output of `slimformer finetune`)."
        )
    return loaded


def model_name(model: str | os.PathLike[str] | LoadedModel) -> str:
    return model.source if isinstance(model, LoadedModel) else str(model)


# ------------------------------------------------------------------------------------------------ parsing


def parse_layers(text: str | Sequence[int] | None, num_layers: int, *, option: str = "--layers") -> list[int]:
    """Layer indices from ``"0,2,4"``, ranges ``"0-2"``, ``"all"`` or a list; sorted, unique, checked."""
    if text is None:
        return list(range(num_layers))
    if isinstance(text, str):
        stripped = text.strip().lower()
        if stripped in ("all", "*"):
            return list(range(num_layers))
        if stripped in ("", "none"):
            return []
        layers: list[int] = []
        for part in stripped.split(","):
            part = part.strip()
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise AnalyzeError(
                    f"{option} {text!r}: {part!r} is not a layer index or a range like 0-2 (layers are numbered "
                    f"0..{num_layers - 1})."
                )
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) is not None else low
            if high < low:
                raise AnalyzeError(f"{option} {text!r}: the range {part!r} runs backwards.")
            layers.extend(range(low, high + 1))
    else:
        layers = [int(i) for i in text]
    bad = sorted({i for i in layers if not 0 <= i < num_layers})
    if bad:
        raise AnalyzeError(
            f"{option}: the model has no layer {bad} (it has {num_layers}, numbered 0..{num_layers - 1})."
        )
    return sorted(set(layers))


def parse_heads(
    text: str | Sequence[tuple[int, int]] | None, heads_per_layer: Sequence[int], *, option: str = "--heads"
) -> list[tuple[int, int]]:
    """(layer, head) pairs from ``"0:3,2:*"`` (``*``: every head of the layer) or a list; checked."""
    if text is None:
        return []
    pairs: list[tuple[int, int]] = []
    if isinstance(text, str):
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            match = re.fullmatch(r"(\d+):(\d+|\*)", part)
            if not match:
                raise AnalyzeError(f"{option} {text!r}: {part!r} is not LAYER:HEAD (e.g. 0:3) or LAYER:* .")
            layer = int(match.group(1))
            if not 0 <= layer < len(heads_per_layer):
                raise AnalyzeError(
                    f"{option}: the model has no layer {layer} (it has {len(heads_per_layer)}, numbered from 0)."
                )
            if match.group(2) == "*":
                pairs.extend((layer, h) for h in range(heads_per_layer[layer]))
            else:
                pairs.append((layer, int(match.group(2))))
    else:
        pairs = [(int(layer), int(head)) for layer, head in text]
    for layer, head in pairs:
        if not 0 <= layer < len(heads_per_layer):
            raise AnalyzeError(f"{option}: the model has no layer {layer} (it has {len(heads_per_layer)}).")
        if not 0 <= head < heads_per_layer[layer]:
            raise AnalyzeError(
                f"{option}: layer {layer} has no head {head} (it has {heads_per_layer[layer]}, numbered from 0)."
            )
    return sorted(set(pairs))


def parse_choices(text: str | Sequence[str], allowed: Sequence[str], option: str) -> list[str]:
    """A comma-separated subset of ``allowed`` (order kept, duplicates dropped); ``none`` or empty: nothing."""
    items = [p.strip().lower() for p in text.split(",")] if isinstance(text, str) else [str(p).lower() for p in text]
    items = [p for p in items if p and p != "none"]
    bad = [p for p in items if p not in allowed]
    if bad:
        raise AnalyzeError(f"{option}: unknown value(s) {bad}; choose from {', '.join(allowed)} (comma-separated).")
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------------ outputs


@contextmanager
def output_folder(out: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """A staging folder that replaces ``out`` in one rename when the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise AnalyzeError(f"Output folder {out} already exists. Choose another --out or pass --overwrite.")
    with atomic_directory(out, overwrite=True) as staging:
        yield staging


def results_folder(out_dir: str | os.PathLike[str], results: dict[str, Any]) -> Path:
    """Create ``out_dir`` if needed and write ``results.json`` into it; the start of every result's ``save``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / RESULTS_FILE, results)
    return out_dir


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def padded(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """[rows, max length] float matrix, NaN-padded (uneven layers after pruning)."""
    width = max((len(r) for r in rows), default=0)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


def nan_to_none(value: Any) -> Any:
    """Replace NaN by None in nested lists (JSON has no NaN)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
