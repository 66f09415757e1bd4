"""Recover accuracy after compression by distilling from the unpruned teacher (logit and TinyBERT-style layer
distillation) into pruned, layer-dropped or DistilBERT-style students."""

from slimformer.distill.pipeline import (
    DistillationModel,
    DistillConfig,
    DistillResult,
    distill,
    head_pairing,
    layer_mapping,
    teacher_logits,
)
from slimformer.distill.students import Student, make_student

__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistillationModel",
    "Student",
    "distill",
    "head_pairing",
    "layer_mapping",
    "make_student",
    "teacher_logits",
]
