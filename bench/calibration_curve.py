"""Score, time and peak memory of retraining-free budget pruning against the calibration-set size (issue 18, item 3):
``FlopsBudget(fraction, calibration_examples=n)`` on a converged teacher of ``bench/teachers.py``, each size in a
fresh process so that its peak resident memory is its own. Writes ``bench/results/calibration_curve.{json,md}``.

    python bench/calibration_curve.py [--tasks stsb] [--sizes 256,512,1024,2048,4096] [--fraction 0.5]
"""

from __future__ import annotations

import argparse
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import RESULTS, machine, markdown_table, teacher_folder, teacher_summary, write_results


def prune_once(task: str, teacher: str, size: int, fraction: float, max_length: int) -> dict:
    """One pruning run in this (fresh) process: score, seconds, peak resident memory."""
    import torch

    import slimformer

    torch.set_num_threads(2)
    data = slimformer.load_task(task)
    result = slimformer.prune(
        teacher,
        slimformer.FlopsBudget(fraction, calibration_examples=size),
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
    return {"task": task, "calibration_examples": size, "score": score, "seconds": seconds, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="stsb")
    parser.add_argument("--sizes", default="256,512,1024,2048,4096")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--teachers-dir", default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows, teachers = [], {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        folder = teacher_folder(task, args.teachers_dir)
        teachers[task] = teacher_summary(task, folder)
        for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
            with ProcessPoolExecutor(max_workers=1) as pool:  # a fresh process: its peak memory is this run's
                rows.append(pool.submit(prune_once, task, str(folder), size, args.fraction, args.max_length).result())
            print(rows[-1], flush=True)
    table = []
    for r in rows:
        drop = (r["score"] - teachers[r["task"]]["score"]) * 100
        table.append([r["task"], r["calibration_examples"], f"{r['score'] * 100:.2f}", f"{drop:+.2f}"])
        table[-1] += [f"{r['seconds']:.0f}", f"{r['peak_mib']:.0f}"]
    scores = ", ".join(f"{task} {summary['score'] * 100:.2f}" for task, summary in teachers.items())
    markdown = (
        f"# Budget pruning against the calibration-set size ({args.fraction:.0%} of the FLOPs, no retraining)\n\n"
        f"MiniLM-L6 teachers: {scores}. One run per "
        "size in a fresh process (peak resident memory of that process, which includes the model and data); "
        "2 threads; one seed (the calibration sample is seeded).\n\n"
        + markdown_table(["task", "calibration examples", "score", "vs teacher", "seconds", "peak MiB"], table)
        + "\n"
    )
    record = {"machine": machine(), "args": {**vars(args), "results_dir": str(args.results_dir)}}
    write_results("calibration_curve", {**record, "teachers": teachers, "rows": rows}, markdown, args.results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
