"""Gates on attention heads, FFN neurons and whole layers, installed as hooks (no model code changed).

transformers v5 removed ``head_mask``; slimformer gates heads instead with a forward pre-hook on the input of the
attention output projection, where each head's context vector occupies its own ``head_size`` slice. FFN neurons
are gated on the input of the FFN down projection. A gate of 1 changes nothing, 0 removes the unit's
contribution exactly as physically removing it would (the projections' biases stay). Gates are ordinary tensors:
give them ``requires_grad=True`` to read importance scores off their gradients (Michel et al. 2019, "Are Sixteen
Heads Really Better than One?").

They sit below :mod:`slimformer.prune` because importance scoring, the gate gradients and the analyses use them
as much as masking does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import layer_views


@dataclass
class Gates:
    """Per-layer gate vectors: ``heads[l]`` has one entry per head present in layer ``l``, ``neurons[l]`` one per
    FFN neuron; ``layers`` (optional) has one entry per layer (1 keeps the layer, 0 skips it: the layer's output
    is replaced by its input). Any entry may be fractional, e.g. for learned or soft gates. A gate may also carry
    a leading batch dimension (``[batch, units]``): one gate per example, whose gradients are then per-example
    gradients (used for the empirical Fisher of Kwon et al. 2022)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor | None = None

    @classmethod
    def ones(cls, model: PreTrainedModel, *, requires_grad: bool = False, layers: bool = False) -> Gates:
        """All-ones gates shaped like ``model``'s current layers (which may already be pruned unevenly)."""
        device = next(model.parameters()).device
        views = layer_views(model)

        def one(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, requires_grad=requires_grad)

        return cls(
            heads=[one(v.num_heads) for v in views],
            neurons=[one(v.ffn_size) for v in views],
            layers=one(len(views)) if layers else None,
        )

    def detach(self) -> Gates:
        return Gates(
            heads=[g.detach().clone() for g in self.heads],
            neurons=[g.detach().clone() for g in self.neurons],
            layers=None if self.layers is None else self.layers.detach().clone(),
        )

    def grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Gradients accumulated on the gates (zeros where none flowed)."""

        def grad(g: torch.Tensor) -> torch.Tensor:
            return g.grad.detach().clone() if g.grad is not None else torch.zeros_like(g)

        return (
            [grad(g) for g in self.heads],
            [grad(g) for g in self.neurons],
            None if self.layers is None else grad(self.layers),
        )

    def zero_grad(self) -> None:
        for gate in [*self.heads, *self.neurons, *([self.layers] if self.layers is not None else [])]:
            gate.grad = None


def _head_gate_hook(gate: torch.Tensor, head_size: int):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
        (context,) = args[:1]
        # each head's context occupies a contiguous head_size slice of the projection's input
        scale = gate.to(context.dtype).repeat_interleave(head_size, dim=-1)
        if scale.dim() == 2:  # per-example gates: [batch, width] -> [batch, 1, width]
            scale = scale[:, None, :]
        return (context * scale, *args[1:])

    return hook


def _neuron_gate_hook(gate: torch.Tensor):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]):
        scale = gate.to(args[0].dtype)
        if scale.dim() == 2:  # per-example gates
            scale = scale[:, None, :]
        return (args[0] * scale, *args[1:])

    return hook


def _layer_gate_hook(gate: torch.Tensor):
    """out = g * layer(x) + (1 - g) * x: g = 0 skips the layer exactly, and g stays differentiable."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        g = gate.to(hidden_out.dtype)
        mixed = g * hidden_out + (1 - g) * hidden_in
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    return hook


@contextmanager
def gated(model: PreTrainedModel, gates: Gates) -> Iterator[Gates]:
    """Install ``gates`` on ``model`` for the duration of the ``with`` block; the hooks are always removed."""
    views = layer_views(model)
    if len(gates.heads) != len(views) or len(gates.neurons) != len(views):
        raise ValueError(f"gates cover {len(gates.heads)} layers, the model has {len(views)}")
    handles = []
    try:
        for view, head_gate, neuron_gate in zip(views, gates.heads, gates.neurons, strict=True):
            if head_gate.shape[-1] != view.num_heads or neuron_gate.shape[-1] != view.ffn_size:
                raise ValueError(
                    f"layer {view.index}: gates for {head_gate.shape[-1]} heads / {neuron_gate.shape[-1]} neurons, "
                    f"the layer has {view.num_heads} / {view.ffn_size}"
                )
            handles.append(view.attn_out.register_forward_pre_hook(_head_gate_hook(head_gate, view.head_size)))
            handles.append(view.ffn_down.register_forward_pre_hook(_neuron_gate_hook(neuron_gate)))
            if gates.layers is not None:
                handles.append(
                    view.layer.register_forward_hook(_layer_gate_hook(gates.layers[view.index]), with_kwargs=True)
                )
        yield gates
    finally:
        for handle in handles:
            handle.remove()
