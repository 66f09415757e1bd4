"""What each compressed variant costs beyond its dev score, as columns for a report or a benchmark table: accuracy
on the task's AdvGLUE examples (Wang et al. 2021), loyalty to the dense model on dev and AdvGLUE (Xu et al. 2021),
and, for sentiment classifiers, the Equity Evaluation Corpus gender and race gaps (Kiritchenko & Mohammad 2018).

Each column appears only where its data is there (AdvGLUE beside GLUE, the EEC in the shared data folder) and where
it means something (EEC gaps need a positive class): :func:`compression_costs` leaves out what does not apply
instead of failing, because a report must not break for a missing optional data file. Works on anything the
evaluation path runs: PyTorch models and the int8 runtime wrappers alike.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from slimformer.analyze.bias import bias, find_eec_file
from slimformer.analyze.common import AnalyzeError
from slimformer.analyze.loyalty import loyalty_metrics
from slimformer.evaluation import Evaluator
from slimformer.models import LoadedModel
from slimformer.tasks import TaskData


def sentiment_label(data: TaskData) -> int | None:
    """The index of the positive class when the task is sentiment (a label named ``positive``), else None."""
    names = [str(name).lower() for name in (data.spec.label_names or [])]
    if data.spec.is_regression or data.spec.is_embedding or "positive" not in names:
        return None
    return names.index("positive")


def compression_costs(
    models: dict[str, Any],
    reference: str,
    tokenizer: Any,
    data: TaskData,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    eec_file: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    dev_logits: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """For every model in ``models`` (name -> network), the costs that apply: ``advglue`` (the primary metric on
    the task's AdvGLUE examples), ``loyalty`` (label and probability loyalty to ``models[reference]`` on each dev
    split and on AdvGLUE) and ``eec_gender_gap`` / ``eec_race_gap`` (mean paired gap in P(positive), female -
    male and African-American - European). Empty dicts when nothing applies (an embedding task, no data files).

    ``dev_logits`` (name -> split -> logits, from :meth:`Evaluator.logits` at the same ``max_length``): the
    models' dev logits when the caller has them already, so the dev set is not run a second time."""
    from slimformer.tasks.advglue import find_advglue_file, has_advglue, load_advglue

    costs: dict[str, dict[str, Any]] = {name: {} for name in models}
    if data.spec.is_embedding:
        return costs
    sets = {"dev": data}
    if has_advglue(data.spec) and find_advglue_file(data_dir) is not None:
        sets["advglue"] = load_advglue(data.spec, data_dir)
    metric = data.spec.primary_metric
    for set_name, task_data in sets.items():
        if set_name == "dev" and dev_logits is not None:
            missing = sorted(set(models) - set(dev_logits))
            if missing:
                raise AnalyzeError(f"dev_logits has no logits for {', '.join(missing)}.")
            logits = dev_logits
        else:
            evaluator = Evaluator(tokenizer, task_data, max_length=max_length, batch_size=batch_size)
            logits = {name: evaluator.logits(net) for name, net in models.items()}
        if set_name == "advglue":
            for name in models:
                scores = evaluator.metrics(logits[name])
                costs[name]["advglue"] = scores[next(iter(scores))][metric]
        for name in models:
            for split, values in logits[name].items():
                label = set_name if len(logits[name]) == 1 else f"{set_name} {split}"
                measured = loyalty_metrics(logits[reference][split], values, regression=data.spec.is_regression)
                measured.pop("examples")
                costs[name].setdefault("loyalty", {})[label] = measured
    positive = sentiment_label(data)
    if positive is not None and find_eec_file(eec_file) is not None:
        for name, net in models.items():
            loaded = LoadedModel(net, tokenizer, data.spec, name)
            length = min(max_length, 64)  # EEC sentences are short
            gaps = bias(loaded, eec_file=eec_file, task=data.spec, positive_label=positive, max_length=length)
            costs[name]["eec_gender_gap"] = gaps.gaps["gender"]["all"]["mean"]
            costs[name]["eec_race_gap"] = gaps.gaps["race"]["all"]["mean"]
    return costs


def _loyalty_cell(loyalty: dict[str, dict[str, float]], key: str) -> str:
    return " / ".join(f"{values[key]:.3f}" for values in loyalty.values() if key in values)


COST_HEADERS = ["AdvGLUE", "label loyalty", "prob. loyalty", "EEC gender gap (F-M)", "EEC race gap (AA-EU)"]


def cost_cells(costs: dict[str, Any]) -> list[str]:
    """The :data:`COST_HEADERS` cells of one model's costs ('' where a cost does not apply). Loyalty lists its
    sets in order (dev, then AdvGLUE); for regression the Pearson correlation stands in for label loyalty."""
    loyalty = costs.get("loyalty") or {}
    regression = any("pearson" in values for values in loyalty.values())
    return [
        f"{costs['advglue'] * 100:.2f}" if "advglue" in costs else "",
        _loyalty_cell(loyalty, "pearson" if regression else "label_loyalty"),
        "" if regression else _loyalty_cell(loyalty, "probability_loyalty"),
        f"{costs['eec_gender_gap'] * 100:+.2f}" if "eec_gender_gap" in costs else "",
        f"{costs['eec_race_gap'] * 100:+.2f}" if "eec_race_gap" in costs else "",
    ]


def costs_markdown(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table of every model's costs (no lines when none has any), with what the columns mean."""
    if not any(rows.values()):
        return []
    sets = next((list(c["loyalty"]) for c in rows.values() if c.get("loyalty")), [])
    lines = [
        "| model | " + " | ".join(COST_HEADERS) + " |",
        "|---|" + "---|" * len(COST_HEADERS),
    ]
    lines += [f"| {name} | " + " | ".join(cost_cells(costs)) + " |" for name, costs in rows.items()]
    lines += [
        "",
        f"Loyalty to the dense model (Xu et al. 2021) on {' / '.join(sets)}: label loyalty = share of the dense "
        "model's labels kept (Pearson of the predictions for regression), probability loyalty = 1 - sqrt(JS). EEC "
        "gaps: mean paired difference in P(positive), in points (Kiritchenko & Mohammad 2018).",
    ]
    return lines


__all__ = ["COST_HEADERS", "compression_costs", "cost_cells", "costs_markdown", "sentiment_label"]
