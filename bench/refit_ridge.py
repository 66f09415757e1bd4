"""One ridge for every output row of the refit, or each row's ridge scaled by its energy (slimformer's default since
this benchmark; ``slimformer.budget.tune.row_scales``).

Retraining-free budget pruning of the converged MiniLM-L6 teachers (bench/teachers.py; the 48-class article task of
bench/many_class.py) at 50 / 40 / 30% of the FLOPs through ``slimformer.prune``, everything else at its default,
once with each ridge: the same plan (the ridge only changes the refit weights, so the architecture and the latency
are the same) and the same seeded calibration sample. Each pruned model also as dynamic int8 on ONNX Runtime,
scored by the runtime. all-mpnet-base-v2's rows are in bench/results/embeddings.md. Writes
``bench/results/refit_ridge.{json,md}``.

    python bench/refit_ridge.py [--tasks sst2,stsb,squad-article] [--fractions 0.5,0.4,0.3]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path

import slimformer
import slimformer.budget.method as budget_method
from common import RESULTS, RUNS, machine, markdown_table, task_fraction_cells, write_results
from refit_rows import MAX_LENGTH, task_data
from teachers import teacher_dir

RIDGES = {"one": False, "rows": True}  # name -> row_scaled_ridge
OUT = RUNS / "refit_ridge"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb,squad-article")
    parser.add_argument("--fractions", default="0.5,0.4,0.3")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    results_file = args.results_dir / "refit_ridge.json"
    rows = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    refit = budget_method.reconstruct_weights
    try:
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            data = task_data(task)
            for fraction in [float(f) for f in args.fractions.split(",")]:
                for ridge, scaled in RIDGES.items():
                    key = (task, fraction, ridge)
                    if any((r["task"], r["fraction"], r["ridge"]) == key for r in rows):
                        continue
                    budget_method.reconstruct_weights = functools.partial(refit, row_scaled_ridge=scaled)
                    folder = OUT / f"{task}-{fraction:g}-{ridge}"
                    result = slimformer.prune(
                        str(teacher_dir(task)),
                        slimformer.FlopsBudget(fraction),
                        data,
                        out=folder,
                        overwrite=True,
                        max_length=MAX_LENGTH[task],
                        measure=False,
                        progress=False,
                    )
                    quantized = slimformer.quantize(
                        folder,
                        slimformer.Quantize(mode="dynamic"),
                        data,
                        out=folder.with_name(folder.name + "-int8"),
                        overwrite=True,
                        max_length=MAX_LENGTH[task],
                        measure=False,
                        progress=False,
                    )
                    plan = result.plan
                    rows.append(
                        {
                            "task": task,
                            "fraction": fraction,
                            "ridge": ridge,
                            "score": result.score,
                            "score_int8": quantized.score,
                            "kept_heads": sum(len(h) for h in plan.kept_heads),
                            "kept_neurons": sum(len(n) for n in plan.kept_neurons),
                            "largest_weight": largest_refit_weight(result.model),
                        }
                    )
                    print(rows[-1], flush=True)
                    write(rows, args.results_dir)
                    shutil.rmtree(folder.with_name(folder.name + "-int8"), ignore_errors=True)  # 20-90 MB each
    finally:
        budget_method.reconstruct_weights = refit
    write(rows, args.results_dir)


def largest_refit_weight(model) -> float:
    """The largest |weight| of the refit projections (attention outputs and FFN down projections)."""
    from slimformer.arch import layer_views

    projections = [p for view in layer_views(model) for p in (view.attn_out, view.ffn_down)]
    return max(float(p.weight.abs().max()) for p in projections if p.weight.numel())


def write(rows: list[dict], results_dir: Path) -> None:
    teachers, cells = task_fraction_cells(rows)
    table = []
    for task, teacher, fraction, cell in cells:
        found = {r["ridge"]: r for r in cell}
        if set(found) != set(RIDGES):
            continue
        one, scaled = found["one"], found["rows"]
        table.append(
            [
                f"{task} ({teacher['score'] * 100:.2f})",
                f"{fraction:.0%}",
                f"{one['score'] * 100:.2f}",
                f"{scaled['score'] * 100:.2f}",
                f"{(scaled['score'] - one['score']) * 100:+.2f}",
                f"{one['score_int8'] * 100:.2f}",
                f"{scaled['score_int8'] * 100:.2f}",
                f"{one['largest_weight']:.2f} / {scaled['largest_weight']:.2f}",
            ]
        )
    headers = ["task (teacher)", "FLOPs", "one ridge", "ridge per row", "change", "int8, one ridge"]
    headers += ["int8, ridge per row", "largest refit weight"]
    markdown = (
        "# The refit's ridge: one for every output row, or scaled by each row's energy\n\n"
        "MiniLM-L6 teachers converged by bench/teachers.py (dev score in brackets), pruned without retraining to a "
        "share of the encoder FLOPs by `slimformer.prune(FlopsBudget(f))` with every other setting at its default; "
        "the same plan and calibration sample for both ridges (one run per cell). 'ridge per row': each output "
        "row's ridge times its residual energy over the median row's (at least 1), slimformer's default. int8: "
        "dynamic int8 on ONNX Runtime of the pruned model, scored by the runtime. Dev scores: SST-2 and the 48-class "
        "article task accuracy, STS-B mean of Pearson and Spearman.\n\n" + markdown_table(headers, table)
    )
    write_results("refit_ridge", {"machine": machine(), "teachers": teachers, "rows": rows}, markdown, results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
