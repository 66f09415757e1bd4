"""Which whole layers to drop: the strategies of Sajjad et al. 2020 ("On the Effect of Dropping Layers of
Pre-trained Transformer Models", a.k.a. "Poor Man's BERT"): top, bottom, alternate, symmetric and
contribution-based. Layer indices count from 0 at the bottom (next to the embeddings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimformer.arch import layer_views
from slimformer.errors import SlimformerError
from slimformer.gradients import model_inputs
from slimformer.importance import importance_sample
from slimformer.tasks import TaskData

STRATEGIES = ("top", "bottom", "alternate", "symmetric", "contribution")


def parse_drop_layers(text: str) -> tuple[str, int]:
    """``"top:2"`` -> ("top", 2), with a clear error for anything else."""
    strategy, _, count = text.partition(":")
    if strategy not in STRATEGIES or not count.isdigit():
        raise SlimformerError(
            f"--drop-layers {text!r} is not understood: write STRATEGY:K with STRATEGY one of {', '.join(STRATEGIES)} "
            "and K the number of layers to drop, e.g. top:2."
        )
    return strategy, int(count)


def layers_to_drop(strategy: str, num_layers: int, k: int, contributions: Sequence[float] | None = None) -> list[int]:
    """The ``k`` layer indices a strategy drops from a ``num_layers``-layer model.

    top: the last k; bottom: the first k; alternate: every other layer from the top (L-1, L-3, ...); symmetric:
    k layers from the middle, keeping the bottom and top ones; contribution: the k layers whose output differs
    least from their input (needs ``contributions``, see :func:`layer_contributions`).
    """
    if not 0 <= k < num_layers:
        raise SlimformerError(f"Cannot drop {k} of {num_layers} layers: keep at least one (0 <= K < {num_layers}).")
    if strategy == "top":
        return list(range(num_layers - k, num_layers))
    if strategy == "bottom":
        return list(range(k))
    if strategy == "alternate":
        order = list(range(num_layers - 1, -1, -2)) + list(range(num_layers - 2, -1, -2))
        return sorted(order[:k])
    if strategy == "symmetric":
        start = (num_layers - k) // 2
        return list(range(start, start + k))
    if strategy == "contribution":
        if contributions is None or len(contributions) != num_layers:
            raise SlimformerError("The contribution strategy needs one contribution score per layer.")
        order = sorted(range(num_layers), key=lambda i: (contributions[i], i))
        return sorted(order[:k])
    raise SlimformerError(f"Unknown layer-dropping strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")


def layer_contributions(model: PreTrainedModel, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """How much each layer changes its input: 1 - mean cosine similarity between the hidden states entering and
    leaving it, over the real tokens of ``batches`` (Sajjad et al.'s contribution-based dropping)."""
    views = layer_views(model)
    device = next(model.parameters()).device
    totals = [0.0] * len(views)
    count = 0
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            seen[index] = (hidden_in, hidden_out)

        return record

    handles = [v.layer.register_forward_hook(hook(v.index), with_kwargs=True) for v in views]
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = model_inputs(batch, device)
                model(**inputs)
                valid = inputs["attention_mask"].bool()
                for index, (hidden_in, hidden_out) in seen.items():
                    cosine = torch.nn.functional.cosine_similarity(hidden_in[valid], hidden_out[valid], dim=-1)
                    totals[index] += float((1 - cosine).sum())
                count += int(valid.sum())
    finally:
        for handle in handles:
            handle.remove()
    return [total / max(count, 1) for total in totals]


def choose_layers_to_drop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    text: str,
    *,
    n_examples: int = 256,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> list[int]:
    """The layer indices ``text`` (``STRATEGY:K``) drops from ``model``; the contribution strategy measures each
    layer on ``n_examples`` training examples of ``data``."""
    strategy, count = parse_drop_layers(text)
    contributions = None
    if strategy == "contribution":
        sample = importance_sample(
            tokenizer, data, n_examples=n_examples, batch_size=batch_size, max_length=max_length, seed=seed
        )
        contributions = layer_contributions(model, sample.batches)
    return layers_to_drop(strategy, len(layer_views(model)), count, contributions)
