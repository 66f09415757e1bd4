"""Ablation of a fine-tuned model, after Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?".

Three experiments, each a dev evaluation of the model with gates (:mod:`slimformer.gates`) set to 0:

* **single head masked** (their §3.2, Table 1): the change of the score when one head is masked, for every head;
  a layers x heads heatmap of the change.
* **all but one head in a layer** (their §3.3, Table 2): for every layer and head, the score when that head is
  the only one the layer keeps; per layer, the best head to keep and its score.
* **whole components removed**: each layer's attention (every head masked: the sublayer adds only its output
  projection's bias, as physically pruning every head would), each layer's FFN (every neuron masked: only the
  down projection's bias) and each whole layer (skipped: its output is its input).

Scores are the task's primary metric, averaged over its dev splits. With ``seeds > 1`` each seed evaluates on
a different random dev subset of ``max_eval_samples`` rows (the model is fixed, so data is the only source of
randomness); the summary gives mean ± std over seeds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    fmt,
    fmt_stat,
    load_analysis_model,
    load_task_data,
    markdown_table,
    matrix_stat,
    model_name,
    nan_to_none,
    padded,
    parse_layers,
    results_folder,
    seed_list,
    stat,
    task_spec_of,
)
from slimformer.analyze.plots import heatmap
from slimformer.arch import layer_views
from slimformer.evaluation import Evaluator
from slimformer.gates import Gates, gated
from slimformer.models import LoadedModel
from slimformer.tasks import TaskData

COMPONENTS = ("attention", "ffn", "layer")
SINGLE_HEAD_PNG = "single_head_delta.png"
KEEP_ONE_PNG = "keep_one_score.png"
COMPONENTS_PNG = "components_delta.png"


@dataclass
class AblateResult:
    """Scores of a model with single heads masked, with one head kept per layer, and without whole components.

    Matrices are [layers, heads] (NaN for heads a layer does not have, and for layers not analysed); every
    ``*_delta`` is the masked score minus the full model's score, with the same dev data per seed.
    """

    task: str
    metric: str
    model: str
    seeds: list[int]
    layers: list[int]
    base: dict[str, Any]
    single_head_delta: np.ndarray
    single_head_delta_std: np.ndarray
    keep_one_score: np.ndarray
    keep_one_score_std: np.ndarray
    best_head_per_layer: list[dict[str, Any]]
    components: dict[str, list[dict[str, Any] | None]]
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return nan_to_none(
            {
                "analysis": "ablate",
                "paper": 'Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?"',
                "task": self.task,
                "metric": self.metric,
                "model": self.model,
                "seeds": self.seeds,
                "layers": self.layers,
                "layers_indexed_from": 0,
                "base": self.base,
                "single_head_delta": {"mean": self.single_head_delta, "std": self.single_head_delta_std},
                "keep_one_score": {"mean": self.keep_one_score, "std": self.keep_one_score_std},
                "best_head_per_layer": self.best_head_per_layer,
                "components_delta": self.components,
                "per_seed": self.per_seed,
                "meta": self.meta,
            }
        )

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write results.json, the heatmaps and report.md into ``out_dir`` (which must exist or is created)."""
        out_dir = results_folder(out_dir, self.to_dict())
        suffix = f" (mean of {len(self.seeds)} seeds)" if len(self.seeds) > 1 else ""
        heatmap(
            self.single_head_delta,
            out_dir / SINGLE_HEAD_PNG,
            title=f"{self.task}: change of {self.metric} with one head masked (points){suffix}",
            colorbar_label=f"Δ {self.metric} (points)",
            cmap="RdBu",
            center=0.0,
            scale=100.0,
        )
        heatmap(
            self.keep_one_score,
            out_dir / KEEP_ONE_PNG,
            title=f"{self.task}: {self.metric} with only this head kept in its layer{suffix}",
            colorbar_label=f"{self.metric} (points)",
            cmap="viridis",
            scale=100.0,
        )
        num_layers = len(self.components["attention"])
        matrix = np.full((num_layers, len(COMPONENTS)), np.nan)
        for c, name in enumerate(COMPONENTS):
            for layer, entry in enumerate(self.components[name]):
                if entry is not None:
                    matrix[layer, c] = entry["mean"]
        heatmap(
            matrix,
            out_dir / COMPONENTS_PNG,
            title=f"{self.task}: change of {self.metric} without a component (points){suffix}",
            xlabels=list(COMPONENTS),
            xlabel="removed",
            colorbar_label=f"Δ {self.metric} (points)",
            cmap="RdBu",
            center=0.0,
            scale=100.0,
        )
        (out_dir / REPORT_FILE).write_text(self.report())
        return out_dir

    def report(self) -> str:
        seeds = len(self.seeds)
        deltas = self.single_head_delta[np.isfinite(self.single_head_delta)]
        lines = [
            f"# Ablation of {self.model} on {self.task}",
            "",
            'After Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?". '
            f"Metric: {self.metric} on the dev split ({self.meta.get('eval_rows')} rows"
            + (f", a different random subset per seed, {seeds} seeds: mean ± std" if seeds > 1 else "")
            + f"), in points. Full model: **{fmt_stat(self.base)}**.",
            "",
            f"- Single head masked: {deltas.size} heads; change from {fmt(deltas.min(), signed=True)} to "
            f"{fmt(deltas.max(), signed=True)} points; {int((np.abs(deltas) < 0.01).sum())} heads change it by less "
            f"than 1 point, {int((deltas < -0.01).sum())} lower it by more than 1 point, "
            f"{int((deltas > 0).sum())} raise it."
            if deltas.size
            else "- Single head masked: no heads analysed.",
            "",
            "## Per layer",
            "",
        ]
        rows = []
        for layer in self.layers:
            best = self.best_head_per_layer[layer]
            worst = int(np.nanargmin(self.single_head_delta[layer]))
            rows.append(
                [
                    layer,
                    fmt_stat(self.components["attention"][layer], signed=True),
                    fmt_stat(self.components["ffn"][layer], signed=True),
                    fmt_stat(self.components["layer"][layer], signed=True),
                    best["head"],
                    fmt_stat(best["score"]),
                    f"{worst} ({fmt(self.single_head_delta[layer, worst], signed=True)})",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "layer",
                    "Δ without attention",
                    "Δ without FFN",
                    "Δ without layer",
                    "best single head",
                    "score with only it",
                    "most harmful head to mask (Δ)",
                ],
                rows,
            )
        )
        lines += [
            "Δ: score minus the full model's. 'Without attention' masks every head of the layer (the output "
            "projection's bias stays, as after physically pruning every head); 'without FFN' masks every FFN neuron; "
            "'without layer' skips the layer. 'Best single head': the head that, kept alone in its layer (all other "
            "layers intact), gives the highest score" + (" (chosen on the mean over seeds)." if seeds > 1 else "."),
            "",
            f"![single head masked]({SINGLE_HEAD_PNG})",
            f"![keep one head]({KEEP_ONE_PNG})",
            f"![components]({COMPONENTS_PNG})",
            "",
            f"{self.meta.get('evaluations')} evaluations in {self.meta.get('seconds')} s.",
            "",
        ]
        return "\n".join(lines)


def ablate(
    model: str | os.PathLike[str] | LoadedModel,
    task: str | TaskData = "sst2",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    layers: str | list[int] | None = None,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    batch_size: int = 64,
    seeds: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> AblateResult:
    """Michel et al. 2019's ablations of a fine-tuned ``model`` on ``task``'s dev split (see the module doc).

    ``layers`` restricts the experiments to some layers (``"0,2"``, ``"0-3"``, a list; default all). With
    ``seeds > 1``, ``max_eval_samples`` must be set: seed ``seed + i`` evaluates on its own random dev subset.
    The model is unchanged afterwards (all masking is done with hooks that are removed).
    """
    started = time.perf_counter()
    spec = task_spec_of(task)
    seed_values = seed_list(seed, seeds)
    if seeds > 1 and max_eval_samples is None:
        raise AnalyzeError(
            "--seeds > 1 needs --max-eval-samples: each seed evaluates the same fine-tuned model on its own random "
            "dev subset; on the whole dev set every seed would give identical numbers."
        )
    loaded = load_analysis_model(model, spec, require_head=True)
    net, tokenizer = loaded.model, loaded.tokenizer
    views = layer_views(net)
    heads_per_layer = [v.num_heads for v in views]
    chosen = parse_layers(layers, len(views))
    if not chosen:
        raise AnalyzeError("--layers selects no layer to ablate.")
    n_evals = 1 + sum(2 * heads_per_layer[i] + len(COMPONENTS) for i in chosen)

    per_seed = []
    bar = tqdm(total=n_evals * len(seed_values), desc="ablate", unit="eval", disable=not progress)
    eval_rows = None
    try:
        for current in seed_values:
            data = load_task_data(task, data_dir, max_eval_samples=max_eval_samples, seed=current)
            evaluator = Evaluator(tokenizer, data, max_length=max_length, batch_size=batch_size)
            eval_rows = sum(evaluator.sizes.values())
            per_seed.append(_ablate_one(net, evaluator, heads_per_layer, chosen, bar))
            per_seed[-1]["seed"] = current
    finally:
        bar.close()

    base = stat([s["base"] for s in per_seed])
    single_mean, single_std = matrix_stat([padded(s["single_head"]) - s["base"] for s in per_seed])
    keep_mean, keep_std = matrix_stat([padded(s["keep_one"]) for s in per_seed])
    best = []
    for layer in range(len(views)):
        if layer not in chosen:
            best.append(None)
            continue
        head = int(np.nanargmax(keep_mean[layer]))
        best.append(
            {
                "layer": layer,
                "head": head,
                "score": stat([s["keep_one"][layer][head] for s in per_seed]),
                "delta": stat([s["keep_one"][layer][head] - s["base"] for s in per_seed]),
            }
        )
    components: dict[str, list[dict[str, Any] | None]] = {}
    for name in COMPONENTS:
        components[name] = [
            stat([s[name][layer] - s["base"] for s in per_seed]) if layer in chosen else None
            for layer in range(len(views))
        ]
    meta = {
        "max_length": max_length,
        "max_eval_samples": max_eval_samples,
        "eval_rows": eval_rows,
        "batch_size": batch_size,
        "heads_per_layer": heads_per_layer,
        "evaluations": n_evals * len(seed_values),
        "seconds": round(time.perf_counter() - started, 2),
        "data_dir": None if data_dir is None else str(data_dir),
    }
    return AblateResult(
        task=spec.name,
        metric=spec.primary_metric,
        model=model_name(model),
        seeds=seed_values,
        layers=chosen,
        base=base,
        single_head_delta=single_mean,
        single_head_delta_std=single_std,
        keep_one_score=keep_mean,
        keep_one_score_std=keep_std,
        best_head_per_layer=best,
        components=components,
        per_seed=[nan_to_none(s) for s in per_seed],
        meta=meta,
    )


def _ablate_one(net, evaluator: Evaluator, heads_per_layer: list[int], chosen: list[int], bar) -> dict[str, Any]:
    """Every evaluation for one seed; gates are changed in place while their hooks stay installed."""
    nan = float("nan")
    result: dict[str, Any] = {
        "single_head": [[nan] * n for n in heads_per_layer],
        "keep_one": [[nan] * n for n in heads_per_layer],
        **{name: [nan] * len(heads_per_layer) for name in COMPONENTS},
    }
    gates = Gates.ones(net, layers=True)

    def score() -> float:
        value = evaluator.score(net)
        bar.update(1)
        return value

    with gated(net, gates):
        result["base"] = score()
        for layer in chosen:
            head_gate = gates.heads[layer]
            for head in range(heads_per_layer[layer]):
                head_gate[head] = 0.0
                result["single_head"][layer][head] = score()
                head_gate[head] = 1.0
            for head in range(heads_per_layer[layer]):
                head_gate.zero_()
                head_gate[head] = 1.0
                result["keep_one"][layer][head] = score()
            head_gate.zero_()
            result["attention"][layer] = score()
            head_gate.fill_(1.0)
            gates.neurons[layer].zero_()
            result["ffn"][layer] = score()
            gates.neurons[layer].fill_(1.0)
            assert gates.layers is not None
            gates.layers[layer] = 0.0
            result["layer"][layer] = score()
            gates.layers[layer] = 1.0
    return result
