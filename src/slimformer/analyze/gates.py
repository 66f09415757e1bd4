"""In which order does training close a model's heads? (Voita et al. 2019, "Analyzing Multi-Head Self-Attention:
Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned").

Voita et al. put a hard-concrete gate on every head and swept the strength of an L0 penalty; the heads that survive
strong penalties are the ones the model needs. Here one run replaces the sweep: head-only gates
(:class:`~slimformer.configs.Learned` with ``units="heads"``) are trained with the weights while the target share
of heads removed rises linearly from 0 to ``heads`` over the first half of training, under the Lagrangian that holds
the expected size to it. A head's *closing step* is the first step at which its probability of being open fell
below one half; heads that never close rank highest. The order is compared with Michel et al. 2019's gradient
importance of the same (dense) model by a Spearman rank correlation, and drawn as a heatmap.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    load_analysis_model,
    load_task_data,
    model_name,
    results_folder,
    task_spec_of,
)
from slimformer.models import LoadedModel
from slimformer.tasks import TaskData, TaskSpec


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get mean ranks); NaN where either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class GatesResult:
    """Closing step of every head (None: stayed open), the share of heads closed, Michel importance of the dense
    model, and their rank correlation."""

    model: str
    task: str
    steps: int
    closing_step: list[list[int | None]]
    michel: list[list[float]]
    final_open: list[list[float]]
    config: dict[str, Any] = field(default_factory=dict)

    def survival(self) -> np.ndarray:
        """Per head, how long it stayed open as a share of training (1: never closed)."""
        return np.array([[1.0 if s is None else s / self.steps for s in layer] for layer in self.closing_step])

    def correlation(self) -> float:
        return spearman(self.survival().reshape(-1), np.asarray(self.michel).reshape(-1))

    def order(self) -> list[tuple[int, int]]:
        """(layer, head) in the order training closed them (first closed first); open heads are left out."""
        closed = [(s, layer, head) for layer, row in enumerate(self.closing_step) for head, s in enumerate(row)
                  if s is not None]  # fmt: skip
        return [(layer, head) for _, layer, head in sorted(closed)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": "gates",
            "model": self.model,
            "task": self.task,
            "steps": self.steps,
            "closing_step": self.closing_step,
            "closing_order": self.order(),
            "michel_importance": self.michel,
            "final_open_probability": self.final_open,
            "spearman_survival_vs_michel": self.correlation(),
            "config": self.config,
        }

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        from slimformer.analyze.plots import heatmap

        out = results_folder(out_dir, self.to_dict())
        heatmap(self.survival(), out / "gates.png", title=f"{self.model}: how long each head stayed open",
                colorbar_label="share of training open (1 = never closed)", vmin=0.0, vmax=1.0, digits=2)  # fmt: skip
        heatmap(np.asarray(self.michel), out / "michel.png", title="Michel et al. 2019 importance (dense)",
                colorbar_label="normalised importance", digits=2)  # fmt: skip
        (out / REPORT_FILE).write_text(self.markdown())
        return out

    def markdown(self) -> str:
        closed = sum(s is not None for row in self.closing_step for s in row)
        total = sum(len(row) for row in self.closing_step)
        order = ", ".join(f"L{layer}H{head}" for layer, head in self.order()[:24])
        return "\n".join(
            [
                f"# Head gates of `{self.model}` on {self.task}",
                "",
                f"- heads closed: {closed} of {total} in {self.steps} steps",
                f"- closing order (first 24): {order or 'none'}",
                f"- Spearman (time open vs Michel importance): {self.correlation():.3f}",
                "",
                "`gates.png`: share of training each head stayed open; `michel.png`: its gradient importance.",
                "",
            ]
        )


def gates(
    model: str | os.PathLike[str] | LoadedModel,
    task: str | TaskSpec | TaskData,
    *,
    heads: float = 0.75,
    epochs: float = 2.0,
    data_dir: str | os.PathLike[str] | None = None,
    max_train_samples: int | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    n_examples: int = 256,
    work_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> GatesResult:
    """Train head-only hard-concrete gates toward removing ``heads`` of the heads and report the order in which
    they close (see the module doc). The model given is not changed."""
    from slimformer.arch import layer_views
    from slimformer.configs import Learned, PruneContext
    from slimformer.importance import score_model
    from slimformer.learned.method import prune_learned

    if not 0 < heads < 1:
        raise AnalyzeError(f"--heads {heads} must be the share of heads to close, strictly between 0 and 1.")
    spec = task_spec_of(task)
    data = load_task_data(task, data_dir, seed=seed, need_train=True)
    loaded = load_analysis_model(model, spec, require_head=True)
    michel = score_model(loaded, loaded.tokenizer, data, method="gradient", n_examples=n_examples,
                         max_length=max_length, seed=seed, progress=progress)  # fmt: skip
    working = copy.deepcopy(loaded.model)
    views = layer_views(working)
    attention = sum(4 * v.query.in_features * v.query.out_features for v in views)
    ffn = sum(2 * v.ffn_up.in_features * v.ffn_up.out_features for v in views)
    # the Learned target counts all encoder weights; the heads are the attention's share of them
    config = Learned(
        target_sparsity=heads * attention / (attention + ffn),
        units="heads",
        epochs=epochs,
        final_epochs=0.0,
        max_train_samples=max_train_samples,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
    )
    outcome = prune_learned(
        working, loaded.tokenizer, config, PruneContext(data=data, progress=progress, work_dir=work_dir)
    )
    learned = outcome.details["learned"]
    return GatesResult(
        model=model_name(model),
        task=spec.name,
        steps=learned["steps"],
        closing_step=learned["head_closing_step"],
        michel=[np.asarray(row).round(6).tolist() for row in michel.heads],
        final_open=learned["gates"]["heads"],
        config={**config.to_dict(), "heads": heads, "n_examples": n_examples},
    )


__all__ = ["GatesResult", "gates", "spearman"]
