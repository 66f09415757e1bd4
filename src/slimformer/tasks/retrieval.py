"""SQuAD v1.1 as a retrieval task (``squad-retrieval``): each question against all unique paragraphs.

Every question's relevant passage is the paragraph it was asked about (one relevant passage per query), as in the
retrieval use of SQuAD by Karpukhin et al. 2020 (DPR) and BEIR-style evaluations. The splits are ``dev`` (the
questions, ``label`` = the index of the relevant passage), ``corpus`` (the unique paragraphs, ``label`` = their
index) and ``train``: the texts of the questions and paragraphs without any relevance information, for label-free
calibration (pruning an embedding model needs sentences, not labels).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value

from slimformer.errors import DataFileError, TaskError
from slimformer.tasks.data import find_shared_file
from slimformer.tasks.ref import TaskRef
from slimformer.tasks.spec import TaskSpec

SQUAD_DEV_FILE = "dev-v1.1.json"
SQUAD_DIR_ENV = "SQUAD_DIR"
SQUAD_HUB_REPO = "rajpurkar/squad"
_FEATURES = Features({"text_a": Value("string"), "label": Value("int64")})


def find_squad_file(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """``dev-v1.1.json`` in ``data_dir`` (or ``data_dir/squad``, or ``squad`` beside it: the default data folder is
    the GLUE one), else in ``$SQUAD_DIR``; ``data_dir`` may also be the file itself."""
    return find_shared_file(data_dir, SQUAD_DIR_ENV, "squad", SQUAD_DEV_FILE)


def read_squad(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Questions, unique paragraphs (first-seen order) and each question's paragraph index."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        articles = data["data"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataFileError(path, f"is not a SQuAD v1.1 file (a JSON object with 'data'): {error}") from None
    passages: dict[str, int] = {}
    questions: list[str] = []
    relevant: list[int] = []
    try:
        for article in articles:
            for paragraph in article["paragraphs"]:
                index = passages.setdefault(paragraph["context"], len(passages))
                for qa in paragraph["qas"]:
                    questions.append(str(qa["question"]))
                    relevant.append(index)
    except (KeyError, TypeError) as error:
        raise DataFileError(path, f"has a paragraph or question without the SQuAD fields: {error!r}") from None
    if not questions:
        raise DataFileError(path, "has no questions")
    return questions, list(passages), relevant


def _from_hub() -> tuple[list[str], list[str], list[int]]:
    loaded = datasets.load_dataset(SQUAD_HUB_REPO, split="validation")
    return index_passages(zip(loaded["question"], loaded["context"], strict=True))


def load_squad_retrieval(
    spec: TaskSpec,
    data_dir: str | os.PathLike[str] | None,
    *,
    max_eval_samples: int | None = None,
    seed: int = 0,
    offline: bool = False,
) -> Any:
    """The task's splits from a local ``dev-v1.1.json`` (see :func:`find_squad_file`) or, online, the hub.

    ``max_eval_samples`` keeps a seeded random subset of the questions; the corpus always has every paragraph.
    """
    from slimformer.tasks.data import TaskData

    path = find_squad_file(data_dir)
    if path is not None:
        questions, passages, relevant = read_squad(path)
        source, ref = f"local {path}", TaskRef(kind="glue", name=spec.name, data_dir=str(path.parent.resolve()))
    elif offline:
        raise TaskError(
            f"Cannot load {spec.name}: no {SQUAD_DEV_FILE} found (looked in --data-dir, its squad/ folder or the "
            f"one beside it, and ${SQUAD_DIR_ENV}), and the Hugging Face hub is off. Pass --data-dir pointing to "
            f"the folder holding {SQUAD_DEV_FILE}."
        )
    else:
        try:
            questions, passages, relevant = _from_hub()
        except Exception as error:  # network, auth, cache and format errors all mean "no hub data"
            raise TaskError(
                f"Could not load {spec.name} from the Hugging Face hub ({SQUAD_HUB_REPO}): {error}. Pass --data-dir "
                f"pointing to the folder holding {SQUAD_DEV_FILE}."
            ) from error
        source, ref = f"hub {SQUAD_HUB_REPO}", TaskRef(kind="glue", name=spec.name)
    splits = retrieval_splits(questions, passages, relevant, max_eval_samples=max_eval_samples, seed=seed)
    return TaskData(spec=spec, splits=splits, source=source, ref=ref)


def index_passages(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str], list[int]]:
    """Queries, unique passages (first-seen order; identical passages are one corpus entry) and each query's
    passage index, from (query, relevant passage) pairs."""
    passages: dict[str, int] = {}
    queries: list[str] = []
    relevant: list[int] = []
    for query, passage in pairs:
        queries.append(query)
        relevant.append(passages.setdefault(passage, len(passages)))
    return queries, list(passages), relevant


def texts_split(texts: Sequence[str]) -> Dataset:
    """Texts without labels (``label`` -1): what a sentence-embedding model is calibrated or distilled on."""
    return Dataset.from_dict({"text_a": list(texts), "label": [-1] * len(texts)}, features=_FEATURES)


def retrieval_splits(
    queries: Sequence[str],
    passages: Sequence[str],
    relevant: Sequence[int],
    *,
    max_eval_samples: int | None = None,
    seed: int = 0,
    train_texts: Sequence[str] | None = None,
) -> dict[str, Dataset]:
    """The splits of a retrieval task: ``dev`` (the queries, a seeded random subset of ``max_eval_samples`` of
    them if given, ``label`` = the index of the relevant passage), ``corpus`` (every passage) and ``train``
    (``train_texts``, by default the queries and passages themselves, as texts only)."""
    from slimformer.tasks.data import _sample_indices

    indices = _sample_indices(len(queries), max_eval_samples, seed, "max_eval_samples")
    chosen = indices if indices is not None else range(len(queries))
    return {
        "train": texts_split(train_texts if train_texts is not None else [*queries, *passages]),
        "dev": Dataset.from_dict(
            {"text_a": [queries[i] for i in chosen], "label": [relevant[i] for i in chosen]}, features=_FEATURES
        ),
        "corpus": Dataset.from_dict(
            {"text_a": list(passages), "label": list(range(len(passages)))}, features=_FEATURES
        ),
    }


__all__ = ["find_squad_file", "index_passages", "load_squad_retrieval", "read_squad", "retrieval_splits", "texts_split"]
