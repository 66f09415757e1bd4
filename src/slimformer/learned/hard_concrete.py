"""The hard-concrete distribution (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization"): a relaxed Bernoulli stretched past [0, 1] and clipped, so a gate is exactly 0 or exactly 1 with
positive probability and differentiable in between. Its probability of being non-zero is a closed form in the
gate's ``log_alpha``, which makes the expected number of open gates (the L0 norm) differentiable."""

from __future__ import annotations

import math

import torch
from torch import nn

# Louizos et al.'s constants: temperature 2/3, stretched to (-0.1, 1.1)
BETA = 2.0 / 3.0
LOW, HIGH = -0.1, 1.1


class HardConcrete(nn.Module):
    """``size`` independent hard-concrete gates with learned ``log_alpha`` (larger: more likely open).

    In training mode :meth:`forward` draws one sample of every gate (shared by the whole batch); in eval mode it
    returns the deterministic gate, the clipped stretched sigmoid of ``log_alpha``."""

    def __init__(self, size: int, init: float = 2.0) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((size,), float(init)))

    def forward(self) -> torch.Tensor:
        if self.training:
            eps = 1e-6
            u = torch.rand_like(self.log_alpha).clamp(eps, 1 - eps)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        """P(gate != 0) for every gate: the expected L0 norm is their sum."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LOW / HIGH))

    def expected_open(self) -> int:
        """The expected number of open gates, rounded: how many the final structure keeps."""
        return round(self.open_probability().detach().sum().item())

    def keep_top(self, count: int | None = None) -> list[int]:
        """Indices of the ``count`` (default: the expected number of) gates with the largest ``log_alpha``."""
        count = self.expected_open() if count is None else count
        order = torch.argsort(self.log_alpha.detach(), descending=True, stable=True)
        return sorted(order[:count].tolist())
