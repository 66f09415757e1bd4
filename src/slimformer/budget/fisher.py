"""Per-example gradients of head and neuron masks, and the Fisher information built from them.

Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers", §3-4) approximate the loss increase
of pruning with the empirical Fisher information of the masks, I = sum_x g(x) g(x)^T with g(x) = dL(x)/dm. Its
diagonal ranks units for the mask search; its per-layer blocks drive the mask rearrangement. slimformer gets the
per-example gradients in one backward pass per batch: every example carries its own copy of the gates
(shape [batch, units]) and the loss is summed over the batch, so d(sum)/d gate[b] is example b's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimformer.arch import layer_views
from slimformer.errors import SlimformerError
from slimformer.gates import Gates, gated
from slimformer.importance import is_regression, model_inputs, task_loss


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


def collect_mask_gradients(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    label_free: bool = False,
    progress: bool = True,
) -> MaskGradients:
    """Per-example gradients of the task loss with respect to every head and FFN-neuron mask (all masks at 1).

    ``label_free`` uses the model's own predictions as labels (Kwon et al. note this works as well as gold
    labels); it needs a classification head.
    """
    regression = is_regression(model)
    if label_free and regression:
        raise SlimformerError("Label-free Fisher needs a classification task; give labels for regression tasks.")
    views = layer_views(model)
    device = next(model.parameters()).device
    heads: list[list[torch.Tensor]] = [[] for _ in views]
    neurons: list[list[torch.Tensor]] = [[] for _ in views]
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():  # only the masks need gradients
            p.requires_grad_(False)
        for batch in tqdm(batches, desc="Fisher (per-example mask gradients)", disable=not progress, leave=False):
            inputs = model_inputs(batch, device)
            size = inputs["input_ids"].shape[0]
            gates = Gates(
                heads=[torch.ones(size, v.num_heads, device=device, requires_grad=True) for v in views],
                neurons=[torch.ones(size, v.ffn_size, device=device, requires_grad=True) for v in views],
            )
            with torch.enable_grad(), gated(model, gates):
                logits = model(**inputs).logits
                if label_free:
                    labels = logits.detach().argmax(dim=-1)
                elif "labels" in batch:
                    labels = batch["labels"]
                else:
                    raise SlimformerError("The calibration data has no labels; use label_free=True.")
                loss = task_loss(logits, labels, regression, reduction="sum")
                grads = torch.autograd.grad(loss, [*gates.heads, *gates.neurons], allow_unused=True)
            for index, grad in enumerate(grads):
                target = heads if index < len(views) else neurons
                layer = index % len(views)
                shape = (size, (views[layer].num_heads if index < len(views) else views[layer].ffn_size))
                target[layer].append((grad if grad is not None else torch.zeros(shape)).detach().float().cpu())
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return MaskGradients(heads=[torch.cat(h) for h in heads], neurons=[torch.cat(n) for n in neurons])
