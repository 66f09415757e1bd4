"""Recovering accuracy after compression: no recovery vs fine-tuning vs knowledge distillation (issue 5).

Students of MiniLM-L6 at about 2x and 3x measured speedup, made three ways from the fine-tuned teacher:

- the retraining-free budget pruner (Kwon et al. 2022) at 50%, 30% and 25% of the encoder FLOPs;
- layer dropping (Sajjad et al. 2020, top strategy): 3 and 2 of 6 layers kept;
- DistilBERT-style initialisation: every 2nd / every 3rd teacher layer.

Each student is scored with no recovery, after fine-tuning on the task labels (``alpha=0``), and after
knowledge distillation from the teacher (logit KD; the budget-pruned students also get hidden-state KD).
Fine-tuning and KD use the same data, steps and learning rate. Latency is measured at the end, interleaved
with the teacher in the same run (batch 32 x 128 tokens, 2 threads): run nothing else meanwhile.

    python bench/distill.py [--tasks sst2,stsb] [--epochs 3] [--skip-latency]

Every training run writes its model folder under ``runs/bench/distill/`` and is skipped when that folder exists,
so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch

from common import RUNS, glue_dir, interleaved_latency, machine, markdown_table, write_results
from slimformer.budget.pipeline import budget_prune
from slimformer.distill import DistillConfig, distill
from slimformer.measure import count_parameters, flops
from slimformer.models import load_model
from slimformer.train import TrainConfig

OUT = RUNS / "distill"


@dataclass(frozen=True)
class TaskSetup:
    teacher: str
    max_length: int
    train_samples: int | None
    epochs: float
    learning_rate: float
    speed_classes: tuple[str, ...] = ("2x", "3x")
    # students also trained on the whole training split: KD then sees sentences the teacher was not trained on
    whole_train_students: tuple[str, ...] = ()


TASKS = {
    # the same 20,000 sentences and 1 epoch the teacher was fine-tuned with
    "sst2": TaskSetup(
        str(RUNS / "sst2"),
        max_length=64,
        train_samples=20000,
        epochs=1,
        learning_rate=1e-4,
        whole_train_students=("every 3rd layer (2 layers)",),
    ),
    # the second task (a regression task: KD is the MSE to the teacher's predictions) for the 3x students only
    "stsb": TaskSetup(str(RUNS / "stsb"), 128, train_samples=None, epochs=2, learning_rate=1e-4, speed_classes=("3x",)),
    "mrpc": TaskSetup(str(RUNS / "mrpc"), 128, train_samples=None, epochs=3, learning_rate=1e-4, speed_classes=("3x",)),
}

# name -> (student spec, or a FLOPs budget for the budget pruner; the speed class it aims at)
STUDENTS = {
    "budget 50% FLOPs": (0.5, "2x"),
    "budget 30% FLOPs": (0.3, "3x"),
    "budget 25% FLOPs": (0.25, "3x"),
    "drop top 3 (3 layers)": ("drop:top:3", "2x"),
    "drop top 4 (2 layers)": ("drop:top:4", "3x"),
    "every 2nd layer (3 layers)": ("every:2", "2x"),
    "every 3rd layer (2 layers)": ("every:3", "3x"),
}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def student_source(task: str, setup: TaskSetup, name: str, spec: float | str) -> tuple[str, float]:
    """A spec string, or the folder of a budget-pruned student (made once); and the seconds that took."""
    if isinstance(spec, str):
        return spec, 0.0
    folder = OUT / task / f"{slug(name)}-pruned"
    if not folder.exists():
        started = time.perf_counter()
        budget_prune(setup.teacher, task, folder, data_dir=glue_dir(), budget_flops=spec, max_length=setup.max_length)
        (folder / "bench_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return str(folder), float((folder / "bench_seconds.txt").read_text())


def train_runs(task: str, setup: TaskSetup, args: argparse.Namespace) -> list[dict]:
    config = TrainConfig(
        max_length=setup.max_length,
        epochs=args.epochs or setup.epochs,
        learning_rate=setup.learning_rate,
        max_train_samples=setup.train_samples,
        warmup_steps=50,
        save_steps=500,
    )
    rows = []
    for name, (spec, speed_class) in STUDENTS.items():
        if speed_class not in setup.speed_classes:
            continue
        source, prune_seconds = student_source(task, setup, name, spec)
        kd = DistillConfig(alpha=args.alpha, temperature=args.temperature)
        if not isinstance(spec, str) and args.hidden_weight > 0:
            kd = replace(kd, hidden_weight=args.hidden_weight)  # all layers kept: TinyBERT hidden-state KD
        runs = [("fine-tune", DistillConfig(alpha=0.0), config), ("KD", kd, config)]
        if name in setup.whole_train_students:
            whole = replace(config, max_train_samples=None)
            runs += [("fine-tune, whole train", DistillConfig(alpha=0.0), whole), ("KD, whole train", kd, whole)]
        for recovery, settings, run_config in runs:
            out = OUT / task / f"{slug(name)}-{slug(recovery)}"
            if out.exists():
                result_metrics = load_metrics(out)
            else:
                print(f"[{task}] {name}: {recovery}", flush=True)
                result_metrics = distill(
                    setup.teacher, source, task, out, data_dir=glue_dir(), config=run_config, distill_config=settings
                ).metrics
            rows.append(
                {
                    "task": task,
                    "student": name,
                    "speed_class": speed_class,
                    "recovery": recovery,
                    "model_dir": str(out),
                    "teacher_score": result_metrics["teacher_score"],
                    "score_before": result_metrics["student_score_before"],
                    "score": result_metrics["score"],
                    "eval": result_metrics["eval"],
                    "train_samples": result_metrics["train"]["samples"],
                    "train_seconds": result_metrics["train"]["seconds"],
                    "run_seconds": result_metrics["total_seconds"],
                    "prune_seconds": prune_seconds,
                    "distill": result_metrics["distill"],
                    "config": result_metrics["config"],
                }
            )
    return rows


def load_metrics(out) -> dict:
    import json

    return json.loads((out / "metrics.json").read_text())


def measure(rows: list[dict], teachers: dict[str, str], rounds: int, repeats: int) -> dict[str, dict]:
    """Latency, FLOPs and parameters of each distinct student architecture and of the teachers."""
    models = {f"teacher {task}": load_model(path).model for task, path in teachers.items()}
    for row in rows:
        key = f"{row['task']} {row['student']}"
        if key not in models:
            models[key] = load_model(row["model_dir"]).model
    samples = interleaved_latency(models, rounds=rounds, repeats=repeats)
    return {
        name: {
            "latency_median_ms": statistics.median(samples[name]),
            "encoder_gflops_seq128": flops(net, seq_len=128).encoder / 1e9,
            "params": count_parameters(net).total,
            "encoder_params": count_parameters(net).encoder,
        }
        for name, net in models.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--epochs", type=float, default=None, help="override the per-task epochs")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--hidden-weight", type=float, default=0.0, help="TinyBERT hidden-state KD for the budget-pruned students"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (latency always uses 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.perf_counter()
    rows = [row for task in tasks for row in train_runs(task, TASKS[task], args)]
    sizes = {} if args.skip_latency else measure(rows, {t: TASKS[t].teacher for t in tasks}, args.rounds, args.repeats)
    for row in rows:
        teacher = sizes.get(f"teacher {row['task']}")
        student = sizes.get(f"{row['task']} {row['student']}")
        if teacher and student:
            row.update(student)
            row["speedup"] = teacher["latency_median_ms"] / student["latency_median_ms"]
            row["flops_reduction"] = teacher["encoder_gflops_seq128"] / student["encoder_gflops_seq128"]

    lines = [
        "# Recovery after compression: fine-tuning vs knowledge distillation (MiniLM-L6)\n",
        "Speedup: median latency, batch 32 x 128 tokens, 2 threads, interleaved with the teacher in the same run. "
        "Fine-tuning = task labels only (alpha 0); KD = logit KD "
        f"(alpha {args.alpha}, T {args.temperature}, teacher logits cached)"
        + (f"; budget-pruned students add hidden-state KD (weight {args.hidden_weight})" if args.hidden_weight else "")
        + f". Same data, steps and learning rate for both; training on {args.threads} thread(s). "
        "No recovery = the student as made (budget pruner: retraining-free, with its mask tuning).\n",
    ]
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        setup = TASKS[task]
        teacher_score = task_rows[0]["teacher_score"]
        lines.append(
            f"\n## {task} (teacher {teacher_score * 100:.2f}; {setup.train_samples or 'all'} training examples, "
            f"{args.epochs or setup.epochs:g} epochs, lr {setup.learning_rate:g}, max length {setup.max_length})\n\n"
        )
        table = []
        for name in [n for n, (_, speed) in STUDENTS.items() if speed in setup.speed_classes]:
            ft = next(r for r in task_rows if r["student"] == name and r["recovery"] == "fine-tune")
            kd = next(r for r in task_rows if r["student"] == name and r["recovery"] == "KD")
            table.append(
                [
                    name,
                    f"{kd['speedup']:.2f}x" if "speedup" in kd else "-",
                    f"{kd['flops_reduction']:.2f}x" if "flops_reduction" in kd else "-",
                    f"{kd['score_before'] * 100:.2f}",
                    f"{ft['score'] * 100:.2f}",
                    f"{kd['score'] * 100:.2f}",
                    f"{(kd['score'] - teacher_score) * 100:+.2f}",
                    f"{ft['run_seconds']:.0f} / {kd['run_seconds']:.0f}",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "student",
                    "speedup",
                    "FLOPs reduction",
                    "no recovery",
                    "fine-tune",
                    "KD",
                    "KD - teacher",
                    "wall s (FT / KD)",
                ],
                table,
            )
        )
        whole = [r for r in task_rows if r["recovery"].endswith("whole train")]
        if whole:
            lines.append(
                f"\nThe same students trained on the whole training split ({whole[0]['train_samples']} examples, "
                "1 epoch), so KD also sees sentences the teacher was not fine-tuned on:\n\n"
            )
            lines.append(
                markdown_table(
                    ["student", "recovery", "score", "- teacher", "wall s"],
                    [
                        [
                            r["student"],
                            r["recovery"],
                            f"{r['score'] * 100:.2f}",
                            f"{(r['score'] - teacher_score) * 100:+.2f}",
                            f"{r['run_seconds']:.0f}",
                        ]
                        for r in whole
                    ],
                )
            )
    lines.append(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s (runs already on disk are reused).\n")
    write_results(
        "distill",
        {"machine": machine(), "args": vars(args), "rows": rows, "sizes": sizes},
        "".join(lines),
    )
    print("".join(lines))


if __name__ == "__main__":
    main()
