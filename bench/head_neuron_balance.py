"""Does Kwon et al.'s search undervalue heads against FFN neurons once the least-squares refit follows? Budget
pruning of the converged MiniLM-L6 teachers with the neurons' Fisher multiplied by a weight before the search
(1: today's default; below 1: neurons look cheaper to remove, so the plan keeps more heads and fewer neurons at the
same FLOPs), on SST-2, STS-B and the 48-class article task (bench/many_class.py), several calibration seeds.

The motivation (bench/results/embedding_diagnosis.md): on all-MiniLM-L6-v2 as an embedding model, the refit recovers
more of a pruned FFN's output error than of pruned attention's, and a weight of 0.5 kept STS-B while retrieval
nDCG@10 rose. The weight is ``FlopsBudget(neuron_weight=...)``; its default stays 1 for task models from these rows.

    PYTHONPATH=src:bench python bench/head_neuron_balance.py [--tasks sst2,stsb,squad-article] [--weights 1,0.5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import slimformer
from common import RESULTS, glue_dir, machine, markdown_table, teacher_folder, teacher_summary, write_results
from slimformer.evaluation import evaluate_model, headline_score
from slimformer.tasks import load_task

NAME = "head_neuron_balance"


def task_data(task: str):
    if task == "squad-article":
        from many_class import load_data

        return load_data()
    return load_task(task, glue_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb,squad-article")
    parser.add_argument("--weights", default="1,0.5")
    parser.add_argument("--fractions", default="0.5,0.4")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    path = RESULTS / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": [], "teachers": {}}
    done = {(r["task"], r["weight"], r["fraction"], r["seed"]) for r in results["rows"]}
    for task in args.tasks.split(","):
        folder = teacher_folder(task)
        teacher = teacher_summary(task, folder)
        results["teachers"][task] = teacher
        max_length = teacher["max_length"] or 128
        data = task_data(task)
        loaded = slimformer.load_model(str(folder), data.spec)
        dense, tokenizer = loaded.model, loaded.tokenizer
        metric = data.spec.primary_metric
        for fraction in [float(f) for f in args.fractions.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for weight in [float(w) for w in args.weights.split(",")]:
                    if (task, weight, fraction, seed) in done:
                        continue
                    started = time.perf_counter()
                    result = slimformer.prune(
                        copy.deepcopy(dense),
                        slimformer.FlopsBudget(fraction, seed=seed, neuron_weight=weight),
                        data,
                        tokenizer=tokenizer,
                        max_length=max_length,
                        evaluate=False,
                        measure=False,
                        progress=False,
                    )
                    model = result.model
                    evaluation = evaluate_model(model, tokenizer, data, max_length=max_length, progress=False)
                    row = {
                        "task": task,
                        "weight": weight,
                        "fraction": fraction,
                        "seed": seed,
                        "score": headline_score(evaluation, metric),
                        "heads_per_layer": result.report["models"]["after"]["heads_per_layer"],
                        "neurons_per_layer": result.report["models"]["after"]["neurons_per_layer"],
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                    print(json.dumps(row), flush=True)
                    results["rows"].append(row)
                    results["machine"] = machine()
                    write_results(NAME, results, render(results))
    write_results(NAME, results, render(results))


def render(results: dict) -> str:
    cells: dict[tuple, list[float]] = {}
    plans: dict[tuple, list[int]] = {}
    for r in results["rows"]:
        cells.setdefault((r["task"], r["weight"], r["fraction"]), []).append(r["score"])
        plans.setdefault((r["task"], r["weight"], r["fraction"]), []).append(sum(r["heads_per_layer"]))
    table = []
    for (task, weight, fraction), scores in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][2], -kv[0][1])):
        teacher = 100 * results["teachers"][task]["score"]
        values = [100 * s - teacher for s in scores]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        table.append(
            [
                task,
                f"{teacher:.2f}",
                f"{fraction:.0%}",
                f"{weight:g}",
                f"{statistics.mean(values):+.2f}{spread} (n={len(values)})",
                f"{statistics.mean(plans[(task, weight, fraction)]):.0f}",
            ]
        )
    return (
        "# Heads against neurons in the budget search\n\n"
        "Retraining-free budget pruning (`FlopsBudget`, defaults) of the converged MiniLM-L6 teachers, with the "
        "neurons' Fisher multiplied by a weight (`neuron_weight`) before Kwon et al.'s search (1: the default for "
        "task models). Score change against the teacher, mean ± standard deviation over calibration seeds; heads "
        "kept (of 72), mean over seeds. 2 threads.\n\n"
        + markdown_table(["task", "teacher", "FLOPs", "neuron weight", "change vs teacher", "heads kept"], table)
    )


if __name__ == "__main__":
    main()
