"""Fine-tuning with masks in place: the Hugging Face Trainer, run on a model whose gates (heads, MLPs), weight masks
(:mod:`torch.nn.utils.prune`) or constant attention patterns are installed as hooks for the whole run.

Masked units get no gradient through their zero gate or mask, so they stay removed while the rest trains. The
recipe (AdamW, linear decay, no warm-up by default) is the one of :func:`slimformer.train.finetune`; no
checkpoints are written: the analyses resume at the granularity of whole training runs instead.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from slimformer.analyze.common import AnalyzeError
from slimformer.train import padded_trainer, training_arguments


@dataclass
class RetrainConfig:
    """How each (re-)fine-tuning run of an analysis trains: CPU-friendly defaults like ``slimformer finetune``."""

    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0

    def check(self) -> None:
        if self.max_steps <= 0 and not self.epochs > 0:
            raise AnalyzeError(f"--epochs must be positive (or set --max-steps), got {self.epochs}.")
        if self.batch_size < 1:
            raise AnalyzeError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if not self.learning_rate > 0:
            raise AnalyzeError(f"--lr must be positive, got {self.learning_rate}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_device() -> torch.device:
    """The device the Trainer will put the model on (so hooks' tensors can be made there first)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    config: RetrainConfig,
    *,
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place on a tokenized training split (with ``labels``), with whatever hooks are installed.

    Call it inside the masks' ``with`` block, after moving the model to :func:`training_device`. Returns the
    number of examples and steps, the mean training loss and the seconds taken. The model is left in eval mode.
    """
    config.check()
    if len(train_dataset) == 0:
        raise AnalyzeError("The training split is empty.")
    with tempfile.TemporaryDirectory(prefix="slimformer-analyze-") as scratch:
        args = training_arguments(
            config,
            scratch,
            seed=seed,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=not progress,
        )
        trainer = padded_trainer(model, tokenizer, train_dataset, args)
        if not progress:  # the analyses show their own progress; no per-run metrics dict on stdout
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    model.eval()
    return {
        "samples": len(train_dataset),
        "steps": int(output.global_step),
        "loss": float(output.training_loss),
        "seconds": round(seconds, 2),
    }
