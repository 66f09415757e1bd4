"""Lottery tickets in a fine-tuned model, after Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery,
All Tickets Are Winning".

1. Find subnetworks in a model fine-tuned on the task (``finetuned``, or one fine-tuned here from ``model``):

   * **s-pruning** (structured): iteratively mask 10% of the remaining heads and one whole MLP, by gradient
     importance (Michel et al. 2019), until the dev score falls below 90% of the full model's
     (:func:`slimformer.prune.iterative.iterative_prune`);
   * **m-pruning** (magnitude): iteratively mask 10% of the remaining encoder weights, smallest magnitude first,
     ranked globally, with the same stopping rule (:mod:`slimformer.analyze.magnitude`).

2. Re-fine-tune from the **pre-trained** weights (``model``), with everything outside a subnetwork masked during
   training and evaluation: the **good** subnetwork (the survivors), a **random** one of the same size and a
   **bad** one (the pruned elements, topped up with random survivors to the same size;
   :mod:`slimformer.analyze.subnetworks`). Optionally also the **full** model, re-fine-tuned the same way.
   Good, random and bad of one seed share the seed, so the same head initialisation and data order.

3. Survival heatmaps: how often each head and MLP survives s-pruning over seeds, and which fraction of each
   head's and MLP's weights survives m-pruning.

Seed ``s`` drives the training subset (``max_train_samples``) and dev subset (``max_eval_samples``), the
fine-tuning of the full model when no ``finetuned`` model is given, the importance sample of s-pruning, the
draws of the random and bad subnetworks and the re-fine-tuning. With a given ``finetuned`` model every seed
prunes that same model, so seeds then measure the pruning procedure's and re-fine-tuning's variation, not the
fine-tuning's.

Every completed step (a fine-tuned model, a pruning run, one re-fine-tuning) is written to ``work_dir``; run
again with the same settings and completed steps are read back instead of recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import set_seed

from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    fmt,
    fmt_stat,
    load_analysis_model,
    load_task_data,
    markdown_table,
    model_name,
    nan_to_none,
    padded,
    parse_choices,
    results_folder,
    seed_list,
    stat,
    task_spec_of,
)
from slimformer.analyze.magnitude import MagnitudeResult, WeightMasks, magnitude_prune, masked_weights
from slimformer.analyze.plots import bar_chart, line_chart, survival_heatmap
from slimformer.analyze.subnetworks import SUBNETWORKS, structured_subnetworks, weight_subnetworks
from slimformer.analyze.training import RetrainConfig, train, training_device
from slimformer.evaluation import Evaluator
from slimformer.folders import save_model_folder
from slimformer.io import write_json_atomic
from slimformer.models import LoadedModel, load_model
from slimformer.prune.apply import masked
from slimformer.prune.iterative import iterative_prune
from slimformer.prune.plan import Layout, PruningPlan
from slimformer.tasks import TaskData, TaskSpec, tokenize_task

logger = logging.getLogger(__name__)

KINDS = ("s", "m")
SUBNETWORK_CHOICES = (*SUBNETWORKS, "full")
SURVIVORS_FILE = "survivors.json"
SURVIVORS_VERSION = 1
SUBNETWORKS_PNG = "subnetworks.png"
CURVES_PNG = "pruning_curves.png"
KIND_NAMES = {"s": "s-pruning (heads + MLPs)", "m": "m-pruning (weights)"}


@dataclass
class LotteryResult:
    """Pruning results and re-fine-tuned scores of the subnetworks, per seed and summarised (mean ± std).

    ``summary`` maps ``"<kind>-<subnetwork>"`` (e.g. ``"s-good"``), ``"full"`` and ``"finetuned"`` (the model
    the subnetworks were found in) to a score statistic; ``survivors`` is what ``survivors.json`` holds (the input
    of :func:`slimformer.analyze.stability`).
    """

    task: str
    metric: str
    model: str
    finetuned: str | None
    seeds: list[int]
    kinds: list[str]
    subnetworks: list[str]
    per_seed: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    survival: dict[str, dict[str, Any]]
    survivors: dict[str, Any]
    masks: dict[int, WeightMasks] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return nan_to_none(
            {
                "analysis": "lottery",
                "paper": 'Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning"',
                "task": self.task,
                "metric": self.metric,
                "model": self.model,
                "finetuned": self.finetuned,
                "seeds": self.seeds,
                "kinds": self.kinds,
                "subnetworks": self.subnetworks,
                "summary": self.summary,
                "survival": self.survival,
                "per_seed": self.per_seed,
                "meta": self.meta,
            }
        )

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """results.json, survivors.json, m-pruning masks (``m_masks_seed<N>.npz``), plots and report.md."""
        out_dir = results_folder(out_dir, self.to_dict())
        write_json_atomic(out_dir / SURVIVORS_FILE, self.survivors)
        for current, masks in self.masks.items():
            masks.save(out_dir / f"m_masks_seed{current}.npz")
        suffix = f", {len(self.seeds)} seeds" if len(self.seeds) > 1 else ""
        for kind in self.kinds:
            survival = self.survival[kind]
            label = "survival frequency over seeds" if kind == "s" else "fraction of weights surviving"
            survival_heatmap(
                np.asarray(survival["heads"], dtype=np.float64),
                np.asarray(survival["mlps"], dtype=np.float64),
                out_dir / f"survival_{kind}.png",
                title=f"{self.task}: {KIND_NAMES[kind]}{suffix}",
                label=label,
            )
        groups: dict[str, dict[str, tuple[float, float]]] = {}
        for kind in self.kinds:
            for sub in self.subnetworks:
                entry = self.summary.get(f"{kind}-{sub}")
                if entry and entry["mean"] is not None:
                    groups.setdefault(KIND_NAMES[kind], {})[sub] = (entry["mean"], entry["std"])
        hlines = {}
        if "full" in self.summary:
            hlines["full model, re-fine-tuned"] = self.summary["full"]["mean"]
        if self.summary.get("finetuned", {}).get("mean") is not None and self.finetuned is not None:
            hlines["fine-tuned model pruned"] = self.summary["finetuned"]["mean"]
        if groups:
            bar_chart(
                groups,
                out_dir / SUBNETWORKS_PNG,
                ylabel=f"dev {self.metric} (points)",
                title=f"{self.task}: subnetworks re-fine-tuned from pre-trained weights{suffix}",
                hlines=hlines,
            )
        series = {}
        for entry in self.per_seed:
            if "s" in entry:
                curve = entry["s"]["curve"]
                series[f"s seed {entry['seed']} (x: heads)"] = (
                    [p["heads_pruned_fraction"] for p in curve],
                    [p["score"] for p in curve],
                )
            if "m" in entry:
                curve = entry["m"]["curve"]
                series[f"m seed {entry['seed']} (x: weights)"] = (
                    [p["sparsity"] for p in curve],
                    [p["score"] for p in curve],
                )
        if series:
            threshold = np.mean([e["finetuned_score"] for e in self.per_seed]) * self.meta.get("keep_score", 0.9)
            line_chart(
                series,
                out_dir / CURVES_PNG,
                xlabel="fraction pruned",
                ylabel=f"dev {self.metric} (points)",
                title=f"{self.task}: iterative pruning of the fine-tuned model (no retraining)",
                hlines={f"{self.meta.get('keep_score', 0.9):g} x full": float(threshold)},
            )
        (out_dir / REPORT_FILE).write_text(self.report())
        return out_dir

    def report(self) -> str:
        seeds = len(self.seeds)
        finetuned = self.finetuned or f"{self.model} fine-tuned here (same recipe as the re-fine-tuning)"
        lines = [
            f"# Lottery tickets in {self.model} on {self.task}",
            "",
            'After Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning". '
            f"Subnetworks found in {finetuned}"
            + (
                f"; re-fine-tuned from the pre-trained {self.model} with everything else masked"
                if self.subnetworks
                else " (pruning only, no re-fine-tuning)"
            )
            + f". Metric: dev {self.metric}, in points"
            + (f"; {seeds} seeds ({', '.join(map(str, self.seeds))}): mean ± std." if seeds > 1 else ".")
            + f" Training: {self.meta.get('train_rows')} examples, {self.meta.get('train', {}).get('epochs')} "
            f"epoch(s) (max steps {self.meta.get('train', {}).get('max_steps')}); dev: {self.meta.get('eval_rows')} "
            "rows.",
            "",
            "## Pruning the fine-tuned model",
            "",
        ]
        rows = [["full (unpruned)", fmt_stat(self.summary["finetuned"]), "", ""]]
        if "s" in self.kinds:
            heads = stat([e["s"]["heads_kept"] for e in self.per_seed])
            mlps = stat([e["s"]["mlps_kept"] for e in self.per_seed])
            rows.append(
                [
                    KIND_NAMES["s"],
                    fmt_stat(stat([e["s"]["final_score"] for e in self.per_seed])),
                    f"{fmt_stat(heads, scale=1, digits=1)} of {self.meta['total_heads']} heads, "
                    f"{fmt_stat(mlps, scale=1, digits=1)} of {self.meta['total_mlps']} MLPs",
                    fmt_stat(stat([e["s"]["iterations"] for e in self.per_seed]), scale=1, digits=1),
                ]
            )
        if "m" in self.kinds:
            rows.append(
                [
                    KIND_NAMES["m"],
                    fmt_stat(stat([e["m"]["final_score"] for e in self.per_seed])),
                    f"{fmt_stat(stat([1 - e['m']['sparsity'] for e in self.per_seed]), digits=1)}% of encoder weights",
                    fmt_stat(stat([e["m"]["iterations"] for e in self.per_seed]), scale=1, digits=1),
                ]
            )
        lines.append(markdown_table(["", "dev score", "kept", "iterations tried"], rows))
        lines += [
            f"Pruning stops at the first step whose score falls below {self.meta.get('keep_score')} x the full "
            "score (or after --max-iterations steps); the kept subnetwork is the one before that step.",
            "",
        ]
        if self.subnetworks:
            lines += ["## Subnetworks re-fine-tuned from the pre-trained weights", ""]
            headers = ["subnetwork", *[KIND_NAMES[k] for k in self.kinds]]
            table = []
            for sub in [s for s in self.subnetworks if s != "full"]:
                table.append([sub, *[fmt_stat(self.summary.get(f"{k}-{sub}", {})) for k in self.kinds]])
            if "full" in self.summary:
                table.append(["full (no mask)", *[fmt_stat(self.summary["full"]) for _ in self.kinds]])
            lines.append(markdown_table(headers, table))
            lines += [
                "Good: the survivors of pruning; random: as many heads and MLPs (s) or as many weights per matrix (m), "
                "drawn at random; bad: the pruned elements topped up with random survivors to the same size.",
                "",
            ]
            if any(f"{k}-{s}" in self.summary for k in self.kinds for s in self.subnetworks):
                lines.append(f"![subnetworks]({SUBNETWORKS_PNG})")
        lines.append(f"![pruning curves]({CURVES_PNG})")
        lines += [f"![survival {k}](survival_{k}.png)" for k in self.kinds]
        lines += ["", f"Total time {self.meta.get('seconds')} s.", ""]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- work dir


class _Work:
    """Completed steps on disk (or nowhere, with no work dir)."""

    def __init__(self, root: Path | None, signature: dict[str, Any], resume: bool) -> None:
        self.root = root
        if root is None:
            return
        if root.exists() and not resume:
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        marker = root / "run.json"
        if marker.is_file():
            previous = json.loads(marker.read_text())
            if previous != json.loads(json.dumps(signature)):
                raise AnalyzeError(
                    f"{root} holds steps of a lottery run with other settings ({previous}). Use the same settings "
                    "to resume it, or pass --no-resume (or another --out) to start over."
                )
        write_json_atomic(marker, signature)

    def path(self, name: str) -> Path | None:
        return None if self.root is None else self.root / name

    def read(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        if path is None or not path.is_file():
            return None
        return json.loads(path.read_text())

    def write(self, name: str, data: dict[str, Any]) -> None:
        path = self.path(name)
        if path is not None:
            write_json_atomic(path, data)


# --------------------------------------------------------------------------------------------------- main


def lottery(
    task: str | TaskData = "sst2",
    *,
    model: str | os.PathLike[str] = "minilm-l6",
    finetuned: str | os.PathLike[str] | LoadedModel | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    prune_kinds: Sequence[str] | str = KINDS,
    subnetworks: Sequence[str] | str = SUBNETWORKS,
    seeds: int = 1,
    seed: int = 0,
    keep_score: float = 0.9,
    step: float = 0.1,
    method: str = "gradient",
    n_examples: int = 256,
    max_length: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_prune_iterations: int | None = None,
    train_config: RetrainConfig | None = None,
    eval_batch_size: int = 64,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
) -> LotteryResult:
    """Prasanna et al. 2020's s- and m-pruning and good/random/bad subnetworks (see the module doc).

    ``model`` is the pre-trained model the subnetworks are re-fine-tuned from; ``finetuned`` the model they are
    found in (default: ``model`` fine-tuned here per seed with ``train_config``). ``prune_kinds`` is a subset of
    ``("s", "m")``, ``subnetworks`` of ``("good", "random", "bad", "full")`` (empty: prune only, no re-fine-tuning).
    ``work_dir`` makes the run resumable. The models passed in are not changed.
    """
    started = time.perf_counter()
    spec = task_spec_of(task)
    seed_values = seed_list(seed, seeds)
    kinds = parse_choices(prune_kinds, KINDS, "--prune-kinds")
    subs = parse_choices(subnetworks, SUBNETWORK_CHOICES, "--subnetworks")
    if not kinds and any(s != "full" for s in subs):
        raise AnalyzeError("--subnetworks good/random/bad need at least one --prune-kinds (s or m).")
    if not 0.0 < keep_score <= 1.0:
        raise AnalyzeError(f"--keep-score must be in (0, 1], got {keep_score}.")
    if not 0.0 < step < 1.0:
        raise AnalyzeError(f"--step must be between 0 and 1, got {step}.")
    config = train_config or RetrainConfig()
    config.check()
    signature = {
        "model": str(model),
        "finetuned": model_name(finetuned) if finetuned is not None else None,
        "task": spec.name,
        "keep_score": keep_score,
        "step": step,
        "method": method,
        "n_examples": n_examples,
        "max_length": max_length,
        "max_train_samples": max_train_samples,
        "max_eval_samples": max_eval_samples,
        "max_prune_iterations": max_prune_iterations,
        "train": config.to_dict(),
        "eval_batch_size": eval_batch_size,
    }
    work = _Work(Path(work_dir) if work_dir is not None else None, signature, resume)

    given = load_analysis_model(finetuned, spec, require_head=True, what="--finetuned") if finetuned else None
    reference_layout = Layout.of(given.model) if given else None
    if given is not None and subs and subs != ["full"]:
        _check_compatible(model, spec, given)
    per_seed: list[dict[str, Any]] = []
    masks_by_seed: dict[int, WeightMasks] = {}
    plans_by_seed: dict[int, PruningPlan] = {}
    total = len(seed_values) * (len(kinds) + len(kinds) * len([s for s in subs if s != "full"]) + ("full" in subs))
    bar = tqdm(total=total, desc="lottery", unit="run", disable=not progress)
    train_rows = eval_rows = None
    try:
        for current in seed_values:
            data = load_task_data(
                task,
                data_dir,
                max_train_samples=max_train_samples,
                max_eval_samples=max_eval_samples,
                seed=current,
                need_train=True,
            )
            train_rows = len(data.train) if data.train is not None else 0
            entry: dict[str, Any] = {"seed": current}
            # 1. the fine-tuned model the subnetworks are found in
            if given is not None:
                tuned = given
            else:
                tuned, entry["finetune"] = _finetuned_here(model, spec, data, config, max_length, current, work)
            layout = Layout.of(tuned.model)
            if reference_layout is None:
                reference_layout = layout
            evaluator = Evaluator(tuned.tokenizer, data, max_length=max_length, batch_size=eval_batch_size)
            eval_rows = sum(evaluator.sizes.values())
            entry["finetuned_score"] = evaluator.score(tuned.model)
            # 2. pruning
            if "s" in kinds:
                bar.set_postfix_str(f"seed {current}: s-pruning")
                plan, entry["s"] = _s_pruning(
                    tuned, data, work, current, step, keep_score, method, n_examples, max_length, max_prune_iterations
                )
                plans_by_seed[current] = plan
                bar.update(1)
            if "m" in kinds:
                bar.set_postfix_str(f"seed {current}: m-pruning")
                masks_by_seed[current], entry["m"] = _m_pruning(
                    tuned, evaluator, work, current, step, keep_score, max_prune_iterations
                )
                bar.update(1)
            if given is None:
                del tuned  # free the fine-tuned copy before re-fine-tuning
            # 3. re-fine-tuning from the pre-trained weights
            entry["retrain"] = {}
            for kind in kinds:
                chosen = [s for s in subs if s != "full"]
                if not chosen:
                    continue
                if kind == "s":
                    nets: dict[str, Any] = structured_subnetworks(plans_by_seed[current], current, tuple(chosen))
                else:
                    nets = weight_subnetworks(masks_by_seed[current], current, tuple(chosen))
                for sub in chosen:
                    bar.set_postfix_str(f"seed {current}: re-fine-tune {kind}-{sub}")
                    entry["retrain"][f"{kind}-{sub}"] = _retrain(
                        f"{kind}-{sub}", nets[sub], model, spec, data, evaluator, config, max_length, current, work
                    )
                    bar.update(1)
            if "full" in subs:
                if given is None:
                    entry["retrain"]["full"] = {"score": entry["finetuned_score"], "same_as": "finetuned"}
                else:
                    bar.set_postfix_str(f"seed {current}: re-fine-tune full")
                    entry["retrain"]["full"] = _retrain(
                        "full", None, model, spec, data, evaluator, config, max_length, current, work
                    )
                bar.update(1)
            per_seed.append(entry)
    finally:
        bar.close()

    assert reference_layout is not None
    summary: dict[str, dict[str, Any]] = {"finetuned": stat([e["finetuned_score"] for e in per_seed])}
    for name in dict.fromkeys(k for e in per_seed for k in e["retrain"]):
        summary[name] = stat([e["retrain"][name]["score"] for e in per_seed if name in e["retrain"]])
    survival: dict[str, dict[str, Any]] = {}
    runs = []
    head_size = reference_layout.head_size
    if "s" in kinds:
        heads = [plans_by_seed[s].head_mask()[:, : max(reference_layout.heads)] for s in seed_values]
        mlps = [[1.0 if kept else 0.0 for kept in plans_by_seed[s].kept_neurons] for s in seed_values]
        survival["s"] = {"heads": np.mean(heads, axis=0).tolist(), "mlps": np.mean(mlps, axis=0).tolist()}
        for current in seed_values:
            plan = plans_by_seed[current]
            runs.append(
                {
                    "seed": current,
                    "kind": "s",
                    "heads": [
                        [int(h in kept) for h in range(n)]
                        for kept, n in zip(plan.kept_heads, plan.layout.heads, strict=True)
                    ],
                    "mlps": [int(bool(kept)) for kept in plan.kept_neurons],
                    "score": next(e["s"]["final_score"] for e in per_seed if e["seed"] == current),
                }
            )
    if "m" in kinds:
        fractions = [masks_by_seed[s].survival(head_size) for s in seed_values]
        survival["m"] = {
            "heads": np.nanmean([padded(h) for h, _ in fractions], axis=0).tolist(),
            "mlps": np.mean([m for _, m in fractions], axis=0).tolist(),
        }
        for current, (heads_fraction, mlps_fraction) in zip(seed_values, fractions, strict=True):
            runs.append(
                {
                    "seed": current,
                    "kind": "m",
                    "head_weight_fraction": heads_fraction,
                    "mlp_weight_fraction": mlps_fraction,
                    "sparsity": masks_by_seed[current].sparsity,
                }
            )
    survivors = {
        "slimformer_survivors": SURVIVORS_VERSION,
        "task": spec.name,
        "metric": spec.primary_metric,
        "model": str(model),
        "finetuned": model_name(finetuned) if finetuned is not None else None,
        "layout": {"heads": list(reference_layout.heads), "ffn": list(reference_layout.ffn)},
        "runs": runs,
    }
    meta = {
        **signature,
        "total_heads": sum(reference_layout.heads),
        "total_mlps": reference_layout.num_layers,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "seconds": round(time.perf_counter() - started, 2),
        "work_dir": None if work.root is None else str(work.root),
    }
    return LotteryResult(
        task=spec.name,
        metric=spec.primary_metric,
        model=str(model),
        finetuned=model_name(finetuned) if finetuned is not None else None,
        seeds=seed_values,
        kinds=kinds,
        subnetworks=subs,
        per_seed=per_seed,
        summary=summary,
        survival=survival,
        survivors=survivors,
        masks=masks_by_seed,
        meta=meta,
    )


def _check_compatible(model: str | os.PathLike[str], spec: TaskSpec, given: LoadedModel) -> None:
    """The pre-trained model must have the fine-tuned one's layout and vocabulary for masks to carry over."""
    pre = load_model(model, spec)
    if Layout.of(pre.model) != Layout.of(given.model):
        raise AnalyzeError(
            f"The pre-trained --model {model} has layout {Layout.of(pre.model).to_dict()}, the --finetuned model "
            f"{Layout.of(given.model).to_dict()}: subnetworks found in one cannot be re-fine-tuned in the other. "
            "Pass the model the fine-tuned one was trained from."
        )
    if pre.tokenizer.get_vocab() != given.tokenizer.get_vocab():
        raise AnalyzeError(
            f"The pre-trained --model {model} and the --finetuned model use different vocabularies; pass the model "
            "the fine-tuned one was trained from."
        )


def _finetuned_here(
    model: str | os.PathLike[str],
    spec: TaskSpec,
    data: TaskData,
    config: RetrainConfig,
    max_length: int,
    seed: int,
    work: _Work,
) -> tuple[LoadedModel, dict[str, Any]]:
    """``model`` fine-tuned on the seed's training subset (read back from the work dir when it is there)."""
    folder = work.path(f"finetuned-seed{seed}")
    record = work.read(f"finetuned-seed{seed}.json")
    if folder is not None and folder.is_dir() and record is not None:
        return load_model(folder, spec), record
    set_seed(seed)
    loaded = load_model(model, spec)
    loaded.model.to(training_device())
    tokenized = tokenize_task(data, loaded.tokenizer, max_length=max_length)
    stats = train(loaded.model, loaded.tokenizer, tokenized["train"], config, seed=seed)
    if folder is not None:
        save_model_folder(loaded.model, loaded.tokenizer, folder, overwrite=True)
        work.write(f"finetuned-seed{seed}.json", stats)
    return loaded, stats


def _s_pruning(
    tuned: LoadedModel,
    data: TaskData,
    work: _Work,
    seed: int,
    step: float,
    keep_score: float,
    method: str,
    n_examples: int,
    max_length: int,
    max_iterations: int | None,
) -> tuple[PruningPlan, dict[str, Any]]:
    name = f"prune-s-seed{seed}.json"
    record = work.read(name)
    if record is None:
        result = iterative_prune(
            tuned.model,
            tuned.tokenizer,
            data,
            step=step,
            prune_mlps=True,
            keep_score=keep_score,
            method=method,
            n_examples=n_examples,
            max_length=max_length,
            seed=seed,
            max_iterations=max_iterations,
            progress=False,
        )
        plan = result.plan
        record = {
            "dense_score": result.dense_score,
            "final_score": result.final_score,
            "heads_kept": sum(len(h) for h in plan.kept_heads),
            "mlps_kept": sum(1 for n in plan.kept_neurons if n),
            "iterations": result.meta["iterations"],
            "stop_reason": result.meta["stop_reason"],
            "seconds": result.meta["seconds"],
            "curve": result.curve,
            "plan": plan.to_dict(),
        }
        work.write(name, record)
    plan = PruningPlan.from_dict(record["plan"])
    plan.validate(tuned.model)
    return plan, {k: v for k, v in record.items() if k != "plan"} | {"kept_heads": plan.kept_heads}


def _m_pruning(
    tuned: LoadedModel,
    evaluator: Evaluator,
    work: _Work,
    seed: int,
    step: float,
    keep_score: float,
    max_iterations: int | None,
) -> tuple[WeightMasks, dict[str, Any]]:
    name = f"prune-m-seed{seed}"
    record = work.read(f"{name}.json")
    masks_path = work.path(f"{name}.npz")
    if record is not None and masks_path is not None and masks_path.is_file():
        masks = WeightMasks.load(masks_path)
        masks.check(tuned.model)
        return masks, record
    started = time.perf_counter()
    result: MagnitudeResult = magnitude_prune(
        tuned.model, evaluator, step=step, keep_score=keep_score, max_iterations=max_iterations, progress=False
    )
    record = {
        "dense_score": result.dense_score,
        "final_score": result.final_score,
        "sparsity": result.masks.sparsity,
        "weights_total": result.masks.total,
        "weights_kept": result.masks.kept,
        "iterations": result.meta["iterations"],
        "stop_reason": result.meta["stop_reason"],
        "seconds": round(time.perf_counter() - started, 2),
        "curve": result.curve,
        "per_matrix_kept": result.meta["per_matrix_kept"],
    }
    if masks_path is not None:
        result.masks.save(masks_path)
    work.write(f"{name}.json", record)
    return result.masks, record


def _retrain(
    name: str,
    subnetwork: PruningPlan | WeightMasks | None,
    model: str | os.PathLike[str],
    spec: TaskSpec,
    data: TaskData,
    evaluator: Evaluator,
    config: RetrainConfig,
    max_length: int,
    seed: int,
    work: _Work,
) -> dict[str, Any]:
    """Fine-tune the pre-trained ``model`` with everything outside ``subnetwork`` masked; score it on dev."""
    record_name = f"retrain-{name}-seed{seed}.json"
    record = work.read(record_name)
    if record is not None:
        return record
    set_seed(seed)
    loaded = load_model(model, spec)
    net = loaded.model.to(training_device())
    tokenized = tokenize_task(data, loaded.tokenizer, max_length=max_length)
    size: dict[str, Any]
    if isinstance(subnetwork, PruningPlan):
        try:
            subnetwork.validate(net)
        except Exception as error:
            raise AnalyzeError(
                f"The pre-trained --model {model} does not have the shape of the fine-tuned model the subnetworks "
                f"were found in: {error}"
            ) from error
        size = {
            "heads": sum(len(h) for h in subnetwork.kept_heads),
            "mlps": sum(1 for n in subnetwork.kept_neurons if n),
        }
        with masked(net, subnetwork):
            stats = train(net, loaded.tokenizer, tokenized["train"], config, seed=seed)
            evaluation = evaluator.evaluate(net)
    elif isinstance(subnetwork, WeightMasks):
        size = {"weights_kept": subnetwork.kept, "sparsity": subnetwork.sparsity}
        with masked_weights(net, subnetwork, restore=False):
            stats = train(net, loaded.tokenizer, tokenized["train"], config, seed=seed)
            evaluation = evaluator.evaluate(net)
    else:
        size = {}
        stats = train(net, loaded.tokenizer, tokenized["train"], config, seed=seed)
        evaluation = evaluator.evaluate(net)
    score = float(np.mean([split[spec.primary_metric] for split in evaluation.values()]))
    record = {"score": score, "eval": evaluation, "train": stats, "size": size}
    work.write(record_name, record)
    logger.info("%s seed %d: %s %.4f", name, seed, spec.primary_metric, score)
    return record


def describe(result: LotteryResult) -> str:
    """One line per summary entry, for the command line."""
    return ", ".join(f"{name} {fmt(entry['mean'])}" for name, entry in result.summary.items())
