"""Benchmark: retraining-free pruning to a FLOPs budget (after Kwon et al. 2022) on MiniLM-L6 fine-tuned on SST-2
and on STS-B (runs/bench/<task> from glue_finetune.py), against baselines pruned to the same FLOPs, all
physically removed and measured in the same run:

- slimformer budget (the default): Fisher mask search + per-layer rearrangement + least-squares reconstruction of
  the kept output/down-projection weights (2,048 calibration examples)
- Kwon et al. as published: the same search and rearrangement + least-squares mask tuning (one scale per unit)
- Fisher mask search only (no rearrangement, no tuning)
- Michel-style iterative pruning: 4 rounds of gradient importance (Michel et al. 2019) on 2,048 examples, each
  round removing a quarter of the target share of heads and neurons in every layer (TextPruner's setting)
- uniform per-layer magnitude pruning
- random plans of the same per-layer size (3 seeds)

Latency: batch 32 x 128 tokens, 2 threads, median of 10 after 3 warm-up runs; the dense model is measured
first and last and the faster of the two is used (so speedups are, if anything, understated).

    python bench/budget.py [--tasks sst2,stsb] [--budgets 0.6,0.5,0.4,0.3] [--latency-budget 0.5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np

from common import RESULTS, RUNS, glue_dir, machine, markdown_table, write_results
from slimformer.budget.pipeline import budget_prune
from slimformer.evaluation import evaluate_model
from slimformer.importance import score_model
from slimformer.measure import count_parameters, flops, measure_latency
from slimformer.models import load_model
from slimformer.plots import save_png_atomic
from slimformer.prune import plan_from_scores, remove
from slimformer.tasks import load_task

MAX_LENGTH = {"sst2": 64, "stsb": 128}  # the lengths the models were fine-tuned with
CALIBRATION = 2048
KWON = "Kwon et al. (search+rearrange+mask scales)"


def score(model, tokenizer, data, task: str) -> float:
    evaluation = evaluate_model(model, tokenizer, data, max_length=MAX_LENGTH[task], progress=False)
    return float(np.mean([split[data.spec.primary_metric] for split in evaluation.values()]))


def latency_ms(model) -> float:
    return measure_latency(model, batch_size=32, seq_len=128, threads=2, warmup=3, repeats=10).median_ms


def michel_iterative(model, tokenizer, data, task: str, fraction: float, rounds: int = 4):
    plan = None
    for round_index in range(1, rounds + 1):
        scores = score_model(
            model,
            tokenizer,
            data,
            method="gradient",
            n_examples=CALIBRATION,
            batch_size=32,
            max_length=MAX_LENGTH[task],
            plan=plan,
            progress=False,
        )
        share = fraction * round_index / rounds
        plan = plan_from_scores(model, scores.heads, scores.neurons, heads=share, ffn=share, scope="layer")
    return plan


def run_task(task: str, budgets: list[float], latency_budget: float | None, seeds: int) -> list[dict]:
    loaded = load_model(RUNS / task)
    dense, tokenizer = loaded.model, loaded.tokenizer
    data = load_task(task, glue_dir())
    dense_score = score(dense, tokenizer, data, task)
    dense_flops = flops(dense, seq_len=128).encoder
    dense_ms_first = latency_ms(dense)
    rows = []

    def add(method: str, budget: float | None, model, seconds: float, extra: dict | None = None) -> None:
        row = {
            "task": task,
            "method": method,
            "budget": budget,
            "score": score(model, tokenizer, data, task),
            "flops_fraction": flops(model, seq_len=128).encoder / dense_flops,
            "params": count_parameters(model).total,
            "latency_ms": latency_ms(model),
            "pruning_seconds": seconds,
            **(extra or {}),
        }
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def ours(budget: float, **options) -> tuple:
        started = time.perf_counter()
        result = budget_prune(
            RUNS / task,
            data,
            None,
            budget_flops=budget,
            max_length=MAX_LENGTH[task],
            n_calibration=CALIBRATION,
            evaluate=False,
            measure=False,
            progress=False,
            **options,
        )
        return result, time.perf_counter() - started

    for budget in budgets:
        for method, tune in (("slimformer budget (search+rearrange+weights)", "weights"), (KWON, "scales")):
            result, seconds = ours(budget, tune=tune)
            add(method, budget, result.model, seconds, {"phases_seconds": result.report["phases_seconds"]})
        result, seconds = ours(budget, rearrange_masks=False, tune="none")
        add("Fisher mask search only", budget, result.model, seconds)
        fraction = 1 - budget
        started = time.perf_counter()
        plan = michel_iterative(dense, tokenizer, data, task, fraction)
        add("Michel iterative, 4 rounds", budget, remove(copy.deepcopy(dense), plan), time.perf_counter() - started)
        started = time.perf_counter()
        magnitude = score_model(dense, tokenizer, data, method="magnitude", progress=False)
        plan = plan_from_scores(dense, magnitude.heads, magnitude.neurons, heads=fraction, ffn=fraction, scope="layer")
        add("uniform magnitude", budget, remove(copy.deepcopy(dense), plan), time.perf_counter() - started)
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            plan = plan_from_scores(
                dense,
                [rng.random(12) for _ in range(6)],
                [rng.random(1536) for _ in range(6)],
                heads=fraction,
                ffn=fraction,
                scope="layer",
            )
            add(f"random (seed {seed})", budget, remove(copy.deepcopy(dense), plan), 0.0)
    if latency_budget is not None:
        started = time.perf_counter()
        result = budget_prune(
            RUNS / task,
            data,
            None,
            budget_latency=latency_budget,
            max_length=MAX_LENGTH[task],
            n_calibration=CALIBRATION,
            evaluate=False,
            measure=False,
            progress=False,
        )
        add(
            f"slimformer --budget-latency {latency_budget}",
            latency_budget,
            result.model,
            time.perf_counter() - started,
            {"predicted": result.report["budget"], "phases_seconds": result.report["phases_seconds"]},
        )
    dense_ms = min(dense_ms_first, latency_ms(dense))
    for row in rows:
        row["speedup"] = dense_ms / row["latency_ms"]
        row["score_drop"] = dense_score - row["score"]
    rows.insert(
        0,
        {
            "task": task,
            "method": "dense",
            "budget": 1.0,
            "score": dense_score,
            "flops_fraction": 1.0,
            "params": count_parameters(dense).total,
            "latency_ms": dense_ms,
            "speedup": 1.0,
            "score_drop": 0.0,
            "pruning_seconds": 0.0,
        },
    )
    return rows


def pareto_plot(rows: list[dict], task: str, metric: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        name = "random" if row["method"].startswith("random") else row["method"]
        by_method.setdefault(name, []).append(row)
    for name, points in by_method.items():
        points = sorted(points, key=lambda r: r["latency_ms"])
        style = "o" if name in ("dense", "random") else "o-"
        axes.plot([p["latency_ms"] for p in points], [p["score"] * 100 for p in points], style, label=name)
    axes.set_xlabel("measured latency, batch 32 x 128 tokens, 2 threads (ms)")
    axes.set_ylabel(f"{task} dev {metric} (x100)")
    axes.set_title(f"MiniLM-L6 on {task}: score vs latency, no retraining")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    save_png_atomic(figure, RESULTS / f"budget_pareto_{task}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--budgets", default="0.6,0.5,0.4,0.3")
    parser.add_argument("--latency-budget", type=float, default=0.5)
    parser.add_argument("--random-seeds", type=int, default=3)
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    tasks = args.tasks.split(",")
    # keep the rows of tasks not re-run this time, so tasks can be benchmarked one at a time
    previous = RESULTS / "budget.json"
    all_rows = (
        [r for r in json.loads(previous.read_text())["rows"] if r["task"] not in tasks] if previous.is_file() else []
    )
    for task in tasks:
        rows = run_task(task, budgets, args.latency_budget if task == "sst2" else None, args.random_seeds)
        all_rows += rows
        pareto_plot(rows, task, load_task(task, glue_dir()).spec.primary_metric)
    sections = []
    tasks = list(dict.fromkeys(r["task"] for r in all_rows))
    for task in tasks:
        table = []
        for row in (r for r in all_rows if r["task"] == task):
            table.append(
                [
                    row["method"],
                    "" if row["budget"] is None else f"{row['budget']:g}",
                    f"{row['flops_fraction']:.3f}",
                    f"{row['score'] * 100:.2f}",
                    f"{-row['score_drop'] * 100 + 0.0:+.2f}",
                    f"{row['params'] / 1e6:.2f}M",
                    f"{row['latency_ms']:.0f}",
                    f"{row['speedup']:.2f}x",
                    f"{row['pruning_seconds']:.0f}",
                ]
            )
        sections.append(
            f"## {task}\n\n"
            + markdown_table(
                [
                    "method",
                    "budget",
                    "FLOPs kept",
                    "dev score",
                    "vs dense",
                    "params",
                    "latency ms",
                    "speedup",
                    "pruning s",
                ],
                table,
            )
            + f"\n![pareto](budget_pareto_{task}.png)\n"
        )
    random_summary = {}
    for task in tasks:
        for budget in sorted({r["budget"] for r in all_rows if r["task"] == task and r["budget"] is not None}):
            scores = [
                r["score"]
                for r in all_rows
                if r["task"] == task and r["budget"] == budget and r["method"].startswith("random")
            ]
            if scores:
                random_summary[f"{task}@{budget}"] = (statistics.mean(scores), statistics.pstdev(scores))
    markdown = (
        "# Retraining-free pruning to a FLOPs budget: MiniLM-L6 (after Kwon et al. 2022)\n\n"
        "Models: runs/bench/sst2 (20,000 SST-2 sentences, 1 epoch) and runs/bench/stsb (full STS-B train, 3 epochs); "
        "dev scores on the full GLUE dev sets (SST-2 accuracy; STS-B mean of Pearson and Spearman). FLOPs are encoder "
        "FLOPs at 128 tokens. 'pruning s' is the wall time of the pruning run (calibration, scoring, search, "
        "tuning, removal), evaluation excluded. Random rows: mean ± std "
        + ", ".join(f"{k} {m * 100:.2f} ± {s * 100:.2f}" for k, (m, s) in random_summary.items())
        + ".\n\n"
        + "\n".join(sections)
    )
    write_results("budget", {"machine": machine(), "rows": all_rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
