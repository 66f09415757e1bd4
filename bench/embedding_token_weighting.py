"""Does weighting the refit's calibration tokens by the loss's sensitivity help sentence-embedding models? (issue 14)

all-MiniLM-L6-v2 pruned label-free to a FLOPs budget exactly as bench/embeddings.py prunes it (its calibration
texts and split), once per ``FlopsBudget(token_weighting=...)``: 0 weighs every token alike (the default), 1 each
token by the squared gradient of the embedding probe loss at its sub-layer output, 0.5 half of each. Scored on
STS-B dev (Spearman of cosine) and retrieval nDCG@10 / recall@10 on the held-out SQuAD articles; several
calibration seeds. Rows already in the results file are kept (rerunning resumes).

    PYTHONPATH=src:bench python bench/embedding_token_weighting.py --budgets 0.5 --weightings 0,0.5,1 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import slimformer
from common import RESULTS, machine, markdown_table, write_results
from embeddings import calibration_texts, model_source, scores, split_articles, text_task
from slimformer.evaluation import PASSAGE_TOKENS
from slimformer.models import load_model
from slimformer.tasks import load_task

NAME = "embedding_token_weighting"


def run(model: str, budget: float, weighting: float, seed: int, calibration, sts, retrieval) -> dict:
    started = time.perf_counter()
    config = slimformer.FlopsBudget(budget, token_weighting=weighting, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        slimformer.prune(
            model_source(model),
            config,
            calibration,
            out=f"{tmp}/m",
            max_length=PASSAGE_TOKENS,
            evaluate=False,
            progress=False,
        )
        pruned = load_model(f"{tmp}/m")
        measured = scores(pruned.model, pruned.tokenizer, sts, retrieval)
    return {
        "model": model,
        "budget": budget,
        "token_weighting": weighting,
        "seed": seed,
        **measured,
        "seconds": round(time.perf_counter() - started, 1),
    }


def summary(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} (n={len(values)})"


def write(rows: list[dict], results_dir: Path) -> None:
    table = []
    groups = sorted({(r["model"], r["budget"], r["token_weighting"]) for r in rows}, key=lambda g: (g[0], -g[1], g[2]))
    for model, budget, weighting in groups:
        chosen = [r for r in rows if (r["model"], r["budget"], r["token_weighting"]) == (model, budget, weighting)]
        table.append(
            [
                model,
                f"{budget:.0%}",
                f"{weighting:g}",
                summary([100 * r["sts_spearman"] for r in chosen]),
                summary([100 * r["ndcg@10"] for r in chosen]),
                summary([100 * r["recall@10"] for r in chosen]),
            ]
        )
    markdown = (
        "# Refit tokens weighted by sensitivity on sentence-embedding models (label-free budget pruning)\n\n"
        "Dense all-MiniLM-L6-v2 (minilm-l6): STS-B 86.72, nDCG@10 79.44; all-mpnet-base-v2 (mpnet): 88.11, 81.86 "
        "(bench/results/embeddings.md). Mean ± standard deviation over "
        "calibration seeds (n runs), retraining-free, the calibration texts and split of bench/embeddings.py. "
        "`token_weighting` 0 is the default (every calibration token alike in the least-squares refit); 1 weighs "
        "each by the squared gradient of the embedding probe loss at its sub-layer output. Processor features: "
        f"{', '.join(machine().get('cpu_features', [])) or 'not recorded'}.\n\n"
        + markdown_table(["model", "FLOPs", "token_weighting", "STS-B Spearman", "nDCG@10", "recall@10"], table)
    )
    write_results(NAME, {"machine": machine(), "rows": rows}, markdown, results_dir)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6", help="minilm-l6 or mpnet")
    parser.add_argument("--budgets", default="0.5")
    parser.add_argument("--weightings", default="0,0.5,1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    results_file = args.results_dir / f"{NAME}.json"
    rows = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    for row in rows:
        row.setdefault("model", "minilm-l6")  # the first rows ran before mpnet did
    sts = load_task("stsb-embed")
    retrieval, texts = split_articles(load_task("squad-retrieval"))
    for seed in [int(s) for s in args.seeds.split(",")]:
        calibration = text_task(sts, calibration_texts(sts, texts, 2048, seed=seed), "calibration texts")
        for budget in [float(b) for b in args.budgets.split(",")]:
            for weighting in [float(w) for w in args.weightings.split(",")]:
                done = (args.model, budget, weighting, seed)
                if any(
                    (r.get("model", "minilm-l6"), r["budget"], r["token_weighting"], r["seed"]) == done for r in rows
                ):
                    continue
                rows.append(run(args.model, budget, weighting, seed, calibration, sts, retrieval))
                print(json.dumps(rows[-1]), flush=True)
                write(rows, args.results_dir)
    write(rows, args.results_dir)


if __name__ == "__main__":
    main()
