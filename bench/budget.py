"""Benchmark: retraining-free pruning to a FLOPs budget (after Kwon et al. 2022) against baselines pruned to the
same FLOPs, on the converged MiniLM-L6 teachers of bench/teachers.py (SST-2 and STS-B, ``runs/bench/teacher-<task>``).

Every variant is made from the teacher through the front door, ``slimformer.prune(model, config, data)``, and
physically removed; none is retrained:

- slimformer budget (the default): ``FlopsBudget(b)``: Fisher mask search + per-layer rearrangement +
  least-squares reconstruction of the kept output/down-projection weights (2,048 calibration examples)
- Kwon et al. as published: ``FlopsBudget(b, tune="scales")``: the same search and rearrangement + least-squares
  mask tuning (one scale per unit)
- Fisher mask search only: ``FlopsBudget(b, rearrange=False, tune="none")``
- Michel-style iterative pruning: 4 rounds of gradient importance (Michel et al. 2019) on 2,048 examples, the
  earlier rounds' units masked while scoring, each round removing a quarter of the target share of heads and
  neurons in every layer (TextPruner's setting); the final plan is applied with ``PlanFile``
- uniform magnitude: ``Fractions(heads=1-b, ffn=1-b, importance="magnitude", scope="layer")``
- random plans of the same per-layer size: ``Fractions(..., importance="random", seed=s)`` (3 seeds)
- SST-2 only: ``LatencyBudget(0.5)``: the same pruner under a latency budget predicted by a per-layer latency
  table measured on this machine

Scores: the full GLUE dev sets (SST-2 accuracy, STS-B mean of Pearson and Spearman), tokens cut at the teacher's
fine-tuning length (SST-2 64, STS-B 128). FLOPs: encoder FLOPs at 128 tokens. Latency: every variant of a task
and the dense teacher measured in one interleaved run (``slimformer.report.interleaved_latency``: 3 rounds that
each visit every model, 5 timed runs per visit after 2 warm-up runs, medians), 2 threads, at batch 32 x 128 tokens
and at batch 1 x 32 tokens (one request). Run nothing else on the machine meanwhile. Writes
``bench/results/budget.{json,md}`` and ``budget_pareto_<task>.png``.

    python bench/budget.py [--tasks sst2,stsb] [--budgets 0.6,0.5,0.4,0.3] [--latency-budget 0.5] [--seeds 3]

``--teachers-dir DIR`` (or ``$SLIMFORMER_BENCH_TEACHERS``) reads the teachers from ``DIR/teacher-<task>`` instead
(e.g. another checkout's runs/bench). A smoke run against a throwaway teacher (``/tmp/t/teacher-sst2``) must write
its results elsewhere (bench/results holds real runs only; the script refuses otherwise):

    python bench/budget.py --tasks sst2 --teachers-dir /tmp/t --results-dir /tmp/r --budgets 0.5 --seeds 1 \\
        --calibration 32 --max-eval-samples 64 --rounds 1 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import slimformer
from common import (
    RESULTS,
    describe_teacher,
    glue_dir,
    machine,
    markdown_table,
    teacher_folder,
    teacher_summary,
    write_results,
)
from slimformer.evaluation import evaluate_model, headline_score
from slimformer.importance import score_model
from slimformer.measure import count_parameters, flops
from slimformer.plots import save_png_atomic
from slimformer.prune.plan import plan_from_scores
from slimformer.report import interleaved_latency
from slimformer.tasks import load_task

OURS = "slimformer budget (search+rearrange+weights)"
KWON = "Kwon et al. (search+rearrange+mask scales)"
SEARCH_ONLY = "Fisher mask search only"
MICHEL = "Michel iterative, 4 rounds"
MAGNITUDE = "uniform magnitude"
SHAPES = {"32x128": (32, 128), "1x32": (1, 32)}  # latency: batch x tokens


def michel_plan(dense, tokenizer, data, fraction: float, *, n_examples: int, max_length: int, rounds: int = 4):
    """Michel et al.'s gradient importance, recomputed in ``rounds`` rounds with the units already chosen masked;
    round r removes r/rounds of ``fraction`` of the heads and neurons of every layer."""
    plan = None
    for round_index in range(1, rounds + 1):
        scores = score_model(
            dense,
            tokenizer,
            data,
            method="gradient",
            n_examples=n_examples,
            batch_size=32,
            max_length=max_length,
            plan=plan,
            progress=False,
        )
        share = fraction * round_index / rounds
        plan = plan_from_scores(dense, scores.heads, scores.neurons, heads=share, ffn=share, scope="layer")
    return plan


def run_task(task: str, teacher: dict, args: argparse.Namespace, latency_budget: float | None) -> list[dict]:
    started_task = time.perf_counter()
    max_length = teacher["max_length"] or 128
    data = load_task(task, glue_dir(), max_eval_samples=args.max_eval_samples)
    loaded = slimformer.load_model(teacher["path"], data.spec)
    dense, tokenizer = loaded.model, loaded.tokenizer
    dense.eval()
    dense_flops = flops(dense, seq_len=128).encoder
    metric = data.spec.primary_metric
    models: dict = {}
    rows: list[dict] = []

    def add(method: str, budget: float, model, seconds: float, config=None, report: dict | None = None) -> None:
        """Score a variant, keep it for the latency run and add its row (``config``: a PruneConfig or a dict)."""
        model.eval()
        evaluation = evaluate_model(model, tokenizer, data, max_length=max_length, progress=False)
        key = method if method == "dense" else f"{method} @ {budget:g}"
        models[key] = model
        row = {
            "task": task,
            "method": method,
            "budget": budget,
            "key": key,
            "config": config.to_dict() if isinstance(config, slimformer.PruneConfig) else config,
            "score": headline_score(evaluation, metric),
            "eval": evaluation,
            "flops_fraction": flops(model, seq_len=128).encoder / dense_flops,
            "params": count_parameters(model).total,
            "pruning_seconds": round(seconds, 2),
        }
        if report is not None:
            row["phases_seconds"] = report["seconds"]
            row["heads_per_layer"] = report["models"]["after"]["heads_per_layer"]
            row["neurons_per_layer"] = report["models"]["after"]["neurons_per_layer"]
            if "budget" in report["details"]:
                row["budget_details"] = report["details"]["budget"]
        rows.append(row)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k in SHOWN}
        print(shown, flush=True)

    def front_door(config: slimformer.PruneConfig, model=None):
        started = time.perf_counter()
        result = slimformer.prune(
            copy.deepcopy(dense) if model is None else model,
            config,
            data if config.needs_data else None,
            tokenizer=tokenizer,
            max_length=max_length,
            evaluate=False,
            measure=False,
            progress=False,
        )
        return result, time.perf_counter() - started

    add("dense", 1.0, dense, 0.0)
    for budget in args.budgets:
        fraction = 1 - budget
        for method, config in (
            (OURS, slimformer.FlopsBudget(budget, calibration_examples=args.calibration)),
            (KWON, slimformer.FlopsBudget(budget, tune="scales", calibration_examples=args.calibration)),
            (
                SEARCH_ONLY,
                slimformer.FlopsBudget(budget, rearrange=False, tune="none", calibration_examples=args.calibration),
            ),
            (MAGNITUDE, slimformer.Fractions(heads=fraction, ffn=fraction, importance="magnitude", scope="layer")),
            *(
                (
                    f"random (seed {seed})",
                    slimformer.Fractions(heads=fraction, ffn=fraction, importance="random", scope="layer", seed=seed),
                )
                for seed in range(args.seeds)
            ),
        ):
            result, seconds = front_door(config)
            add(method, budget, result.model, seconds, config, result.report)
        started = time.perf_counter()
        plan = michel_plan(dense, tokenizer, data, fraction, n_examples=args.calibration, max_length=max_length)
        with tempfile.TemporaryDirectory() as folder:
            result, _ = front_door(slimformer.PlanFile(str(plan.save(Path(folder) / "plan.json"))))
        config = {"method": "michel_iterative", "rounds": 4, "importance": "gradient", "n_examples": args.calibration}
        add(MICHEL, budget, result.model, time.perf_counter() - started, config, result.report)
    if latency_budget is not None:
        config = slimformer.LatencyBudget(latency_budget, calibration_examples=args.calibration)
        result, seconds = front_door(config)
        add(
            f"slimformer latency budget {latency_budget:g}",
            latency_budget,
            result.model,
            seconds,
            config,
            result.report,
        )

    for shape, (batch_size, seq_len) in SHAPES.items():
        print(
            f"[{task}] latency at batch {batch_size} x {seq_len} tokens, {len(models)} models interleaved", flush=True
        )
        latency = interleaved_latency(
            models, batch_size=batch_size, seq_len=seq_len, threads=2, rounds=args.rounds, repeats=args.repeats
        )
        for row in rows:
            row[f"latency_{shape}_ms"] = latency[row["key"]]["median_ms"]
            row[f"speedup_{shape}"] = 1.0 if row["key"] == "dense" else latency["speedup"][row["key"]]
    dense_score = rows[0]["score"]
    for row in rows:
        row["score_drop"] = dense_score - row["score"]
    teacher["wall_seconds_benchmark"] = round(time.perf_counter() - started_task, 1)
    return rows


SHOWN = ("method", "budget", "score", "flops_fraction", "pruning_seconds")


def pareto_plot(rows: list[dict], task: str, metric: str, results_dir: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        name = "random" if row["method"].startswith("random") else row["method"]
        by_method.setdefault(name, []).append(row)
    for index, (shape, label) in enumerate((("32x128", "batch 32 x 128 tokens"), ("1x32", "batch 1 x 32 tokens"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for name, points in by_method.items():
            points = sorted(points, key=lambda r: r[f"latency_{shape}_ms"])
            style = "o" if name in ("dense", "random") or name.startswith("slimformer latency") else "o-"
            axes.plot([p[f"latency_{shape}_ms"] for p in points], [p["score"] * 100 for p in points], style, label=name)
        axes.set_xlabel(f"measured latency, {label}, 2 threads (ms)")
        axes.set_ylabel(f"{task} dev {metric} (x100)")
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    figure.suptitle(f"MiniLM-L6 teacher on {task}: score vs latency, pruned without retraining")
    figure.tight_layout()
    save_png_atomic(figure, results_dir / f"budget_pareto_{task}.png")


def task_section(task: str, rows: list[dict], teacher: dict) -> str:
    table = []
    for row in rows:
        table.append(
            [
                row["method"],
                f"{row['budget']:g}",
                f"{row['flops_fraction']:.3f}",
                f"{row['score'] * 100:.2f}",
                f"{-row['score_drop'] * 100 + 0.0:+.2f}",
                f"{row['params'] / 1e6:.2f}M",
                f"{row['latency_32x128_ms']:.0f}",
                f"{row['speedup_32x128']:.2f}x",
                f"{row['latency_1x32_ms']:.1f}",
                f"{row['speedup_1x32']:.2f}x",
                f"{row['pruning_seconds']:.0f}",
            ]
        )
    headers = ["method", "budget", "FLOPs kept", "dev score", "vs dense", "params"]
    headers += ["ms 32x128", "speedup 32x128", "ms 1x32", "speedup 1x32", "pruning s"]
    randoms: dict[float, list[float]] = {}
    for row in rows:
        if row["method"].startswith("random"):
            randoms.setdefault(row["budget"], []).append(row["score"])
    random_text = "; ".join(
        f"budget {budget:g}: {statistics.mean(s) * 100:.2f} ± {statistics.pstdev(s) * 100:.2f} ({len(s)} seeds)"
        for budget, s in sorted(randoms.items(), reverse=True)
    )
    return (
        f"## {task}\n\nTeacher (the dense row, scored here): {describe_teacher(teacher)}\n\n"
        + markdown_table(headers, table)
        + (f"\nRandom plans, mean ± std: {random_text}.\n" if random_text else "")
        + f"\n![pareto](budget_pareto_{task}.png)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--budgets", default="0.6,0.5,0.4,0.3", help="FLOPs fractions to keep, comma-separated")
    parser.add_argument(
        "--latency-budget", default="0.5", help="latency fraction to keep for the SST-2 latency-budget row, or 'none'"
    )
    parser.add_argument("--seeds", "--random-seeds", type=int, default=3, dest="seeds", help="random plans per budget")
    parser.add_argument("--calibration", type=int, default=2048, help="calibration / importance examples")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="score on a dev subset (smoke runs)")
    parser.add_argument("--rounds", type=int, default=3, help="latency: rounds visiting every model")
    parser.add_argument("--repeats", type=int, default=5, help="latency: timed runs per model per round")
    parser.add_argument("--teachers-dir", default=None, help="folder holding teacher-<task>/ (default runs/bench)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    latency_budget = None if args.latency_budget.lower() in ("none", "", "0") else float(args.latency_budget)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    current = {task: teacher_summary(task, teacher_folder(task, args.teachers_dir)) for task in tasks}
    unconverged = [task for task, teacher in current.items() if not teacher["converged_recipe"]]
    if (args.max_eval_samples or args.calibration != 2048 or unconverged) and (
        args.results_dir.resolve() == RESULTS.resolve()
    ):
        parser.error(
            "smoke settings (--max-eval-samples, --calibration, or a teacher not built by bench/teachers.py: "
            f"{unconverged or 'none here'}) need a --results-dir outside bench/results: results there come from "
            "real runs only"
        )

    # keep the rows of tasks not re-run this time (when they were measured against converged teachers), so that
    # tasks can be benchmarked one at a time
    previous_file = args.results_dir / "budget.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    teachers = {t: s for t, s in previous.get("teachers", {}).items() if t not in tasks}
    all_rows = [r for r in previous.get("rows", []) if r["task"] in teachers]
    for task in tasks:
        teachers[task] = current[task]
        rows = run_task(task, current[task], args, latency_budget if task == "sst2" else None)
        all_rows += rows
        pareto_plot(rows, task, teachers[task]["primary_metric"], args.results_dir)

    order = list(dict.fromkeys(r["task"] for r in all_rows))
    eval_text = (
        f"a seeded random subset of {args.max_eval_samples} examples of each dev set (a smoke run)"
        if args.max_eval_samples
        else "the full GLUE dev sets"
    )
    markdown = (
        "# Retraining-free pruning to a FLOPs budget: MiniLM-L6 (after Kwon et al. 2022)\n\n"
        "Every model is pruned from the converged teacher of its task (bench/teachers.py) with `slimformer.prune`, "
        "physically made smaller and not retrained. Dev scores on "
        f"{eval_text} (SST-2 accuracy; STS-B mean of Pearson and Spearman). 'FLOPs kept': encoder FLOPs at 128 "
        "tokens over the dense model's. Latency: all models of a task, the dense teacher included, measured in one "
        f"interleaved run ({args.rounds} rounds that each visit every model, {args.repeats} timed runs per visit, "
        "medians), 2 threads, at batch 32 x 128 tokens (throughput) and batch 1 x 32 tokens (one request); speedup "
        "= the dense median over the model's. 'pruning s': wall time of the pruning call (calibration "
        f"({args.calibration} examples), scoring, search, tuning, removal), evaluation excluded.\n\n"
        + "\n".join(task_section(t, [r for r in all_rows if r["task"] == t], teachers[t]) for t in order)
    )
    write_results(
        "budget",
        {
            "machine": machine(),
            "args": {**vars(args), "results_dir": str(args.results_dir)},
            "teachers": teachers,
            "rows": all_rows,
        },
        markdown,
        args.results_dir,
    )
    print(markdown)


if __name__ == "__main__":
    main()
