"""Learned structured pruning: hard-concrete gates on heads, FFN neurons, whole blocks and hidden dimensions,
trained to a target size (:class:`~slimformer.configs.Learned`)."""

from slimformer.learned.hard_concrete import HardConcrete
from slimformer.learned.structure import StructureGates

__all__ = ["HardConcrete", "StructureGates"]
