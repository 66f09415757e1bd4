"""``slimformer analyze SUBCOMMAND``: argument parsing and printing only; the work happens in slimformer.analyze.

Each subcommand writes results.json, PNG plots and report.md to ``--out`` (the folder appears complete or not
at all). Options follow the other slimformer commands (--model, --task, --data-dir / $GLUE_DIR, --out, --seed,
--max-length, --max-train-samples, --max-eval-samples); ``--seeds N`` repeats an analysis for seeds
``--seed`` .. ``--seed + N - 1`` and reports mean ± std.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from slimformer.cli_options import (
    DataDirOpt,
    DevFileOpt,
    LabelColumnOpt,
    RegressionOpt,
    TaskOpt,
    TextColumnsOpt,
    TrainFileOpt,
    task_data,
)

analyze_app = typer.Typer(
    name="analyze",
    help="Dissect a model: head ablations, lottery tickets, their stability, constant attention, loyalty, robustness.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console()

FineTunedOpt = Annotated[str, typer.Option("--model", "-m", help="A model folder fine-tuned on --task.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Maximum tokens per example.")]
SeedOpt = Annotated[int, typer.Option(help="First random seed.")]
SeedsOpt = Annotated[int, typer.Option(help="Repeat for N seeds (--seed .. --seed+N-1); report mean ± std.")]
MaxEvalOpt = Annotated[int | None, typer.Option(help="Random subset of each dev split (a new one per seed).")]
MaxTrainOpt = Annotated[int | None, typer.Option(help="Random subset of the train split (a new one per seed).")]
EvalBatchOpt = Annotated[int, typer.Option(help="Evaluation batch size.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace --out if it exists.")]
EpochsOpt = Annotated[float, typer.Option(help="Epochs of each (re-)fine-tuning run.")]
MaxStepsOpt = Annotated[int, typer.Option(help="Stop each training run after this many steps (-1: use epochs).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate of each training run.")]
BatchOpt = Annotated[int, typer.Option(help="Training batch size.")]


def _out_opt(default: str):
    return Annotated[Path, typer.Option("--out", "-o", help=f"Output folder (default {default}).")]


def _check_out(out: Path, overwrite: bool) -> None:
    from slimformer.analyze.common import AnalyzeError

    if out.exists() and not overwrite:
        raise AnalyzeError(f"Output folder {out} already exists. Choose another --out or pass --overwrite.")


def _analysis_task(model: str | None, options: dict):
    """A GLUE task name as given (the analyses subsample it per seed themselves), else the task data of custom
    files or of the task the model folder remembers."""
    task = options["task"]
    if task not in (None, "custom") and not (options["train_file"] or options["dev_file"]):
        return task
    return task_data(model, options)


@analyze_app.command()
def ablate(
    model: FineTunedOpt,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    out: _out_opt("runs/analyze/ablate") = Path("runs/analyze/ablate"),
    layers: Annotated[str | None, typer.Option(help="Only these layers, e.g. '0,2' or '0-3' (default all).")] = None,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: MaxEvalOpt = None,
    batch_size: EvalBatchOpt = 64,
    seeds: SeedsOpt = 1,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Michel et al. 2019: score with each head masked, with one head kept per layer, and without each layer's
    attention, FFN or whole layer."""
    from slimformer.analyze import ablate as run_ablate
    from slimformer.analyze.common import fmt, fmt_stat, output_folder

    _check_out(out, overwrite)
    result = run_ablate(
        model,
        _analysis_task(model, locals()),
        data_dir=data_dir,
        layers=layers,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        batch_size=batch_size,
        seeds=seeds,
        seed=seed,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    table = Table(title=f"ablation on {result.task}: {result.metric} {fmt_stat(result.base)} (Δ in points)")
    for column in ("layer", "no attention", "no FFN", "no layer", "best head alone", "score"):
        table.add_column(column, justify="right")
    for layer in result.layers:
        best = result.best_head_per_layer[layer]
        table.add_row(
            str(layer),
            *(fmt_stat(result.components[c][layer], signed=True) for c in ("attention", "ffn", "layer")),
            str(best["head"]),
            fmt_stat(best["score"]),
        )
    stdout.print(table)
    deltas = result.single_head_delta
    stdout.print(
        f"single head masked: Δ from {fmt(float(np.nanmin(deltas)), signed=True)} to "
        f"{fmt(float(np.nanmax(deltas)), signed=True)} points"
    )
    stdout.print(f"-> {out} (results.json, report.md, heatmaps)")


@analyze_app.command()
def lottery(
    model: Annotated[
        str, typer.Option("--model", "-m", help="The pre-trained model subnetworks are re-fine-tuned from.")
    ] = "minilm-l6",
    finetuned: Annotated[
        str | None,
        typer.Option(help="The fine-tuned model to prune (default: fine-tune --model here, once per seed)."),
    ] = None,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    out: _out_opt("runs/analyze/lottery") = Path("runs/analyze/lottery"),
    prune_kinds: Annotated[str, typer.Option(help="s (heads + MLPs), m (weight magnitude), or both.")] = "s,m",
    subnetworks: Annotated[
        str, typer.Option(help="Re-fine-tune these: good,random,bad and/or full; 'none' to prune only.")
    ] = "good,random,bad",
    seeds: SeedsOpt = 1,
    seed: SeedOpt = 0,
    keep_score: Annotated[float, typer.Option(help="Stop pruning below this fraction of the full score.")] = 0.9,
    step: Annotated[float, typer.Option(help="Fraction of the remaining heads / weights pruned per step.")] = 0.1,
    method: Annotated[str, typer.Option(help="s-pruning importance: gradient, fisher, magnitude, random.")] = (
        "gradient"
    ),
    n_examples: Annotated[int, typer.Option(help="Training examples to score head importance on.")] = 256,
    max_iterations: Annotated[int | None, typer.Option(help="At most this many pruning steps.")] = None,
    max_length: MaxLengthOpt = 128,
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    epochs: EpochsOpt = 1.0,
    max_steps: MaxStepsOpt = -1,
    learning_rate: LrOpt = 5e-5,
    batch_size: BatchOpt = 32,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    resume: Annotated[bool, typer.Option(help="Reuse completed steps in <out>.work/.")] = True,
    keep_work: Annotated[bool, typer.Option(help="Keep <out>.work/ (models, masks) after finishing.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Prasanna et al. 2020: s- and m-pruning, then good / random / bad subnetworks re-fine-tuned from the
    pre-trained weights; survival heatmaps and survivors.json (input of `analyze stability`).

    Resumable: completed steps are kept in <out>.work/; run the same command again to continue."""
    from slimformer.analyze import lottery as run_lottery
    from slimformer.analyze.common import fmt_stat, output_folder
    from slimformer.analyze.training import RetrainConfig

    _check_out(out, overwrite)
    work = out.with_name(out.name + ".work")
    config = RetrainConfig(
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
    )
    result = run_lottery(
        _analysis_task(finetuned, locals()),
        model=model,
        finetuned=finetuned,
        data_dir=data_dir,
        prune_kinds=prune_kinds,
        subnetworks=subnetworks,
        seeds=seeds,
        seed=seed,
        keep_score=keep_score,
        step=step,
        method=method,
        n_examples=n_examples,
        max_length=max_length,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        max_prune_iterations=max_iterations,
        train_config=config,
        work_dir=work,
        resume=resume,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"lottery on {result.task} ({result.metric}, points)")
    table.add_column("")
    table.add_column("dev score", justify="right")
    for name, entry in result.summary.items():
        table.add_row(name, fmt_stat(entry))
    stdout.print(table)
    stdout.print(f"-> {out} (results.json, survivors.json, report.md, plots)")


@analyze_app.command()
def stability(
    inputs: Annotated[
        list[Path], typer.Argument(help="Output folders (or survivors.json files) of `slimformer analyze lottery`.")
    ],
    out: _out_opt("runs/analyze/stability") = Path("runs/analyze/stability"),
    overwrite: OverwriteOpt = False,
) -> None:
    """Prasanna et al. 2020: Jaccard overlap of the heads and MLPs surviving s-pruning, across the seeds and tasks
    of several lottery runs (matrices and heatmaps)."""
    from slimformer.analyze import stability as run_stability
    from slimformer.analyze.common import fmt_stat, output_folder

    _check_out(out, overwrite)
    result = run_stability(inputs)
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    table = Table(title=f"Jaccard overlap of s-pruning survivors ({len(result.labels)} runs)")
    table.add_column("pairs")
    table.add_column("heads", justify="right")
    table.add_column("MLPs", justify="right")
    for task in result.tasks:
        heads, mlps = result.across_seeds["heads"][task], result.across_seeds["mlps"][task]
        if heads["n"]:
            table.add_row(f"{task} across seeds", fmt_stat(heads, scale=1, digits=2), fmt_stat(mlps, scale=1, digits=2))
    if result.across_tasks["heads"]["n"]:
        table.add_row(
            "across tasks",
            fmt_stat(result.across_tasks["heads"], scale=1, digits=2),
            fmt_stat(result.across_tasks["mlps"], scale=1, digits=2),
        )
    stdout.print(table)
    stdout.print(f"-> {out} (results.json, report.md, heatmaps)")


@analyze_app.command()
def papa(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="A model fine-tuned on --task (with --finetune: the pre-trained model)."),
    ],
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    out: _out_opt("runs/analyze/papa") = Path("runs/analyze/papa"),
    configs: Annotated[
        str, typer.Option(help="Presets: none, first-half, last-half, all (comma-separated).")
    ] = "none,first-half,last-half,all",
    layers: Annotated[str | None, typer.Option(help="Also replace every head of these layers, e.g. '0,1'.")] = None,
    heads: Annotated[str | None, typer.Option(help="Also replace these heads, e.g. '0:3,2:*'.")] = None,
    n_examples: Annotated[int, typer.Option(help="Examples the mean attention is computed on.")] = 256,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: MaxEvalOpt = None,
    batch_size: EvalBatchOpt = 64,
    seeds: SeedsOpt = 1,
    seed: SeedOpt = 0,
    finetune: Annotated[
        bool, typer.Option(help="The paper's protocol: fine-tune --model (pre-trained) with the patterns in place.")
    ] = False,
    max_train_samples: MaxTrainOpt = None,
    epochs: EpochsOpt = 1.0,
    max_steps: MaxStepsOpt = -1,
    learning_rate: LrOpt = 5e-5,
    train_batch_size: Annotated[int, typer.Option(help="Training batch size (with --finetune).")] = 32,
    overwrite: OverwriteOpt = False,
) -> None:
    """Hassid et al. 2022: replace attention by constant patterns (the mean attention over a data sample) in
    none, half or all of the layers, or chosen layers / heads, and score the model."""
    from slimformer.analyze import papa as run_papa
    from slimformer.analyze.common import fmt_stat, output_folder
    from slimformer.analyze.training import RetrainConfig

    _check_out(out, overwrite)
    config = RetrainConfig(epochs=epochs, max_steps=max_steps, batch_size=train_batch_size, learning_rate=learning_rate)
    result = run_papa(
        model,
        _analysis_task(None if finetune else model, locals()),
        data_dir=data_dir,
        configs=configs,
        layers=layers,
        heads=heads,
        n_examples=n_examples,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        eval_batch_size=batch_size,
        seeds=seeds,
        seed=seed,
        finetune=finetune,
        train_config=config,
        max_train_samples=max_train_samples,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    table = Table(title=f"constant attention on {result.task} ({result.metric}, points; {result.mode})")
    for column in ("configuration", "heads replaced", "score", "Δ vs none"):
        table.add_column(column, justify="right")
    for entry in result.configs:
        table.add_row(
            entry["name"], str(entry["heads_replaced"]), fmt_stat(entry["score"]), fmt_stat(entry["delta"], signed=True)
        )
    stdout.print(table)
    stdout.print(f"-> {out} (results.json, report.md, plots)")


@analyze_app.command()
def loyalty(
    teacher: Annotated[str, typer.Option(help="The model the student was made from (fine-tuned on --task).")],
    student: Annotated[str, typer.Option(help="The compressed model (pruned, distilled, sparse...).")],
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    out: _out_opt("runs/analyze/loyalty") = Path("runs/analyze/loyalty"),
    advglue: Annotated[
        bool, typer.Option(help="Also on the task's AdvGLUE examples (SST-2, QNLI, RTE, MNLI, QQP).")
    ] = (True),
    advglue_dir: Annotated[
        Path | None, typer.Option(help="AdvGLUE's dev.json or its folder (default: advglue/ beside the GLUE folder).")
    ] = None,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: MaxEvalOpt = None,
    batch_size: EvalBatchOpt = 64,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Xu et al. 2021: how faithful the student is to its teacher: label loyalty, probability loyalty (1 - sqrt of
    the JS divergence), KL, on dev and on AdvGLUE."""
    from slimformer.analyze import loyalty as run_loyalty
    from slimformer.analyze.common import output_folder

    _check_out(out, overwrite)
    result = run_loyalty(
        teacher,
        student,
        _analysis_task(teacher, locals()),
        data_dir=data_dir,
        advglue=advglue,
        advglue_dir=advglue_dir,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        batch_size=batch_size,
        seed=seed,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    table = Table(title=f"loyalty of the student on {result.task}")
    for column in ("set", "teacher", "student", "label loyalty", "probability loyalty", "KL"):
        table.add_column(column, justify="right")
    for name, entry in result.sets.items():
        values = entry["loyalty"]
        if "label_loyalty" in values:
            cells = [f"{values['label_loyalty']:.4f}", f"{values['probability_loyalty']:.4f}",
                     f"{values['kl_teacher_student']:.4f}"]  # fmt: skip
        else:
            cells = [f"pearson {values['pearson']:.4f}", f"|diff| {values['mean_abs_difference']:.4f}", ""]
        table.add_row(name, f"{entry['teacher_score'] * 100:.2f}", f"{entry['student_score'] * 100:.2f}", *cells)
    stdout.print(table)
    stdout.print(f"-> {out} (results.json, report.md)")


@analyze_app.command()
def robustness(
    model: FineTunedOpt,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    out: _out_opt("runs/analyze/robustness") = Path("runs/analyze/robustness"),
    advglue: Annotated[bool, typer.Option(help="Score the task's AdvGLUE examples too (where it has them).")] = True,
    advglue_dir: Annotated[
        Path | None, typer.Option(help="AdvGLUE's dev.json or its folder (default: advglue/ beside the GLUE folder).")
    ] = None,
    epsilons: Annotated[
        str, typer.Option(help="PGD bounds, as multiples of the mean word-embedding norm (comma-separated).")
    ] = "0.01,0.02,0.05,0.1",
    steps: Annotated[int, typer.Option(help="PGD steps per bound.")] = 5,
    attack_examples: Annotated[int, typer.Option(help="Dev examples attacked (a seeded subset).")] = 256,
    max_length: MaxLengthOpt = 128,
    max_eval_samples: MaxEvalOpt = None,
    batch_size: EvalBatchOpt = 32,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Accuracy on AdvGLUE beside the clean dev accuracy, and a PGD attack on the word embeddings: the share of
    correct predictions it flips at each bound."""
    from slimformer.analyze import robustness as run_robustness
    from slimformer.analyze.common import AnalyzeError, output_folder

    _check_out(out, overwrite)
    try:
        bounds = [float(part) for part in epsilons.split(",") if part.strip()]
    except ValueError:
        raise AnalyzeError(f"--epsilons {epsilons!r} is not a comma-separated list of numbers.") from None
    result = run_robustness(
        model,
        _analysis_task(model, locals()),
        data_dir=data_dir,
        advglue=advglue,
        advglue_dir=advglue_dir,
        epsilons=bounds,
        steps=steps,
        attack_examples=attack_examples,
        max_length=max_length,
        max_eval_samples=max_eval_samples,
        batch_size=batch_size,
        seed=seed,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    stdout.print(result.markdown())
    stdout.print(f"-> {out} (results.json, report.md, pgd.png)")


@analyze_app.command()
def gates(
    model: FineTunedOpt,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    text_columns: TextColumnsOpt = None,
    label_column: LabelColumnOpt = None,
    regression: RegressionOpt = False,
    out: _out_opt("runs/analyze/gates") = Path("runs/analyze/gates"),
    heads: Annotated[float, typer.Option(help="Share of heads the rising target ends at removing.")] = 0.75,
    epochs: Annotated[float, typer.Option(help="Epochs of gate training.")] = 2.0,
    max_train_samples: Annotated[int | None, typer.Option(help="Random subset of the training split.")] = None,
    n_examples: Annotated[int, typer.Option(help="Examples Michel et al.'s importance is computed on.")] = 256,
    max_length: MaxLengthOpt = 128,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Voita et al. 2019: train hard-concrete gates on the heads toward removing --heads of them, and report the
    order in which they close, against Michel et al.'s importance (a heatmap of each)."""
    from slimformer.analyze import gates as run_gates
    from slimformer.analyze.common import output_folder

    _check_out(out, overwrite)
    result = run_gates(
        model,
        _analysis_task(model, locals()),
        heads=heads,
        epochs=epochs,
        data_dir=data_dir,
        max_train_samples=max_train_samples,
        max_length=max_length,
        n_examples=n_examples,
        work_dir=out.with_name(out.name + ".work"),
        seed=seed,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    stdout.print(result.markdown())
    stdout.print(f"-> {out} (results.json, report.md, gates.png, michel.png)")


@analyze_app.command()
def bias(
    model: Annotated[str, typer.Option("--model", "-m", help="A sentiment classifier (fine-tuned on --task).")],
    task: Annotated[str, typer.Option(help="The sentiment task the model was fine-tuned on.")] = "sst2",
    positive_label: Annotated[str, typer.Option(help="The positive class: a label name of --task or its index.")] = (
        "positive"
    ),
    eec_file: Annotated[
        Path | None, typer.Option(help="Equity-Evaluation-Corpus.csv (default: eec/ beside the GLUE folder).")
    ] = None,
    out: _out_opt("runs/analyze/bias") = Path("runs/analyze/bias"),
    embedding: Annotated[
        bool | None,
        typer.Option(
            help="Test a sentence-embedding model (SEAT-style association test); default: when the folder is one."
        ),
    ] = None,
    max_length: MaxLengthOpt = 64,
    batch_size: EvalBatchOpt = 64,
    overwrite: OverwriteOpt = False,
) -> None:
    """Kiritchenko & Mohammad 2018: the Equity Evaluation Corpus test of gender and race bias of a sentiment model
    (gaps in the positive probability, per emotion, 95% CIs, paired t-tests); for a sentence-embedding model, a
    SEAT-style association test on sentences from the EEC templates."""
    from slimformer.analyze import bias as run_bias
    from slimformer.analyze.common import output_folder

    _check_out(out, overwrite)
    result = run_bias(
        model,
        eec_file=eec_file,
        task=task,
        positive_label=positive_label,
        max_length=max_length,
        batch_size=batch_size,
        embedding=embedding,
    )
    with output_folder(out, overwrite=overwrite) as staging:
        result.save(staging)
    stdout.print(result.markdown())
    stdout.print(f"-> {out} (results.json, report.md, bias.png)")
