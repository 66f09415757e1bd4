"""Gradients of the task loss with respect to gates on heads, FFN neurons and whole MLP blocks.

One loop serves both users of gate gradients:

- importance scores (:mod:`slimformer.importance`): per batch, the gradient of the batch-mean loss at all gates 1,
  summed over batches as |g| (Michel et al. 2019) or g^2 (the diagonal empirical Fisher, Kwon et al. 2022);
- the budget search (:mod:`slimformer.budget.fisher`): *per-example* gradients, from one backward pass per batch
  in which every example carries its own copy of the gates (shape [batch, units]) and the loss is summed over
  the batch, so d(sum)/d gate[b] is example b's gradient.

Gates are multiplied by optional fixed ``base`` gates (already-masked units stay masked and get gradient 0), and
each layer's neuron gates by one MLP gate per layer, whose gradient scores the whole FFN block (Prasanna et al.
2020). The weights get no gradients (they are frozen for the loop and restored after), dropout is off, and the
model is left as it was: same mode, same ``requires_grad`` flags, no hooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimformer.arch import layer_views
from slimformer.configs import FISHER_KINDS
from slimformer.embedding import is_sentence_embedder
from slimformer.errors import SlimformerError
from slimformer.gates import Gates, gated
from slimformer.measure.memory import HeapTrimmer
from slimformer.models import eager_attention


def is_regression(model: PreTrainedModel) -> bool:
    """True for a model with a single regression output (STS-B, custom numeric targets)."""
    return model.config.problem_type == "regression" or int(model.config.num_labels) == 1


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device)
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "token_type_ids") and isinstance(v, torch.Tensor)
    }


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool, reduction: str = "mean") -> torch.Tensor:
    """The task loss the model's own head computes (batch mean; ``reduction="sum"`` for per-example gradients)."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision losses lose the small gradients
        logits = logits.float()
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.device, logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels.to(logits.device).long(), reduction=reduction)


def embedding_probe_loss(embeddings: torch.Tensor, generator: torch.Generator, reduction: str = "mean") -> torch.Tensor:
    """The label-free loss whose gradients give the Fisher of a sentence-embedding model's masks.

    The embedding-distillation loss 1/2 ||e(m) - e_dense||^2 has zero gradient at the dense model (m = 1), where
    pruning starts; its curvature there is the Gauss-Newton matrix J^T J, J = de/dm. Treating the embedding as the
    mean of a unit Gaussian and drawing targets y = e + r, r ~ N(0, I), as the true Fisher does for a model's own
    predictive distribution (Kwon et al. 2022 use the model's predicted labels the same way), the gradient of
    -log p(y | e) is -J^T r, and E[(J^T r)(J^T r)^T] = J^T J. So sum_b <r_b, e_b> with fresh Gaussian ``r`` per
    example gives per-example gradients whose outer products estimate, without bias, the curvature of keeping the
    dense embeddings (of the normalised embedding, when the model normalises: only the direction counts, as for
    cosine similarity).
    """
    probe = torch.randn(embeddings.shape, generator=generator, dtype=torch.float32).to(embeddings)
    total = (embeddings * probe).sum()
    return total if reduction == "sum" else total / embeddings.shape[0]


def model_fisher_probe_loss(
    logits: torch.Tensor, regression: bool, generator: torch.Generator, reduction: str = "mean"
) -> torch.Tensor:
    """A loss whose per-example gradients estimate, without bias, the Fisher of the model's own predictive
    distribution (the "true" Fisher, a Gauss-Newton matrix) instead of the empirical Fisher of the labels.

    For a softmax classifier the curvature of the log-likelihood in the logits is H = diag(p) - p p^T, so the
    Fisher of parameters (here: masks) is J^T H J with J the logits' Jacobian. With A = diag(sqrt p) - p sqrt(p)^T,
    A A^T = H, and for r ~ N(0, I) the gradient of <logits, A r> (A held fixed) is g = J^T A r with E[g g^T] =
    J^T H J. Unlike the empirical Fisher, it does not vanish on examples the model is sure of: a converged
    many-class teacher predicts its training examples with probability near 1, and their cross-entropy gradients
    then say little about which units matter (bench/results/many_class_diagnosis.md). A regression head's
    unit-variance Gaussian gives H = I: the probe is r itself. Kwon et al. 2022 estimate the empirical Fisher; the
    distinction is Martens 2020, "New insights and perspectives on the natural gradient method", §9-11.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if regression:  # H = I: the embedding probe's Gaussian
        return embedding_probe_loss(logits, generator, reduction)
    probe = torch.randn(logits.shape, generator=generator, dtype=torch.float32).to(logits)
    p = torch.softmax(logits.detach(), dim=-1)
    root = p.sqrt() * probe
    total = (logits * (root - p * root.sum(-1, keepdim=True))).sum()
    return total if reduction == "sum" else total / logits.shape[0]


@dataclass
class GateGradients:
    """Gate gradients per layer: ``heads[l]``, ``neurons[l]`` and ``mlps`` (one entry per layer).

    Summed (``per_example=False``): float64 arrays ``[units]`` holding the sum over batches of |g| or g^2.
    Per example: float32 CPU tensors ``[examples, units]`` (``mlps``: ``[examples, layers]``).
    """

    heads: list[Any]
    neurons: list[Any]
    mlps: Any
    n_batches: int
    n_examples: int


@contextmanager
def _gradients_to_gates_only(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block the weights are frozen and the model is in eval mode; both are restored after.

    Gradients flow only to the gates: freezing the weights skips their (unused) gradients, about half the cost; and
    without dropout the gradients do not depend on a random draw."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def gate_gradients(
    model: PreTrainedModel,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    per_example: bool = False,
    square: bool = False,
    label_free: bool = False,
    base: Gates | None = None,
    progress: bool = True,
    description: str = "gate gradients",
    autocast: torch.dtype | None = None,
    fisher: str = "empirical",
) -> GateGradients:
    """Gradients of the task loss with respect to head, neuron and MLP gates (all at 1), over ``batches``.

    Summed mode: per batch the gradient of the batch-mean loss, accumulated as |g| (``square=False``) or g^2.
    ``per_example=True``: every example's own gradient of its loss (``square`` does not apply). ``label_free``
    uses the model's predicted class as the label (classification only). ``base``: fixed gates kept in place.
    A sentence-embedding model needs no labels: its loss is :func:`embedding_probe_loss`. ``autocast``: run the
    passes under ``torch.autocast`` in this dtype (the gates and the loss stay in float32). ``fisher="model"``:
    the loss is :func:`model_fisher_probe_loss` (no labels needed), whose squared per-example gradients estimate the
    Fisher of the model's own predictive distribution.
    """
    if fisher not in FISHER_KINDS:
        raise SlimformerError(f"Unknown fisher {fisher!r}: choose one of {', '.join(FISHER_KINDS)}.")
    embedder = is_sentence_embedder(model)
    if label_free and is_regression(model) and not embedder:
        raise SlimformerError(
            "Label-free gradients need a classification task: they use the model's own predicted class as the "
            "label, and this model has a single regression output. Use the gold labels instead."
        )
    views = layer_views(model)
    n = len(views)
    parameter = next(model.parameters())
    device = parameter.device
    # gates at least in float32 (half-precision gradients underflow), in float64 for a float64 model
    dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
    regression = is_regression(model)
    widths = [v.num_heads for v in views] + [v.ffn_size for v in views] + [n]
    totals = [np.zeros(width) for width in widths]
    collected: list[list[torch.Tensor]] = [[] for _ in widths]
    n_batches = n_examples = 0
    probes = torch.Generator().manual_seed(0)  # the embedding probes are the same on every run
    trim = HeapTrimmer()

    # under bfloat16 on a CPU, eager attention: PyTorch's CPU flash-attention backward is slow in bfloat16 (MiniLM-L6
    # on STS-B: Fisher 1.9x faster with eager attention, 1.2x with SDPA, over float32)
    attention = eager_attention(model) if autocast is not None and device.type == "cpu" else nullcontext()
    with attention, _gradients_to_gates_only(model):
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc=description, disable=not progress, leave=False):
            inputs = model_inputs(batch, device)
            if not (label_free or embedder or fisher == "model") and "labels" not in batch:
                raise SlimformerError("A batch has no labels; pass labelled data or use label_free=True.")
            size = int(inputs["input_ids"].shape[0])
            # one gate per unit, or one per unit and example (a leading batch dimension)
            shape = (size,) if per_example else ()
            leaves = [torch.ones(*shape, width, device=device, dtype=dtype, requires_grad=True) for width in widths]
            heads, neurons, mlp = leaves[:n], leaves[n : 2 * n], leaves[2 * n]
            # a layer's MLP gate scales all its neuron gates (per example: a [batch, 1] column)
            mlps = [mlp[:, i : i + 1] if per_example else mlp[i] for i in range(n)]
            # fixed masks multiply the learnable gates, so a masked unit stays masked and its gradient is 0
            effective = Gates(
                heads=[g if base is None else g * base.heads[i].to(device) for i, g in enumerate(heads)],
                neurons=[
                    g * mlps[i] if base is None else g * mlps[i] * base.neurons[i].to(device)
                    for i, g in enumerate(neurons)
                ],
                layers=None if base is None or base.layers is None else base.layers.detach().to(device),
            )
            cast = torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)
            with torch.enable_grad(), gated(model, effective), cast:
                logits = model(**inputs).logits.to(dtype)
                if embedder:
                    loss = embedding_probe_loss(logits, probes, reduction="sum" if per_example else "mean")
                elif fisher == "model":
                    reduction = "sum" if per_example else "mean"
                    loss = model_fisher_probe_loss(logits, regression, probes, reduction=reduction)
                else:
                    labels = logits.detach().argmax(dim=-1) if label_free else batch["labels"]
                    loss = task_loss(logits, labels, regression, reduction="sum" if per_example else "mean")
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for index, grad in enumerate(grads):
                if per_example:
                    grad = grad if grad is not None else torch.zeros(size, widths[index])
                    collected[index].append(grad.detach().float().cpu())
                elif grad is not None:
                    values = grad.detach().double().cpu().numpy()
                    totals[index] += values**2 if square else np.abs(values)
            n_batches += 1
            n_examples += size
            # each pass frees activations of its own shape; handed back, they do not pile up in the heap
            # (all-mpnet-base-v2 on 512 MRPC pairs: peak 2.97 GiB without, 1.93 with; same time)
            trim()
    results: list[Any] = totals
    if per_example:
        results = [
            torch.cat(parts) if parts else torch.zeros(0, width) for parts, width in zip(collected, widths, strict=True)
        ]
    return GateGradients(
        heads=results[:n], neurons=results[n : 2 * n], mlps=results[2 * n], n_batches=n_batches, n_examples=n_examples
    )


__all__ = [
    "FISHER_KINDS",
    "GateGradients",
    "gate_gradients",
    "is_regression",
    "model_fisher_probe_loss",
    "model_inputs",
    "task_loss",
]
