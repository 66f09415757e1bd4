"""The 'good', 'random' and 'bad' subnetworks of Prasanna, Rogers & Rumshisky 2020 ("When BERT Plays the Lottery,
All Tickets Are Winning", §5).

* good: what pruning kept (the survivors).
* random: as many elements as the good subnetwork, drawn uniformly at random from all of them.
* bad: the elements pruning removed, topped up with randomly drawn survivors to the same size; when more elements
  were pruned than survived, a random subset of the pruned ones of that size (it then contains no survivor).

For s-pruning the elements are heads (drawn across all layers) and whole MLPs, counted separately, so all three
subnetworks have the same number of heads and the same number of MLPs. For m-pruning the elements are weights,
drawn within each weight matrix, so every matrix keeps the same number of weights in all three. Draws are
seeded (``seed`` plus a fixed offset per kind) and so reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from slimformer.analyze.common import AnalyzeError
from slimformer.analyze.magnitude import WeightMasks
from slimformer.prune.plan import PruningPlan

SUBNETWORKS = ("good", "random", "bad")
_OFFSET = {"random": 1, "bad": 2}


def _rng(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, _OFFSET[kind]])


def _draw(universe: list, kept: list, kind: str, rng: np.random.Generator) -> list:
    """Indices into ``universe`` for the random or bad subnetwork with ``len(kept)`` elements."""
    n = len(kept)
    kept_set = set(kept)
    if kind == "random":
        chosen = rng.choice(len(universe), size=n, replace=False) if n else []
        return sorted(universe[int(i)] for i in chosen)
    pruned = [u for u in universe if u not in kept_set]
    if len(pruned) >= n:
        chosen = rng.choice(len(pruned), size=n, replace=False) if n else []
        return sorted(pruned[int(i)] for i in chosen)
    survivors = sorted(kept_set)
    extra = rng.choice(len(survivors), size=n - len(pruned), replace=False)
    return sorted(pruned + [survivors[int(i)] for i in extra])


def structured_subnetworks(
    plan: PruningPlan, seed: int, kinds: tuple[str, ...] = SUBNETWORKS
) -> dict[str, PruningPlan]:
    """Good/random/bad plans for an s-pruning plan (heads, and whole MLPs: a layer keeps all its FFN or none)."""
    layout = plan.layout
    if plan.dropped_layers:
        raise AnalyzeError("Subnetworks are defined on heads and MLPs; this plan drops whole layers.")
    for layer, kept in enumerate(plan.kept_neurons):
        if kept and len(kept) != layout.ffn[layer]:
            raise AnalyzeError(f"Layer {layer} keeps part of its FFN; s-pruning keeps or removes whole MLPs.")
    all_heads = [(layer, head) for layer, n in enumerate(layout.heads) for head in range(n)]
    kept_heads = [(layer, head) for layer, heads in enumerate(plan.kept_heads) for head in heads]
    all_mlps = list(range(layout.num_layers))
    kept_mlps = [layer for layer, kept in enumerate(plan.kept_neurons) if kept]
    result = {}
    for kind in kinds:
        if kind == "good":
            result[kind] = plan
            continue
        if kind not in _OFFSET:
            raise AnalyzeError(f"Unknown subnetwork {kind!r}; use good, random or bad.")
        rng = _rng(seed, kind)
        heads = _draw(all_heads, kept_heads, kind, rng)
        mlps = _draw(all_mlps, kept_mlps, kind, rng)
        result[kind] = PruningPlan(
            layout=layout,
            kept_heads=[[h for (l2, h) in heads if l2 == layer] for layer in range(layout.num_layers)],
            kept_neurons=[list(range(layout.ffn[layer])) if layer in mlps else [] for layer in all_mlps],
            model_type=plan.model_type,
            meta={"subnetwork": kind, "seed": seed},
        )
    return result


def weight_subnetworks(masks: WeightMasks, seed: int, kinds: tuple[str, ...] = SUBNETWORKS) -> dict[str, WeightMasks]:
    """Good/random/bad weight masks for m-pruning masks, drawn within each matrix (same count per matrix)."""
    result = {}
    for kind in kinds:
        if kind == "good":
            result[kind] = masks
            continue
        if kind not in _OFFSET:
            raise AnalyzeError(f"Unknown subnetwork {kind!r}; use good, random or bad.")
        rng = _rng(seed, kind)
        new = {}
        for name, mask in masks.masks.items():
            flat = mask.reshape(-1).cpu().numpy()
            n = int(flat.sum())
            out = np.zeros_like(flat)
            if kind == "random":
                out[rng.choice(flat.size, size=n, replace=False)] = True
            else:
                pruned = np.flatnonzero(~flat)
                if len(pruned) >= n:
                    out[rng.choice(pruned, size=n, replace=False)] = True
                else:
                    out[pruned] = True
                    out[rng.choice(np.flatnonzero(flat), size=n - len(pruned), replace=False)] = True
            new[name] = torch.from_numpy(out.reshape(tuple(mask.shape)))
        result[kind] = WeightMasks(new)
    return result
