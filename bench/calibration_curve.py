"""Score, time and peak memory of retraining-free budget pruning against the calibration-set size (issue 18, item 3):
``FlopsBudget(fraction, calibration_examples=n)`` on a converged teacher of ``bench/teachers.py``, each size in a
fresh process so that its peak resident memory is its own. Writes ``bench/results/calibration_curve.{json,md}``.

    python bench/calibration_curve.py [--tasks stsb] [--sizes 256,512,1024,2048,4096] [--fraction 0.5] [--seeds 0,1,2]

Rows of tasks and seeds not run this time are kept from the previous results file, so tasks and seeds can be measured
one at a time.
With several seeds (the calibration sample's), the table gives each size's mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from common import RESULTS, machine, markdown_table, teacher_folder, teacher_summary, write_results


def prune_once(task: str, teacher: str, size: int, fraction: float, max_length: int, seed: int = 0) -> dict:
    """One pruning run in this (fresh) process: score, seconds, peak resident memory."""
    import torch

    import slimformer

    torch.set_num_threads(2)
    data = slimformer.load_task(task)
    result = slimformer.prune(
        teacher,
        slimformer.FlopsBudget(fraction, calibration_examples=size, seed=seed),
        data,
        max_length=max_length,
        evaluate=True,
        progress=False,
    )
    # the pruning itself (load, Fisher, search, refit, removal), without the two dev evaluations
    spent = result.report["seconds"]
    seconds = sum(value for key, value in spent.items() if key != "total" and not key.startswith("evaluate"))
    score = result.score
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return {
        "task": task,
        "calibration_examples": size,
        "seed": seed,
        "score": score,
        "seconds": seconds,
        "peak_mib": peak_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="stsb")
    parser.add_argument("--sizes", default="256,512,1024,2048,4096")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--teachers-dir", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    previous_file = args.results_dir / "calibration_curve.json"
    previous = json.loads(previous_file.read_text()) if previous_file.is_file() else {}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # a (task, seed) measured again replaces its old rows; other seeds of the same task are kept and pooled
    rows = [r for r in previous.get("rows", []) if r["task"] not in tasks or r.get("seed", 0) not in seeds]
    teachers = dict(previous.get("teachers", {}))
    for task in tasks:
        folder = teacher_folder(task, args.teachers_dir)
        teachers[task] = teacher_summary(task, folder)
        for seed in seeds:
            for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
                with ProcessPoolExecutor(max_workers=1) as pool:  # a fresh process: its peak memory is this run's
                    job = pool.submit(prune_once, task, str(folder), size, args.fraction, args.max_length, seed)
                    rows.append(job.result())
                print(rows[-1], flush=True)
    table = []
    for task in teachers:
        for size in sorted({r["calibration_examples"] for r in rows if r["task"] == task}):
            group = [r for r in rows if r["task"] == task and r["calibration_examples"] == size]
            scores = np.array([r["score"] for r in group]) * 100
            spread = f" ± {scores.std(ddof=1):.2f}" if len(group) > 1 else ""
            drop = scores.mean() - teachers[task]["score"] * 100
            seconds = np.mean([r["seconds"] for r in group])
            peak = max(r["peak_mib"] for r in group)
            table.append([task, size, len(group), f"{scores.mean():.2f}{spread}", f"{drop:+.2f}", f"{seconds:.0f}",
                          f"{peak:.0f}"])  # fmt: skip
    scores = ", ".join(f"{task} {summary['score'] * 100:.2f}" for task, summary in teachers.items())
    markdown = (
        f"# Budget pruning against the calibration-set size ({args.fraction:.0%} of the FLOPs, no retraining)\n\n"
        f"MiniLM-L6 teachers: {scores}. One run per "
        "size and seed in a fresh process (peak resident memory of that process, which includes the model and data); "
        "2 threads; 'seeds' = how many calibration samples (seeded) were drawn; score = mean ± standard deviation "
        "over them; seconds = mean pruning time.\n\n"
        + markdown_table(["task", "calibration examples", "seeds", "score", "vs teacher", "seconds", "peak MiB"], table)
        + "\n"
    )
    record = {"machine": machine(), "args": {**vars(args), "results_dir": str(args.results_dir)}}
    write_results("calibration_curve", {**record, "teachers": teachers, "rows": rows}, markdown, args.results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
