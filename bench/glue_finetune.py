"""Benchmark: MiniLM-L6 fine-tuned on SST-2, MRPC and STS-B (real GLUE files), dev scores and wall times.

Each task's run is resumable (slimformer's checkpoints) and a finished task is not re-run, so the script can be
stopped and restarted. The fine-tuned models stay in runs/bench/<task>/ for later benchmarks (pruning).

    python bench/glue_finetune.py [--tasks sst2,mrpc,stsb]
"""

from __future__ import annotations

import argparse
import json
import time

from common import RUNS, glue_dir, machine, markdown_table, write_results
from slimformer.train import METRICS_FILE, TrainConfig, finetune

# Subset sizes chosen to fit a 2-core machine: SST-2 matches the reference run (20,000 sentences, 1 epoch,
# length 64); MRPC and STS-B use their whole train sets for 3 epochs.
RUNS_BY_TASK = {
    "sst2": TrainConfig(max_train_samples=20000, epochs=1, max_length=64, learning_rate=5e-5, seed=0),
    "mrpc": TrainConfig(epochs=3, max_length=128, learning_rate=5e-5, warmup_steps=20, seed=0),
    "stsb": TrainConfig(epochs=3, max_length=128, learning_rate=5e-5, warmup_steps=30, seed=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="sst2,mrpc,stsb")
    args = parser.parse_args()
    results = {}
    for task in args.tasks.split(","):
        out = RUNS / task
        config = RUNS_BY_TASK[task]
        if (out / METRICS_FILE).is_file():
            metrics = json.loads((out / METRICS_FILE).read_text())
        else:
            started = time.perf_counter()
            metrics = finetune("minilm-l6", task, out, data_dir=glue_dir(), config=config, overwrite=True).metrics
            metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
        results[task] = metrics
        print(task, json.dumps(metrics["eval"]), flush=True)

    rows = []
    for task, metrics in results.items():
        config = metrics["config"]
        dev = "; ".join(
            f"{name} {value * 100:.2f}" for split in metrics["eval"].values() for name, value in split.items()
        )
        rows.append(
            [
                task,
                dev,
                metrics["train"]["samples"],
                config["epochs"],
                config["max_length"],
                config["learning_rate"],
                metrics["train"]["steps"],
                f"{metrics['train']['seconds']:.0f}",
                f"{metrics['eval_seconds']:.0f}",
            ]
        )
    headers = [
        "task",
        "dev metrics (x100)",
        "train examples",
        "epochs",
        "max length",
        "lr",
        "steps",
        "train s",
        "eval s",
    ]
    markdown = (
        "# MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned with slimformer on GLUE\n\n"
        "Hugging Face Trainer, batch 32, seed 0, 2 CPU cores; dev = the official GLUE dev set. Train seconds are wall "
        "time of the training loop; the runs recorded here shared the 2 cores with other jobs (tests, other "
        "benchmarks), so they are slower than on an idle machine (the reference SST-2 run takes ~8 minutes).\n\n"
        + markdown_table(headers, rows)
    )
    write_results("glue_finetune", {"machine": machine(), "results": results}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
