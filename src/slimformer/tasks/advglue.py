"""AdvGLUE (Wang et al. 2021, "Adversarial GLUE: A Multi-Task Benchmark for Robustness Evaluation of Language
Models"): human-validated adversarial examples for SST-2, QNLI, RTE, MNLI (matched and mismatched) and QQP, in the
GLUE tasks' own label conventions, read as a dev split of the GLUE task (same columns, same labels).

The file is AdvGLUE's ``dev.json`` (one list of examples per task). It is found as ``advglue/dev.json`` beside the
GLUE folder (the default data layout), in ``data_dir`` itself, or through ``$ADVGLUE_DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset

from slimformer.errors import DataFileError, TaskError
from slimformer.tasks.data import TaskData, find_shared_file
from slimformer.tasks.spec import TaskSpec

ADVGLUE_DIR_ENV = "ADVGLUE_DIR"
ADVGLUE_FILE = "dev.json"
# GLUE task -> (AdvGLUE key, first text field, second text field or None)
ADVGLUE_TASKS = {
    "sst2": ("sst2", "sentence", None),
    "qnli": ("qnli", "question", "sentence"),
    "rte": ("rte", "sentence1", "sentence2"),
    "mnli": ("mnli", "premise", "hypothesis"),
    "qqp": ("qqp", "question1", "question2"),
}


def find_advglue_file(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """AdvGLUE's ``dev.json``: ``data_dir`` may be the file, its folder, or the GLUE folder it sits beside."""
    return find_shared_file(data_dir, ADVGLUE_DIR_ENV, "advglue", ADVGLUE_FILE)


def has_advglue(spec: TaskSpec) -> bool:
    return spec.name in ADVGLUE_TASKS


def load_advglue(spec: TaskSpec, data_dir: str | os.PathLike[str] | None = None) -> TaskData:
    """The AdvGLUE examples of ``spec``'s task as a TaskData with the task's dev split name(s) (MNLI: matched and
    mismatched)."""
    if not has_advglue(spec):
        raise TaskError(f"AdvGLUE has no examples for {spec.name}; it covers {', '.join(ADVGLUE_TASKS)}.")
    path = find_advglue_file(data_dir)
    if path is None:
        raise TaskError(
            "AdvGLUE's dev.json was not found: put it in advglue/ beside the GLUE folder, pass its folder as the data "
            f"folder, or set ${ADVGLUE_DIR_ENV}."
        )
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataFileError(path, f"not readable as AdvGLUE's dev.json: {error}") from None
    key, first, second = ADVGLUE_TASKS[spec.name]
    keys = {"dev": key} if spec.name != "mnli" else {"dev_matched": "mnli", "dev_mismatched": "mnli-mm"}
    splits = {}
    for split, source_key in keys.items():
        rows = content.get(source_key)
        if not isinstance(rows, list) or not rows:
            raise DataFileError(path, f"has no examples under {source_key!r}")
        try:
            columns = {"text_a": [str(r[first]) for r in rows], "label": [int(r["label"]) for r in rows]}
            if second is not None:
                columns["text_b"] = [str(r[second]) for r in rows]
        except (KeyError, TypeError, ValueError) as error:
            raise DataFileError(path, f"an example under {source_key!r} lacks a field: {error}") from None
        bad = sorted({label for label in columns["label"] if not 0 <= label < spec.num_labels})
        if bad:
            raise DataFileError(path, f"labels {bad} under {source_key!r} are outside {spec.name}'s classes")
        splits[split] = Dataset.from_dict(columns)
    return TaskData(spec=spec, splits=splits, source=f"AdvGLUE {path}")
