"""The main job on the embedded default model: fine-tune -> evaluate -> measure -> summary.

Later stages of the pipeline (pruning, distillation) join here as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimformer.io import write_json_atomic
from slimformer.measure import measure_model
from slimformer.models import load_model
from slimformer.train import TrainConfig, finetune


def run_demo(
    out: Path = Path("runs/demo"),
    *,
    model: str = "minilm-l6",
    task: str = "sst2",
    data_dir: Path | None = None,
    max_train_samples: int = 4000,
    max_length: int = 64,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Run the demo end to end and return (and write to ``out/summary.json``) its summary."""
    console = console or Console()
    out = Path(out)
    started = time.perf_counter()
    console.rule(f"[bold]1/2 fine-tune {model} on {task} ({max_train_samples} examples)")
    config = TrainConfig(max_length=max_length, max_train_samples=max_train_samples, seed=seed)
    result = finetune(model, task, out / "finetuned", data_dir=data_dir, config=config, overwrite=True)

    console.rule("[bold]2/2 measure (batch 32 x 128 tokens, 2 threads)")
    loaded = load_model(out / "finetuned")
    measured = measure_model(
        loaded.model, seq_len=128, batch_size=32, threads=2, repeats=10, model_dir=str(out / "finetuned")
    )

    summary = {
        "model": model,
        "task": task,
        "train_samples": result.metrics["train"]["samples"],
        "train_seconds": result.metrics["train"]["seconds"],
        "primary_metric": result.metrics["primary_metric"],
        "dev": result.metrics["eval"],
        "score": result.score,
        "measure": measured,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "summary.json", summary)

    table = Table(title=f"slimformer demo: {model} on {task}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for split, metrics in result.metrics["eval"].items():
        for name, value in metrics.items():
            table.add_row(f"dev {name} ({split})", f"{value:.4f}")
    table.add_row("train examples / seconds", f"{summary['train_samples']} / {summary['train_seconds']:.0f}")
    params = measured["params"]
    table.add_row("parameters (total / encoder)", f"{params['total'] / 1e6:.2f}M / {params['encoder'] / 1e6:.2f}M")
    table.add_row("encoder GFLOPs (1 x 128 tokens)", f"{measured['flops']['encoder'] / 1e9:.3f}")
    if measured.get("latency"):
        latency = measured["latency"]
        table.add_row("latency median (32 x 128, 2 threads)", f"{latency['median_ms']:.1f} ms")
    table.add_row("weights on disk", f"{measured['disk']['weights_bytes'] / 2**20:.1f} MiB")
    table.add_row("total time", f"{summary['total_seconds']:.0f} s")
    console.print(table)
    console.print(f"Outputs in {out}/ (finetuned/ model folder with metrics.json, summary.json)")
    return summary
