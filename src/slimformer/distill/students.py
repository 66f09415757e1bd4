"""Students for distillation: a model folder (for example one pruned by ``slimformer prune``), or a smaller copy
of the teacher made by dropping whole layers.

Student specifications:

- a model folder or hub id: used as it is (pruned folders from slimformer included);
- ``drop:STRATEGY:K``: the teacher minus K layers chosen by a strategy of Sajjad et al. 2020 ("Poor Man's BERT":
  top, bottom, alternate, symmetric, contribution);
- ``every:K``: DistilBERT-style initialisation (Sanh et al. 2019): keep every K-th teacher layer, starting
  with the first (``every:2`` keeps layers 0, 2, 4 of six);
- ``layers:0,2,5``: keep exactly these teacher layers.

A student made from its teacher remembers which teacher layer and which teacher heads each of its layers and
heads came from (heads through the model's recorded layout), so intermediate-layer distillation can pair them
exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimformer.arch import layer_views
from slimformer.errors import SlimformerError
from slimformer.folders import read_manifest
from slimformer.models import LoadedModel, load_model
from slimformer.prune.apply import remove
from slimformer.prune.layers import choose_layers_to_drop
from slimformer.prune.plan import PruningPlan
from slimformer.tasks import TaskData

STUDENT_FORMS = "a model folder, 'drop:STRATEGY:K', 'every:K' or 'layers:I,J,...'"


@dataclass
class Student:
    """The student model and what is known of where its parts came from in the teacher."""

    loaded: LoadedModel
    description: str
    origin_layers: list[int] | None = None
    """Teacher layer index of each student layer, when the student was derived from the teacher."""
    plan: PruningPlan | None = None
    """The layer-dropping plan applied to the teacher, for students made here."""

    @property
    def model(self) -> PreTrainedModel:
        return self.loaded.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer


def is_derived_spec(spec: str) -> bool:
    return spec.split(":", 1)[0] in ("drop", "every", "layers") and ":" in spec


def _kept_layers(spec: str, model: PreTrainedModel, tokenizer, data: TaskData, **sample) -> list[int]:
    num_layers = len(layer_views(model))
    kind, _, rest = spec.partition(":")
    if kind == "drop":
        dropped = choose_layers_to_drop(model, tokenizer, data, rest, **sample)
        return [i for i in range(num_layers) if i not in dropped]
    if kind == "every":
        if not rest.isdigit() or int(rest) < 1:
            raise SlimformerError(f"Student {spec!r}: write every:K with K a whole number >= 1, e.g. every:2.")
        return list(range(0, num_layers, int(rest)))
    try:
        kept = sorted({int(part) for part in rest.split(",") if part.strip()})
    except ValueError:
        raise SlimformerError(
            f"Student {spec!r}: write layers:I,J,... with teacher layer indices, e.g. layers:0,2,4."
        ) from None
    bad = [i for i in kept if not 0 <= i < num_layers]
    if not kept or bad:
        raise SlimformerError(
            f"Student {spec!r}: layer indices must be in 0..{num_layers - 1} and at least one must be kept."
        )
    return kept


def make_student(
    spec: str | os.PathLike[str],
    teacher: str | os.PathLike[str],
    data: TaskData,
    *,
    n_examples: int = 256,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> Student:
    """Build or load the student described by ``spec`` (see the module docstring) for ``data``'s task."""
    text = str(spec)
    if is_derived_spec(text):
        loaded = load_model(teacher, data.spec)
        kept = _kept_layers(
            text,
            loaded.model,
            loaded.tokenizer,
            data,
            n_examples=n_examples,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
        )
        base = PruningPlan.keep_all(loaded.model)
        plan = PruningPlan(
            layout=base.layout,
            kept_heads=base.kept_heads,
            kept_neurons=base.kept_neurons,
            dropped_layers=[i for i in range(base.layout.num_layers) if i not in kept],
            model_type=base.model_type,
            meta={"student": text},
        )
        remove(loaded.model, plan)
        return Student(loaded, text, origin_layers=kept, plan=plan)
    if not Path(text).exists() and ":" in text:
        raise SlimformerError(f"Student {text!r} is not understood: give {STUDENT_FORMS}.")
    loaded = load_model(text, data.spec)
    origin = _recorded_origin(text, len(layer_views(loaded.model)))
    return Student(loaded, text, origin_layers=origin)


def _recorded_origin(folder: str, num_layers: int) -> list[int] | None:
    """Teacher layer indices of a folder saved by ``slimformer prune`` (its plan says which layers it dropped)."""
    manifest = read_manifest(folder) if Path(folder).is_dir() else None
    if not manifest or not manifest.get("plan"):
        return None
    plan = PruningPlan.from_dict(manifest["plan"])
    kept = plan.kept_layers
    return kept if len(kept) == num_layers else None
