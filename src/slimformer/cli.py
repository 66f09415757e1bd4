"""The ``slimformer`` command line: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from slimformer.errors import SlimformerError

app = typer.Typer(
    name="slimformer",
    help="Make pre-trained transformer models smaller and faster for a task, and see which parts matter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'minilm-l6' (embedded), a model folder or a hub id.")]
TaskOpt = Annotated[
    str,
    typer.Option(
        "--task",
        "-t",
        help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or 'custom' with --train-file/--dev-file.",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="GLUE_DIR", help="Local GLUE folder (download_glue_data.py layout)."),
]
TrainFileOpt = Annotated[Path | None, typer.Option(help="Custom task: CSV / TSV / JSONL training file.")]
DevFileOpt = Annotated[Path | None, typer.Option(help="Custom task: CSV / TSV / JSONL dev file.")]
TextColumnsOpt = Annotated[str, typer.Option(help="Custom task: comma-separated text column(s), one or two.")]
LabelColumnOpt = Annotated[str, typer.Option(help="Custom task: the label column.")]
RegressionOpt = Annotated[bool, typer.Option(help="Custom task: the label is a real number.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Maximum tokens per example.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (subsampling, head init, data order).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def _task_data(
    task: str,
    data_dir: Path | None,
    train_file: Path | None,
    dev_file: Path | None,
    text_columns: str,
    label_column: str,
    regression: bool,
    max_train: int | None,
    max_eval: int | None,
    seed: int,
):
    from slimformer.tasks import load_custom_task, load_task

    if task == "custom" or train_file or dev_file:
        if not (train_file or dev_file):
            raise SlimformerError("--task custom needs --train-file and/or --dev-file.")
        return load_custom_task(
            train_file,
            dev_file,
            text_columns=[c.strip() for c in text_columns.split(",") if c.strip()],
            label_column=label_column,
            regression=regression,
            name=task,
            max_train_samples=max_train,
            max_eval_samples=max_eval,
            seed=seed,
        )
    return load_task(task, data_dir, max_train_samples=max_train, max_eval_samples=max_eval, seed=seed)


def _print_eval(metrics: dict) -> None:
    table = Table(title=f"{metrics['task']} ({metrics['data_source']})")
    table.add_column("split")
    names = sorted({k for split in metrics["eval"].values() for k in split})
    for name in names:
        table.add_column(name, justify="right")
    for split, values in metrics["eval"].items():
        table.add_row(split, *(f"{values[n]:.4f}" if n in values else "" for n in names))
    stdout.print(table)


@app.command()
def finetune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder (written when finished).")],
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = "text",
    label_column: LabelColumnOpt = "label",
    regression: RegressionOpt = False,
    max_length: MaxLengthOpt = 128,
    batch_size: Annotated[int, typer.Option(help="Training batch size per device.")] = 32,
    epochs: Annotated[float, typer.Option(help="Training epochs (ignored when --max-steps is set).")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimiser steps (-1: use epochs).")] = -1,
    learning_rate: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 5e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    max_train_samples: Annotated[int | None, typer.Option(help="Random subset of the train split.")] = None,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (for resuming).")] = 200,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option(help="Resume from the last complete checkpoint if there is one.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Fine-tune a model on a task, evaluate it on dev and save it with metrics.json.

    Runs on several GPUs unchanged under `accelerate launch -m slimformer.cli finetune ...`.
    """
    from slimformer.train import TrainConfig
    from slimformer.train import finetune as run_finetune

    config = TrainConfig(
        max_length=max_length,
        batch_size=batch_size,
        epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        seed=seed,
        save_steps=save_steps,
    )
    data = _task_data(
        task,
        data_dir,
        train_file,
        dev_file,
        text_columns,
        label_column,
        regression,
        max_train_samples,
        max_eval_samples,
        seed,
    )
    result = run_finetune(model, data, out, config=config, resume=resume, overwrite=overwrite)
    if result.metrics:
        _print_eval(result.metrics)
        train = result.metrics["train"]
        stdout.print(
            f"{result.metrics['primary_metric']}: [bold]{result.score:.4f}[/bold]  "
            f"({train['samples']} examples, {train['steps']} steps, {train['seconds']:.0f} s)  -> {out}"
        )


@app.command()
def evaluate(
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = "text",
    label_column: LabelColumnOpt = "label",
    regression: RegressionOpt = False,
    max_length: MaxLengthOpt = 128,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 64,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    seed: SeedOpt = 0,
    output: Annotated[Path | None, typer.Option(help="Also write the metrics to this JSON file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a model on a task's dev split(s) with the task's official metrics."""
    from slimformer.io import write_json_atomic
    from slimformer.train import evaluate as run_evaluate

    data = _task_data(
        task, data_dir, None, dev_file, text_columns, label_column, regression, None, max_eval_samples, seed
    )
    metrics = run_evaluate(model, data, max_length=max_length, batch_size=batch_size)
    if output:
        write_json_atomic(output, metrics)
    if as_json:
        stdout.print_json(json.dumps(metrics))
    else:
        _print_eval(metrics)


@app.command()
def measure(
    model: ModelOpt = "minilm-l6",
    seq_len: Annotated[int, typer.Option(help="Sequence length for FLOPs and latency.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Batch size for latency.")] = 32,
    threads: Annotated[int, typer.Option(help="CPU threads for latency.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed repeats (after warm-up).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 3,
    latency: Annotated[bool, typer.Option(help="Measure latency (slowest part).")] = True,
    output: Annotated[Path | None, typer.Option(help="Also write the result to this JSON file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Parameters, analytic FLOPs by component, latency (median over repeats) and size on disk."""
    from slimformer.io import write_json_atomic
    from slimformer.measure import measure_model, measurements_table
    from slimformer.models import load_model, resolve_model_source

    loaded = load_model(model)
    source, local = resolve_model_source(model)
    result = measure_model(
        loaded.model,
        seq_len=seq_len,
        batch_size=batch_size,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        model_dir=source if local else None,
        latency=latency,
    )
    result["model"] = str(model)
    if output:
        write_json_atomic(output, result)
    if as_json:
        stdout.print_json(json.dumps(result))
    else:
        stdout.print(measurements_table(result))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("runs/demo"),
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    max_train_samples: Annotated[int, typer.Option(help="Training subset size.")] = 4000,
    max_length: MaxLengthOpt = 64,
    seed: SeedOpt = 0,
) -> None:
    """The main job on the embedded default: fine-tune, evaluate on dev, measure, summarise."""
    from slimformer.demo import run_demo

    run_demo(
        out=out,
        model=model,
        task=task,
        data_dir=data_dir,
        max_train_samples=max_train_samples,
        max_length=max_length,
        seed=seed,
        console=stdout,
    )


def main() -> None:
    """Entry point: run the CLI; a SlimformerError prints its message (no traceback) and exits with 2."""
    try:
        app()
    except SlimformerError as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished outputs are intact; run again to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
