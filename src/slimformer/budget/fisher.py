"""Per-example gradients of head and neuron masks, and the Fisher information built from them.

Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers", §3-4) approximate the loss increase
of pruning with the empirical Fisher information of the masks, I = sum_x g(x) g(x)^T with g(x) = dL(x)/dm. Its
diagonal ranks units for the mask search; its per-layer blocks drive the mask rearrangement. slimformer gets the
per-example gradients from :func:`slimformer.gradients.gate_gradients` (one backward pass per batch, every example
with its own copy of the gates).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from slimformer.budget.stream import DenseTargets
from slimformer.embedding import is_sentence_embedder
from slimformer.errors import SlimformerError
from slimformer.gradients import gate_gradients, is_regression
from slimformer.importance import ImportanceSample, importance_sample


@dataclass
class MaskGradients:
    """``heads[l]``: [examples, heads in layer l]; ``neurons[l]``: [examples, neurons in layer l] (float32)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    @property
    def n_examples(self) -> int:
        return int(self.heads[0].shape[0]) if self.heads else 0

    def head_fisher(self) -> list[np.ndarray]:
        """Diagonal of the Fisher information of each layer's head masks."""
        return [g.double().pow(2).sum(0).numpy() for g in self.heads]

    def neuron_fisher(self) -> list[np.ndarray]:
        return [g.double().pow(2).sum(0).numpy() for g in self.neurons]

    @staticmethod
    def block(grads: torch.Tensor) -> torch.Tensor:
        """The full Fisher block G^T G of one layer's masks (float64)."""
        g = grads.double()
        return g.T @ g

    @staticmethod
    def pruned_loss(grads: torch.Tensor, kept: list[int]) -> float:
        """1_P^T G^T G 1_P for the units not in ``kept``, as ||G 1_P||^2: one pass over the gradients instead of
        the units x units block (seconds per call on a 3,072-neuron layer)."""
        pruned = torch.ones(grads.shape[1], dtype=torch.bool)
        pruned[kept] = False
        return float(grads[:, pruned].double().sum(1).pow(2).sum())


# tokens (rows x padded length) per backward pass of the Fisher: the activations kept for the backward grow with
# them (a batch of 32 x 128 took about 10 GiB on all-mpnet-base-v2), and per-example gradients do not depend on
# how examples are batched
FISHER_TOKENS_PER_PASS = 1024


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (a CUDA GPU that supports it; an x86 CPU with AVX512-BF16 or
    AMX). Elsewhere bfloat16 is emulated on CPUs and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: do not guess
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def fisher_autocast(model: PreTrainedModel, precision: str) -> torch.dtype | None:
    """The autocast dtype of the Fisher's passes for ``precision`` (``"float32"``, ``"bfloat16"`` or ``"auto"``):
    bfloat16 only for a float32 model (a float64 model keeps its precision; a half-precision one has it already),
    and under ``"auto"`` only where the device has native bfloat16 arithmetic."""
    parameter = next(model.parameters())
    if precision == "float32" or parameter.dtype != torch.float32:
        return None
    if precision == "auto" and not native_bfloat16(parameter.device):
        return None
    return torch.bfloat16


def micro_batches(batches: Sequence[dict[str, torch.Tensor]], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Each batch split by rows so that rows x padded length stays within ``max_tokens`` (at least one row)."""
    out = []
    for batch in batches:
        rows, length = batch["input_ids"].shape
        step = max(1, max_tokens // max(length, 1))
        for start in range(0, rows, step):
            out.append({k: v[start : start + step] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


def collect_mask_gradients(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    label_free: bool = False,
    max_tokens_per_pass: int = FISHER_TOKENS_PER_PASS,
    record: DenseTargets | None = None,
    progress: bool = True,
    autocast: torch.dtype | None = None,
    fisher: str = "empirical",
) -> MaskGradients:
    """Per-example gradients of the task loss with respect to every head and FFN-neuron mask (all masks at 1).

    ``label_free`` uses the model's own predictions as labels (Kwon et al. note this works as well as gold
    labels); it needs a classification head. A sentence-embedding model needs no labels at all (see
    :func:`slimformer.gradients.embedding_probe_loss`). Batches are cut to ``max_tokens_per_pass`` tokens per backward
    pass, which bounds the memory of the backward without changing any example's gradient.

    ``record``: the forward passes (the dense model's, every mask at 1) also record the refit's dense targets.
    ``autocast``: the passes' arithmetic (:func:`fisher_autocast`); what ``record`` keeps is stored in the model's
    dtype. ``fisher``: ``"empirical"`` (the labels' loss, Kwon et al.) or ``"model"`` (the model's own predictive
    distribution: :func:`slimformer.gradients.model_fisher_probe_loss`).
    """
    if label_free and is_regression(model) and not is_sentence_embedder(model):
        raise SlimformerError("Label-free Fisher needs a classification task; give labels for regression tasks.")
    with record.recording(model) if record is not None else nullcontext():
        gradients = gate_gradients(
            model,
            micro_batches(batches, max_tokens_per_pass),
            per_example=True,
            label_free=label_free,
            progress=progress,
            description="Fisher (per-example mask gradients)",
            autocast=autocast,
            fisher=fisher,
        )
    return MaskGradients(heads=gradients.heads, neurons=gradients.neurons)


# Where the Fisher only ranks units (the learned gates' and whole-head movement's starting points), not the budget
# pruner's loss estimate: half its default calibration set
RANKING_EXAMPLES = 1024


def calibration_mask_gradients(
    model: PreTrainedModel,
    tokenizer,
    data,
    *,
    n_examples: int,
    batch_size: int,
    max_length: int,
    seed: int,
    label_free: bool = False,
    record: DenseTargets | None = None,
    progress: bool = True,
    autocast: torch.dtype | None = None,
    fisher: str = "empirical",
) -> tuple[MaskGradients, ImportanceSample]:
    """Kwon et al.'s mask gradients on a seeded calibration sample of ``n_examples`` rows of ``data``, and the
    sample itself (its length-grouped batches; the refit reuses them).

    Per-example Fisher does not depend on how examples are batched, so batches are grouped by length: padding only
    costs time.
    """
    sample = importance_sample(
        tokenizer,
        data,
        n_examples=n_examples,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        length_grouped=True,
    )
    gradients = collect_mask_gradients(
        model,
        sample.batches,
        label_free=label_free,
        record=record,
        progress=progress,
        autocast=autocast,
        fisher=fisher,
    )
    return gradients, sample


def ranking_mask_gradients(
    model: PreTrainedModel, tokenizer, data, *, batch_size: int, max_length: int, seed: int, progress: bool = True
) -> MaskGradients:
    """The mask gradients on ``RANKING_EXAMPLES`` training examples, for where the Fisher only ranks units: the
    learned gates' spread start and whole-head movement's Fisher start."""
    gradients, _ = calibration_mask_gradients(
        model.eval(),
        tokenizer,
        data,
        n_examples=RANKING_EXAMPLES,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        progress=progress,
    )
    return gradients
