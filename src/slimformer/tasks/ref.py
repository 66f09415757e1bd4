"""What a model folder remembers about the data it was trained on, so later commands need no data options.

A :class:`TaskRef` is small and JSON-serialisable: a GLUE task's name (and the local folder it was read from, if
any), or a custom task's files, columns and label names (and, for a custom sentence-embedding task, how it is
scored). ``slimformer finetune`` writes it into the folder's manifest; ``prune``, ``distill``, ``importance`` and
``analyze`` read it back when the user gives no task.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimformer.errors import TaskError

TASK_REF_VERSION = 1


@dataclass(frozen=True)
class TaskRef:
    """How to load a task again: ``kind`` "glue" (``name``, ``data_dir``) or "custom" (files and columns; with
    ``embedding`` "sts" or "retrieval", a custom sentence-embedding task)."""

    kind: str
    name: str
    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    regression: bool = False
    label_names: tuple[str, ...] | None = None
    embedding: str | None = None
    version: int = field(default=TASK_REF_VERSION)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text_columns"] = list(self.text_columns)
        data["label_names"] = list(self.label_names) if self.label_names is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRef:
        if not isinstance(data, dict) or data.get("kind") not in ("glue", "custom") or not data.get("name"):
            raise TaskError(f"Not a task reference: {data!r}.")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["text_columns"] = tuple(known.get("text_columns") or ())
        if known.get("label_names") is not None:
            known["label_names"] = tuple(known["label_names"])
        return cls(**known)

    def describe(self) -> str:
        if self.kind == "glue":
            return self.name
        files = ", ".join(f"{s}={p}" for s, p in (("train", self.train_file), ("dev", self.dev_file)) if p)
        return f"{self.name} ({files})"

    def load(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ):
        """The task's data again. A GLUE task reads ``data_dir`` when given (else the remembered folder, else
        ``$GLUE_DIR`` / the hub); a custom task reads its remembered files, which must still exist."""
        from slimformer.tasks.data import load_custom_task, load_task

        limits = {"max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples, "seed": seed}
        if self.kind == "glue":
            folder = data_dir if data_dir is not None else self.data_dir
            if folder is not None and not Path(folder).is_dir():
                folder = None  # the folder moved: fall back to $GLUE_DIR or the hub
            return load_task(self.name, folder, **limits)
        missing = [p for p in (self.train_file, self.dev_file) if p and not Path(p).is_file()]
        if missing:
            again = f"--task custom-{self.embedding} " if self.embedding else "--text-columns and --label-column with "
            raise TaskError(
                f"The model was trained on the custom task {self.describe()}, but {missing[0]} no longer exists. "
                f"Pass the data again ({again}--train-file / --dev-file)."
            )
        if self.embedding is not None:
            from slimformer.tasks.embedding_files import load_custom_embedding_task

            return load_custom_embedding_task(
                self.embedding,
                self.train_file,
                self.dev_file,
                text_columns=self.text_columns or None,
                label_column=self.label_column or None,
                name=self.name,
                **limits,
            )
        return load_custom_task(
            self.train_file,
            self.dev_file,
            text_columns=self.text_columns,
            label_column=self.label_column,
            regression=self.regression,
            label_names=self.label_names,
            name=self.name,
            **limits,
        )
