"""Fine-tune sequence classifiers on GLUE or custom tasks, and record how they score on dev.

Training runs on the Hugging Face :class:`~transformers.Trainer`, so the same call scales out with
``accelerate launch`` (several GPUs or machines) with no code change. Evaluation lives in
:mod:`slimformer.evaluation`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from slimformer.errors import SlimformerError, TaskError
from slimformer.evaluation import evaluate_model
from slimformer.folders import save_model_folder
from slimformer.io import write_json_atomic
from slimformer.models import load_model
from slimformer.report import METRICS_FILE, build_report
from slimformer.tasks import TaskData, load_task, tokenize_task

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """CPU-friendly fine-tuning defaults (about 8 minutes for 20,000 SST-2 sentences on 2 cores)."""

    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 0
    save_steps: int = 200
    logging_steps: int = 50
    # batches of similar lengths (the Trainer's LengthGroupedSampler): much less padding on short-text tasks
    group_by_length: bool = False


@dataclass
class FinetuneResult:
    """Where the fine-tuned model went and what it scored."""

    out_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The primary metric on dev (averaged over MNLI's two dev splits) after training."""
        return float(self.metrics["score"]["after"])


def _task_data(task: str | TaskData, data_dir: str | os.PathLike[str] | None, config: TrainConfig) -> TaskData:
    if isinstance(task, TaskData):
        return task.limited(config.max_train_samples, config.max_eval_samples, config.seed)
    return load_task(
        task,
        data_dir,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        seed=config.seed,
    )


def _is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one is partial."""
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(work_dir: Path, *, remove_partial: bool = True) -> Path | None:
    """The newest complete ``checkpoint-N`` folder; partial ones (from an interrupted save) are deleted unless
    ``remove_partial`` is false."""
    if not work_dir.is_dir():
        return None
    checkpoints = sorted(
        (p for p in work_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if _is_complete_checkpoint(checkpoint):
            return checkpoint
        if not remove_partial:
            continue
        logger.warning("Removing partial checkpoint %s (interrupted while saving)", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def finetune(
    model: str | os.PathLike[str] = "minilm-l6",
    task: str | TaskData = "sst2",
    out_dir: str | os.PathLike[str] = "runs/finetuned",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    config: TrainConfig | None = None,
    resume: bool = True,
    overwrite: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``task``, evaluate it on every dev split and save it to ``out_dir``.

    The output is an ordinary Hugging Face model folder (safetensors, config, tokenizer) plus ``metrics.json`` and
    the manifest every slimformer model folder has (:func:`slimformer.folders.save_model_folder`).
    It appears only when the run has finished (written to a staging folder, then renamed). Checkpoints go to
    ``<out_dir>.work/``; when a run is interrupted, calling again with the same arguments resumes from the last
    complete checkpoint. ``callbacks`` are passed to the :class:`~transformers.Trainer`.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SlimformerError(
            f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite to replace it."
        )
    work_dir = out_dir.with_name(out_dir.name + ".work")
    run_signature = {"model": str(model), "task": _task_name(task), "config": asdict(config)}
    checkpoint = prepare_work_dir(work_dir, run_signature, resume)

    data = _task_data(task, data_dir, config)
    require_train_split(data)
    set_seed(config.seed)
    loaded = load_model(model, data.spec)
    tokenized = tokenize_task(data, loaded.tokenizer, max_length=config.max_length)
    trainer, train_output, train_seconds = run_trainer(
        loaded.model, loaded.tokenizer, tokenized["train"], work_dir, config, checkpoint, callbacks=callbacks
    )
    if not trainer.is_world_process_zero():
        return FinetuneResult(out_dir=out_dir)
    metrics = trained_report(
        "finetune",
        trainer.model,
        loaded.tokenizer,
        data,
        tokenized,
        config,
        train_output,
        train_seconds,
        checkpoint,
        source=str(model),
        run_config={"method": "finetune", "version": 1, **asdict(config)},
    )
    save_model_folder(
        trainer.model,
        loaded.tokenizer,
        out_dir,
        task=data.record(),
        json_files={METRICS_FILE: metrics},
        overwrite=True,
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    return FinetuneResult(out_dir=out_dir, metrics=metrics)


def require_train_split(data: TaskData) -> None:
    if "train" not in data.splits:
        raise TaskError(f"Task {data.spec.name!r} from {data.source} has no train split to train on.")


def training_arguments(config: Any, output_dir: str | os.PathLike[str], *, seed: int, **overrides: Any):
    """The Trainer settings every slimformer training run shares (AdamW with linear decay, no evaluation during
    training, no reporting), from a config with ``batch_size``, ``epochs``, ``max_steps``, ``learning_rate``,
    ``weight_decay`` and ``warmup_steps``; ``overrides`` add or replace TrainingArguments fields."""
    settings: dict[str, Any] = {
        "per_device_train_batch_size": config.batch_size,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_steps,
        "seed": seed,
        "eval_strategy": "no",
        "report_to": "none",
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning is pointless (and warns) on CPU
        # Without an accelerator, say so: only then does accelerate make processes started by torchrun one
        # gloo (DDP) group; otherwise each process silently trains alone on all the data.
        "use_cpu": not torch.accelerator.is_available(),
    }
    if getattr(config, "group_by_length", False):
        settings["train_sampling_strategy"] = "group_by_length"

    return TrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})


def padded_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    args: TrainingArguments,
    *,
    callbacks: list[TrainerCallback] | None = None,
    optimizers: tuple[Any, Any] = (None, None),
) -> Trainer:
    """A Trainer whose batches are padded per batch (DataCollatorWithPadding); ``optimizers`` as the Trainer takes
    them (an optimizer and a learning-rate scheduler, each None for the Trainer's own)."""
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
        optimizers=optimizers,
    )
    # The classifiers' loss is the mean over their own batch and ignores num_items_in_batch. Told otherwise (their
    # forward takes **kwargs), the Trainer multiplies the loss by the number of processes under DDP, doubling the
    # gradient with two processes.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def run_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    work_dir: Path,
    config: TrainConfig,
    checkpoint: Path | None,
    *,
    callbacks: list[TrainerCallback] | None = None,
    remove_unused_columns: bool = True,
    optimizers: tuple[Any, Any] = (None, None),
) -> tuple[Trainer, Any, float]:
    """Train ``model`` with the Hugging Face Trainer (so ``accelerate launch`` scales it out), checkpointing to
    ``work_dir`` and resuming from ``checkpoint``. Returns the trainer, its output and the training seconds."""
    args = training_arguments(
        config,
        work_dir,
        seed=config.seed,
        per_device_eval_batch_size=config.eval_batch_size,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        remove_unused_columns=remove_unused_columns,
    )
    trainer = padded_trainer(model, tokenizer, train_dataset, args, callbacks=callbacks, optimizers=optimizers)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer, train_output, time.perf_counter() - started


def train_resumably(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    work_dir: str | os.PathLike[str] | None,
    config: TrainConfig,
    signature: dict[str, Any],
    **trainer_options: Any,
) -> tuple[Any, float, Path | None]:
    """:func:`run_trainer` for a method that trains inside a larger job (sparse and learned pruning): checkpoints
    in ``work_dir`` (resumed when its ``signature`` matches, deleted once training has finished) or, without one,
    in a temporary folder. Returns the trainer's output, the training seconds and the checkpoint resumed from."""
    import tempfile

    temporary = None
    if work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="slimformer-train-")
        folder = Path(temporary.name)
    else:
        folder = Path(work_dir)
    try:
        checkpoint = prepare_work_dir(folder, signature, resume=True)
        _trainer, output, seconds = run_trainer(
            model, tokenizer, train_dataset, folder, config, checkpoint, remove_unused_columns=False, **trainer_options
        )
    finally:
        if temporary is not None:
            temporary.cleanup()
    if work_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return output, seconds, checkpoint


def trained_report(
    command: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    tokenized: dict[str, Dataset],
    config: TrainConfig,
    train_output: Any,
    train_seconds: float,
    checkpoint: Path | None,
    *,
    source: str,
    run_config: dict[str, Any],
    before: PreTrainedModel | dict[str, Any] | None = None,
    eval_before: dict[str, dict[str, float]] | None = None,
    extra_scores: dict[str, float] | None = None,
    details: dict[str, Any] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report (:mod:`slimformer.report`) of a freshly trained model: its dev metrics, size, and how the
    training went (``details["train"]``), as written to ``metrics.json``."""
    model.eval()
    eval_started = time.perf_counter()
    evaluation = evaluate_model(
        model, tokenizer, data, max_length=config.max_length, batch_size=config.eval_batch_size, tokenized=tokenized
    )
    train = {
        "samples": len(tokenized["train"]),
        "steps": train_output.global_step,
        "loss": float(train_output.training_loss),
        "seconds": round(train_seconds, 2),
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    return build_report(
        command,
        model=source,
        task=data.record(),
        primary_metric=data.spec.primary_metric,
        config=run_config,
        before=before,
        after=model,
        eval_before=eval_before,
        eval_after=evaluation,
        extra_scores=extra_scores,
        seconds={
            **(seconds or {}),
            "train": round(train_seconds, 2),
            "evaluate": round(time.perf_counter() - eval_started, 2),
        },
        details={"train": train, **(details or {})},
    )


def _task_name(task: str | TaskData) -> str:
    return task.spec.name if isinstance(task, TaskData) else str(task)


def prepare_work_dir(work_dir: Path, signature: dict[str, Any], resume: bool) -> Path | None:
    """Return the checkpoint to resume from, if any; refuse to mix checkpoints of a different run.

    Under ``torchrun`` / ``accelerate launch`` only the process of rank 0 deletes or writes anything here (two
    processes deleting the same folder trip over each other); the others only look for the checkpoint."""
    if int(os.environ.get("RANK", "0")) != 0:
        return last_complete_checkpoint(work_dir, remove_partial=False) if resume else None
    signature_file = work_dir / "run.json"
    if work_dir.exists() and not resume:
        shutil.rmtree(work_dir)
    if work_dir.exists() and signature_file.is_file():
        previous = json.loads(signature_file.read_text())
        if previous != json.loads(json.dumps(signature)):
            raise SlimformerError(
                f"{work_dir} holds checkpoints of a different run ({previous}). Use the same arguments to "
                "resume it, or pass --no-resume to start over."
            )
    checkpoint = last_complete_checkpoint(work_dir)
    write_json_atomic(signature_file, signature)
    return checkpoint
