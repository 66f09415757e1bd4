"""How faithful a compressed model is to the model it was made from (Xu et al. 2021, "Beyond Preserved Accuracy:
Evaluating Loyalty and Robustness of BERT Compression"): beyond the two scores, do they predict the same thing?

On the task's dev split(s), and on the task's AdvGLUE examples when it has them (:mod:`slimformer.tasks.advglue`):

* label loyalty: the share of examples on which the student predicts the teacher's label;
* probability loyalty: 1 - sqrt(JS divergence) between the two predicted distributions (base 2, so in [0, 1]), as
  Xu et al. define it; plus the mean KL(teacher || student) and the mean absolute difference of the probability
  each gives the teacher's label;
* for a regression task (STS-B): the mean absolute difference of the predictions and their Pearson correlation.

Both models read the same tokens (their tokenizers must agree), so the differences are the models'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    load_analysis_model,
    model_name,
    results_folder,
    task_spec_of,
)
from slimformer.evaluation import Evaluator
from slimformer.models import LoadedModel
from slimformer.tasks import TaskData, TaskSpec


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def loyalty_metrics(teacher_logits: np.ndarray, student_logits: np.ndarray, *, regression: bool) -> dict[str, float]:
    """The loyalty of ``student`` to ``teacher`` from their logits on the same examples."""
    if teacher_logits.shape != student_logits.shape:
        raise AnalyzeError(
            f"Teacher and student logits differ in shape ({teacher_logits.shape} vs {student_logits.shape}): they "
            "were not made for the same task."
        )
    if regression:
        t, s = teacher_logits.reshape(-1).astype(np.float64), student_logits.reshape(-1).astype(np.float64)
        correlation = float(np.corrcoef(t, s)[0, 1]) if t.std() > 0 and s.std() > 0 else float("nan")
        return {"mean_abs_difference": float(np.abs(t - s).mean()), "pearson": correlation, "examples": len(t)}
    p, q = _softmax(teacher_logits.astype(np.float64)), _softmax(student_logits.astype(np.float64))
    eps = 1e-12
    middle = (p + q) / 2
    js = 0.5 * (p * np.log2((p + eps) / (middle + eps))).sum(1) + 0.5 * (q * np.log2((q + eps) / (middle + eps))).sum(1)
    kl = (p * np.log((p + eps) / (q + eps))).sum(1)
    labels = p.argmax(1)
    rows = np.arange(len(labels))
    return {
        "label_loyalty": float((q.argmax(1) == labels).mean()),
        "probability_loyalty": float((1.0 - np.sqrt(np.clip(js, 0.0, 1.0))).mean()),
        "kl_teacher_student": float(kl.mean()),
        "probability_difference": float(np.abs(p[rows, labels] - q[rows, labels]).mean()),
        "examples": len(labels),
    }


@dataclass
class LoyaltyResult:
    """Loyalty per data set (``dev`` splits, ``advglue`` splits) and both models' scores on each."""

    teacher: str
    student: str
    task: str
    metric: str
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": "loyalty", "teacher": self.teacher, "student": self.student, "task": self.task,
                "metric": self.metric, "sets": self.sets}  # fmt: skip

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out = results_folder(out_dir, self.to_dict())
        (out / REPORT_FILE).write_text(self.markdown())
        return out

    def markdown(self) -> str:
        lines = [f"# Loyalty of `{self.student}` to `{self.teacher}` on {self.task}", ""]
        for name, entry in self.sets.items():
            lines.append(f"## {name} ({entry['loyalty']['examples']} examples)")
            lines.append("")
            lines.append(f"- {self.metric}: teacher {entry['teacher_score'] * 100:.2f}, student "
                         f"{entry['student_score'] * 100:.2f}")  # fmt: skip
            for key, value in entry["loyalty"].items():
                if key != "examples":
                    lines.append(f"- {key.replace('_', ' ')}: {value:.4f}")
            lines.append("")
        return "\n".join(lines)


def loyalty(
    teacher: str | os.PathLike[str] | LoadedModel,
    student: str | os.PathLike[str] | LoadedModel,
    task: str | TaskSpec | TaskData,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    advglue: bool = True,
    advglue_dir: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> LoyaltyResult:
    """Label and probability loyalty of ``student`` to ``teacher`` on ``task``'s dev split(s) and, with
    ``advglue`` and when the task has them, on its AdvGLUE examples (see the module doc)."""
    from slimformer.analyze.common import load_task_data
    from slimformer.tasks.advglue import has_advglue, load_advglue

    spec = task_spec_of(task)
    data = load_task_data(task, data_dir, max_eval_samples=max_eval_samples, seed=seed)
    teacher_loaded = load_analysis_model(teacher, spec, require_head=True, what="--teacher")
    student_loaded = load_analysis_model(student, spec, require_head=True, what="--student")
    probe = "Loyalty compares the two models on the same tokens."
    if teacher_loaded.tokenizer(probe)["input_ids"] != student_loaded.tokenizer(probe)["input_ids"]:
        raise AnalyzeError("The student's tokenizer differs from the teacher's: compare models of one family.")
    sets = {"dev": data}
    if advglue and has_advglue(spec):
        sets["advglue"] = load_advglue(spec, advglue_dir or data_dir)
    result = LoyaltyResult(
        teacher=model_name(teacher), student=model_name(student), task=spec.name, metric=spec.primary_metric
    )
    for set_name, task_data in sets.items():
        evaluator = Evaluator(teacher_loaded.tokenizer, task_data, max_length=max_length, batch_size=batch_size)
        teacher_logits = evaluator.logits(teacher_loaded.model)
        student_logits = evaluator.logits(student_loaded.model)
        teacher_eval, student_eval = evaluator.metrics(teacher_logits), evaluator.metrics(student_logits)
        for split in teacher_logits:
            name = set_name if len(teacher_logits) == 1 else f"{set_name} {split}"
            result.sets[name] = {
                "teacher_score": teacher_eval[split][spec.primary_metric],
                "student_score": student_eval[split][spec.primary_metric],
                "loyalty": loyalty_metrics(teacher_logits[split], student_logits[split], regression=spec.is_regression),
            }
    return result
