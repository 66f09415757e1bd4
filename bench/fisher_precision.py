"""The budget pruner's Fisher in float32 or under bfloat16 autocast (``FlopsBudget(fisher_precision=...)``).

The Fisher's forward and backward passes are most of the time of retraining-free pruning (issue 18); on a CPU with
native bfloat16 dot products (AVX512-BF16 / AMX) autocast makes them about a quarter faster. This benchmark asks
what that costs: the converged MiniLM-L6 teachers of bench/teachers.py pruned to 50 / 40 / 30% of the FLOPs with
each precision, everything else at its default, on three seeded calibration samples (the seed draws the 2,048
calibration examples; both precisions see the same sample). Reported: the dev score (mean ± sd over the seeds and
the mean paired change), how many heads and neurons the two plans disagree on, and the Fisher's seconds (in one
process, runs one after another: a rough guide; bench/budget_scaling.py times whole runs in fresh processes).
With ``--embedding mpnet`` it also prunes all-mpnet-base-v2 label-free to 50% of the FLOPs with the bfloat16
Fisher, on bench/embeddings.py's calibration texts and scored on its STS-B and retrieval sets, beside the float32
row bench/embeddings.py wrote (the same plan inputs: float32 is deterministic, and the refit has not changed its
weights since). Writes ``bench/results/fisher_precision.{json,md}``.

    python bench/fisher_precision.py [--tasks sst2,stsb] [--fractions 0.5,0.4,0.3] [--seeds 0,1,2] [--embedding mpnet]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import slimformer
from common import RESULTS, machine, markdown_table, task_fraction_cells, write_results
from refit_rows import MAX_LENGTH
from teachers import teacher_dir

PRECISIONS = ("float32", "bfloat16")


def units(plan) -> set[tuple[str, int, int]]:
    """The heads and neurons a plan keeps, as (kind, layer, index)."""
    kept = {("head", layer, h) for layer, heads in enumerate(plan.kept_heads) for h in heads}
    return kept | {("neuron", layer, n) for layer, neurons in enumerate(plan.kept_neurons) for n in neurons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--fractions", default="0.5,0.4,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--embedding", default="", help="also this embedding model (mpnet) at 50%% FLOPs")
    parser.add_argument(
        "--redo", default="", help="measure these precisions' rows again (e.g. bfloat16, after a change to its passes)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    results_file = args.results_dir / "fisher_precision.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    redo = {p.strip() for p in args.redo.split(",") if p.strip()}
    rows = [r for r in previous.get("rows", []) if r["precision"] not in redo]
    embedding_rows = previous.get("embedding_rows", [])
    if args.embedding and not any(r["model"] == args.embedding for r in embedding_rows):
        embedding_rows.append(embedding_row(args.embedding, args.results_dir))
        write(rows, args.results_dir, embedding_rows)
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        data = slimformer.load_task(task)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for precision in PRECISIONS:
                    key = (task, fraction, seed, precision)
                    if any((r["task"], r["fraction"], r["seed"], r["precision"]) == key for r in rows):
                        continue
                    config = slimformer.FlopsBudget(fraction, seed=seed, fisher_precision=precision)
                    result = slimformer.prune(
                        str(teacher_dir(task)), config, data, max_length=MAX_LENGTH[task], progress=False
                    )
                    seconds = result.report["seconds"]
                    rows.append(
                        {
                            "task": task,
                            "fraction": fraction,
                            "seed": seed,
                            "precision": precision,
                            "resolved": result.report["details"]["fisher_precision"],
                            "score": result.score,
                            "fisher_seconds": seconds["fisher"],
                            "tune_seconds": seconds["tune"],
                            "kept": sorted(units(result.plan)),
                        }
                    )
                    print({k: v for k, v in rows[-1].items() if k != "kept"}, flush=True)
                    write(rows, args.results_dir, embedding_rows)
    write(rows, args.results_dir, embedding_rows)


def embedding_row(name: str, results_dir: Path, budget: float = 0.5) -> dict:
    """``name`` pruned label-free to ``budget`` with the bfloat16 Fisher as bench/embeddings.py prunes it, its
    scores beside that benchmark's float32 row."""
    import embeddings
    from slimformer.tasks import load_task

    reference = json.loads((results_dir / "embeddings.json").read_text())["rows"]
    found = [r for r in reference if r["model"] == name and r["variant"] in ("dense", f"flops {budget:g}")]
    dense, exact = sorted(found, key=lambda r: r["variant"] != "dense")
    sts = load_task("stsb-embed")
    retrieval, texts = embeddings.split_articles(load_task("squad-retrieval"))
    calibration = embeddings.text_task(sts, embeddings.calibration_texts(sts, texts, 2048), "calibration texts")
    config = slimformer.FlopsBudget(budget, calibration_examples=2048, fisher_precision="bfloat16")
    result = slimformer.prune(
        embeddings.model_source(name), config, calibration, max_length=embeddings.PASSAGE_TOKENS, evaluate=False
    )
    seconds = result.report["seconds"]
    return {
        "model": name,
        "fraction": budget,
        "dense": {k: dense[k] for k in ("sts_spearman", "ndcg@10")},
        "float32": {k: exact[k] for k in ("sts_spearman", "ndcg@10", "prune_seconds")},
        "bfloat16": {
            **embeddings.scores(result.model, result.tokenizer, sts, retrieval),
            "fisher_seconds": seconds["fisher"],
            "prune_seconds": sum(v for k, v in seconds.items() if k != "total" and not k.startswith("evaluate")),
        },
    }


def spread(values: list[float]) -> str:
    """Mean ± standard deviation, in points."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * 100:.2f} ± {sd * 100:.2f}"


def write(rows: list[dict], results_dir: Path, embedding_rows: list[dict] | None = None) -> None:
    teachers, cells = task_fraction_cells(rows)
    table = []
    for task, teacher, fraction, cell in cells:
        pairs = []
        for seed in sorted({r["seed"] for r in cell}):
            found = {r["precision"]: r for r in cell if r["seed"] == seed}
            if set(found) == set(PRECISIONS):
                pairs.append((found["float32"], found["bfloat16"]))
        if not pairs:
            continue
        exact = [p[0]["score"] for p in pairs]
        rounded = [p[1]["score"] for p in pairs]
        changes = [(b - a) * 100 for a, b in zip(exact, rounded, strict=True)]
        differ = [
            len({tuple(u) for u in a["kept"]} ^ {tuple(u) for u in b["kept"]}) / 2 for a, b in pairs
        ]  # a unit swapped in for one swapped out counts once
        kept_total = statistics.mean(len(a["kept"]) for a, _ in pairs)
        table.append(
            [
                f"{task} ({teacher['score'] * 100:.2f})",
                f"{fraction:.0%}",
                len(pairs),
                spread(exact),
                spread(rounded),
                " / ".join(f"{c:+.2f}" for c in changes) + f" (mean {statistics.mean(changes):+.2f})",
                f"{statistics.mean(differ):.0f} of {kept_total:.0f}",
                f"{statistics.median(p[0]['fisher_seconds'] for p in pairs):.1f} / "
                f"{statistics.median(p[1]['fisher_seconds'] for p in pairs):.1f}",
            ]
        )
    headers = ["task (teacher)", "FLOPs", "seeds", "float32 Fisher", "bfloat16 Fisher", "change per seed"]
    headers += ["units the plans disagree on", "Fisher s (median) float32 / bfloat16"]
    markdown = (
        "# The budget pruner's Fisher in float32 or under bfloat16 autocast\n\n"
        "MiniLM-L6 teachers converged by bench/teachers.py (dev score in brackets), pruned without retraining by "
        "`slimformer.prune(FlopsBudget(f, seed=s, fisher_precision=p))`, every other setting at its default; each "
        "seed draws one calibration sample of 2,048 training examples, the same for both precisions (so the change "
        "per seed is paired). Under bfloat16 the Fisher's forward passes also record the refit's dense targets "
        "(stored in float32); on a CPU they run eager attention (PyTorch's CPU flash-attention backward is slow in "
        "bfloat16), and the bfloat16 rows were measured again when that changed: before it the change per seed was "
        "-0.11 / +0.15 / -0.69 on SST-2 and +0.01 / +0.00 / -0.01 on STS-B at 50 / 40 / 30% (means). Dev scores: "
        "SST-2 accuracy, STS-B mean of Pearson and Spearman. Units the plans disagree on: heads plus FFN neurons "
        "kept by one plan and not the other, halved. Fisher seconds: runs one after another in one process on 2 "
        "threads, the float32 ones in an earlier session than the bfloat16 ones (a rough guide; whole runs are "
        "timed interleaved in budget_scaling.md).\n\n" + markdown_table(headers, table)
    )
    embedding_rows = embedding_rows or []
    if embedding_rows:
        lines = []
        for r in embedding_rows:
            dense = r["dense"]
            for precision in ("float32", "bfloat16"):
                got = r[precision]
                lines.append(
                    [
                        r["model"],
                        f"{r['fraction']:.0%}",
                        precision,
                        f"{got['sts_spearman'] * 100:.2f} ({got['sts_spearman'] / dense['sts_spearman'] * 100:.1f}%)",
                        f"{got['ndcg@10'] * 100:.2f} ({got['ndcg@10'] / dense['ndcg@10'] * 100:.1f}%)",
                        f"{got['prune_seconds']:.0f}",
                    ]
                )
        markdown += (
            "\n## Sentence-embedding model, label-free\n\n"
            "Pruned as bench/embeddings.py prunes it (2,048 unlabelled calibration texts, probe Fisher, each layer's "
            "Fisher scaled to sum 1), scored on its STS-B dev (Spearman of cosine) and SQuAD retrieval test (nDCG@10); "
            "the float32 row is embeddings.md's, % of the dense model in brackets. Pruning seconds include the "
            "model's loading.\n\n"
            + markdown_table(["model", "FLOPs", "Fisher", "STS-B", "nDCG@10", "pruning s"], lines)
        )
    data = {"machine": machine(), "teachers": teachers, "rows": rows, "embedding_rows": embedding_rows}
    write_results("fisher_precision", data, markdown, results_dir)
    print(markdown)


if __name__ == "__main__":
    main()
