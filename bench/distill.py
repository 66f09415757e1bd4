"""Recovering accuracy after compression: no recovery vs fine-tuning vs knowledge distillation (issue 5), against
the converged MiniLM-L6 teachers of bench/teachers.py (``runs/bench/teacher-<task>``).

Students made from the teacher (default set, about 45 minutes on 2 CPU cores):

- SST-2: the retraining-free budget pruner (``slimformer.prune(teacher, FlopsBudget(f))``, Kwon et al. 2022 with
  the least-squares weight refit, 2,048 calibration examples) at 50% and 25% of the encoder FLOPs, and the
  DistilBERT-style initialisation ``every:3`` (every 3rd teacher layer: 2 layers);
- STS-B: the budget pruner at 25% of the FLOPs.

Each student is scored with no recovery (as made), after fine-tuning on the task labels (``alpha=0``), and after
logit knowledge distillation from the teacher (``alpha=0.5``, ``T=2``, teacher logits cached), all through
``slimformer.distill``. Fine-tuning and KD use the same data, steps and learning rate (1e-4, 50 warm-up steps,
batch 32, length-grouped batches, the teacher's max length): SST-2 a fixed random 20,000 of the training
sentences for 1 epoch, STS-B the whole training set for 2 epochs. ``--seeds N`` repeats each fine-tuning / KD run
with seeds 0..N-1 (same data, other initialisation of new parts, dropout and order) and reports mean ± std.
Latency: the teacher and each student architecture measured in one interleaved run per task
(``slimformer.report.interleaved_latency``: 3 rounds, 5 timed runs per model per round, medians), 2 threads, at
batch 32 x 128 tokens and batch 1 x 32 tokens (one request): run nothing else meanwhile. Writes
``bench/results/distill.{json,md}``.

    python bench/distill.py [--tasks sst2,stsb] [--seeds 1] [--students NAME,...] [--skip-latency]

Results add up: a run keeps the rows of every (task, student) it did not train from the previous ``distill.json``
(so ``--tasks stsb`` adds STS-B beside SST-2). Every training run writes its model folder under
``runs/bench/distill/<teacher>-<hash of its weights>/`` and is skipped when that folder exists (its settings are
checked), so an interrupted benchmark resumes where it stopped and runs against another teacher are never
reused. ``--teachers-dir DIR`` (or ``$SLIMFORMER_BENCH_TEACHERS``)
reads the teachers from ``DIR/teacher-<task>`` instead (e.g. another checkout's runs/bench). A smoke run against a
throwaway teacher must write its runs and results elsewhere (the script refuses otherwise):

    python bench/distill.py --tasks sst2 --teachers-dir /tmp/t --runs-dir /tmp/runs --results-dir /tmp/r \\
        --students "every 3rd layer (2 layers)" --train-samples 64 --max-eval-samples 64 --rounds 1 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import slimformer
from common import (
    RESULTS,
    RUNS,
    describe_teacher,
    glue_dir,
    machine,
    markdown_table,
    teacher_folder,
    teacher_summary,
    write_results,
)
from slimformer.distill.pipeline import DistillConfig
from slimformer.measure import count_parameters, flops
from slimformer.report import interleaved_latency
from slimformer.tasks import load_task
from slimformer.train import TrainConfig

DEFAULT_RUNS = RUNS / "distill"
DEFAULT_CALIBRATION = 2048
SHAPES = {"32x128": (32, 128), "1x32": (1, 32)}  # latency: batch x tokens

# name -> a student spec of slimformer.distill, or the FLOPs fraction a budget-pruned student keeps
STUDENTS: dict[str, str | float] = {
    "budget 50% FLOPs": 0.5,
    "budget 30% FLOPs": 0.3,
    "budget 25% FLOPs": 0.25,
    "drop top 3 (3 layers)": "drop:top:3",
    "drop top 4 (2 layers)": "drop:top:4",
    "every 2nd layer (3 layers)": "every:2",
    "every 3rd layer (2 layers)": "every:3",
}


@dataclass(frozen=True)
class TaskSetup:
    students: tuple[str, ...]
    train_samples: int | None  # None: the whole training split
    epochs: float
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    group_by_length: bool = True


TASKS = {
    "sst2": TaskSetup(("budget 50% FLOPs", "budget 25% FLOPs", "every 3rd layer (2 layers)"), 20000, epochs=1),
    # a regression task: KD is the MSE to the teacher's predictions
    "stsb": TaskSetup(("budget 25% FLOPs",), None, epochs=2),
    "mrpc": TaskSetup(("budget 25% FLOPs",), None, epochs=3),
}


def slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def weights_digest(folder: Path) -> str:
    """A short hash of a model folder's weights: run folders name the exact teacher they were trained against."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) or [folder / "metrics.json"]:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:8]


def load_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def check_settings(folder: Path, metrics: dict, config: TrainConfig, settings: DistillConfig) -> None:
    """Refuse to reuse a finished run made with other settings (e.g. another --epochs)."""
    run = metrics.get("config") or {}  # the report keeps the training and distillation settings that made it
    if run.get("train") != json.loads(json.dumps(asdict(config))) or run.get("distill") != asdict(settings):
        raise SystemExit(
            f"{folder} was trained with other settings than this run asks for; delete it, or pass another --runs-dir."
        )


def budget_student(task: str, teacher: dict, name: str, fraction: float, base: Path, args) -> tuple[str, float]:
    """The folder of a budget-pruned student (made once from the teacher) and the seconds pruning took."""
    suffix = "" if args.calibration == DEFAULT_CALIBRATION else f"-cal{args.calibration}"
    folder = base / f"{slug(name)}-pruned{suffix}"
    if not folder.exists():
        print(f"[{task}] pruning {name}", flush=True)
        # calibration from the whole training split, as in bench/budget.py
        slimformer.prune(
            teacher["path"],
            slimformer.FlopsBudget(fraction, calibration_examples=args.calibration),
            load_task(task, glue_dir(), max_eval_samples=args.max_eval_samples),
            out=folder,
            max_length=teacher["max_length"],
            evaluate=False,
            progress=False,
        )
    return str(folder), float(load_metrics(folder)["seconds"]["total"])


def train_runs(task: str, setup: TaskSetup, teacher: dict, args) -> list[dict]:
    base = Path(args.runs_dir) / f"{teacher['name']}-{weights_digest(Path(teacher['path']))}"
    train_samples = args.train_samples or setup.train_samples
    # one fixed subset of the training split for every student, recovery and seed (seed 0 picks it)
    data = load_task(task, glue_dir(), max_train_samples=train_samples, max_eval_samples=args.max_eval_samples, seed=0)
    kd = DistillConfig(alpha=args.alpha, temperature=args.temperature)
    recoveries = {"fine-tune": DistillConfig(alpha=0.0), "KD": kd}
    rows = []
    for name in args.students or setup.students:
        spec = STUDENTS[name]
        source, prune_seconds = (
            (spec, 0.0) if isinstance(spec, str) else budget_student(task, teacher, name, spec, base, args)
        )
        for recovery, settings in recoveries.items():
            for seed in range(args.seeds):
                config = TrainConfig(
                    max_length=teacher["max_length"],
                    epochs=args.epochs or setup.epochs,
                    learning_rate=setup.learning_rate,
                    warmup_steps=setup.warmup_steps,
                    max_train_samples=train_samples,
                    max_eval_samples=args.max_eval_samples,
                    save_steps=500,
                    seed=seed,
                    group_by_length=setup.group_by_length,
                )
                out = base / f"{slug(name)}-{slug(recovery)}-seed{seed}"
                if out.exists():
                    metrics = load_metrics(out)
                    check_settings(out, metrics, config, settings)
                else:
                    print(f"[{task}] {name}: {recovery}, seed {seed}", flush=True)
                    metrics = slimformer.distill(
                        teacher["path"],
                        source,
                        out,
                        data,
                        config=config,
                        distill_config=settings,
                        progress=False,
                    ).metrics
                rows.append(
                    {
                        "task": task,
                        "student": name,
                        "recovery": recovery,
                        "seed": seed,
                        "model_dir": str(out),
                        "teacher_score_measured": metrics["score"].get("teacher"),
                        "score_before": metrics["score"]["before"],
                        "score": metrics["score"]["after"],
                        "eval": metrics["eval"]["after"],
                        "train_samples": metrics["details"]["train"]["samples"],
                        "train_steps": metrics["details"]["train"]["steps"],
                        "train_seconds": metrics["details"]["train"]["seconds"],
                        "run_seconds": metrics["seconds"]["total"],
                        "prune_seconds": prune_seconds,
                        "distill": metrics["details"]["distill"],
                        "config": metrics["config"],
                    }
                )
                before = (metrics["score"]["before"] or 0) * 100
                print(
                    f"[{task}] {name}, {recovery}, seed {seed}: {metrics['score']['after'] * 100:.2f} "
                    f"(before {before:.2f}), {metrics['seconds']['total']:.0f} s",
                    flush=True,
                )
    return rows


def measure(task: str, teacher: dict, rows: list[dict], args) -> dict[str, dict]:
    """Latency (both shapes, interleaved), FLOPs and parameters of the teacher and each student architecture."""
    models = {"teacher": slimformer.load_model(teacher["path"]).model}
    for row in rows:
        if row["student"] not in models:
            models[row["student"]] = slimformer.load_model(row["model_dir"]).model
    sizes = {
        name: {
            "encoder_gflops_seq128": flops(net, seq_len=128).encoder / 1e9,
            "params": count_parameters(net).total,
            "encoder_params": count_parameters(net).encoder,
        }
        for name, net in models.items()
    }
    for shape, (batch_size, seq_len) in SHAPES.items():
        print(f"[{task}] latency at batch {batch_size} x {seq_len}, {len(models)} models interleaved", flush=True)
        latency = interleaved_latency(
            models, batch_size=batch_size, seq_len=seq_len, threads=2, rounds=args.rounds, repeats=args.repeats
        )
        for name in models:
            sizes[name][f"latency_{shape}_ms"] = latency[name]["median_ms"]
            sizes[name][f"speedup_{shape}"] = latency["speedup"].get(name, 1.0)
    return sizes


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def shown(stats: dict | None) -> str:
    if not stats:
        return "-"
    text = f"{stats['mean'] * 100:.2f}"
    return text + (f" ± {stats['std'] * 100:.2f}" if stats["n"] > 1 else "")


def summarise(task: str, rows: list[dict], sizes: dict[str, dict], teacher: dict) -> list[dict]:
    summary = []
    for name in dict.fromkeys(r["student"] for r in rows):
        mine = [r for r in rows if r["student"] == name]
        entry = {"task": task, "student": name, "score_before": mine[0]["score_before"], **sizes.get(name, {})}
        if name in sizes:
            entry["flops_reduction"] = sizes["teacher"]["encoder_gflops_seq128"] / sizes[name]["encoder_gflops_seq128"]
        for recovery in ("fine-tune", "KD"):
            runs = [r for r in mine if r["recovery"] == recovery]
            if runs:
                entry[recovery] = mean_std([r["score"] for r in runs])
                entry[f"{recovery} seconds"] = statistics.mean(r["run_seconds"] for r in runs)
        # the teacher as scored by the same evaluation as its students (its metrics.json score on a full dev set)
        measured = mine[0]["teacher_score_measured"]
        entry["teacher_score"] = teacher["score"] if measured is None else measured
        if "KD" in entry:
            entry["KD - teacher"] = entry["KD"]["mean"] - entry["teacher_score"]
        entry["prune_seconds"] = mine[0]["prune_seconds"]
        summary.append(entry)
    return summary


def task_section(task: str, summary: list[dict], rows: list[dict], teacher: dict, setup: TaskSetup, args) -> str:
    samples = args.train_samples or setup.train_samples
    used = rows[0]["train_samples"] if rows else "?"
    data = f"a fixed random subset of {used:,} training examples" if samples else f"all {used:,} training examples"
    table = [
        [
            entry["student"],
            f"{entry['speedup_32x128']:.2f}x" if "speedup_32x128" in entry else "-",
            f"{entry['speedup_1x32']:.2f}x" if "speedup_1x32" in entry else "-",
            f"{entry['flops_reduction']:.2f}x" if "flops_reduction" in entry else "-",
            "-" if entry["score_before"] is None else f"{entry['score_before'] * 100:.2f}",
            shown(entry.get("fine-tune")),
            shown(entry.get("KD")),
            f"{entry['KD - teacher'] * 100:+.2f}" if "KD - teacher" in entry else "-",
            " / ".join(f"{entry.get(key, 0):.0f}" for key in ("prune_seconds", "fine-tune seconds", "KD seconds")),
        ]
        for entry in summary
    ]
    headers = ["student", "speedup 32x128", "speedup 1x32", "FLOPs reduction", "no recovery", "fine-tune", "KD"]
    headers += ["KD - teacher", "wall s (prune / FT / KD)"]
    return (
        f"\n## {task}: teacher {teacher['score'] * 100:.2f}\n\n"
        f"Teacher: {describe_teacher(teacher)}\n\n"
        f"Students trained on {data}, {args.epochs or setup.epochs:g} epoch(s), lr {setup.learning_rate:g}, warm-up "
        f"{setup.warmup_steps} steps, max length {teacher['max_length']}"
        + (", length-grouped batches" if setup.group_by_length else "")
        + f"; {args.seeds} seed(s) per recovery.\n\n"
        + markdown_table(headers, table)
    )


def merge_previous(path: Path, rows, summary, sizes, teachers, task_args):
    """Keep the results of an earlier run for every (task, student) this run did not train: running
    ``--tasks stsb`` or ``--students`` adds to ``distill.json`` instead of replacing it. A kept student keeps its
    own speedups (each measured against the teacher in its own interleaved run); a task whose teacher changed
    since is dropped, not mixed."""
    if not path.is_file():
        return rows, summary, sizes, teachers, task_args
    previous = json.loads(path.read_text())
    done = {(r["task"], r["student"]) for r in rows}
    kept_rows, kept_summary = list(rows), list(summary)
    merged_sizes = {task: dict(value) for task, value in sizes.items()}
    merged_teachers, merged_args = dict(teachers), dict(task_args)
    for task, teacher in previous.get("teachers", {}).items():
        if task in teachers and teachers[task].get("score") != teacher.get("score"):
            continue  # another teacher: its students' numbers do not belong next to these
        old_rows = [r for r in previous.get("rows", []) if r["task"] == task and (task, r["student"]) not in done]
        if not old_rows:
            continue
        students = {r["student"] for r in old_rows}
        kept_rows += old_rows
        kept_summary += [e for e in previous.get("summary", []) if e["task"] == task and e["student"] in students]
        old_sizes = previous.get("sizes", {}).get(task, {})
        merged_sizes.setdefault(task, {}).update({k: v for k, v in old_sizes.items() if k in students})
        merged_teachers.setdefault(task, teacher)
        merged_args.setdefault(task, previous.get("task_args", {}).get(task, previous.get("args", {})))
    return kept_rows, kept_summary, merged_sizes, merged_teachers, merged_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument(
        "--students", default=None, help=f"comma-separated, for every task (default: per task); any of {list(STUDENTS)}"
    )
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune / KD runs per student, seeds 0..N-1")
    parser.add_argument("--epochs", type=float, default=None, help="override the per-task epochs")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (latency always uses 2)")
    parser.add_argument("--rounds", type=int, default=3, help="latency: rounds visiting every model")
    parser.add_argument("--repeats", type=int, default=5, help="latency: timed runs per model per round")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--teachers-dir", default=None, help="folder holding teacher-<task>/ (default runs/bench)")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS, help="where the training runs go")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--train-samples", type=int, default=None, help="override the training subset (smoke runs)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="score on a dev subset (smoke runs)")
    parser.add_argument("--calibration", type=int, default=DEFAULT_CALIBRATION, help="budget pruner calibration")
    args = parser.parse_args()
    if args.students:
        by_slug = {slug(name): name for name in STUDENTS}
        chosen = [by_slug.get(slug(name)) for name in args.students.split(",")]
        if None in chosen:
            parser.error(f"--students: choose among {list(STUDENTS)}")
        args.students = chosen
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    teachers = {task: teacher_summary(task, teacher_folder(task, args.teachers_dir)) for task in tasks}
    unconverged = [task for task, teacher in teachers.items() if not teacher["converged_recipe"]]
    smoke = args.train_samples or args.max_eval_samples or args.calibration != DEFAULT_CALIBRATION or unconverged
    defaults = args.results_dir.resolve() == RESULTS.resolve() or args.runs_dir.resolve() == DEFAULT_RUNS.resolve()
    if smoke and defaults:
        parser.error(
            "smoke settings (--train-samples, --max-eval-samples, --calibration, or a teacher not built by "
            f"bench/teachers.py: {unconverged or 'none here'}) need --runs-dir and --results-dir outside "
            "runs/bench/distill and bench/results: those hold real runs only"
        )
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args_record = {**vars(args), "runs_dir": str(args.runs_dir), "results_dir": str(args.results_dir)}
    rows, summary, sizes, task_args = [], [], {}, {}
    for task in tasks:
        teacher = teachers[task]
        task_rows = train_runs(task, TASKS[task], teacher, args)
        sizes[task] = {} if args.skip_latency else measure(task, teacher, task_rows, args)
        rows += task_rows
        summary += summarise(task, task_rows, sizes[task], teacher)
        task_args[task] = args_record
    rows, summary, sizes, teachers, task_args = merge_previous(
        args.results_dir / "distill.json", rows, summary, sizes, teachers, task_args
    )
    sections = [
        task_section(
            task,
            [e for e in summary if e["task"] == task],
            [r for r in rows if r["task"] == task],
            teachers[task],
            TASKS[task],
            argparse.Namespace(**task_args[task]),
        )
        for task in TASKS
        if task in teachers
    ]

    markdown = (
        "# Recovery after compression: fine-tuning vs knowledge distillation (MiniLM-L6)\n\n"
        "Every student is made from the converged teacher of its task (bench/teachers.py). No recovery = the "
        "student as made (budget pruner: retraining-free, with its least-squares weight refit; layer students: "
        "the teacher's layers copied). Fine-tune = task labels only (alpha 0); KD = logit KD "
        f"(alpha {args.alpha}, T {args.temperature}, teacher logits cached); same data, steps and learning rate for "
        f"both, training on {args.threads} thread(s). Scores: mean ± std over seeds when there are several. "
        + (
            f"Dev scores on a seeded random subset of {args.max_eval_samples} examples (a smoke run). "
            if args.max_eval_samples
            else "Dev scores on the full GLUE dev sets. "
        )
        + (
            "Speedup: median latency of the teacher over the student's, all of a task's models measured in one "
            f"interleaved run ({args.rounds} rounds x {args.repeats} timed runs), 2 threads, at batch 32 x 128 "
            "tokens and batch 1 x 32 tokens (one request). 'wall s': pruning (budget students, made once) and the "
            "mean seconds of one fine-tuning / KD run (evaluation included).\n"
            if not args.skip_latency
            else "Latency not measured (--skip-latency).\n"
        )
        + "".join(sections)
        + f"\nTotal benchmark time {time.perf_counter() - started:.0f} s (runs already on disk are reused).\n"
    )
    write_results(
        "distill",
        {
            "machine": machine(),
            "args": args_record,
            "task_args": task_args,
            "teachers": teachers,
            "summary": summary,
            "rows": rows,
            "sizes": sizes,
        },
        markdown,
        args.results_dir,
    )
    print(markdown)


if __name__ == "__main__":
    main()
