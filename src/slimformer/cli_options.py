"""Options the ``slimformer`` commands share (typer annotations), and the one way they turn data options into
task data: custom files, a GLUE task, or (no task given) the task the model folder remembers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimformer.errors import SlimformerError

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'minilm-l6' (embedded), a model folder or a hub id.")]
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        "-t",
        help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), a sentence-embedding task (stsb-embed, "
        "squad-retrieval: the model loads as a sentence-transformers embedding model), or your own files with "
        "--train-file/--dev-file: 'custom' (classification / regression), 'custom-sts' (sentence1, sentence2, "
        "score; scored like stsb-embed) or 'custom-retrieval' (query, passage; scored like squad-retrieval). "
        "Default: the task the model folder was trained on.",
    ),
]
# No envvar here: $GLUE_DIR is the fallback of slimformer.tasks.load_task, so that a model folder's remembered data
# folder comes before it and only an explicit --data-dir overrides that.
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Local GLUE folder (download_glue_data.py layout; for squad-retrieval, the folder holding "
        "dev-v1.1.json). Default: the folder the model was trained from, else $GLUE_DIR (squad/ beside it), "
        "else the hub.",
    ),
]
TrainFileOpt = Annotated[Path | None, typer.Option(help="Custom task: CSV / TSV / JSONL training file.")]
DevFileOpt = Annotated[Path | None, typer.Option(help="Custom task: CSV / TSV / JSONL dev file.")]
TextColumnsOpt = Annotated[
    str | None,
    typer.Option(
        help="Custom task: comma-separated text column(s), one or two (default: text; custom-sts: "
        "sentence1,sentence2; custom-retrieval: query,passage)."
    ),
]
LabelColumnOpt = Annotated[
    str | None, typer.Option(help="Custom task: the label column (default: label; custom-sts: score).")
]
CalibrationFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="Sentence-embedding tasks: a plain text file, one sentence per line, to calibrate / distill on instead "
        "of the task's training texts (dev stays the task's)."
    ),
]
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


def task_data(
    model: str | None,
    options: dict,
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    required: bool = True,
):
    """The data a command works on, from its options (the command's ``locals()``): custom files (``custom``, or the
    sentence-embedding ``custom-sts`` / ``custom-retrieval``), a GLUE or embedding task, or (no task given) the task
    the model folder remembers."""
    from slimformer.api import resolve_data
    from slimformer.tasks import custom_embedding_kind, load_custom_embedding_task, load_custom_task

    task, train_file, dev_file = options.get("task"), options.get("train_file"), options.get("dev_file")
    seed = options.get("seed", 0)
    columns = options.get("text_columns")
    embedding = custom_embedding_kind(task)
    if embedding is not None:
        if not (train_file or dev_file):
            what = "sentence1, sentence2, score" if embedding == "sts" else "query, passage"
            raise SlimformerError(
                f"--task {task} needs --dev-file and/or --train-file: CSV / TSV / JSONL files with columns {what}."
            )
        return load_custom_embedding_task(
            embedding,
            train_file,
            dev_file,
            text_columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
            label_column=options.get("label_column"),
            max_train_samples=max_train,
            max_eval_samples=max_eval,
            seed=seed,
        )
    if task == "custom" or train_file or dev_file:
        if not (train_file or dev_file):
            raise SlimformerError("--task custom needs --train-file and/or --dev-file.")
        return load_custom_task(
            train_file,
            dev_file,
            text_columns=[c.strip() for c in (columns or "text").split(",") if c.strip()],
            label_column=options.get("label_column") or "label",
            regression=options.get("regression", False),
            name=task or "custom",
            max_train_samples=max_train,
            max_eval_samples=max_eval,
            seed=seed,
        )
    return resolve_data(
        model or "",
        task,
        data_dir=options.get("data_dir"),
        required=required,
        max_train_samples=max_train,
        max_eval_samples=max_eval,
        seed=seed,
    )
