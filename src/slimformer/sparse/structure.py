"""Turn what sparse pruning emptied into physical removal ("hybrid filled" in nn_pruning's terms, Lagunas et al.
2021): a head or FFN neuron whose weights are gone is sliced out of the model, the rest stays sparse.

A unit is removed only where that changes no output (checked against the masked model in the tests):

* a head whose attention-output columns are all zero contributes nothing;
* a head whose value rows are all zero outputs its value bias at every position (attention weights sum to 1), a
  constant that is folded into the attention-output bias before the head goes;
* an FFN neuron whose down-projection column is all zero contributes nothing;
* an FFN neuron whose up-projection row is all zero outputs ``activation(bias)`` everywhere, folded into the
  down-projection bias (the activation's value is read off the model itself, so every family's own activation
  applies).

A head with only its query or key rows gone still attends (to a content-independent pattern) and is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from slimformer.arch import LayerView, layer_views
from slimformer.prune.plan import Layout, PruningPlan


def _zero_columns(weight: torch.Tensor, size: int) -> torch.Tensor:
    """Per group of ``size`` consecutive columns: all zero?"""
    return (weight == 0).all(0).reshape(-1, size).all(1)


def _zero_rows(weight: torch.Tensor, size: int) -> torch.Tensor:
    return (weight == 0).all(1).reshape(-1, size).all(1)


@torch.no_grad()
def _constant_activations(model: PreTrainedModel, views: list[LayerView]) -> list[torch.Tensor]:
    """Each layer's FFN activation of its up-projection bias alone (what a neuron with no input weights outputs):
    one forward pass with every up projection's output replaced by its bias, reading the down projection's input."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for view in views:

        def bias_only(module, args, output):
            bias = module.bias if module.bias is not None else output.new_zeros(output.shape[-1])
            return torch.zeros_like(output) + bias

        def record(module, args, index=view.index):
            captured[index] = args[0].reshape(-1, args[0].shape[-1])[0].detach().clone()

        handles.append(view.ffn_up.register_forward_hook(bias_only))
        handles.append(view.ffn_down.register_forward_pre_hook(record))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [captured[view.index] for view in views]


@torch.no_grad()
def removable_units(model: PreTrainedModel) -> tuple[PruningPlan, dict[str, Any]]:
    """The plan that removes every head and FFN neuron that sparse pruning emptied, after folding the constants
    of half-empty ones into biases (in place; the model's outputs do not change). Returns the plan and counts."""
    views = layer_views(model)
    kept_heads, kept_neurons = [], []
    counts = {"heads_removed": 0, "heads_folded": 0, "neurons_removed": 0, "neurons_folded": 0}
    constants = None
    for view in views:
        size = view.head_size
        heads = []
        if view.num_heads:
            out_empty = _zero_columns(view.attn_out.weight, size)
            value_empty = _zero_rows(view.value.weight, size)
            for head in range(view.num_heads):
                columns = slice(head * size, (head + 1) * size)
                if bool(out_empty[head]):
                    counts["heads_removed"] += 1
                elif bool(value_empty[head]):
                    if view.value.bias is not None:
                        _add_bias(view.attn_out, view.attn_out.weight[:, columns] @ view.value.bias[columns])
                    counts["heads_folded"] += 1
                else:
                    heads.append(head)
        neurons = []
        if view.ffn_size:
            down_empty = (view.ffn_down.weight == 0).all(0)
            up_empty = (view.ffn_up.weight == 0).all(1)
            folding = (up_empty & ~down_empty).nonzero().flatten()
            if len(folding):
                if constants is None:
                    constants = _constant_activations(model, views)
                value = view.ffn_down.weight[:, folding] @ constants[view.index][folding].to(view.ffn_down.weight)
                _add_bias(view.ffn_down, value)
                counts["neurons_folded"] += len(folding)
            counts["neurons_removed"] += int(down_empty.sum())
            neurons = (~(down_empty | up_empty)).nonzero().flatten().tolist()
        kept_heads.append(heads)
        kept_neurons.append(neurons)
    plan = PruningPlan(
        layout=Layout.of(model),
        kept_heads=kept_heads,
        kept_neurons=kept_neurons,
        model_type=model.config.model_type,
        meta={"source": "sparse pruning: heads and FFN neurons with no weights left"},
    )
    return plan, counts


def _add_bias(linear: torch.nn.Linear, value: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(value.clone())
    else:
        linear.bias.add_(value.to(linear.bias.dtype))
