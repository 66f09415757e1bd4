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

from slimformer.arch import head_inputs, layer_views, stream_entry, stream_norms


@dataclass
class Gates:
    """Per-layer gate vectors: ``heads[l]`` has one entry per head present in layer ``l``, ``neurons[l]`` one per
    FFN neuron; ``layers`` (optional) has one entry per layer (1 keeps the layer, 0 skips it: the layer's output
    is replaced by its input); ``hidden`` (optional) has one entry per dimension of the residual stream, shared by
    every layer (see :func:`gated_layer_norm`). Any entry may be fractional, e.g. for learned or soft gates. Head
    and neuron gates may also carry a leading batch dimension (``[batch, units]``): one gate per example, whose
    gradients are then per-example gradients (used for the empirical Fisher of Kwon et al. 2022)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def _all(self) -> list[torch.Tensor]:
        return [*self.heads, *self.neurons, *(g for g in (self.layers, self.hidden) if g is not None)]

    @classmethod
    def ones(
        cls, model: PreTrainedModel, *, requires_grad: bool = False, layers: bool = False, hidden: bool = False
    ) -> Gates:
        """All-ones gates shaped like ``model``'s current layers (which may already be pruned unevenly)."""
        device = next(model.parameters()).device
        views = layer_views(model)

        def one(n: int) -> torch.Tensor:
            return torch.ones(n, device=device, requires_grad=requires_grad)

        return cls(
            heads=[one(v.num_heads) for v in views],
            neurons=[one(v.ffn_size) for v in views],
            layers=one(len(views)) if layers else None,
            hidden=one(views[0].query.in_features) if hidden and views else None,
        )

    def detach(self) -> Gates:
        def copy(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g.detach().clone()

        return Gates(
            heads=[copy(g) for g in self.heads],
            neurons=[copy(g) for g in self.neurons],
            layers=copy(self.layers),
            hidden=copy(self.hidden),
        )

    def grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Gradients accumulated on the head, neuron and layer gates (zeros where none flowed)."""

        def grad(g: torch.Tensor) -> torch.Tensor:
            return g.grad.detach().clone() if g.grad is not None else torch.zeros_like(g)

        return (
            [grad(g) for g in self.heads],
            [grad(g) for g in self.neurons],
            None if self.layers is None else grad(self.layers),
        )

    def zero_grad(self) -> None:
        for gate in self._all():
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


def gated_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, gate: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the dimensions ``gate`` keeps, zero on the others.

    The mean and variance are weighted by the gate, so a 0/1 gate gives exactly what slicing the dimensions out
    of the stream gives (a LayerNorm over fewer dimensions, then nothing there), and a fractional gate stays
    differentiable. Masking the input or output alone would not: a plain LayerNorm's statistics would still
    count the masked dimensions, and the model could not be sliced without changing its outputs.
    """
    g = gate.to(x.dtype)
    total = g.sum().clamp_min(torch.finfo(x.dtype).tiny)
    mean = (x * g).sum(-1, keepdim=True) / total
    centered = x - mean
    variance = (centered.square() * g).sum(-1, keepdim=True) / total
    normed = centered * torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        normed = normed * norm.weight
    if norm.bias is not None:
        normed = normed + norm.bias
    return normed * g


def _gated_norm_hook(gate: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        return gated_layer_norm(args[0], module, gate)

    return hook


def _gated_output_hook(gate: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        return output * gate.to(output.dtype)

    return hook


def _hidden_gate_handles(model: PreTrainedModel, gate: torch.Tensor) -> list:
    """Gate every dimension of the residual stream: it starts at the embeddings' LayerNorm (or ELECTRA's projection)
    and is re-normalised after every attention and FFN block, so gating those modules zeroes the gated dimensions
    everywhere the layers and the task head read the stream. Raises for a model whose width the gate does not fit
    or whose output is the stream itself (an embedding model: the embedding would change size)."""
    if not head_inputs(model):
        raise ValueError("hidden-dimension gates need a task head: an embedding model's output is the stream itself")
    if gate.dim() != 1:
        raise ValueError("hidden-dimension gates are one vector shared by every example")
    _, entry = stream_entry(model)
    width = entry.out_features if isinstance(entry, nn.Linear) else entry.normalized_shape[-1]
    if gate.shape[0] != width:
        raise ValueError(f"hidden gates cover {gate.shape[0]} dimensions, the model's stream has {width}")
    handles = []
    if isinstance(entry, nn.LayerNorm):
        handles.append(entry.register_forward_hook(_gated_norm_hook(gate)))
    else:
        handles.append(entry.register_forward_hook(_gated_output_hook(gate)))
    for _, _, norm in stream_norms(model):
        handles.append(norm.register_forward_hook(_gated_norm_hook(gate)))
    return handles


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
        if gates.hidden is not None:
            handles.extend(_hidden_gate_handles(model, gates.hidden))
        yield gates
    finally:
        for handle in handles:
            handle.remove()
