"""Which rows the last layer's refit should fit (issue 18, item 4): every real token, or only each example's first
token, the only one a sequence-classification head reads of the last layer.

Retraining-free budget pruning of the converged MiniLM-L6 teachers (bench/teachers.py; the 48-class article task
of bench/many_class.py) at 50 and 40% of the FLOPs, everything else at its default, once with the last layer fitted
on every token and once on first tokens only (slimformer's default since this benchmark). One run per cell, the
same seeded calibration sample for both. Writes ``bench/results/refit_rows.{json,md}``.

    python bench/refit_rows.py [--tasks sst2,stsb,squad-article] [--fractions 0.5,0.4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import slimformer
import slimformer.budget.method as budget_method
from common import RESULTS, machine, markdown_table, task_fraction_cells, write_results
from teachers import teacher_dir

MAX_LENGTH = {"sst2": 64, "squad-article": 64, "stsb": 128}  # the teachers' own
ROWS = ("all", "first")


def task_data(task: str):
    if task == "squad-article":
        from many_class import load_data

        return load_data()
    return slimformer.load_task(task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb,squad-article")
    parser.add_argument("--fractions", default="0.5,0.4")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    results_file = args.results_dir / "refit_rows.json"
    rows = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    chosen = budget_method.last_layer_rows
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        data = task_data(task)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            for last_rows in ROWS:
                if any((r["task"], r["fraction"], r["last_layer_rows"]) == (task, fraction, last_rows) for r in rows):
                    continue
                budget_method.last_layer_rows = chosen if last_rows == "first" else (lambda model: "all")
                result = slimformer.prune(
                    str(teacher_dir(task)),
                    slimformer.FlopsBudget(fraction),
                    data,
                    max_length=MAX_LENGTH[task],
                    progress=False,
                )
                rows.append({"task": task, "fraction": fraction, "last_layer_rows": last_rows, "score": result.score})
                print(rows[-1], flush=True)
                write(rows, args.results_dir)
    budget_method.last_layer_rows = chosen
    write(rows, args.results_dir)


def write(rows: list[dict], results_dir: Path) -> None:
    teachers, cells = task_fraction_cells(rows)
    table = []
    for task, teacher, fraction, cell in cells:
        scores = {r["last_layer_rows"]: r["score"] for r in cell}
        if set(scores) != set(ROWS):
            continue
        table.append(
            [
                f"{task} ({teacher['score'] * 100:.2f})",
                f"{fraction:.0%}",
                f"{scores['all'] * 100:.2f}",
                f"{scores['first'] * 100:.2f}",
                f"{(scores['first'] - scores['all']) * 100:+.2f}",
            ]
        )
    markdown = (
        "# The last layer's refit: every token or first tokens only\n\n"
        "Retraining-free budget pruning (`FlopsBudget`, defaults) of the converged MiniLM-L6 teachers (their dev "
        "score in brackets; SST-2 accuracy, STS-B mean of Pearson and Spearman, the 48-class SQuAD-article task of "
        "bench/many_class.py accuracy). The last layer's least-squares refit fits every real token, or only each "
        "example's first token: the only one a classification head reads. One run per cell, the same seeded "
        "calibration sample (2,048 examples) for both.\n\n"
        + markdown_table(["task (teacher)", "FLOPs kept", "every token", "first tokens", "change"], table)
    )
    write_results("refit_rows", {"machine": machine(), "teachers": teachers, "rows": rows}, markdown, results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
