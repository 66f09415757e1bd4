"""Structured pruning: plans, masking (through :mod:`slimformer.gates`) and physical removal of heads, FFN neurons
and layers."""

from slimformer.prune.apply import MaskHandle, apply_plan, masked, plan_gates, remove
from slimformer.prune.plan import Layout, PlanError, PruningPlan, plan_from_scores

__all__ = [
    "Layout",
    "MaskHandle",
    "PlanError",
    "PruningPlan",
    "apply_plan",
    "masked",
    "plan_from_scores",
    "plan_gates",
    "remove",
]
