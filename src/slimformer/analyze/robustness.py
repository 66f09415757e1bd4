"""How easily a (compressed) model is fooled: its accuracy on AdvGLUE next to its clean dev accuracy, and a
projected-gradient attack in the input-embedding space that runs on any classification task.

* AdvGLUE (Wang et al. 2021): human-validated adversarial sentences for SST-2, QNLI, RTE, MNLI and QQP
  (:mod:`slimformer.tasks.advglue`), scored like the dev split.
* PGD on embeddings (Madry et al. 2018, applied to word embeddings as in FreeLB, Zhu et al. 2020): every token's
  word embedding may move by at most ``epsilon`` times the mean norm of the model's word embeddings (an L2 ball
  per token, so the bound means the same for every model); ``steps`` normalised gradient-ascent steps on the
  task loss, each projected back into the ball. Reported per bound: the attack success rate (the share of
  examples the model classified correctly whose prediction the attack flips) and the accuracy under attack.

Compressed models are often less robust than their teachers at equal clean accuracy (Xu et al. 2021; Zheng et al.
2022, whose robust tickets this analysis is the yardstick for).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorWithPadding, PreTrainedModel

from slimformer.adversarial import embedding_offset, embedding_scale, pgd_perturbation
from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    load_analysis_model,
    load_task_data,
    model_name,
    results_folder,
    task_spec_of,
)
from slimformer.evaluation import Evaluator
from slimformer.models import LoadedModel
from slimformer.tasks import TaskData, TaskSpec, tokenize_task

# on a converged MiniLM-L6 SST-2 model 5% already flips two thirds of the correct predictions and 10% nearly all
# (bench/results/costs.md), so the default bounds resolve the range where models differ
DEFAULT_EPSILONS = (0.01, 0.02, 0.05, 0.1)


def pgd_flips(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    radius: float,
    steps: int,
) -> torch.Tensor:
    """Which examples of ``batch`` change their predicted class under the attack (a bool per example)."""
    with torch.no_grad():
        clean = model(**batch).logits.argmax(-1)
    delta = pgd_perturbation(model, batch, labels, radius=radius, steps=steps)
    with torch.no_grad(), embedding_offset(model, delta, batch["attention_mask"]):
        attacked = model(**batch).logits.argmax(-1)
    return attacked != clean


@dataclass
class RobustnessResult:
    """Clean and AdvGLUE scores, and the PGD attack's success rate per bound."""

    model: str
    task: str
    metric: str
    clean: dict[str, float] = field(default_factory=dict)
    advglue: dict[str, float] | None = None
    pgd: list[dict[str, Any]] = field(default_factory=list)
    embedding_scale: float = 0.0
    attacked_examples: int = 0
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": "robustness", **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out = results_folder(out_dir, self.to_dict())
        (out / REPORT_FILE).write_text(self.markdown())
        self.plot(out / "pgd.png")
        return out

    def markdown(self) -> str:
        lines = [f"# Robustness of `{self.model}` on {self.task}", ""]
        for split, value in self.clean.items():
            lines.append(f"- clean {split} {self.metric}: {value * 100:.2f}")
        for split, value in (self.advglue or {}).items():
            lines.append(f"- AdvGLUE {split} {self.metric}: {value * 100:.2f}")
        lines += [
            "",
            f"PGD on word embeddings ({self.steps} steps, {self.attacked_examples} dev examples; bound = epsilon x "
            f"the mean word-embedding norm, {self.embedding_scale:.3f}):",
            "",
            "| epsilon | attack success rate | accuracy under attack |",
            "|---|---|---|",
        ]
        lines += [
            f"| {p['epsilon']:g} | {p['success_rate'] * 100:.1f}% | {p['accuracy'] * 100:.2f} |" for p in self.pgd
        ]
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> Path:
        from matplotlib.figure import Figure

        from slimformer.plots import save_png_atomic

        figure = Figure(figsize=(5, 3.5))
        axes = figure.add_subplot()
        axes.plot([p["epsilon"] for p in self.pgd], [p["success_rate"] * 100 for p in self.pgd], marker="o")
        axes.set_xlabel("epsilon (x mean word-embedding norm)")
        axes.set_ylabel("attack success rate (%)")
        axes.set_title(f"PGD on embeddings: {Path(self.model).name or self.model}")
        axes.set_ylim(0, 100)
        return save_png_atomic(figure, path)


def robustness(
    model: str | os.PathLike[str] | LoadedModel,
    task: str | TaskSpec | TaskData,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    advglue: bool = True,
    advglue_dir: str | os.PathLike[str] | None = None,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    steps: int = 5,
    attack_examples: int | None = 256,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> RobustnessResult:
    """Clean dev score, AdvGLUE score (when the task has it) and PGD attack success at each ``epsilon`` on up to
    ``attack_examples`` dev examples (a seeded subset)."""
    from slimformer.tasks.advglue import has_advglue, load_advglue

    spec = task_spec_of(task)
    if spec.is_regression or spec.is_embedding:
        raise AnalyzeError(f"The robustness analysis needs a classification task; {spec.name} is not one.")
    if steps < 1 or not epsilons or any(e <= 0 for e in epsilons):
        raise AnalyzeError("PGD needs steps >= 1 and bounds (epsilons) above 0.")
    data = load_task_data(task, data_dir, max_eval_samples=max_eval_samples, seed=seed)
    loaded = load_analysis_model(model, spec, require_head=True)
    net, tokenizer = loaded.model.eval(), loaded.tokenizer
    result = RobustnessResult(model=model_name(model), task=spec.name, metric=spec.primary_metric, steps=steps)
    clean = Evaluator(tokenizer, data, max_length=max_length).evaluate(net)
    result.clean = {split: values[spec.primary_metric] for split, values in clean.items()}
    if advglue and has_advglue(spec):
        adversarial = load_advglue(spec, advglue_dir or data_dir)
        scores = Evaluator(tokenizer, adversarial, max_length=max_length).evaluate(net)
        result.advglue = {split: values[spec.primary_metric] for split, values in scores.items()}
    split = next(iter(data.dev))
    tokenized = tokenize_task(TaskData(spec=spec, splits={split: data.dev[split]}), tokenizer, max_length=max_length)
    dataset = tokenized[split]
    if attack_examples is not None and attack_examples < len(dataset):
        chosen = np.random.default_rng(seed).choice(len(dataset), size=attack_examples, replace=False)
        dataset = dataset.select(sorted(int(i) for i in chosen))
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    collate = DataCollatorWithPadding(tokenizer)
    scale = embedding_scale(net)
    result.embedding_scale, result.attacked_examples = scale, len(dataset)
    requires = [p.requires_grad for p in net.parameters()]
    for parameter in net.parameters():
        parameter.requires_grad_(False)  # only the perturbation needs gradients
    try:
        # batches of similar length (little padding); only correctly classified examples are attacked, the
        # only ones whose flip counts
        order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
        batches = []
        for start in range(0, len(order), batch_size):
            rows = dataset.select([int(i) for i in order[start : start + batch_size]])
            batch = dict(collate([{c: rows[i][c] for c in columns} for i in range(len(rows))]))
            labels = torch.as_tensor(rows["labels"])
            with torch.no_grad():
                right = net(**batch).logits.argmax(-1) == labels
            batches.append(({k: v[right] for k, v in batch.items()}, labels[right]))
        correct, total = sum(len(labels) for _, labels in batches), len(dataset)
        for epsilon in epsilons:
            flipped = 0
            for batch, labels in batches:
                if len(labels):
                    flipped += int(pgd_flips(net, batch, labels, radius=epsilon * scale, steps=steps).sum())
            result.pgd.append(
                {
                    "epsilon": float(epsilon),
                    "success_rate": flipped / correct if correct else float("nan"),
                    "accuracy": (correct - flipped) / total,
                    "clean_accuracy": correct / total,
                }
            )
    finally:
        for parameter, flag in zip(net.parameters(), requires, strict=True):
            parameter.requires_grad_(flag)
    return result
