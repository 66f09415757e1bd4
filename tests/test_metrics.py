"""Every metric against a value worked out by hand, from logits and from class ids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimformer.errors import TaskError
from slimformer.tasks import compute_metrics, get_task_spec
from slimformer.tasks.data import custom_task_spec


def logits_for(ids: list[int], classes: int = 2) -> np.ndarray:
    """Logits whose argmax is ``ids`` (with distracting non-zero values elsewhere)."""
    logits = np.full((len(ids), classes), -1.0) + np.linspace(0, 0.5, classes)
    logits[np.arange(len(ids)), ids] = 3.0
    return logits


def test_accuracy():
    # 3 of 4 right (the third is wrong) -> 0.75
    assert compute_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


def test_accuracy_from_logits_equals_accuracy_from_ids():
    ids, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert compute_metrics("rte", logits_for(ids), labels) == compute_metrics("rte", ids, labels)
    assert compute_metrics("rte", torch.tensor(logits_for(ids)), torch.tensor(labels)) == {"accuracy": 0.75}


def test_mrpc_f1_accuracy_and_combined_score():
    predictions, labels = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]
    # Positive class 1: TP = 2 (items 0, 3), FP = 1 (item 1), FN = 1 (item 4).
    # precision = 2/3, recall = 2/3 -> F1 = 2/3. Accuracy = 3/5 (items 0, 2, 3). Combined = (2/3 + 3/5) / 2.
    result = compute_metrics("mrpc", logits_for(predictions), labels)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["combined_score"] == pytest.approx((2 / 3 + 0.6) / 2)
    assert list(result) == ["f1", "accuracy", "combined_score"]
    assert compute_metrics("qqp", predictions, labels) == pytest.approx(result)


def test_cola_matthews_correlation():
    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # TP = 2 (items 0, 4), FP = 1 (item 1), TN = 2 (items 2, 5), FN = 1 (item 3).
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 3/9 = 1/3.
    result = compute_metrics("cola", logits_for(predictions), labels)
    assert result == {"matthews_correlation": pytest.approx(1 / 3)}
    assert get_task_spec("cola").primary_metric == "matthews_correlation"


def test_stsb_pearson_and_spearman():
    predictions = np.array([[1.0], [2.0], [3.0], [10.0]])  # (n, 1), as a regression head outputs
    labels = [1.0, 3.0, 2.0, 4.0]
    # Pearson: mean p = 4, deviations -3, -2, -1, 6; mean y = 2.5, deviations -1.5, 0.5, -0.5, 1.5.
    # sum of products = 4.5 - 1 + 0.5 + 9 = 13; sum p^2 = 50; sum y^2 = 5 -> r = 13 / sqrt(250).
    # Spearman: ranks of p = 1, 2, 3, 4 and of y = 1, 3, 2, 4; rank deviations give 4 / sqrt(5 * 5) = 0.8.
    result = compute_metrics("stsb", predictions, labels)
    assert result["pearson"] == pytest.approx(13 / math.sqrt(250))
    assert result["spearmanr"] == pytest.approx(0.8)
    assert result["combined_score"] == pytest.approx((13 / math.sqrt(250) + 0.8) / 2)
    flat = compute_metrics("stsb", predictions[:, 0], np.array(labels)[:, None])
    assert flat == pytest.approx(result)


def test_constant_regression_predictions_score_zero_not_nan():
    result = compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert result == {"pearson": 0.0, "spearmanr": 0.0, "combined_score": 0.0}


def test_mnli_three_class_logits():
    # argmax of the rows: 0, 2, 1, 1 against 0, 2, 2, 1 -> 3 of 4
    logits = np.array([[2.0, 0.1, -1.0], [0.0, 0.5, 0.9], [0.2, 0.3, 0.1], [-1.0, 4.0, 3.9]])
    assert compute_metrics("mnli", logits, [0, 2, 2, 1]) == {"accuracy": 0.75}


def test_custom_three_class_macro_f1():
    spec = custom_task_spec("topics", ["text"], ["a", "b", "c"])
    # class 0: P = 1, R = 1, F1 = 1; class 1: TP 1, FN 1 -> P = 1, R = 1/2, F1 = 2/3;
    # class 2: TP 1, FP 1 -> P = 1/2, R = 1, F1 = 2/3. Macro F1 = (1 + 2/3 + 2/3) / 3 = 7/9. Accuracy 3/4.
    result = compute_metrics(spec, logits_for([0, 1, 2, 2], classes=3), [0, 1, 1, 2])
    assert result["f1"] == pytest.approx(7 / 9)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["combined_score"] == pytest.approx((7 / 9 + 0.75) / 2)
    assert spec.primary_metric == "accuracy"


def test_custom_binary_f1_scores_class_one():
    spec = custom_task_spec("spam", ["text"], ["ham", "spam"])
    # class 1: TP 1 (item 0), FP 1 (item 2), FN 1 (item 1) -> F1 = 1/2
    assert compute_metrics(spec, [1, 0, 1, 0], [1, 1, 0, 0])["f1"] == pytest.approx(0.5)


def test_custom_regression_uses_correlations():
    spec = custom_task_spec("price", ["text"], None)
    result = compute_metrics(spec, [1.0, 2.0, 3.0], [2.0, 4.0, 6.0])  # exactly linear -> 1 and 1
    assert result == pytest.approx({"pearson": 1.0, "spearmanr": 1.0, "combined_score": 1.0})


def test_eval_prediction_tuple_and_float_class_ids():
    logits = logits_for([1, 0])
    assert compute_metrics("sst2", (logits, np.zeros((2, 4))), [1, 1]) == {"accuracy": 0.5}
    assert compute_metrics("sst2", np.array([1.0, 0.0]), [1, 1]) == {"accuracy": 0.5}


@pytest.mark.parametrize(
    ("task", "predictions", "labels", "message"),
    [
        ("sst2", [1, 0, 1], [1, 0], "3 predictions for 2 labels"),
        ("sst2", np.zeros((2, 3)), [1, 0], "logits for 3 classes, but sst2 has 2"),
        ("sst2", [0.4, 0.7], [1, 0], "not fractional scores"),
        ("stsb", np.zeros((2, 2)), [1.0, 0.0], "regression task"),
        ("sst2", [], [], "empty"),
    ],
)
def test_bad_inputs(task, predictions, labels, message):
    with pytest.raises(TaskError, match=message):
        compute_metrics(task, predictions, labels)
