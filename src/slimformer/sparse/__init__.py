"""Weight-level (sparse) pruning: one-shot magnitude, gradual magnitude (GMP*) and movement pruning, on single
weights, square blocks or whole heads; heads and neurons left empty are removed physically.

Use it through the front door: ``slimformer.prune(model, Movement(sparsity=0.9, granularity="block:32"), "stsb")``
(configs in :mod:`slimformer.configs`), or ``slimformer prune --sparse movement --sparsity 0.9``.
"""

from slimformer.sparse.masks import (
    Granularity,
    SparsityError,
    WeightMasks,
    apply_masks,
    encoder_linears,
    magnitude_masks,
    masked_weights,
)
from slimformer.sparse.schedule import CubicSchedule
from slimformer.sparse.structure import removable_units

__all__ = [
    "CubicSchedule",
    "Granularity",
    "SparsityError",
    "WeightMasks",
    "apply_masks",
    "encoder_linears",
    "magnitude_masks",
    "masked_weights",
    "removable_units",
]
