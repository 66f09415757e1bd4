"""The main job on the embedded default model: fine-tune -> score importance -> prune -> recover by distillation
-> evaluate and measure, side by side."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimformer.distill import DistillConfig, distill
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
    console.rule(f"[bold]1/4 fine-tune {model} on {task} ({max_train_samples} examples)")
    config = TrainConfig(max_length=max_length, max_train_samples=max_train_samples, seed=seed)
    tuned = finetune(model, task, out / "finetuned", data_dir=data_dir, config=config, overwrite=True)

    console.rule(f"[bold]2/4 prune {heads:.0%} of heads and {ffn:.0%} of FFN neurons per layer (no retraining)")
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

    console.rule("[bold]3/4 recover: distill the fine-tuned model into the pruned one (same examples, 1 epoch)")
    recover = TrainConfig(max_length=max_length, max_train_samples=max_train_samples, seed=seed, learning_rate=1e-4)
    recovered = distill(
        out / "finetuned",
        out / "pruned",
        task,
        out / "distilled",
        data_dir=data_dir,
        config=recover,
        distill_config=DistillConfig(alpha=0.5, temperature=2.0),
        evaluate_before=False,
        overwrite=True,
        resume=False,
    )

    console.rule("[bold]4/4 measure all three (batch 32 x 128 tokens, 2 threads, median of 10)")
    measured = {}
    for name in ("finetuned", "pruned", "distilled"):
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
        "dev": {
            "finetuned": tuned.metrics["eval"],
            "pruned": pruned.report["eval"]["pruned"],
            "distilled": recovered.metrics["eval"],
        },
        "score": {
            "finetuned": tuned.score,
            "pruned": pruned.report["score"]["pruned"],
            "distilled": recovered.score,
        },
        "distill_seconds": recovered.metrics["train"]["seconds"],
        "plan": pruned.report["summary"],
        "measure": measured,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "summary.json", summary)
    console.print(_table(summary, model, task))
    console.print(f"Outputs in {out}/: finetuned/, pruned/ and distilled/ model folders, summary.json")
    return summary


def _table(summary: dict, model: str, task: str) -> Table:
    measured = summary["measure"]
    names = ("finetuned", "pruned", "distilled")
    table = Table(title=f"slimformer demo: {model} on {task}")
    table.add_column("")
    for title in ("fine-tuned", "pruned", "pruned + KD", "pruned + KD vs fine-tuned"):
        table.add_column(title, justify="right")

    def row(label: str, values: list[str], ratio: str) -> None:
        table.add_row(label, *values, ratio)

    metric = summary["primary_metric"]
    scores = [summary["score"][n] for n in names]
    row(f"dev {metric}", [f"{s:.4f}" for s in scores], f"{scores[2] - scores[0]:+.4f}")
    plan = summary["plan"]
    row("heads", [str(plan["heads"]["before"]), str(plan["heads"]["after"]), str(plan["heads"]["after"])], "")
    neurons = plan["neurons"]
    row("FFN neurons", [str(neurons["before"]), str(neurons["after"]), str(neurons["after"])], "")
    params = [measured[n]["params"]["total"] for n in names]
    row("parameters", [f"{p / 1e6:.2f}M" for p in params], f"{params[2] / params[0]:.2f}x")
    flops = [measured[n]["flops"]["encoder"] for n in names]
    row("encoder GFLOPs (128 tokens)", [f"{f / 1e9:.3f}" for f in flops], f"{flops[2] / flops[0]:.2f}x")
    latency = [measured[n]["latency"]["median_ms"] for n in names]
    row("latency 32 x 128 (ms)", [f"{t:.0f}" for t in latency], f"{latency[0] / latency[2]:.2f}x faster")
    disk = [measured[n]["disk"]["weights_bytes"] for n in names]
    row("weights on disk", [f"{d / 2**20:.1f} MiB" for d in disk], f"{disk[2] / disk[0]:.2f}x")
    row(
        "train examples / seconds",
        [f"{summary['train_samples']} / {summary['train_seconds']:.0f}", "", f"/ {summary['distill_seconds']:.0f}"],
        "",
    )
    row("total time", [f"{summary['total_seconds']:.0f} s", "", ""], "")
    return table
