"""The ``slimformer`` command line: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from slimformer.cli_options import (
    BatchSizeOpt,
    CalibrationFileOpt,
    DataDirOpt,
    DevFileOpt,
    EpochsOpt,
    JsonOpt,
    LabelColumnOpt,
    LearningRateOpt,
    MaxLengthOpt,
    MaxStepsOpt,
    MaxTrainOpt,
    ModelOpt,
    RegressionOpt,
    ResumeOpt,
    SaveStepsOpt,
    SeedOpt,
    TaskOpt,
    TextColumnsOpt,
    TrainFileOpt,
    WarmupOpt,
    task_data,
)
from slimformer.errors import SlimformerError
from slimformer.report import INVOCATION, print_report

app = typer.Typer(
    name="slimformer",
    help="Make pre-trained transformer models smaller and faster for a task, and see which parts matter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
stdout = Console()


def _training_inputs(options: dict) -> tuple:
    """The TrainConfig and task data of a training command, from its options (``locals()`` of the command)."""
    from slimformer.train import TrainConfig

    names = ("max_length", "batch_size", "epochs", "max_steps", "learning_rate", "warmup_steps")
    names += ("max_train_samples", "max_eval_samples", "seed", "save_steps")
    config = TrainConfig(**{name: options[name] for name in names})
    data = task_data(
        options.get("model") or options["teacher"],
        options,
        max_train=options["max_train_samples"],
        max_eval=options["max_eval_samples"],
    )
    return config, data


def _print_eval(metrics: dict) -> None:
    """Every metric of every dev split: an evaluation's ``eval``, or a report's ``eval.after``."""
    evaluation = metrics["eval"].get("after") or metrics["eval"]
    task = metrics["task"]["name"] if isinstance(metrics["task"], dict) else metrics["task"]
    source = metrics.get("data_source") or (metrics["task"] or {}).get("data_source", "")
    table = Table(title=f"{task} ({source})")
    table.add_column("split")
    names = sorted({k for split in evaluation.values() for k in split})
    for name in names:
        table.add_column(name, justify="right")
    for split, values in evaluation.items():
        table.add_row(split, *(f"{values[n]:.4f}" if n in values else "" for n in names))
    stdout.print(table)


@app.command()
def finetune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder (written when finished).")],
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
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
    if result.metrics:  # rank 0 of a multi-process run
        _print_eval(result.metrics)
        print_report(result.metrics, stdout, out=str(out))


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
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
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
    counterfactual: Annotated[
        bool,
        typer.Option(
            help="Fair distillation: add gender-swapped copies of the training sentences, each pair taught the "
            "teacher's averaged prediction (Delobelle & Berendt 2022)."
        ),
    ] = False,
    masked_copies: Annotated[
        int,
        typer.Option(
            help="Data augmentation: each training text also seen N times with --mask-rate of its tokens masked, "
            "taught the teacher's predictions on them (TinyBERT-style; 0: off)."
        ),
    ] = 0,
    mask_rate: Annotated[float, typer.Option(help="Share of tokens masked in each --masked-copies copy.")] = 0.15,
    calibration_file: CalibrationFileOpt = None,
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
    if calibration_file is not None:
        from slimformer.tasks import with_calibration_texts

        data = with_calibration_texts(data, calibration_file, max_samples=max_train_samples, seed=seed)
    settings = DistillConfig(
        alpha=alpha,
        temperature=temperature,
        hidden_weight=hidden_weight,
        attention_weight=attention_weight,
        layer_map=layer_map,
        cache_teacher=cache_teacher,
        counterfactual=counterfactual,
        masked_copies=masked_copies,
        mask_rate=mask_rate,
    )
    result = run_distill(
        teacher, student, data, out, config=config, distill_config=settings, resume=resume, overwrite=overwrite
    )
    if result.metrics:  # rank 0 of a multi-process run
        print_report(result.metrics, stdout, out=str(out))


@app.command()
def evaluate(
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    max_length: MaxLengthOpt = 128,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 64,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    seed: SeedOpt = 0,
    output: Annotated[Path | None, typer.Option(help="Also write the metrics to this JSON file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a model on a task's dev split(s) with the task's official metrics."""
    from slimformer.api import evaluate as run_evaluate
    from slimformer.io import write_json_atomic

    data = task_data(model, locals(), max_eval=max_eval_samples)
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
    from slimformer.api import measure as run_measure
    from slimformer.io import write_json_atomic
    from slimformer.measure import measurements_table

    result = run_measure(
        model, seq_len=seq_len, batch_size=batch_size, threads=threads, repeats=repeats, warmup=warmup, latency=latency
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
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
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
    from slimformer.api import check_label_set
    from slimformer.importance import score_model
    from slimformer.models import load_model
    from slimformer.plots import plot_head_importance

    data = task_data(model, locals())
    loaded = load_model(model, data.spec)
    check_label_set(loaded.model, data)
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


def _prune_config(options: dict):
    """The one pruning config the prune options describe (or the one in --config)."""
    from slimformer import configs

    fractions = options["heads"] > 0 or options["ffn"] > 0
    chosen = {
        "--config": options["config"] is not None,
        "--budget-flops": options["budget_flops"] is not None,
        "--budget-latency": options["budget_latency"] is not None,
        "--plan": options["plan"] is not None,
        "--iterative": options["iterative"],
        "--heads/--ffn": fractions,
        "--sparse": options["sparse"] is not None,
        "--learned": options["learned"],
    }
    given = [name for name, on in chosen.items() if on]
    if options["drop_layers"] is not None and not fractions:
        given.append("--drop-layers")
    if len(given) != 1:
        raise SlimformerError(
            "Say what to prune in exactly one way: --budget-flops, --budget-latency, --heads/--ffn (optionally with "
            "--drop-layers), --drop-layers, --iterative, --sparse METHOD --sparsity S, --learned --target-sparsity S, "
            "--plan plan.json, or --config FILE" + (f"; got {', '.join(given)}." if given else ".")
        )
    if options["config"] is not None:
        return configs.load_config(options["config"])
    budget = {
        "tune": options["tune"],
        "rearrange": options["rearrange"],
        "calibration_examples": options["calibration_examples"],
        "label_free": options["label_free"],
        "seq_len": options["seq_len"],
        "seed": options["seed"],
        "max_memory": options["max_memory"],
        "refit_head": options["refit_head"],
        "fisher_scale": options["fisher_scale"],
        "neuron_weight": options["neuron_weight"],
        "fisher_precision": options["fisher_precision"],
        "fisher": options["fisher"],
        "unit_choice": options["unit_choice"],
        "steps": options["budget_steps"],
        "token_weighting": options["token_weighting"],
    }
    if options["sparse"] is not None:
        if options["sparsity"] is None:
            raise SlimformerError("--sparse needs --sparsity: the fraction of the encoder's linear weights to remove.")
        return configs.sparse_config(
            options["sparse"],
            options["sparsity"],
            granularity=options["granularity"],
            scope=options["scope"],
            epochs=options["epochs"],
            learning_rate=options["learning_rate"],
            max_length=options["max_length"],
            max_train_samples=options["max_train_samples"],
            debias_weight=options["debias_weight"],
            adversarial_weight=options["adversarial_weight"],
            score_init=options["score_init"],
            seed=options["seed"],
        )
    if options["learned"]:
        if (options["target_sparsity"] is None) == (options["target_speedup"] is None):
            raise SlimformerError(
                "--learned needs one of --target-sparsity (the fraction of the encoder's weights to remove) or "
                "--target-speedup (predicted by this machine's latency table)."
            )
        learned = {
            **({"target_sparsity": options["target_sparsity"]} if options["target_sparsity"] is not None else {}),
            **({"target_speedup": options["target_speedup"]} if options["target_speedup"] is not None else {}),
            "threads": options["threads"],
            "units": options["units"],
            "epochs": options["epochs"],
            "final_epochs": options["final_epochs"],
            "layer_distill_weight": options["layer_distill_weight"],
            "max_length": options["max_length"],
            "max_train_samples": options["max_train_samples"],
            "seed": options["seed"],
        }
        if options["learning_rate"] is not None:
            learned["learning_rate"] = options["learning_rate"]
        return configs.Learned(**learned)
    if options["budget_flops"] is not None:
        return configs.FlopsBudget(fraction=options["budget_flops"], **budget)
    if options["budget_latency"] is not None:
        return configs.LatencyBudget(fraction=options["budget_latency"], threads=options["threads"], **budget)
    if options["plan"] is not None:
        return configs.PlanFile(path=str(options["plan"]))
    if options["iterative"]:
        return configs.Iterative(
            keep_score=options["keep_score"],
            step=options["step"],
            importance=options["method"],
            n_examples=options["n_examples"],
            label_free=options["label_free"],
            seed=options["seed"],
        )
    if not fractions:
        return configs.DropLayers(
            strategy=options["drop_layers"], n_examples=options["n_examples"], seed=options["seed"]
        )
    return configs.Fractions(
        heads=options["heads"],
        ffn=options["ffn"],
        importance=options["method"],
        scope=options["scope"],
        min_heads_per_layer=options["min_heads_per_layer"],
        ffn_multiple=options["ffn_multiple"],
        n_examples=options["n_examples"],
        label_free=options["label_free"],
        drop_layers=options["drop_layers"],
        seed=options["seed"],
    )


@app.command()
def prune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned model.")],
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    budget_flops: Annotated[
        float | None, typer.Option(help="Retraining-free (Kwon et al. 2022): keep this fraction of encoder FLOPs.")
    ] = None,
    budget_latency: Annotated[
        float | None, typer.Option(help="Retraining-free: keep this fraction of measured latency (lookup table).")
    ] = None,
    heads: Annotated[float, typer.Option(help="Fraction of attention heads to remove (0.5 = half).")] = 0.0,
    ffn: Annotated[float, typer.Option(help="Fraction of FFN neurons to remove.")] = 0.0,
    plan: Annotated[Path | None, typer.Option(help="Apply this plan.json instead of scoring.")] = None,
    iterative: Annotated[bool, typer.Option(help="Prune heads and MLPs iteratively until the score drops.")] = False,
    drop_layers: Annotated[
        str | None,
        typer.Option(help="Drop whole layers (Sajjad et al. 2020): top|bottom|alternate|symmetric|contribution:K."),
    ] = None,
    sparse: Annotated[
        str | None,
        typer.Option(
            help="Weight-level pruning: magnitude (one shot), gmp (GMP*, while distilling), movement, soft-movement, "
            "block-movement (32 x 32 tiles) or head-movement (whole heads and neurons); with --sparsity."
        ),
    ] = None,
    sparsity: Annotated[
        float | None, typer.Option(help="Sparse: fraction of the encoder's linear weights to remove (0.9 = 90%).")
    ] = None,
    granularity: Annotated[
        str | None, typer.Option(help="Sparse: weight, block:B (B x B tiles) or head; default set by --sparse.")
    ] = None,
    score_init: Annotated[
        str | None,
        typer.Option(
            help="Movement: where scores start: magnitude, zero, or fisher (head-movement only: the retraining-free "
            "pruner's importance); default magnitude for single weights, zero for blocks and heads."
        ),
    ] = None,
    epochs: Annotated[
        float, typer.Option(help="Methods that train (gmp, movement, learned: its gate phase): epochs.")
    ] = 3.0,
    learning_rate: Annotated[
        float | None,
        typer.Option(help="Sparse methods that train: learning rate of the weights (default 1e-4 for gmp, else 3e-5)."),
    ] = None,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Sparse methods that train: random subset of the training split.")
    ] = None,
    debias_weight: Annotated[
        float,
        typer.Option(help="Sparse methods that train: weight of invariance to gender-swapped inputs (debiasing)."),
    ] = 0.0,
    adversarial_weight: Annotated[
        float,
        typer.Option(help="Sparse methods that train: weight of the task loss under a PGD attack (robust tickets)."),
    ] = 0.0,
    learned: Annotated[
        bool,
        typer.Option(
            help="Learned structured pruning (CoFi / Voita: hard-concrete gates trained while distilling, removed "
            "after); with --target-sparsity."
        ),
    ] = False,
    target_sparsity: Annotated[
        float | None, typer.Option(help="Learned: fraction of the encoder's weights to remove (0.9 = 10x smaller).")
    ] = None,
    target_speedup: Annotated[
        float | None,
        typer.Option(
            help="Learned: or a speedup to reach, predicted by this machine's per-layer latency table (batch 32 x "
            "128, --threads)."
        ),
    ] = None,
    units: Annotated[
        str, typer.Option(help="Learned: what to gate, a subset of heads,ffn,blocks,hidden.")
    ] = "heads,ffn,blocks",
    final_epochs: Annotated[
        float, typer.Option(help="Learned: epochs of training with the structure fixed, after --epochs of gates.")
    ] = 1.0,
    layer_distill_weight: Annotated[
        float, typer.Option(help="Learned: weight of layer distillation (hidden states; needs a teacher pass).")
    ] = 0.0,
    storage: Annotated[
        str | None,
        typer.Option(
            help="How to save the weights: dense (plain transformers loads it), sparse-bitmask (non-zeros plus a "
            "bitmask: smaller; slimformer loads it) or sparse-bitmask-int8 (matrices rounded to int8 per row "
            "first: smallest, lossy). Default: sparse-bitmask after --sparse, dense otherwise."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Repeat a run: a config JSON, or an earlier output folder / its metrics.json.")
    ] = None,
    calibration_examples: Annotated[int, typer.Option(help="Budget pruning: calibration examples.")] = 2048,
    calibration_file: CalibrationFileOpt = None,
    rearrange: Annotated[bool, typer.Option(help="Budget pruning: rearrange masks by the layer Fisher.")] = True,
    refit_head: Annotated[
        bool, typer.Option(help="Budget pruning: also refit the task head's output layer to the dense logits.")
    ] = False,
    fisher_scale: Annotated[
        str | None,
        typer.Option(
            help="Budget pruning: 'global' (compare every unit's Fisher as it is) or 'layer' (scale each layer's "
            "Fisher to sum 1 first: a more even allocation). Default: layer for sentence-embedding models, global "
            "otherwise."
        ),
    ] = None,
    neuron_weight: Annotated[
        float | None,
        typer.Option(
            help="Budget pruning: the neurons' Fisher times this against the heads' in the search (below 1: more "
            "heads and fewer neurons kept at the same FLOPs). Default: 0.5 for sentence-embedding models, 1 otherwise."
        ),
    ] = None,
    fisher_precision: Annotated[
        str,
        typer.Option(
            help="Budget pruning: arithmetic of the Fisher's passes: float32, bfloat16 (autocast; measured 43-50% "
            "less Fisher time where the CPU has AVX512-BF16) or auto, the default (bfloat16 where the "
            "hardware has it natively; float32 gives the same plan on every machine)."
        ),
    ] = "auto",
    fisher: Annotated[
        str | None,
        typer.Option(
            help="Budget pruning: the Fisher units are ranked by: 'empirical' (of the labels' loss, Kwon et al.) or "
            "'model' (of the model's own predicted distribution; no labels needed). Default: model for "
            "classifiers with 9 or more classes, empirical otherwise."
        ),
    ] = None,
    unit_choice: Annotated[
        str | None,
        typer.Option(
            help="Budget pruning: which heads and neurons each layer keeps (how many comes from the search): "
            "'fisher' (the Fisher's rearranged choice) or 'refit' (those the least-squares refit does best "
            "without, chosen layer by layer; ZipLM). Default: refit for sentence-embedding models, fisher otherwise."
        ),
    ] = None,
    budget_steps: Annotated[
        int,
        typer.Option(
            help="Budget pruning: reach the budget in this many rounds (geometric), the Fisher measured again on "
            "the pruned and refit model before each."
        ),
    ] = 1,
    token_weighting: Annotated[
        float | None,
        typer.Option(
            help="Budget pruning: how much the least-squares refit weighs each calibration token by the loss's "
            "sensitivity to it (0: all alike; 1: by sensitivity alone; between: a mix). Default: 0.5 for "
            "sentence-embedding models, 0 otherwise."
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Budget pruning: RAM the refit's activations may take before they spill to disk (e.g. 6GB); "
            "default half of the free memory."
        ),
    ] = None,
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
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence for FLOPs (and budgets) and latency.")] = 128,
    threads: Annotated[int, typer.Option(help="CPU threads for latency (measured and budgeted).")] = 2,
    measure: Annotated[bool, typer.Option(help="Measure latency and size before and after.")] = True,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Prune a model for real (smaller, faster): to a FLOPs or latency budget, by fractions, layers, iteratively,
    weight by weight (--sparse), or by a saved plan; evaluate and measure before and after, and save it with
    plan.json and metrics.json."""
    import slimformer
    from slimformer.report import print_report

    settings = _prune_config(locals())  # refuses impossible targets before any data or model is loaded
    data = task_data(model, locals(), max_eval=max_eval_samples, required=settings.needs_data)
    result = slimformer.prune(
        model,
        settings,
        data,
        data_dir=data_dir,
        out=out,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        measure=measure,
        seq_len=seq_len,
        threads=threads,
        overwrite=overwrite,
        weight_storage=storage,
        calibration_file=calibration_file,
    )
    print_report(result.report, stdout, out=f"{out} (model, plan.json, metrics.json)")


@app.command()
def quantize(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the int8 artifact.")],
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    runtime: Annotated[str, typer.Option(help="Runtime to quantize for: onnxruntime or openvino.")] = "onnxruntime",
    mode: Annotated[
        str | None,
        typer.Option(
            help="dynamic (ONNX Runtime; no calibration) or static (calibrated on training examples); "
            "default: dynamic on onnxruntime, static on openvino."
        ),
    ] = None,
    calibration_examples: Annotated[
        int, typer.Option(help="Static int8 or --fp32-outliers: training examples to calibrate on.")
    ] = 256,
    calibration_file: CalibrationFileOpt = None,
    per_channel: Annotated[bool, typer.Option(help="One weight scale per output channel.")] = True,
    fp32_outliers: Annotated[
        float | None,
        typer.Option(
            help="ONNX Runtime: keep in fp32 the linear layers whose input's largest value exceeds this many times "
            "its RMS on calibration examples (e.g. 100 for all-mpnet-base-v2; dynamic int8 then reads them too)."
        ),
    ] = None,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence for FLOPs and latency.")] = 128,
    threads: Annotated[int, typer.Option(help="CPU threads for latency (both runtimes).")] = 2,
    measure: Annotated[bool, typer.Option(help="Measure latency of the fp32 model and the int8 artifact.")] = True,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Quantize a (pruned) model to int8 on a runtime: an artifact folder that runs without slimformer, scored
    and timed through the runtime itself against the PyTorch fp32 model."""
    import slimformer

    settings = slimformer.Quantize(
        runtime=runtime,
        mode=mode,
        calibration_examples=calibration_examples,
        per_channel=per_channel,
        seed=seed,
        fp32_outlier_ratio=fp32_outliers,
    )
    data = task_data(model, locals(), max_eval=max_eval_samples, required=settings.calibrates)
    result = slimformer.quantize(
        model,
        settings,
        data,
        data_dir=data_dir,
        out=out,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        measure=measure,
        seq_len=seq_len,
        threads=threads,
        overwrite=overwrite,
        calibration_file=calibration_file,
    )
    files = "model.xml + model.bin" if settings.runtime == "openvino" else "model.onnx"
    print_report(result.report, stdout, out=f"{out} ({files}, tokenizer, metrics.json, README.md)")


@app.command()
def compress(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the final int8 artifact and report.md.")],
    model: ModelOpt = "minilm-l6",
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    target_speedup: Annotated[
        float | None, typer.Option(help="Speedup to reach, measured on the runtime against dense PyTorch fp32.")
    ] = None,
    budget_flops: Annotated[float | None, typer.Option(help="Or: the fraction of FLOPs to keep.")] = None,
    runtime: Annotated[str, typer.Option(help="onnxruntime or openvino.")] = "onnxruntime",
    mode: Annotated[str | None, typer.Option(help="int8 mode (default: the runtime's default).")] = None,
    recover: Annotated[str | None, typer.Option(help="Recovery after pruning: kd or finetune.")] = None,
    epochs: Annotated[float, typer.Option(help="Recovery epochs.")] = 1.0,
    masked_copies: Annotated[
        int, typer.Option(help="With --recover kd: masked copies of each training text in the distillation.")
    ] = 0,
    calibration_examples: Annotated[int, typer.Option(help="Examples the budget pruner calibrates on.")] = 2048,
    calibration_file: CalibrationFileOpt = None,
    max_attempts: Annotated[int, typer.Option(help="Pruning attempts while the measured speedup falls short.")] = 3,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: Annotated[int | None, typer.Option(help="Random subset of each dev split.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence for FLOPs and throughput latency.")] = 128,
    threads: Annotated[int, typer.Option(help="CPU threads for latency.")] = 2,
    costs: Annotated[
        bool,
        typer.Option(
            help="Also measure each stage's AdvGLUE accuracy, loyalty to the dense model and EEC gender / race "
            "gaps, where the data is there."
        ),
    ] = True,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Prune to a target speedup (or FLOPs budget), optionally recover, quantize to int8 on a runtime, and
    evaluate and time every stage side by side (report.md, pareto.png)."""
    import slimformer
    from slimformer.deploy.compress import render_markdown

    settings = slimformer.Compress(
        target_speedup=target_speedup,
        budget_flops=budget_flops,
        runtime=runtime,
        mode=mode,
        recover=recover,
        epochs=epochs,
        masked_copies=masked_copies,
        calibration_examples=calibration_examples,
        max_attempts=max_attempts,
        seed=seed,
    )
    data = task_data(model, locals(), max_eval=max_eval_samples)
    result = slimformer.compress(
        model,
        settings,
        data,
        data_dir=data_dir,
        out=out,
        max_length=max_length,
        seq_len=seq_len,
        threads=threads,
        costs=costs,
        overwrite=overwrite,
        calibration_file=calibration_file,
    )
    stdout.print(render_markdown(result.report))
    stdout.print(f"Saved to {out} (int8 model, tokenizer, report.md, pareto.png, pruned/)")


@app.command()
def export(
    onnx: Annotated[Path, typer.Option("--onnx", help="Path of the .onnx file to write.")],
    model: ModelOpt = "minilm-l6",
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    check: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch outputs.")] = True,
) -> None:
    """Export a (pruned) model to ONNX and check it against PyTorch with onnxruntime."""
    from slimformer.api import export_onnx

    result = export_onnx(model, onnx, opset=opset, check=check)
    diff = "" if result.max_abs_diff is None else f", max |onnx - torch| = {result.max_abs_diff:.2e}"
    stdout.print(f"{onnx}: {result.size_bytes / 2**20:.1f} MiB, opset {result.opset}{diff}")


@app.command()
def push(
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub model repo to push to, 'user-or-org/name'.")],
    model: Annotated[Path, typer.Option("--model", help="The model folder to upload.")],
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
    token: Annotated[
        str | None, typer.Option(help="Hub token (default: $HF_TOKEN or the one `hf auth login` stored).")
    ] = None,
) -> None:
    """Upload a model folder to the Hugging Face hub, its model card rewritten for the repo."""
    from slimformer.hub import push_to_hub

    url = push_to_hub(model, repo_id, private=private, token=token)
    stdout.print(f"{model} -> {url}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("runs/demo"),
    model: ModelOpt = "minilm-l6",
    task: Annotated[str, typer.Option("--task", "-t", help="GLUE task to fine-tune on.")] = "sst2",
    data_dir: DataDirOpt = None,
    max_train_samples: Annotated[int, typer.Option(help="Fine-tuning subset size.")] = 20000,
    distill_samples: Annotated[int, typer.Option(help="Distillation subset size.")] = 8000,
    max_length: MaxLengthOpt = 64,
    budget: Annotated[float, typer.Option(help="Fraction of the encoder FLOPs to keep.")] = 0.5,
    seed: SeedOpt = 0,
) -> None:
    """The main job on the embedded default: fine-tune, prune to a FLOPs budget, distill, measure all three."""
    from slimformer.demo import run_demo

    run_demo(
        out=out,
        model=model,
        task=task,
        data_dir=data_dir,
        max_train_samples=max_train_samples,
        distill_samples=distill_samples,
        max_length=max_length,
        budget=budget,
        seed=seed,
        console=stdout,
    )


def _print_version(value: bool) -> None:
    if value:
        from slimformer._version import __version__

        stdout.print(f"slimformer {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Make pre-trained transformer models smaller and faster for a task, and see which parts matter."""


from slimformer.analyze.cli import analyze_app  # noqa: E402

app.add_typer(analyze_app, name="analyze")


def main() -> None:
    """Entry point: run the CLI; a SlimformerError prints its message (no traceback) and exits with 2."""
    INVOCATION.set(shlex.join(["slimformer", *sys.argv[1:]]))
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
