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
BatchSizeOpt = Annotated[int, typer.Option(help="Training batch size per device.")]
EpochsOpt = Annotated[float, typer.Option(help="Training epochs (ignored when --max-steps is set).")]
MaxStepsOpt = Annotated[int, typer.Option(help="Stop after this many optimiser steps (-1: use epochs).")]
LearningRateOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warm-up steps.")]
MaxTrainOpt = Annotated[int | None, typer.Option(help="Random subset of the train split.")]
SaveStepsOpt = Annotated[int, typer.Option(help="Checkpoint every N steps (for resuming).")]
ResumeOpt = Annotated[bool, typer.Option(help="Resume from the last complete checkpoint if there is one.")]
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


def _training_inputs(options: dict) -> tuple:
    """The TrainConfig and task data of a training command, from its options (``locals()`` of the command)."""
    from slimformer.train import TrainConfig

    names = ("max_length", "batch_size", "epochs", "max_steps", "learning_rate", "warmup_steps")
    names += ("max_train_samples", "max_eval_samples", "seed", "save_steps")
    config = TrainConfig(**{name: options[name] for name in names})
    data = _task_data(
        options["task"],
        options["data_dir"],
        options["train_file"],
        options["dev_file"],
        options["text_columns"],
        options["label_column"],
        options["regression"],
        options["max_train_samples"],
        options["max_eval_samples"],
        options["seed"],
    )
    return config, data


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
    batch_size: BatchSizeOpt = 32,
    epochs: EpochsOpt = 1.0,
    max_steps: MaxStepsOpt = -1,
    learning_rate: LearningRateOpt = 5e-5,
    warmup_steps: WarmupOpt = 0,
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    save_steps: SaveStepsOpt = 200,
    seed: SeedOpt = 0,
    resume: ResumeOpt = True,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Fine-tune a model on a task, evaluate it on dev and save it with metrics.json.

    Runs on several GPUs unchanged under `accelerate launch -m slimformer.cli finetune ...`.
    """
    from slimformer.train import finetune as run_finetune

    config, data = _training_inputs(locals())
    result = run_finetune(model, data, out, config=config, resume=resume, overwrite=overwrite)
    if result.metrics:
        _print_eval(result.metrics)
        train = result.metrics["train"]
        stdout.print(
            f"{result.metrics['primary_metric']}: [bold]{result.score:.4f}[/bold]  "
            f"({train['samples']} examples, {train['steps']} steps, {train['seconds']:.0f} s)  -> {out}"
        )


@app.command()
def distill(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output student folder (written when finished).")],
    teacher: Annotated[str, typer.Option(help="The fine-tuned teacher: a model folder or hub id.")],
    student: Annotated[
        str,
        typer.Option(
            help="A model folder (e.g. from `slimformer prune`), or made from the teacher: 'drop:STRATEGY:K' "
            "(Sajjad et al. 2020: top, bottom, alternate, symmetric, contribution), 'every:K' (DistilBERT-style: "
            "every K-th teacher layer) or 'layers:0,2,4'."
        ),
    ],
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = "text",
    label_column: LabelColumnOpt = "label",
    regression: RegressionOpt = False,
    alpha: Annotated[
        float, typer.Option(help="Weight of the logit distillation loss; the task loss gets 1-alpha.")
    ] = 0.5,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit distillation loss.")] = 2.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of TinyBERT-style hidden-state MSE (0: off).")] = 0.0,
    attention_weight: Annotated[float, typer.Option(help="Weight of attention-distribution KL (0: off).")] = 0.0,
    layer_map: Annotated[
        str, typer.Option(help="'auto' or student:teacher layer pairs such as 0:1,1:3,2:5 (0-based).")
    ] = "auto",
    cache_teacher: Annotated[
        bool, typer.Option(help="Cache the teacher's logits on the training set on disk (logit-only runs).")
    ] = True,
    max_length: MaxLengthOpt = 128,
    batch_size: BatchSizeOpt = 32,
    epochs: EpochsOpt = 1.0,
    max_steps: MaxStepsOpt = -1,
    learning_rate: LearningRateOpt = 5e-5,
    warmup_steps: WarmupOpt = 0,
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    save_steps: SaveStepsOpt = 200,
    seed: SeedOpt = 0,
    resume: ResumeOpt = True,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Distill a fine-tuned teacher into a smaller student (logit KD, optionally TinyBERT-style layer KD).

    Runs on several GPUs unchanged under `accelerate launch -m slimformer.cli distill ...`.
    """
    from slimformer.distill import DistillConfig
    from slimformer.distill import distill as run_distill

    config, data = _training_inputs(locals())
    settings = DistillConfig(
        alpha=alpha,
        temperature=temperature,
        hidden_weight=hidden_weight,
        attention_weight=attention_weight,
        layer_map=layer_map,
        cache_teacher=cache_teacher,
    )
    result = run_distill(
        teacher, student, data, out, config=config, distill_config=settings, resume=resume, overwrite=overwrite
    )
    if result.metrics:
        _print_eval(result.metrics)
        m = result.metrics
        nan = float("nan")
        before = f"teacher {m.get('teacher_score', nan):.4f}  student before {m.get('student_score_before', nan):.4f}"
        train = m["train"]
        stdout.print(
            f"{before}  after [bold]{m['score']:.4f}[/bold]  ({train['steps']} steps, {train['seconds']:.0f} s)"
            f"  -> {out}"
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
    from slimformer.evaluation import evaluate as run_evaluate
    from slimformer.io import write_json_atomic

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


MethodOpt = Annotated[str, typer.Option(help="Importance: gradient (Michel et al. 2019), fisher, magnitude or random.")]
ExamplesOpt = Annotated[int, typer.Option(help="Training examples to score importance on.")]
LabelFreeOpt = Annotated[bool, typer.Option(help="Score with the model's own predictions instead of labels.")]


@app.command()
def importance(
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for scores JSON and heatmap PNG.")] = Path(
        "runs/importance"
    ),
    method: MethodOpt = "gradient",
    n_examples: ExamplesOpt = 256,
    batch_size: Annotated[int, typer.Option(help="Batch size for scoring.")] = 32,
    max_length: MaxLengthOpt = 128,
    label_free: LabelFreeOpt = False,
    seed: SeedOpt = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="Reuse scores computed before (keyed by a hash).")] = None,
) -> None:
    """Head and FFN-neuron importance scores: JSON plus a layers x heads heatmap."""
    from slimformer.importance import score_model
    from slimformer.models import load_model
    from slimformer.plots import plot_head_importance
    from slimformer.tasks import load_task

    data = load_task(task, data_dir, seed=seed)
    loaded = load_model(model, data.spec)
    scores = score_model(
        loaded.model,
        loaded.tokenizer,
        data,
        method=method,
        n_examples=n_examples,
        batch_size=batch_size,
        max_length=max_length,
        label_free=label_free,
        seed=seed,
        cache_dir=cache_dir,
    )
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / "importance.json")
    plot_head_importance(
        scores.head_matrix(), out / "head_importance.png", title=f"Head importance ({method}) on {data.spec.name}"
    )
    matrix = scores.head_matrix()
    table = Table(title=f"head importance ({method}), rows = layers")
    table.add_column("layer")
    for head in range(matrix.shape[1]):
        table.add_column(str(head), justify="right")
    for layer, row in enumerate(matrix):
        table.add_row(str(layer), *("" if value != value else f"{value:.2f}" for value in row))
    stdout.print(table)
    stdout.print(f"Scores: {out / 'importance.json'}  heatmap: {out / 'head_importance.png'}")


@app.command()
def prune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned model.")],
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    heads: Annotated[float, typer.Option(help="Fraction of attention heads to remove (0.5 = half).")] = 0.0,
    ffn: Annotated[float, typer.Option(help="Fraction of FFN neurons to remove.")] = 0.0,
    plan: Annotated[Path | None, typer.Option(help="Apply this plan.json instead of scoring.")] = None,
    iterative: Annotated[bool, typer.Option(help="Prune heads and MLPs iteratively until the score drops.")] = False,
    drop_layers: Annotated[
        str | None,
        typer.Option(help="Drop whole layers (Sajjad et al. 2020): top|bottom|alternate|symmetric|contribution:K."),
    ] = None,
    budget_flops: Annotated[
        float | None, typer.Option(help="Retraining-free (Kwon et al. 2022): keep this fraction of encoder FLOPs.")
    ] = None,
    budget_latency: Annotated[
        float | None, typer.Option(help="Retraining-free: keep this fraction of measured latency (lookup table).")
    ] = None,
    calibration_examples: Annotated[int, typer.Option(help="Budget pruning: calibration examples.")] = 2048,
    rearrange: Annotated[bool, typer.Option(help="Budget pruning: rearrange masks by the layer Fisher.")] = True,
    tune: Annotated[
        str,
        typer.Option(
            help="Budget pruning, after the search: weights (refit the kept output/down projection weights by "
            "least squares), scales (Kwon et al.'s one scale per head/neuron) or none."
        ),
    ] = "weights",
    keep_score: Annotated[float, typer.Option(help="Iterative: stop below this fraction of the dense score.")] = 0.9,
    step: Annotated[float, typer.Option(help="Iterative: fraction of remaining heads pruned per step.")] = 0.1,
    method: MethodOpt = "gradient",
    scope: Annotated[str, typer.Option(help="global (rank across layers) or layer (same fraction each).")] = "global",
    min_heads_per_layer: Annotated[int, typer.Option(help="Keep at least this many heads per layer.")] = 0,
    ffn_multiple: Annotated[int, typer.Option(help="Round kept FFN widths to a multiple of 8/16/32/64.")] = 1,
    n_examples: ExamplesOpt = 256,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    label_free: LabelFreeOpt = False,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Remove attention heads and FFN neurons for real (smaller, faster), evaluate and save the model."""
    if budget_flops is not None or budget_latency is not None:
        if heads or ffn or plan or iterative or drop_layers:
            raise SlimformerError("A --budget-* choice cannot be combined with --heads/--ffn, --plan or --iterative.")
        from slimformer.budget.pipeline import budget_prune

        result = budget_prune(
            model,
            task,
            out,
            data_dir=data_dir,
            budget_flops=budget_flops,
            budget_latency=budget_latency,
            n_calibration=calibration_examples,
            rearrange_masks=rearrange,
            tune=tune,
            max_length=max_length,
            label_free=label_free,
            seed=seed,
            overwrite=overwrite,
        )
        _print_budget_report(result.report, out)
        return
    from slimformer.prune.pipeline import prune_model

    result = prune_model(
        model,
        task,
        out,
        data_dir=data_dir,
        heads=heads,
        ffn=ffn,
        plan=plan,
        iterative=iterative,
        keep_score=keep_score,
        step=step,
        method=method,
        scope=scope,
        min_heads_per_layer=min_heads_per_layer,
        ffn_multiple=ffn_multiple,
        n_examples=n_examples,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        label_free=label_free,
        drop_layers=drop_layers,
        seed=seed,
        overwrite=overwrite,
    )
    report = result.report
    summary = report["summary"]
    table = Table(title=f"pruned {model} for {report['task']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if "score" in report:
        table.add_row(report["primary_metric"], f"{report['score']['dense']:.4f}", f"{report['score']['pruned']:.4f}")
    for key in ("layers", "heads", "neurons"):
        table.add_row(key, str(summary[key]["before"]), str(summary[key]["after"]))
    table.add_row("parameters", f"{summary['params']['before'] / 1e6:.2f}M", f"{summary['params']['after'] / 1e6:.2f}M")
    fl = summary["encoder_flops"]
    table.add_row(f"encoder GFLOPs (seq {fl['seq_len']})", f"{fl['before'] / 1e9:.3f}", f"{fl['after'] / 1e9:.3f}")
    stdout.print(table)
    stdout.print(f"heads kept per layer: {summary['heads_per_layer']}")
    stdout.print(f"-> {out} (model, plan.json, metrics.json)")


def _print_budget_report(report: dict, out: Path) -> None:
    table = Table(title=f"{report['method']} for {report['task']}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    score = report["score"]
    table.add_row(score["metric"], f"{score['dense']:.4f}", f"{score['pruned']:.4f}")
    fl = report["encoder_flops"]
    table.add_row("encoder GFLOPs", f"{fl['dense'] / 1e9:.3f}", f"{fl['pruned'] / 1e9:.3f}")
    summary = report["summary"]
    table.add_row("parameters", f"{summary['params']['before'] / 1e6:.2f}M", f"{summary['params']['after'] / 1e6:.2f}M")
    latency = report["latency"]
    table.add_row("latency (ms)", f"{latency['dense']['median_ms']:.0f}", f"{latency['pruned']['median_ms']:.0f}")
    stdout.print(table)
    stdout.print(f"heads per layer {summary['heads_per_layer']}, neurons per layer {summary['neurons_per_layer']}")
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report["phases_seconds"].items())
    stdout.print(f"speedup {latency['speedup']:.2f}x; pruning took {report['pruning_seconds']:.0f} s ({phases})")
    stdout.print(f"-> {out} (model, plan.json, metrics.json)")


@app.command()
def export(
    onnx: Annotated[Path, typer.Option("--onnx", help="Path of the .onnx file to write.")],
    model: ModelOpt = "minilm-l6",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    check: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch outputs.")] = True,
) -> None:
    """Export a (pruned) model to ONNX and check it against PyTorch with onnxruntime."""
    from slimformer.export import export_onnx
    from slimformer.models import load_model

    loaded = load_model(model)
    result = export_onnx(loaded.model, onnx, opset=opset, check=check)
    diff = "" if result.max_abs_diff is None else f", max |onnx - torch| = {result.max_abs_diff:.2e}"
    stdout.print(f"{onnx}: {result.size_bytes / 2**20:.1f} MiB, opset {result.opset}{diff}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("runs/demo"),
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = "sst2",
    data_dir: DataDirOpt = None,
    max_train_samples: Annotated[int, typer.Option(help="Training subset size.")] = 4000,
    max_length: MaxLengthOpt = 64,
    heads: Annotated[float, typer.Option(help="Fraction of heads to prune in every layer.")] = 0.5,
    ffn: Annotated[float, typer.Option(help="Fraction of FFN neurons to prune in every layer.")] = 0.5,
    seed: SeedOpt = 0,
) -> None:
    """The main job on the embedded default: fine-tune, prune, evaluate and measure both, summarise."""
    from slimformer.demo import run_demo

    run_demo(
        out=out,
        model=model,
        task=task,
        data_dir=data_dir,
        max_train_samples=max_train_samples,
        max_length=max_length,
        heads=heads,
        ffn=ffn,
        seed=seed,
        console=stdout,
    )


from slimformer.analyze.cli import analyze_app  # noqa: E402

app.add_typer(analyze_app, name="analyze")


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
