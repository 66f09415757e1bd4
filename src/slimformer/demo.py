"""The main job on the embedded default model: fine-tune -> score importance -> prune -> evaluate -> measure.

Later stages of the pipeline (budget pruning, distillation) join here as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimformer.io import write_json_atomic
from slimformer.measure import measure_model
from slimformer.models import load_model
from slimformer.prune.pipeline import prune_model
from slimformer.train import TrainConfig, finetune


def run_demo(
    out: Path = Path("runs/demo"),
    *,
    model: str = "minilm-l6",
    task: str = "sst2",
    data_dir: Path | None = None,
    max_train_samples: int = 4000,
    max_length: int = 64,
    heads: float = 0.5,
    ffn: float = 0.5,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Run the demo end to end and return (and write to ``out/summary.json``) its summary."""
    console = console or Console()
    out = Path(out)
    started = time.perf_counter()
    console.rule(f"[bold]1/3 fine-tune {model} on {task} ({max_train_samples} examples)")
    config = TrainConfig(max_length=max_length, max_train_samples=max_train_samples, seed=seed)
    tuned = finetune(model, task, out / "finetuned", data_dir=data_dir, config=config, overwrite=True)

    console.rule(f"[bold]2/3 prune {heads:.0%} of heads and {ffn:.0%} of FFN neurons per layer (no retraining)")
    pruned = prune_model(
        out / "finetuned",
        task,
        out / "pruned",
        data_dir=data_dir,
        heads=heads,
        ffn=ffn,
        scope="layer",
        method="gradient",
        n_examples=256,
        max_length=max_length,
        seed=seed,
        overwrite=True,
    )

    console.rule("[bold]3/3 measure both (batch 32 x 128 tokens, 2 threads, median of 10)")
    measured = {}
    for name in ("finetuned", "pruned"):
        loaded = load_model(out / name)
        measured[name] = measure_model(
            loaded.model, seq_len=128, batch_size=32, threads=2, repeats=10, model_dir=str(out / name)
        )

    summary = {
        "model": model,
        "task": task,
        "train_samples": tuned.metrics["train"]["samples"],
        "train_seconds": tuned.metrics["train"]["seconds"],
        "primary_metric": tuned.metrics["primary_metric"],
        "dev": {"finetuned": tuned.metrics["eval"], "pruned": pruned.report["eval"]["pruned"]},
        "score": {"finetuned": tuned.score, "pruned": pruned.report["score"]["pruned"]},
        "plan": pruned.report["summary"],
        "measure": measured,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "summary.json", summary)
    console.print(_table(summary, model, task))
    console.print(f"Outputs in {out}/: finetuned/ and pruned/ model folders, summary.json")
    return summary


def _table(summary: dict, model: str, task: str) -> Table:
    dense, small = summary["measure"]["finetuned"], summary["measure"]["pruned"]
    table = Table(title=f"slimformer demo: {model} on {task}")
    table.add_column("")
    table.add_column("fine-tuned", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("ratio", justify="right")
    metric = summary["primary_metric"]
    before, after = summary["score"]["finetuned"], summary["score"]["pruned"]
    table.add_row(f"dev {metric}", f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    plan = summary["plan"]
    table.add_row("heads", str(plan["heads"]["before"]), str(plan["heads"]["after"]), "")
    table.add_row("FFN neurons", str(plan["neurons"]["before"]), str(plan["neurons"]["after"]), "")
    p0, p1 = dense["params"]["total"], small["params"]["total"]
    table.add_row("parameters", f"{p0 / 1e6:.2f}M", f"{p1 / 1e6:.2f}M", f"{p1 / p0:.2f}x")
    f0, f1 = dense["flops"]["encoder"], small["flops"]["encoder"]
    table.add_row("encoder GFLOPs (128 tokens)", f"{f0 / 1e9:.3f}", f"{f1 / 1e9:.3f}", f"{f1 / f0:.2f}x")
    l0, l1 = dense["latency"]["median_ms"], small["latency"]["median_ms"]
    table.add_row("latency 32 x 128 (ms)", f"{l0:.0f}", f"{l1:.0f}", f"{l0 / l1:.2f}x faster")
    d0, d1 = dense["disk"]["weights_bytes"], small["disk"]["weights_bytes"]
    table.add_row("weights on disk", f"{d0 / 2**20:.1f} MiB", f"{d1 / 2**20:.1f} MiB", f"{d1 / d0:.2f}x")
    table.add_row("train examples / seconds", f"{summary['train_samples']} / {summary['train_seconds']:.0f}", "", "")
    table.add_row("total time", f"{summary['total_seconds']:.0f} s", "", "")
    return table
