"""What the measuring modules share: their error type and which modules make up a model's head."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import ArchSpec, classifier_modules, get_spec
from slimformer.errors import SlimformerError


class MeasureError(SlimformerError):
    """A measurement was asked for with impossible settings (a bad size, a missing folder or device)."""


def head_modules(model: PreTrainedModel, spec: ArchSpec | None = None) -> list[nn.Module]:
    """The modules after the transformer layers: the base model's pooler (if any) and the classifier."""
    spec = spec or get_spec(model)
    modules: list[nn.Module] = []
    # BERT keeps its pooler on the base model, outside the spec's classifier paths; it is head, not encoder.
    pooler = getattr(model.base_model, "pooler", None)
    if isinstance(pooler, nn.Module):
        modules.append(pooler)
    for module in classifier_modules(model, spec):
        if all(module is not seen for seen in modules):
            modules.append(module)
    return modules


def require_positive(**values: int) -> None:
    """Raise :class:`MeasureError` naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MeasureError(f"{name} must be a positive integer, got {value!r}")
