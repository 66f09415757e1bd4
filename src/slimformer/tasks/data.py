"""Load a task's splits as ``datasets.Dataset`` objects: GLUE from a folder or the hub, or custom files."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, Features, Value

from slimformer.errors import DataFileError, TaskError
from slimformer.tasks.readers import Row, file_format, read_delimited, read_jsonl
from slimformer.tasks.ref import TaskRef
from slimformer.tasks.spec import GLUE_HUB_REPO, TaskSpec, _normalise, get_task_spec

logger = logging.getLogger(__name__)

SOURCES = ("auto", "local", "hub")
GLUE_DIR_ENV = "GLUE_DIR"


@dataclass
class TaskData:
    """A task's spec and its splits ("train", "dev" or MNLI's two dev splits), with where they came from.

    Every split has the columns ``text_a``, ``text_b`` (pair tasks only) and ``label`` (the class index, or a
    float for regression).
    """

    spec: TaskSpec
    splits: dict[str, Dataset] = field(default_factory=dict)
    source: str = ""
    # how to load this data again (remembered by the model folders trained on it); None for hand-built data
    ref: TaskRef | None = None

    @property
    def train(self) -> Dataset | None:
        """The training split, or None when the data has none (QNLI's folder here has only dev.tsv)."""
        return self.splits.get("train")

    @property
    def dev(self) -> dict[str, Dataset]:
        """The dev splits present, in the spec's order."""
        return {name: self.splits[name] for name in self.spec.dev_splits if name in self.splits}

    def limited(
        self, max_train_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0
    ) -> TaskData:
        """This data with at most ``max_train_samples`` training rows and ``max_eval_samples`` rows per dev split,
        drawn as :func:`load_task` draws them (seeded, file order kept); itself when nothing is cut. Data loaded
        by the caller still honours a command's sample limits this way."""
        splits = dict(self.splits)
        for name, dataset in self.splits.items():
            if name != "train" and name not in self.spec.dev_splits:
                continue  # a retrieval corpus is not a sample of anything
            limit, what = _limit_for(name, max_train_samples, max_eval_samples)
            indices = _sample_indices(len(dataset), limit, seed, what)
            if indices is not None:
                splits[name] = dataset.select(indices)
        if all(splits[name] is self.splits[name] for name in splits):
            return self
        return dataclasses.replace(self, splits=splits)

    def record(self) -> dict[str, Any]:
        """What a model folder's manifest says about the task its model was trained for: how to load it again
        (the :class:`~slimformer.tasks.TaskRef` fields; ``kind`` is None for data built by hand), its labels,
        metric and where the data came from."""
        how = self.ref.to_dict() if self.ref is not None else {"kind": None, "name": self.spec.name}
        return {
            **how,
            "num_labels": self.spec.num_labels,
            "labels": list(self.spec.label_names) if self.spec.label_names is not None else None,
            "primary_metric": self.spec.primary_metric,
            "data_source": self.source,
        }

    def describe(self) -> str:
        """One line for logs: task, source and split sizes."""
        sizes = ", ".join(f"{name} {len(split):,}" for name, split in self.splits.items())
        return f"{self.spec.name} from {self.source}: {sizes}"


# --------------------------------------------------------------------------------------------- helpers


def _features(spec: TaskSpec) -> Features:
    columns = {"text_a": Value("string")}
    if spec.is_pair:
        columns["text_b"] = Value("string")
    columns["label"] = Value("float32") if spec.is_regression else Value("int64")
    return Features(columns)


def _sample_indices(size: int, limit: int | None, seed: int, what: str) -> list[int] | None:
    """A seeded random subset of ``limit`` row indices in file order, or None to keep every row."""
    if limit is None:
        return None
    if limit < 1:
        raise TaskError(f"{what} must be at least 1, got {limit}.")
    if limit >= size:
        return None
    # choice() without replacement draws only `limit` numbers; sorting keeps the file's order.
    chosen = np.random.default_rng(seed).choice(size, size=limit, replace=False)
    return sorted(int(i) for i in chosen)


def _limit_for(split: str, max_train_samples: int | None, max_eval_samples: int | None) -> tuple[int | None, str]:
    if split == "train":
        return max_train_samples, "max_train_samples"
    return max_eval_samples, "max_eval_samples"


def _build_dataset(
    spec: TaskSpec, texts: Sequence[Sequence[str]], labels: Sequence[Any], indices: list[int] | None
) -> Dataset:
    if indices is not None:
        texts = [[column[i] for i in indices] for column in texts]
        labels = [labels[i] for i in indices]
    columns: dict[str, Any] = {"text_a": list(texts[0])}
    if spec.is_pair:
        columns["text_b"] = list(texts[1])
    columns["label"] = list(labels)
    return Dataset.from_dict(columns, features=_features(spec))


def _parse_score(path: Path, line: int, raw: Any, column: str) -> float:
    if isinstance(raw, bool):
        raise DataFileError(path, f"bad label {raw!r} in column {column!r}: expected a number", line=line)
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise DataFileError(
            path, f"bad label {raw!r} in column {column!r}: expected a number (regression task)", line=line
        ) from None
    if not math.isfinite(value):
        raise DataFileError(path, f"bad label {raw!r} in column {column!r}: expected a finite number", line=line)
    return value


def find_shared_file(given: str | os.PathLike[str] | None, env: str, folder: str, filename: str) -> Path | None:
    """A data file kept in its own folder beside the GLUE one (``../shared/data/<folder>/<filename>``): ``given``
    may be the file, its folder, or a folder holding ``<folder>/``; else ``$<env>``, else beside ``$GLUE_DIR``."""
    bases = [Path(d).expanduser() for d in (given, os.environ.get(env), os.environ.get("GLUE_DIR")) if d]
    for base in bases:
        if base.is_file():
            return base
        for candidate in (base / filename, base / folder / filename, base.parent / folder / filename):
            if candidate.is_file():
                return candidate
    return None


def _hub_offline() -> bool:
    flags = (os.environ.get(var, "0").strip().lower() for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in {"1", "true", "yes", "on"} for flag in flags)


# --------------------------------------------------------------------------------------------- GLUE


def _example_file(spec: TaskSpec) -> str:
    return f"{spec.glue_dir}/{spec.dev_splits[0]}.tsv"


def _glue_split_files(spec: TaskSpec) -> list[tuple[str, str]]:
    return [("train", "train.tsv"), *((split, f"{split}.tsv") for split in spec.dev_splits)]


def _find_task_folder(spec: TaskSpec, data_dir: Path) -> Path | None:
    """``data_dir/<GLUE name>`` (matched loosely: "sst2", "SST-2"), or ``data_dir`` if it is that folder."""
    assert spec.glue_dir is not None
    names = {_normalise(n) for n in (spec.name, spec.glue_dir, *spec.aliases)}
    exact = data_dir / spec.glue_dir
    if exact.is_dir():
        return exact
    if _normalise(data_dir.name) in names and data_dir.is_dir():
        return data_dir
    if data_dir.is_dir():
        for child in sorted(data_dir.iterdir()):
            if child.is_dir() and _normalise(child.name) in names:
                return child
    return None


def read_glue_file(spec: TaskSpec, path: Path) -> tuple[list[list[str]], list[Any]]:
    """Texts (one list per text column) and labels (class indices or floats) of one GLUE TSV file.

    GLUE files are tab-separated with no quoting at all: a field may start with a lone double quote (MRPC,
    QNLI, STS-B), and csv's default quoting would swallow the following lines into one field.
    """
    texts: list[list[str]] = [[] for _ in spec.tsv_text_columns]
    labels: list[Any] = []
    label_column = spec.tsv_label_column
    column_name = f"field {label_column + 1}" if isinstance(label_column, int) else repr(label_column)
    index_of = {value: i for i, value in enumerate(spec.tsv_label_values or ())}
    rows = read_delimited(path, spec.tsv_columns, delimiter="\t", quoted=False, has_header=spec.tsv_has_header)
    for line, values in rows:
        *row_texts, raw_label = values
        if spec.is_regression:
            labels.append(_parse_score(path, line, raw_label, str(label_column)))
        else:
            label = index_of.get(raw_label.strip())
            if label is None:
                allowed = ", ".join(repr(v) for v in index_of)
                raise DataFileError(
                    path,
                    f"bad label {raw_label!r} in {column_name}: {spec.name} labels are {allowed}",
                    line=line,
                )
            labels.append(label)
        for column, text in zip(texts, row_texts, strict=True):
            column.append(text)
    if not labels:
        raise DataFileError(path, "has no data rows" + (" after the header" if spec.tsv_has_header else ""))
    return texts, labels


def _load_local(
    spec: TaskSpec, folder: Path, max_train_samples: int | None, max_eval_samples: int | None, seed: int
) -> TaskData:
    splits: dict[str, Dataset] = {}
    missing_dev = []
    for split, filename in _glue_split_files(spec):
        path = folder / filename
        if not path.is_file():
            if split != "train":
                missing_dev.append(filename)
            continue  # a folder may hold only the dev split (evaluation-only use)
        texts, labels = read_glue_file(spec, path)
        limit, what = _limit_for(split, max_train_samples, max_eval_samples)
        splits[split] = _build_dataset(spec, texts, labels, _sample_indices(len(labels), limit, seed, what))
    if missing_dev:
        expected = ", ".join(filename for _, filename in _glue_split_files(spec))
        raise DataFileError(
            folder / missing_dev[0],
            f"is missing: the {spec.name} folder must hold {' and '.join(missing_dev)} "
            f"(expected files: {expected}, as written by download_glue_data.py; train.tsv is optional)",
        )
    ref = TaskRef(kind="glue", name=spec.name, data_dir=str(folder.parent.resolve()))
    return TaskData(spec=spec, splits=splits, source=f"local {folder}", ref=ref)


def _load_hub(spec: TaskSpec, max_train_samples: int | None, max_eval_samples: int | None, seed: int) -> TaskData:
    try:
        loaded = datasets.load_dataset(GLUE_HUB_REPO, spec.hub_config)
    except Exception as error:  # network, auth, cache and format errors all mean "no hub data"
        raise TaskError(
            f"Could not load {spec.name} from the Hugging Face hub ({GLUE_HUB_REPO}, {spec.hub_config}): "
            f"{type(error).__name__}: {error}. Pass --data-dir (or set {GLUE_DIR_ENV}) to a folder in the "
            f"GLUE layout, holding {_example_file(spec)}."
        ) from error
    renames = dict(zip(spec.text_columns, ("text_a", "text_b"), strict=False))
    splits = {}
    for split, hub_split in spec.hub_splits:
        if hub_split not in loaded:
            continue
        dataset = loaded[hub_split].select_columns([*spec.text_columns, "label"])
        limit, what = _limit_for(split, max_train_samples, max_eval_samples)
        indices = _sample_indices(len(dataset), limit, seed, what)
        if indices is not None:
            dataset = dataset.select(indices)
        # ClassLabel becomes plain int64 so hub and local data look the same.
        splits[split] = dataset.rename_columns(renames).cast(_features(spec))
    ref = TaskRef(kind="glue", name=spec.name)
    return TaskData(spec=spec, splits=splits, source=f"hub {GLUE_HUB_REPO}/{spec.hub_config}", ref=ref)


def load_task(
    name: str | TaskSpec,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "auto",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a GLUE task's train and dev splits.

    ``source="local"`` reads ``data_dir/<GLUE name>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv`` and
    ``dev_mismatched.tsv``), the layout of download_glue_data.py; ``data_dir`` defaults to ``$GLUE_DIR``.
    ``"hub"`` loads ``nyu-mll/glue``; ``"auto"`` reads the local folder when there is one, else the hub.
    ``max_train_samples`` / ``max_eval_samples`` keep a random subset (seeded by ``seed``) of each split.
    """
    from slimformer.tasks.embedding_files import custom_embedding_kind

    kind = custom_embedding_kind(name) if isinstance(name, str) else None
    if kind is not None:
        raise TaskError(
            f"{name} is a sentence-embedding task on your own files: load it with "
            f"load_custom_embedding_task({kind!r}, train_file, dev_file) (on the command line: --task {name} "
            "--dev-file ... and/or --train-file ...)."
        )
    spec = get_task_spec(name)
    if source not in SOURCES:
        raise TaskError(f"Unknown data source {source!r}; use one of: {', '.join(SOURCES)}.")
    if spec.embedding_eval == "retrieval":
        from slimformer.tasks.retrieval import load_squad_retrieval

        return load_squad_retrieval(
            spec, data_dir, max_eval_samples=max_eval_samples, seed=seed, offline=_hub_offline() or source == "local"
        )
    if spec.glue_dir is None:
        raise TaskError(f"Task {spec.name!r} is not a GLUE task; load its files with load_custom_task().")
    if data_dir is None:
        data_dir = os.environ.get(GLUE_DIR_ENV, "").strip() or None
    base = Path(data_dir).expanduser() if data_dir is not None else None
    folder = _find_task_folder(spec, base) if base is not None else None

    if source == "local" or (source == "auto" and folder is not None):
        if base is None:
            raise TaskError(
                f"No GLUE data folder for {spec.name}: pass --data-dir (data_dir=...) or set {GLUE_DIR_ENV}."
            )
        if not base.is_dir():
            raise DataFileError(base, f"no such folder: expected a GLUE data folder holding {spec.glue_dir}/")
        if folder is None:
            raise DataFileError(
                base / spec.glue_dir,
                f"no such folder: expected the {spec.name} files in it, e.g. {base / _example_file(spec)} "
                "(the layout of download_glue_data.py)",
            )
        return _load_local(spec, folder, max_train_samples, max_eval_samples, seed)

    if source == "auto":
        where = f"{base} has no {spec.glue_dir} folder" if base is not None else "no GLUE data folder was given"
        if _hub_offline():
            raise TaskError(
                f"Cannot load {spec.name}: {where}, and the Hugging Face hub is off (HF_HUB_OFFLINE). "
                f"Pass --data-dir or set {GLUE_DIR_ENV} to a folder holding {_example_file(spec)}."
            )
        if base is not None:
            logger.warning("%s; loading %s from the Hugging Face hub instead", where, spec.name)
    return _load_hub(spec, max_train_samples, max_eval_samples, seed)


# --------------------------------------------------------------------------------------------- custom


def _read_custom_rows(path: Path, columns: Sequence[str]) -> list[Row]:
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise DataFileError(path, f"{problem}: expected a CSV, TSV or JSONL data file")
    kind = file_format(path)
    if kind == "jsonl":
        rows = list(read_jsonl(path, columns))
    else:
        # CSV is ordinary quoted CSV; TSV follows GLUE's convention of no quoting.
        rows = list(
            read_delimited(
                path,
                columns,
                delimiter="," if kind == "csv" else "\t",
                quoted=kind == "csv",
                exact_width=kind == "csv",
            )
        )
    if not rows:
        raise DataFileError(path, "has no data rows")
    for line, values in rows:
        for column, value in zip(columns[:-1], values, strict=False):
            if not isinstance(value, str):
                raise DataFileError(path, f"text column {column!r} holds {value!r}, expected a string", line=line)
    return rows


def _label_key(value: Any) -> str | None:
    """A class label as text: JSON numbers and numeric strings compare equal ("1", 1, 1.0)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _as_int(key: str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


def _index_labels(keyed: list[tuple[Path, int, str]], label_names: tuple[str, ...]) -> list[int]:
    """Class indices for user-given names: the file holds the names, or else (all of it) 0-based indices."""
    by_name = {name: i for i, name in enumerate(label_names)}
    if all(key in by_name for _, _, key in keyed):
        return [by_name[key] for _, _, key in keyed]

    def is_index(key: str) -> bool:
        value = _as_int(key)
        return value is not None and 0 <= value < len(label_names)

    if all(is_index(key) for _, _, key in keyed):
        return [int(key) for _, _, key in keyed]
    # Report the first label that is neither a name nor an index, else the first that mixes the two.
    bad = [row for row in keyed if row[2] not in by_name and not is_index(row[2])]
    path, line, key = bad[0] if bad else next(row for row in keyed if row[2] not in by_name)
    raise DataFileError(
        path,
        f"bad label {key!r}: expected one of the label names {', '.join(map(repr, label_names))} "
        f"(or, throughout the data, their indices 0-{len(label_names) - 1})",
        line=line,
    )


def _infer_label_names(keys: Iterable[str]) -> tuple[str, ...]:
    unique = set(keys)
    if all(_as_int(key) is not None for key in unique):
        # Integer labels sort numerically (2 before 10) and are named canonically ("01" -> "1").
        return tuple(str(i) for i in sorted({int(key) for key in unique}))
    return tuple(sorted(unique))


def load_custom_task(
    train_file: str | os.PathLike[str] | None,
    dev_file: str | os.PathLike[str] | None = None,
    *,
    text_columns: Sequence[str],
    label_column: str = "label",
    regression: bool = False,
    label_names: Sequence[str] | None = None,
    name: str = "custom",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> TaskData:
    """A task from your own CSV, TSV or JSONL files (by extension), with one or two text columns.

    Class labels may be words or integers; without ``label_names`` they are the sorted distinct labels of the
    training file (numerically when all are integers), and a dev label the training file lacks is an error.
    Classification is scored with accuracy and F1 (macro-averaged beyond two classes), regression with
    Pearson and Spearman correlation.
    """
    text_columns = tuple(text_columns)
    if not 1 <= len(text_columns) <= 2 or not all(isinstance(c, str) and c for c in text_columns):
        raise TaskError(f"A custom task needs one or two text columns, got {list(text_columns)!r}.")
    if label_column in text_columns:
        raise TaskError(f"The label column {label_column!r} is also listed as a text column.")
    if regression and label_names:
        raise TaskError("A regression task has no label names; drop label_names or regression.")
    files = [(split, Path(path).expanduser()) for split, path in (("train", train_file), ("dev", dev_file)) if path]
    if not files:
        raise TaskError("A custom task needs a training file, a dev file, or both.")

    columns = (*text_columns, label_column)
    rows = {split: _read_custom_rows(path, columns) for split, path in files}
    paths = dict(files)

    names: tuple[str, ...] | None = None
    labels: dict[str, list[Any]] = {}
    if regression:
        for split, split_rows in rows.items():
            labels[split] = [_parse_score(paths[split], line, values[-1], label_column) for line, values in split_rows]
    else:
        keyed: dict[str, list[tuple[Path, int, str]]] = {}
        for split, split_rows in rows.items():
            keyed[split] = []
            for line, values in split_rows:
                key = _label_key(values[-1])
                if key is None or key == "":
                    raise DataFileError(paths[split], f"empty label in column {label_column!r}", line=line)
                keyed[split].append((paths[split], line, key))
        if label_names:
            names = tuple(str(n) for n in label_names)
            if len(set(names)) != len(names):
                raise TaskError(f"label_names has duplicates: {list(names)!r}.")
            # One decision (names or indices) for all files together.
            every = _index_labels([row for split_keyed in keyed.values() for row in split_keyed], names)
            start = 0
            for split, split_keyed in keyed.items():
                labels[split], start = every[start : start + len(split_keyed)], start + len(split_keyed)
        else:
            reference = "train" if "train" in keyed else "dev"
            names = _infer_label_names(key for _, _, key in keyed[reference])
            index = {name: i for i, name in enumerate(names)}
            numeric = all(_as_int(n) is not None for n in names)
            for split, split_keyed in keyed.items():
                labels[split] = []
                for path, line, key in split_keyed:
                    # Integer labels were named canonically above, so look "01" up as "1".
                    label = index.get(str(_as_int(key)) if numeric and _as_int(key) is not None else key)
                    if label is None:
                        raise DataFileError(
                            path,
                            f"label {key!r} does not occur in the training file {paths[reference]}; labels "
                            f"there: {', '.join(map(repr, names))} (or pass label_names)",
                            line=line,
                        )
                    labels[split].append(label)
        if len(names) < 2:
            raise TaskError(
                f"Custom task {name!r} has a single label {names[0]!r}: a classifier needs at least two. "
                "Pass label_names, or regression=True (--regression) for a numeric target."
            )

    spec = custom_task_spec(name, text_columns, names)
    splits = {}
    for split, split_rows in rows.items():
        texts = [[values[i] for _, values in split_rows] for i in range(len(text_columns))]
        limit, what = _limit_for(split, max_train_samples, max_eval_samples)
        indices = _sample_indices(len(split_rows), limit, seed, what)
        splits[split] = _build_dataset(spec, texts, labels[split], indices)
    source = "custom " + ", ".join(f"{split}={path}" for split, path in files)
    ref = TaskRef(
        kind="custom",
        name=name,
        train_file=str(paths["train"].resolve()) if "train" in paths else None,
        dev_file=str(paths["dev"].resolve()) if "dev" in paths else None,
        text_columns=text_columns,
        label_column=label_column,
        regression=regression,
        label_names=names,
    )
    return TaskData(spec=spec, splits=splits, source=source, ref=ref)


def custom_task_spec(name: str, text_columns: Sequence[str], label_names: Sequence[str] | None) -> TaskSpec:
    """The spec of a custom task: accuracy + F1 for classes, Pearson + Spearman for a numeric label."""
    if label_names is None:
        return TaskSpec(
            name=name,
            label_names=None,
            metrics=("pearson", "spearmanr"),
            primary_metric="combined_score",
            text_columns=tuple(text_columns),
        )
    return TaskSpec(
        name=name,
        label_names=tuple(label_names),
        metrics=("accuracy", "f1"),
        primary_metric="accuracy",
        text_columns=tuple(text_columns),
        f1_average="binary" if len(label_names) == 2 else "macro",
    )


def split_texts(split: Dataset) -> list[str]:
    """Every non-empty text of a split, row by row (``text_a`` then ``text_b``): what a sentence-embedding model
    reads, one text at a time, when it is calibrated or distilled on a task's data."""
    columns = [split[c] for c in ("text_a", "text_b") if c in split.column_names]
    return [text for row in zip(*columns, strict=True) for text in row if text]
