"""Sentence-embedding tasks from your own files, and calibration texts from a plain text file.

``custom-sts``: pairs of texts with a similarity score (columns ``sentence1``, ``sentence2``, ``score``; any
scale), scored as ``stsb-embed`` is: Spearman (and Pearson) correlation of the cosine similarity of the two
embeddings with the scores. ``custom-retrieval``: (query, relevant passage) pairs (columns ``query``,
``passage``), scored as ``squad-retrieval`` is: every query against the file's unique passages (identical
passages are one corpus entry), nDCG@10, MRR@10, recall@1 and recall@10. Both read CSV, TSV or JSON lines like
the custom classification files (:func:`slimformer.tasks.load_custom_task`), with the same errors.

The training split of either is texts only: what pruning calibrates on and embedding distillation imitates.
:func:`with_calibration_texts` replaces it by the sentences of a plain text file (one per line), for any
embedding task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimformer.errors import DataFileError, TaskError
from slimformer.tasks.data import (
    TaskData,
    _build_dataset,
    _limit_for,
    _parse_score,
    _read_custom_rows,
    _sample_indices,
)
from slimformer.tasks.readers import Row, _bad_utf8_line
from slimformer.tasks.ref import TaskRef
from slimformer.tasks.retrieval import index_passages, retrieval_splits, texts_split
from slimformer.tasks.spec import EMBEDDING_TASKS, TaskSpec, _normalise

# task name -> how it is scored (TaskSpec.embedding_eval), and the built-in task scored the same way
CUSTOM_EMBEDDING_TASKS = {"custom-sts": "sts", "custom-retrieval": "retrieval"}
_SCORED_LIKE = {"sts": "stsb-embed", "retrieval": "squad-retrieval"}
DEFAULT_TEXT_COLUMNS = {"sts": ("sentence1", "sentence2"), "retrieval": ("query", "passage")}
DEFAULT_SCORE_COLUMN = "score"
# data files, which a calibration file (plain text) is not
_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")


def custom_embedding_kind(name: str | None) -> str | None:
    """ "sts" or "retrieval" when ``name`` is ``custom-sts`` or ``custom-retrieval`` (any case, ``_`` for ``-``),
    else None."""
    if not name:
        return None
    by_name = {_normalise(task): kind for task, kind in CUSTOM_EMBEDDING_TASKS.items()}
    return by_name.get(_normalise(str(name)))


def custom_embedding_spec(name: str, evaluation: str, text_columns: Sequence[str]) -> TaskSpec:
    """The spec of a custom embedding task: the metrics of ``stsb-embed`` ("sts") or ``squad-retrieval``
    ("retrieval"). ``text_columns`` are the file's columns (for retrieval only the query column counts as the
    task's text: the passages form the corpus)."""
    if evaluation not in _SCORED_LIKE:
        raise TaskError(f"Unknown embedding evaluation {evaluation!r}: choose one of {', '.join(_SCORED_LIKE)}.")
    like = EMBEDDING_TASKS[_SCORED_LIKE[evaluation]]
    return TaskSpec(
        name=name,
        label_names=None,
        metrics=like.metrics,
        primary_metric=like.primary_metric,
        text_columns=tuple(text_columns) if evaluation == "sts" else (text_columns[0],),
        kind="embedding",
        embedding_eval=evaluation,
    )


def _texts(path: Path, rows: list[Row], columns: Sequence[str]) -> list[list[str]]:
    """The text columns of ``rows`` (the first ``len(columns)`` values of each), each value a non-empty string."""
    texts: list[list[str]] = [[] for _ in columns]
    for line, values in rows:
        for column, value, out in zip(columns, values, texts, strict=False):
            if not isinstance(value, str):
                raise DataFileError(path, f"text column {column!r} holds {value!r}, expected a string", line=line)
            if not value.strip():
                raise DataFileError(path, f"empty text in column {column!r}", line=line)
            out.append(value)
    return texts


def _columns(evaluation: str, text_columns: Sequence[str] | None, label_column: str | None) -> tuple[tuple, str]:
    names = tuple(text_columns) if text_columns else DEFAULT_TEXT_COLUMNS[evaluation]
    what = "sentence1,sentence2" if evaluation == "sts" else "query,passage"
    if len(names) != 2 or not all(isinstance(c, str) and c for c in names) or names[0] == names[1]:
        raise TaskError(
            f"A custom {evaluation} task needs two different text columns ({what} by default), got {list(names)!r}."
        )
    if evaluation == "retrieval":
        if label_column:
            raise TaskError(
                "A custom retrieval task has no label column: each row's passage is its query's one relevant "
                "passage. Name the two columns with text_columns (--text-columns query,passage)."
            )
        return names, ""
    score = label_column or DEFAULT_SCORE_COLUMN
    if score in names:
        raise TaskError(f"The score column {score!r} is also listed as a text column.")
    return names, score


def load_custom_embedding_task(
    evaluation: str,
    train_file: str | os.PathLike[str] | None = None,
    dev_file: str | os.PathLike[str] | None = None,
    *,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    name: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> TaskData:
    """A sentence-embedding task from your own CSV, TSV or JSONL files (by extension).

    ``evaluation="sts"``: rows of two texts and a similarity score (``text_columns`` default ``sentence1``,
    ``sentence2``; ``label_column`` default ``score``, a number on any scale), scored like ``stsb-embed``.
    ``evaluation="retrieval"``: rows of a query and its one relevant passage (``text_columns`` default ``query``,
    ``passage``; no label column), scored like ``squad-retrieval``: the dev file's queries against its unique
    passages. The training split holds texts only (every text of the training file; for retrieval without a
    training file, the dev file's queries and passages, as ``squad-retrieval`` does): what pruning calibrates on
    and embedding distillation imitates. ``max_eval_samples`` keeps a seeded subset of the dev rows (retrieval:
    of the queries; the corpus keeps every passage), ``max_train_samples`` of the training rows.
    """
    if evaluation not in _SCORED_LIKE:
        raise TaskError(f"Unknown embedding evaluation {evaluation!r}: choose one of {', '.join(_SCORED_LIKE)}.")
    names, score = _columns(evaluation, text_columns, label_column)
    name = name or next(task for task, kind in CUSTOM_EMBEDDING_TASKS.items() if kind == evaluation)
    files = [(split, Path(path).expanduser()) for split, path in (("train", train_file), ("dev", dev_file)) if path]
    if not files:
        raise TaskError(f"A custom {evaluation} task needs a dev file, a training file, or both.")
    spec = custom_embedding_spec(name, evaluation, names)
    columns = (*names, score) if score else names
    splits = {}
    for split, path in files:
        rows = _read_custom_rows(path, columns)
        limit, what = _limit_for(split, max_train_samples, max_eval_samples)
        texts = _texts(path, rows, names)
        if evaluation == "sts":
            scores = [_parse_score(path, line, values[-1], score) for line, values in rows]
            splits[split] = _build_dataset(spec, texts, scores, _sample_indices(len(rows), limit, seed, what))
        elif split == "train":
            indices = _sample_indices(len(rows), limit, seed, what)
            chosen = indices if indices is not None else range(len(rows))
            queries, passages, _ = index_passages((texts[0][i], texts[1][i]) for i in chosen)
            splits["train"] = texts_split([*queries, *passages])
        else:
            queries, passages, relevant = index_passages(zip(*texts, strict=True))
            train = splits.get("train")
            dev_splits = retrieval_splits(
                queries,
                passages,
                relevant,
                max_eval_samples=limit,
                seed=seed,
                train_texts=list(train["text_a"]) if train is not None else None,
            )
            splits.update(dev_splits)
    paths = dict(files)
    source = "custom " + ", ".join(f"{split}={path}" for split, path in files)
    ref = TaskRef(
        kind="custom",
        name=name,
        train_file=str(paths["train"].resolve()) if "train" in paths else None,
        dev_file=str(paths["dev"].resolve()) if "dev" in paths else None,
        text_columns=names,
        label_column=score,
        regression=evaluation == "sts",
        embedding=evaluation,
    )
    return TaskData(spec=spec, splits=splits, source=source, ref=ref)


# ------------------------------------------------------------------------------------------------ calibration


def read_sentences(path: str | os.PathLike[str]) -> list[str]:
    """The sentences of a plain text file, one per line (UTF-8; surrounding white space and blank lines dropped)."""
    path = Path(path).expanduser()
    expected = "expected a plain text file with one sentence per line"
    if not path.is_file():
        raise DataFileError(path, f"{'is not a file' if path.exists() else 'does not exist'}: {expected}")
    if path.suffix.lower() in _DATA_SUFFIXES:
        raise DataFileError(
            path,
            f"is a {path.suffix.lower()[1:].upper()} data file: {expected} (e.g. sentences.txt); to calibrate on "
            "a data file's texts, make it the task's training file (--train-file) instead",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"is not UTF-8 text ({error.reason})", line=_bad_utf8_line(path)) from error
    except OSError as error:
        raise DataFileError(path, f"cannot be read: {error.strerror or error}") from error
    sentences = []
    # split("\n"), not splitlines(): the latter also breaks at characters such as U+2028 inside a sentence
    for line, raw in enumerate(text.split("\n"), 1):
        if "\x00" in raw:
            raise DataFileError(path, f"holds a NUL character: {expected}, not binary data", line=line)
        if raw.strip():
            sentences.append(raw.strip())
    if not sentences:
        raise DataFileError(path, f"is empty{' (blank lines only)' if text else ''}: {expected}")
    return sentences


def with_calibration_texts(
    data: TaskData | None,
    path: str | os.PathLike[str],
    *,
    max_samples: int | None = None,
    seed: int = 0,
) -> TaskData:
    """``data`` with its training split replaced by the sentences of the plain text file ``path`` (one per line;
    a seeded random subset of ``max_samples`` of them if given), texts only: budget pruning then calibrates on
    them, and embedding distillation imitates the teacher on them. The dev splits (and what the task remembers
    for later commands) stay the task's own. Only for sentence-embedding tasks, which read one text at a time
    and need no labels."""
    if data is None or not data.spec.is_embedding:
        what = f"{data.spec.name} is not one" if data is not None else "no task was given"
        raise TaskError(
            "A calibration file (one sentence per line) is for sentence-embedding tasks (stsb-embed, "
            f"squad-retrieval, custom-sts, custom-retrieval), which calibrate on texts without labels; {what}."
        )
    sentences = read_sentences(path)
    indices = _sample_indices(len(sentences), max_samples, seed, "max_train_samples")
    if indices is not None:
        sentences = [sentences[i] for i in indices]
    splits: dict[str, Any] = {**data.splits, "train": texts_split(sentences)}
    resolved = Path(path).expanduser()
    source = f"{data.source}; train=calibration file {resolved}"
    return TaskData(spec=data.spec, splits=splits, source=source, ref=data.ref)


__all__ = [
    "CUSTOM_EMBEDDING_TASKS",
    "custom_embedding_kind",
    "custom_embedding_spec",
    "load_custom_embedding_task",
    "read_sentences",
    "with_calibration_texts",
]
