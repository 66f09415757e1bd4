"""The official GLUE metrics (and those of custom tasks), from logits or predicted labels."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from slimformer.errors import TaskError
from slimformer.tasks.spec import TaskSpec, get_task_spec


def _correlation(function: Callable[..., Any], predictions: np.ndarray, labels: np.ndarray) -> float:
    # A correlation is undefined for constant input or fewer than two points (scipy gives nan); a model that
    # predicts one value carries no ranking information, so score it 0 and keep means and comparisons finite.
    if len(labels) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(function(predictions, labels)[0])
    return 0.0 if np.isnan(value) else value


def _metric_functions(spec: TaskSpec) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    return {
        "accuracy": lambda p, y: float(np.mean(p == y)),
        "f1": lambda p, y: float(f1_score(y, p, average=spec.f1_average, zero_division=0)),
        "matthews_correlation": lambda p, y: float(matthews_corrcoef(y, p)),
        "pearson": lambda p, y: _correlation(stats.pearsonr, p, y),
        "spearmanr": lambda p, y: _correlation(stats.spearmanr, p, y),
    }


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    return array


def _class_ids(spec: TaskSpec, predictions: np.ndarray) -> np.ndarray:
    if predictions.ndim == 2:
        if predictions.shape[1] != spec.num_labels:
            raise TaskError(
                f"Got logits for {predictions.shape[1]} classes, but {spec.name} has {spec.num_labels}: "
                f"{', '.join(spec.label_names or ())}."
            )
        return predictions.argmax(axis=-1)
    if predictions.ndim != 1:
        raise TaskError(f"Predictions must be logits (n, classes) or class ids (n,), got shape {predictions.shape}.")
    if np.issubdtype(predictions.dtype, np.floating) and not np.all(np.mod(predictions, 1) == 0):
        raise TaskError(
            f"{spec.name} is a classification task: pass logits (n, {spec.num_labels}) or class ids, "
            "not fractional scores."
        )
    return predictions.astype(np.int64)


def compute_metrics(spec: TaskSpec | str, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's official metrics, plus ``combined_score`` (their mean) when there are two or more.

    ``predictions`` are logits of shape (n, num_labels), class ids of shape (n,), or for regression scores of
    shape (n,) or (n, 1). CoLA: Matthews correlation; STS-B: Pearson and Spearman; MRPC, QQP: F1 and
    accuracy; the rest: accuracy. Correlations of constant predictions are reported as 0.
    """
    spec = get_task_spec(spec)
    if isinstance(predictions, tuple):  # Hugging Face's EvalPrediction: (logits, other outputs...)
        predictions = predictions[0]
    predicted = _as_array(predictions)
    gold = _as_array(labels)
    if gold.ndim != 1:
        raise TaskError(f"Labels must be one value per example, got shape {gold.shape}.")
    if len(predicted) != len(gold):
        raise TaskError(f"Got {len(predicted)} predictions for {len(gold)} labels.")
    if len(gold) == 0:
        raise TaskError("No predictions to score: the evaluation split is empty.")
    if spec.is_regression:
        if predicted.ndim != 1:
            raise TaskError(f"{spec.name} is a regression task: predictions must have shape (n,) or (n, 1).")
        predicted, gold = predicted.astype(np.float64), gold.astype(np.float64)
    else:
        predicted, gold = _class_ids(spec, predicted), gold.astype(np.int64)
    functions = _metric_functions(spec)
    results = {name: functions[name](predicted, gold) for name in spec.metrics}
    if len(results) > 1:
        results["combined_score"] = float(np.mean(list(results.values())))
    return results


# ------------------------------------------------------------------------------------------------ embeddings


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def sts_metrics(first: np.ndarray, second: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Semantic textual similarity as sentence-transformers scores it: Spearman (and Pearson) correlation of the
    cosine similarity of each pair's embeddings with the gold scores."""
    cosine = np.sum(_unit(first) * _unit(second), axis=-1)
    gold = np.asarray(gold, dtype=np.float64)
    return {
        "spearman_cosine": _correlation(stats.spearmanr, cosine, gold),
        "pearson_cosine": _correlation(stats.pearsonr, cosine, gold),
    }


def relevant_ranks(queries: np.ndarray, corpus: np.ndarray, relevant: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The 1-based rank of each query's relevant passage among all passages by cosine similarity (ties count in
    the query's favour: a passage ranks above only when strictly more similar)."""
    queries, corpus = _unit(queries), _unit(corpus)
    relevant = np.asarray(relevant, dtype=np.int64)
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ corpus.T
        own = scores[np.arange(len(scores)), relevant[start : start + chunk]]
        ranks[start : start + chunk] = (scores > own[:, None]).sum(axis=1) + 1
    return ranks


def retrieval_metrics(queries: np.ndarray, corpus: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Retrieval with one relevant passage per query: nDCG@10 (its ideal value is 1, so it is 1 / log2(rank + 1)
    within the top 10), MRR@10, recall@1 and recall@10, averaged over the queries (Manning et al. 2008, ch. 8)."""
    ranks = relevant_ranks(queries, corpus, relevant)
    top10 = ranks <= 10
    return {
        "ndcg@10": float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1), 0.0))),
        "mrr@10": float(np.mean(np.where(top10, 1.0 / ranks, 0.0))),
        "recall@1": float(np.mean(ranks <= 1)),
        "recall@10": float(np.mean(top10)),
    }
