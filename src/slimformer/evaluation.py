"""Evaluation: a model's logits and the task's official metrics on its dev split(s).

There is one path. :class:`Evaluator` tokenizes the dev split(s) once, and only those (never the training split),
collates them into batches sorted by length (little padding) and scores any model on them, as often as asked:
pruning loops, ablations and early stopping build one and call it many times. :func:`evaluate_model` (one
evaluation) and :func:`evaluate` (a model folder or loaded model) go through an :class:`Evaluator`;
:func:`predict` (the logits of any tokenized dataset, e.g. a teacher's on the training set) shares its batching
and forward loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from slimformer.errors import TaskError
from slimformer.models import LoadedModel, load_model
from slimformer.tasks import TaskData, compute_metrics, load_task, tokenize_task


def headline_score(evaluation: dict[str, dict[str, float]], metric: str) -> float:
    """The primary metric averaged over the dev splits (MNLI has two)."""
    values = [split_metrics[metric] for split_metrics in evaluation.values()]
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------------ batching


def length_order(dataset: Dataset) -> np.ndarray:
    """Row indices of a tokenized dataset sorted by length (stable), so batches carry little padding."""
    return np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")


def length_sorted_batches(
    tokenizer: PreTrainedTokenizerBase, dataset: Dataset, order: np.ndarray, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The model inputs of ``dataset``'s rows in ``order``, ``batch_size`` rows a batch, padded per batch."""
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    features = dataset.select_columns(columns)
    for start in range(0, len(order), batch_size):
        rows = features.select(order[start : start + batch_size].tolist())
        yield dict(collator([dict(row) for row in rows]))


def _logits(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    order: np.ndarray,
    *,
    total: int,
    progress: bool,
    description: str,
) -> np.ndarray:
    """The model's logits for length-sorted ``batches``, put back in the dataset's row order."""
    device = next(model.parameters()).device
    outputs: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, total=total, desc=description, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                outputs.append(model(**batch).logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    logits = np.concatenate(outputs) if outputs else np.zeros((0, model.config.num_labels), dtype=np.float32)
    restored = np.empty_like(logits)
    restored[order] = logits
    return restored


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "predict",
) -> np.ndarray:
    """Logits for every row of a tokenized dataset, in the dataset's order.

    Rows are batched by length (then put back in order) so that little time goes into padding; batches are
    collated as they are needed, so a large dataset is never held padded in memory.
    """
    order = length_order(dataset)
    batches = length_sorted_batches(tokenizer, dataset, order, batch_size)
    total = -(-len(order) // batch_size)
    return _logits(model, batches, order, total=total, progress=progress, description=description)


# ------------------------------------------------------------------------------------------------ evaluating


def dev_only(data: TaskData, splits: list[str] | None = None) -> TaskData:
    """``data`` with only its dev splits (or the ``splits`` named), so that nothing else gets tokenized."""
    names = splits or list(data.dev)
    missing = [name for name in names if name not in data.splits]
    if missing:
        raise TaskError(
            f"Task {data.spec.name!r} from {data.source} has no split {missing}; it has {list(data.splits)}."
        )
    return TaskData(spec=data.spec, splits={name: data.splits[name] for name in names}, source=data.source)


class Evaluator:
    """Scores a model (as it is, hooks included) on a task's dev splits with the task's metrics.

    The dev splits (or the ``splits`` named) are tokenized, or taken from ``tokenized`` when the caller has them
    already, and collated into length-sorted batches once, so every later evaluation costs only the forward passes.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        data: TaskData,
        *,
        max_length: int = 128,
        batch_size: int = 64,
        splits: list[str] | None = None,
        tokenized: dict[str, Dataset] | None = None,
    ) -> None:
        self.spec = data.spec
        self.embedding: EmbeddingEvaluator | None = None
        if data.spec.is_embedding:
            self.embedding = EmbeddingEvaluator(tokenizer, data, max_length=max_length, batch_size=batch_size)
            self.sizes = self.embedding.sizes
            return
        if tokenized is None:
            dev = dev_only(data, splits)
            names = list(dev.splits)
        else:
            names = splits or [s for s in data.spec.dev_splits if s in tokenized]
        if not names:
            raise TaskError(f"Task {data.spec.name!r} from {data.source} has no dev split to evaluate on.")
        if tokenized is None:
            tokenized = tokenize_task(dev, tokenizer, max_length=max_length)
        self.splits: dict[str, tuple[list[dict[str, torch.Tensor]], np.ndarray, np.ndarray]] = {}
        for name in names:
            dataset = tokenized[name]
            order = length_order(dataset)
            batches = list(length_sorted_batches(tokenizer, dataset, order, batch_size))
            self.splits[name] = (batches, order, np.asarray(dataset["labels"]))
        self.sizes = {name: len(labels) for name, (_, _, labels) in self.splits.items()}

    def logits(self, model: PreTrainedModel, *, progress: bool = False) -> dict[str, np.ndarray]:
        """The model's logits on every split, in each split's row order."""
        if self.embedding is not None:
            raise TaskError(f"{self.spec.name} is scored on embeddings; a sentence-embedding model has no logits.")
        return {
            name: _logits(model, batches, order, total=len(batches), progress=progress, description=f"eval {name}")
            for name, (batches, order, _) in self.splits.items()
        }

    def evaluate(self, model: PreTrainedModel, *, progress: bool = False) -> dict[str, dict[str, float]]:
        """The task's metrics on every split."""
        if self.embedding is not None:
            return self.embedding.evaluate(model, progress=progress)
        return self.metrics(self.logits(model, progress=progress))

    def metrics(self, logits: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """The task's metrics from logits :meth:`logits` already gave (no second pass over the data)."""
        return {
            name: {k: float(v) for k, v in compute_metrics(self.spec, values, self.splits[name][2]).items()}
            for name, values in logits.items()
        }

    def score(self, model: PreTrainedModel, *, progress: bool = False) -> float:
        """The primary metric averaged over the splits (MNLI has two)."""
        return headline_score(self.evaluate(model, progress=progress), self.spec.primary_metric)


# sentence-transformers reads up to 256 tokens of a passage with all-MiniLM-L6-v2 (384 with all-mpnet-base-v2)
PASSAGE_TOKENS = 256


def encode(
    model: PreTrainedModel,
    batches: list[dict[str, torch.Tensor]],
    order: np.ndarray,
    *,
    progress: bool = False,
    description: str = "encode",
) -> np.ndarray:
    """A sentence-embedding model's embeddings for length-sorted ``batches``, in the texts' original order."""
    return _logits(model, batches, order, total=len(batches), progress=progress, description=description)


def text_batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int, batch_size: int
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """``texts`` tokenized one by one (truncated to ``max_length``) and collated into length-sorted batches."""
    dataset = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=max_length)))
    order = length_order(dataset)
    return list(length_sorted_batches(tokenizer, dataset, order, batch_size)), order


class EmbeddingEvaluator:
    """Scores a sentence-embedding model on an embedding task: STS (cosine of the two texts' embeddings against
    the gold scores) or retrieval (every query against the task's corpus, which is encoded with up to
    :data:`PASSAGE_TOKENS` tokens a passage, or ``max_length`` if longer). Texts are tokenized and batched once."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, data: TaskData, *, max_length: int = 128, batch_size: int = 64
    ) -> None:
        self.spec = data.spec
        self.splits: dict[str, list[tuple[list[dict[str, torch.Tensor]], np.ndarray]]] = {}
        self.gold: dict[str, np.ndarray] = {}
        names = list(data.dev)
        if not names:
            raise TaskError(f"Task {data.spec.name!r} from {data.source} has no dev split to evaluate on.")

        def batched(texts: list[str], length: int = max_length):
            return text_batches(tokenizer, list(texts), max_length=length, batch_size=batch_size)

        for name in names:
            dataset = data.splits[name]
            columns = ["text_a", "text_b"] if self.spec.embedding_eval == "sts" else ["text_a"]
            self.splits[name] = [batched(dataset[column]) for column in columns]
            self.gold[name] = np.asarray(dataset["label"])
        self.corpus = None
        if self.spec.embedding_eval == "retrieval":
            if "corpus" not in data.splits:
                raise TaskError(f"Task {data.spec.name!r} from {data.source} has no corpus to retrieve from.")
            self.corpus = batched(data.splits["corpus"]["text_a"], max(max_length, PASSAGE_TOKENS))
        self.sizes = {name: len(gold) for name, gold in self.gold.items()}

    def evaluate(self, model: PreTrainedModel, *, progress: bool = False) -> dict[str, dict[str, float]]:
        from slimformer.embedding import is_sentence_embedder
        from slimformer.tasks.metrics import retrieval_metrics, sts_metrics

        if not is_sentence_embedder(model):
            raise TaskError(
                f"{self.spec.name} scores sentence embeddings, but this is a task model with a head; load it as a "
                "sentence-embedding model (load_model(path, task) with an embedding task does)."
            )
        corpus = None
        if self.corpus is not None:
            corpus = encode(model, *self.corpus, progress=progress, description="encode corpus")
        results = {}
        for name, parts in self.splits.items():
            vectors = [encode(model, *part, progress=progress, description=f"encode {name}") for part in parts]
            if corpus is not None:
                metrics = retrieval_metrics(vectors[0], corpus, self.gold[name])
            else:
                metrics = sts_metrics(vectors[0], vectors[1], self.gold[name])
            results[name] = metrics
        return results

    def score(self, model: PreTrainedModel, *, progress: bool = False) -> float:
        return headline_score(self.evaluate(model, progress=progress), self.spec.primary_metric)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    tokenized: dict[str, Dataset] | None = None,
    splits: list[str] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """The task's official metrics on each dev split (or the ``splits`` named), evaluated once.

    Only the splits evaluated are tokenized (unless ``tokenized`` already holds them). To evaluate the same data
    many times, build an :class:`Evaluator` once instead.
    """
    evaluator = Evaluator(
        tokenizer, data, max_length=max_length, batch_size=batch_size, splits=splits, tokenized=tokenized
    )
    return evaluator.evaluate(model, progress=progress)


def evaluate(
    model: str | os.PathLike[str] | LoadedModel,
    task: str | TaskData = "sst2",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a model folder (or a loaded model) on a task's dev splits; returns metrics like ``finetune``."""
    data = (
        task if isinstance(task, TaskData) else load_task(task, data_dir, max_eval_samples=max_eval_samples, seed=seed)
    )
    loaded = model if isinstance(model, LoadedModel) else load_model(model, data.spec)
    started = time.perf_counter()
    evaluation = evaluate_model(loaded.model, loaded.tokenizer, data, max_length=max_length, batch_size=batch_size)
    return {
        "task": data.spec.name,
        "data_source": data.source,
        "model": loaded.source,
        "primary_metric": data.spec.primary_metric,
        "score": headline_score(evaluation, data.spec.primary_metric),
        "eval": evaluation,
        "eval_seconds": round(time.perf_counter() - started, 2),
    }


__all__ = [
    "EmbeddingEvaluator",
    "Evaluator",
    "dev_only",
    "evaluate",
    "evaluate_model",
    "headline_score",
    "length_order",
    "length_sorted_batches",
    "predict",
]
