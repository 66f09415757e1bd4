"""Benchmark: the seed spread of bench/sparse.py's trained variants (the score targets of the sparse-pruning issue).

One run of a training variant is one draw: on SST-2 dev (872 sentences) one seed moves the score by about a point.
This builds the chosen variants of ``bench/sparse.py`` (same configs, same training table, same teacher) at several
seeds (``config.seed``: the order the training examples are seen in) and reports each seed's dev score, its
dynamic int8 score on ONNX Runtime, agreement with the teacher, and mean ± standard deviation per variant. Seed 0
is the model bench/sparse.py built (the same folder). No latency: every variant here keeps the model's shape, so
its speed is that of the dense model (bench/results/sparse*.md time them).

    python bench/sparse_seeds.py --task sst2 --variants "soft movement 80%,soft movement 90%" --seeds 0,1,2

Writes ``bench/results/sparse_seeds[_<task>].{json,md}``; rows already measured are kept (resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import sparse
from common import (
    DISPLAY,
    RESULTS,
    RUNS,
    TRAINING,
    describe_teacher,
    dev_scorer,
    int8,
    machine,
    markdown_table,
    teacher_folder,
    teacher_summary,
    write_results,
)
from slimformer.analyze.loyalty import loyalty_metrics
from slimformer.deploy.runtime import load_artifact_folder
from slimformer.models import load_model
from slimformer.tasks import load_task


def results_name(task: str) -> str:
    return "sparse_seeds" if task == "stsb" else f"sparse_seeds_{task}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="sst2", choices=sorted(TRAINING))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--variants", required=True, help="labels of bench/sparse.py, comma-separated")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    task = args.task
    sparse.OUT = RUNS / "sparse" if task == "stsb" else RUNS / f"sparse-{task}"
    teacher_path = teacher_folder(task)
    teacher = teacher_summary(task, teacher_path)
    data = load_task(task)
    known = sparse.variants(args.epochs, task)
    labels = [label.strip() for label in args.variants.split(",")]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; bench/sparse.py has: {', '.join(known)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    dense = load_model(teacher_path)
    scored = dev_scorer(dense.tokenizer, data, teacher["primary_metric"])

    teacher_logits = scored(dense.model)[1]
    path = RESULTS / f"{results_name(task)}.json"
    previous = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = {(r["variant"], r["seed"]): r for r in previous}
    for label in labels:
        for seed in seeds:
            if (label, seed) in runs:
                continue
            config = dataclasses.replace(known[label], seed=seed)
            # seed 0 is bench/sparse.py's own model, other seeds get their own folder
            name = label if seed == 0 else f"{label} seed {seed}"
            folder, report = sparse.build(name, config, teacher_path, data, args.epochs, task)
            model = load_model(folder).model
            score, logits = scored(model)
            runtime = load_artifact_folder(int8(folder, data), threads=2).model
            runs[(label, seed)] = {
                "variant": label,
                "seed": seed,
                "score": score,
                "score_int8": scored(runtime)[0],
                "loyalty": loyalty_metrics(teacher_logits, logits, regression=data.spec.is_regression),
                "sparsity": report["details"]["sparse"]["sparsity"],
                "train_seconds": report["seconds"].get("train"),
            }
            print(json.dumps(runs[(label, seed)]), flush=True)
            write(list(runs.values()), teacher, args)
    write(list(runs.values()), teacher, args)


def _spread(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (one seed)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def write(runs: list[dict], teacher: dict, args) -> None:
    by_variant: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["variant"], r["seed"])):
        by_variant.setdefault(run["variant"], []).append(run)
    base = 100 * teacher["score"]
    summary = []
    for label, rows in by_variant.items():
        scores = [r["score"] for r in rows]
        summary.append(
            [
                label,
                ", ".join(str(r["seed"]) for r in rows),
                ", ".join(f"{100 * s:.2f}" for s in scores),
                _spread(scores),
                f"{100 * statistics.fmean(scores) - base:+.2f}",
                f"{100 * min(scores) - base:+.2f}",
                _spread([r["score_int8"] for r in rows]),
                f"{statistics.fmean(r['loyalty'].get('label_loyalty', r['loyalty'].get('pearson')) for r in rows):.3f}",
                f"{100 * rows[0]['sparsity']:.0f}%",
            ]
        )
    display = DISPLAY[args.task]
    table = markdown_table(
        [
            "variant",
            "seeds",
            f"{display} per seed",
            "mean ± sd",
            "mean vs teacher",
            "worst seed vs teacher",
            "int8 (ORT) mean ± sd",
            "agreement / Pearson with teacher",
            "sparsity",
        ],
        summary,
    )
    text = (
        f"# Seed spread of sparse pruning on {display} (MiniLM-L6)\n\n{describe_teacher(teacher)}\n\n"
        f"Each variant is bench/sparse.py's config with `seed` set (the order training examples are seen in): "
        f"{args.epochs:g} epochs over {TRAINING[args.task]['what']}, batch 32, logit distillation from the dense "
        f"teacher; {sparse.ALL_DATA}sparsity over the encoder's linear weights. "
        "int8: dynamic, per-channel, on ONNX Runtime, scored by "
        "the runtime. Standard deviations are over seeds (sample sd). Unstructured sparsity keeps the dense shape, "
        "so those models run at the dense model's speed; head movement removes the heads and neurons it empties "
        "(speed: bench/results/sparse*.md).\n\n" + table + "\n"
    )
    write_results(
        results_name(args.task),
        {"machine": machine(), "teacher": teacher, "runs": runs},
        text,
    )


if __name__ == "__main__":
    main()
