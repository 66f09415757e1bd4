"""MPNet: attention projections under ``attention.attn`` named q, k, v, o.

MPNet adds a relative-position bias with one slice per head, computed once by the encoder for all layers; after
heads are removed from a layer, that layer must take only its own heads' slices.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.arch import ArchSpec


def _slice_position_bias(module: nn.Module, args: tuple, kwargs: dict):
    ids = module.slimformer_head_ids
    if len(args) >= 3 and args[2] is not None:  # attn(hidden_states, attention_mask, position_bias, ...)
        bias = args[2]
        return (*args[:2], bias.index_select(1, ids.to(bias.device)), *args[3:]), kwargs
    if kwargs.get("position_bias") is not None:
        bias = kwargs["position_bias"]
        return args, {**kwargs, "position_bias": bias.index_select(1, ids.to(bias.device))}
    return args, kwargs


def keep_position_bias_heads(attention: nn.Module, head_ids: list[int]) -> None:
    # an explicit device: transformers may build the model under a meta-device context, where ids would be lost
    attention.slimformer_head_ids = torch.tensor(head_ids, dtype=torch.long, device="cpu")
    if not getattr(attention, "_slimformer_bias_hook", False):
        attention.register_forward_pre_hook(_slice_position_bias, with_kwargs=True)
        attention._slimformer_bias_hook = True


SPEC = ArchSpec(
    family="mpnet",
    model_types=("mpnet",),
    layers="encoder.layer",
    attention="attention.attn",
    query="attention.attn.q",
    key="attention.attn.k",
    value="attention.attn.v",
    attn_out="attention.attn.o",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
    attn_norm="attention.LayerNorm",
    on_heads_pruned=keep_position_bias_heads,
)
