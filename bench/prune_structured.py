"""Benchmark: structured pruning of MiniLM-L6 fine-tuned on SST-2 (runs/bench/sst2, from glue_finetune.py).

(i)  Dev accuracy vs fraction of heads masked, in importance order (Michel et al. 2019, gradient importance) vs
     random order (mean and spread over seeds), like Michel et al.'s Fig. 3. One-shot: scores computed once.
(ii) Plans removing 25 / 50 / 75% of heads and FFN neurons in every layer (physically removed, no retraining):
     accuracy, parameters, encoder FLOPs, measured CPU latency (batch 32 x 128 tokens, 2 threads) against the
     dense model in the same run, and speedup divided by FLOPs reduction.

    python bench/prune_structured.py [--importance-examples 512] [--random-seeds 3] [--rounds 3 --repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np

from common import RESULTS, RUNS, glue_dir, interleaved_latency, machine, markdown_table, write_results
from slimformer.evaluation import evaluate_model
from slimformer.importance import score_model
from slimformer.measure import count_parameters, flops
from slimformer.models import load_model
from slimformer.plots import plot_curve
from slimformer.prune import masked, plan_from_scores, remove
from slimformer.tasks import load_task

MAX_LENGTH = 64  # the length the model was fine-tuned with; latency is measured at 128 tokens as the issue asks
FRACTIONS = [round(0.1 * i, 1) for i in range(11)]


def accuracy(model, tokenizer, data) -> float:
    return evaluate_model(model, tokenizer, data, max_length=MAX_LENGTH, progress=False)["dev"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--importance-examples", type=int, default=512)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model per round")
    args = parser.parse_args()

    loaded = load_model(RUNS / "sst2")
    model, tokenizer = loaded.model, loaded.tokenizer
    data = load_task("sst2", glue_dir())
    started = time.perf_counter()
    scores = score_model(
        model,
        tokenizer,
        data,
        method="gradient",
        n_examples=args.importance_examples,
        batch_size=32,
        max_length=MAX_LENGTH,
        seed=0,
    )
    importance_seconds = time.perf_counter() - started
    dense_acc = accuracy(model, tokenizer, data)
    print(f"dense accuracy {dense_acc:.4f}; importance {importance_seconds:.1f} s", flush=True)

    # (i) accuracy vs fraction of heads masked --------------------------------------------------------------
    curve = []
    for fraction in FRACTIONS:
        plan = plan_from_scores(model, scores.heads, heads=fraction)
        with masked(model, plan):
            by_importance = accuracy(model, tokenizer, data)
        randoms = []
        for seed in range(args.random_seeds):
            rng = np.random.default_rng(1000 + seed)
            random_scores = [rng.random(len(h)) for h in scores.heads]
            with masked(model, plan_from_scores(model, random_scores, heads=fraction)):
                randoms.append(accuracy(model, tokenizer, data))
        point = {
            "fraction_heads_masked": fraction,
            "heads_kept": plan.summary(model)["heads"]["after"],
            "accuracy_importance_order": by_importance,
            "accuracy_random_order_mean": statistics.mean(randoms),
            "accuracy_random_order_std": statistics.pstdev(randoms),
            "accuracy_random_order": randoms,
        }
        curve.append(point)
        print(point, flush=True)
    plot_curve(
        [p["fraction_heads_masked"] for p in curve],
        {
            "importance order (Michel et al.)": [p["accuracy_importance_order"] for p in curve],
            f"random order (mean of {args.random_seeds})": [p["accuracy_random_order_mean"] for p in curve],
        },
        RESULTS / "prune_heads_curve.png",
        xlabel="fraction of heads masked",
        ylabel="SST-2 dev accuracy",
        title="MiniLM-L6 on SST-2: masking heads without retraining",
    )

    # (ii) physically pruned plans: accuracy, size, FLOPs, latency -----------------------------------------
    models = {"dense": model}
    plans = {}
    for fraction in (0.25, 0.5, 0.75):
        plan = plan_from_scores(model, scores.heads, scores.neurons, heads=fraction, ffn=fraction, scope="layer")
        plans[f"prune {fraction:.0%}"] = plan
        models[f"prune {fraction:.0%}"] = remove(copy.deepcopy(model), plan)
    samples = interleaved_latency(models, rounds=args.rounds, repeats=args.repeats)
    rows, table = [], []
    dense_flops = flops(model, seq_len=128).encoder
    dense_ms = statistics.median(samples["dense"])
    for name, net in models.items():
        median_ms = statistics.median(samples[name])
        encoder_flops = flops(net, seq_len=128).encoder
        speedup = dense_ms / median_ms
        flops_reduction = dense_flops / encoder_flops
        row = {
            "model": name,
            "accuracy": accuracy(net, tokenizer, data),
            "params": count_parameters(net).total,
            "encoder_params": count_parameters(net).encoder,
            "encoder_gflops_seq128": encoder_flops / 1e9,
            "latency_median_ms": median_ms,
            "latency_p10_ms": float(np.percentile(samples[name], 10)),
            "latency_p90_ms": float(np.percentile(samples[name], 90)),
            "latency_samples": len(samples[name]),
            "speedup": speedup,
            "flops_reduction": flops_reduction,
            "speedup_over_flops_reduction": speedup / flops_reduction,
            "heads_per_layer": plans[name].summary(model)["heads_per_layer"] if name in plans else None,
        }
        rows.append(row)
        table.append(
            [
                name,
                f"{row['accuracy'] * 100:.2f}",
                f"{row['params'] / 1e6:.2f}M",
                f"{row['encoder_params'] / 1e6:.2f}M",
                f"{row['encoder_gflops_seq128']:.3f}",
                f"{median_ms:.0f} ({row['latency_p10_ms']:.0f}-{row['latency_p90_ms']:.0f})",
                f"{speedup:.2f}x",
                f"{flops_reduction:.2f}x",
                f"{row['speedup_over_flops_reduction']:.2f}",
            ]
        )
        print(row, flush=True)

    curve_table = [
        [
            p["fraction_heads_masked"],
            p["heads_kept"],
            f"{p['accuracy_importance_order'] * 100:.2f}",
            f"{p['accuracy_random_order_mean'] * 100:.2f} ± {p['accuracy_random_order_std'] * 100:.2f}",
        ]
        for p in curve
    ]
    markdown = (
        "# Structured pruning of MiniLM-L6 fine-tuned on SST-2 (no retraining)\n\n"
        f"Model: runs/bench/sst2 (dense dev accuracy {dense_acc * 100:.2f}). Gradient head/neuron importance "
        f"(Michel et al. 2019) on {args.importance_examples} training sentences, {importance_seconds:.0f} s. "
        f"Evaluation: the 872 SST-2 dev sentences, max length {MAX_LENGTH}.\n\n"
        "## (i) Accuracy vs fraction of heads masked (one-shot, global ranking)\n\n"
        + markdown_table(
            ["fraction masked", "heads kept", "importance order", "random order (mean ± std)"], curve_table
        )
        + "\n![curve](prune_heads_curve.png)\n\n"
        "## (ii) Heads and FFN neurons physically removed in every layer\n\n"
        f"Latency: batch 32 x 128 tokens, 2 threads, median of {args.rounds} interleaved rounds x {args.repeats} runs "
        "per model (p10-p90 in brackets); speedup and FLOPs reduction against the dense model of the same run.\n\n"
        + markdown_table(
            [
                "model",
                "accuracy",
                "params",
                "encoder params",
                "encoder GFLOPs (128)",
                "latency ms",
                "speedup",
                "FLOPs reduction",
                "speedup / FLOPs reduction",
            ],
            table,
        )
    )
    write_results(
        "prune_structured",
        {
            "machine": machine(),
            "dense_accuracy": dense_acc,
            "importance_seconds": importance_seconds,
            "importance_examples": args.importance_examples,
            "curve": curve,
            "plans": rows,
        },
        markdown,
    )
    print(markdown)


if __name__ == "__main__":
    main()
