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
