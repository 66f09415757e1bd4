"""Analytic FLOPs of one forward pass, read from the modules' actual shapes, or computed for a layout (heads and
neurons per layer) with the same formula (:func:`shape_flops`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import LayerView, get_spec, layer_list, layer_views
from slimformer.measure.base import head_modules, require_positive


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one forward pass of ``batch_size`` sequences of ``seq_len`` tokens, by component.

    ``encoder = qkv + attn_scores + attn_out + ffn`` summed over layers, and
    ``total = embeddings + encoder + head``. ``per_layer`` has one dict per layer with its ``heads``,
    ``ffn_size`` and the same four components plus their ``total``.
    """

    seq_len: int
    batch_size: int
    qkv: int
    attn_scores: int
    attn_out: int
    ffn: int
    encoder: int
    embeddings: int
    head: int
    total: int
    per_layer: list[dict[str, int]] = field(default_factory=list)

    @property
    def classifier(self) -> int:
        """Alias of :attr:`head` (pooler + classifier)."""
        return self.head

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "qkv": self.qkv,
            "attn_scores": self.attn_scores,
            "attn_out": self.attn_out,
            "ffn": self.ffn,
            "encoder": self.encoder,
            "embeddings": self.embeddings,
            "head": self.head,
            "total": self.total,
            "per_layer": [dict(layer) for layer in self.per_layer],
        }


def linear_flops(module: nn.Linear, tokens: int) -> int:
    """FLOPs of ``module`` applied to ``tokens`` vectors: one multiply-add (2 FLOPs) per weight per token."""
    return 2 * tokens * module.in_features * module.out_features


def shape_flops(
    *, hidden: int, qk_width: int, v_width: int, ffn_size: int, seq_len: int, batch_size: int = 1
) -> dict[str, int]:
    """FLOPs of one transformer layer from its widths: **the one FLOPs formula** of slimformer.

    ``hidden`` is the model width, ``qk_width`` the width of the query and key projections (heads × head size),
    ``v_width`` that of the value projection (the attention context), ``ffn_size`` the FFN neurons. Measuring a
    model (:func:`layer_flops`), summarising a pruning plan and the budget search's cost per head and per neuron
    (:func:`encoder_flops` on a layout) all evaluate this. It is linear in the widths with no fixed part, so one
    head or one neuron has a fixed cost in a layer and a layer with nothing left costs 0.
    """
    tokens = batch_size * seq_len
    qkv = 2 * tokens * hidden * (2 * qk_width + v_width)  # the q, k and v projections
    # QK^T costs 2·s·s·d per head, summed over heads: 2·s·s·(query width); softmax(...)·V likewise with the
    # value width. Separate widths (not heads × head size) keep this right if q/k and v are pruned apart.
    attn_scores = 2 * batch_size * seq_len * seq_len * (qk_width + v_width)
    attn_out = 2 * tokens * v_width * hidden
    ffn = 2 * tokens * hidden * ffn_size * 2  # up and down projections
    return {
        "qkv": qkv,
        "attn_scores": attn_scores,
        "attn_out": attn_out,
        "ffn": ffn,
        "total": qkv + attn_scores + attn_out + ffn,
    }


def layer_flops(view: LayerView, seq_len: int, batch_size: int = 1) -> dict[str, int]:
    """FLOPs of one transformer layer, from the shapes of its projections as they are now."""
    widths = {
        "hidden": view.query.in_features,
        "qk_width": view.query.out_features,
        "v_width": view.value.out_features,
        "ffn_size": view.ffn_up.out_features,
    }
    return {
        "layer": view.index,
        "heads": view.num_heads,
        "ffn_size": view.ffn_size,
        **shape_flops(**widths, seq_len=seq_len, batch_size=batch_size),
    }


def encoder_flops(
    heads: Sequence[int],
    ffn: Sequence[int],
    *,
    head_size: int,
    hidden: int,
    seq_len: int = 128,
    batch_size: int = 1,
) -> int:
    """Encoder FLOPs of a *layout*: ``heads[l]`` heads of ``head_size`` and ``ffn[l]`` FFN neurons in layer ``l``
    (0 and 0 for a dropped layer), without building the model; equals ``flops(model).encoder`` for a model of
    that layout."""
    require_positive(seq_len=seq_len, batch_size=batch_size)
    return sum(
        shape_flops(
            hidden=hidden,
            qk_width=h * head_size,
            v_width=h * head_size,
            ffn_size=f,
            seq_len=seq_len,
            batch_size=batch_size,
        )["total"]
        for h, f in zip(heads, ffn, strict=True)
    )


def flops(model: PreTrainedModel, seq_len: int = 128, batch_size: int = 1) -> FlopCounts:
    """Analytic FLOPs of one forward pass of ``batch_size`` sequences of ``seq_len`` tokens.

    A multiply-add counts as 2 FLOPs, as in ``torch.utils.flop_counter``. Every count comes from the shapes
    of the modules each layer has *now*, so it stays right after structured pruning leaves layers with
    different numbers of heads and FFN neurons. Components per layer:

    - ``qkv``: the query, key and value projections (each from its own in/out features);
    - ``attn_scores``: the two attention matmuls, QK^T and the attention-weighted sum of values
      (``2 · 2 · s² · head_size · heads`` per sequence when q/k and v have the same width);
    - ``attn_out``: the attention output projection;
    - ``ffn``: the FFN up and down projections.

    ``encoder`` is their sum over layers: **this is the number pruning budgets refer to** ("keep 50% of
    FLOPs" means 50% of the encoder FLOPs). ``head`` is the pooler and classifier, which in every supported
    family read the first token only, so they cost one token per sequence. ``embeddings`` is any linear layer
    outside the layers and the head (ELECTRA's embedding projection), applied to every token.

    Ignored, being small next to the matmuls and not counted by ``FlopCounterMode`` either: embedding
    lookups, LayerNorm, softmax, GELU, dropout, biases, residual additions, masks and position biases.
    Works on models on the meta device (it reads only shapes).
    """
    require_positive(seq_len=seq_len, batch_size=batch_size)
    spec = get_spec(model)
    per_layer = [layer_flops(view, seq_len, batch_size) for view in layer_views(model, spec)]
    heads = head_modules(model, spec)
    head_linears = {id(m): m for h in heads for m in h.modules() if isinstance(m, nn.Linear)}
    layer_linears = {id(m) for m in layer_list(model, spec).modules() if isinstance(m, nn.Linear)}
    other_linears = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m) not in head_linears and id(m) not in layer_linears
    ]
    components = {key: sum(layer[key] for layer in per_layer) for key in ("qkv", "attn_scores", "attn_out", "ffn")}
    encoder = sum(components.values())
    head = sum(linear_flops(m, batch_size) for m in head_linears.values())
    embeddings = sum(linear_flops(m, batch_size * seq_len) for m in other_linears)
    return FlopCounts(
        seq_len=seq_len,
        batch_size=batch_size,
        **components,
        encoder=encoder,
        embeddings=embeddings,
        head=head,
        total=embeddings + encoder + head,
        per_layer=per_layer,
    )
