"""Parameter counts, split into embeddings, encoder layers and head."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import get_spec, layer_list
from slimformer.measure.base import head_modules


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model; ``embeddings + encoder + head == total``."""

    total: int
    embeddings: int
    encoder: int
    head: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _params_by_id(modules: Iterable[nn.Module]) -> dict[int, nn.Parameter]:
    # Keyed by identity so that a parameter shared between modules (tied weights) is counted once.
    return {id(p): p for module in modules for p in module.parameters()}


def count_parameters(model: PreTrainedModel) -> ParamCounts:
    """Count the parameters of ``model``, split by where they sit.

    ``encoder`` is every parameter of the transformer layers; ``head`` is the pooler (BERT) and the
    classifier; ``embeddings`` is everything else, i.e. what comes before the layers: token, position and type
    embeddings with their LayerNorm, ELECTRA's embedding projection and MPNet's relative-position bias table.
    Works on models on the meta device too (it reads only shapes).
    """
    spec = get_spec(model)
    every = _params_by_id([model])
    encoder = _params_by_id([layer_list(model, spec)])
    head = {key: p for key, p in _params_by_id(head_modules(model, spec)).items() if key not in encoder}
    total = sum(p.numel() for p in every.values())
    encoder_count = sum(p.numel() for p in encoder.values())
    head_count = sum(p.numel() for p in head.values())
    return ParamCounts(
        total=total,
        embeddings=total - encoder_count - head_count,
        encoder=encoder_count,
        head=head_count,
    )
