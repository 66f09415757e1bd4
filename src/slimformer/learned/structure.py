"""The gates of learned structured pruning, one hard-concrete group per kind of unit, and what they imply: a sample
of :class:`~slimformer.gates.Gates` for a training step, the expected model size (differentiable), and the
structure to keep at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import layer_views
from slimformer.gates import Gates
from slimformer.layout import model_width
from slimformer.learned.hard_concrete import HardConcrete

if TYPE_CHECKING:
    from slimformer.budget.latency_table import LatencyTable


class StructureGates(nn.Module):
    """Hard-concrete gates on ``units`` of ``model``: ``heads`` (per head), ``ffn`` (per FFN neuron), ``blocks``
    (one per layer's whole attention and one per its whole FFN) and ``hidden`` (per residual-stream dimension,
    shared by all layers), as CoFi gates them (Xia et al. 2022)."""

    def __init__(self, model: PreTrainedModel, units: tuple[str, ...], init: float = 2.0) -> None:
        super().__init__()
        views = layer_views(model)
        self.units = tuple(units)
        self.head_counts = [v.num_heads for v in views]
        self.ffn_sizes = [v.ffn_size for v in views]
        self.head_size = views[0].head_size
        self.width = model_width(model)
        layers = len(views)
        self.heads = nn.ModuleList(HardConcrete(n, init) for n in self.head_counts) if "heads" in units else None
        self.neurons = nn.ModuleList(HardConcrete(n, init) for n in self.ffn_sizes) if "ffn" in units else None
        self.attn_blocks = HardConcrete(layers, init) if "blocks" in units else None
        self.ffn_blocks = HardConcrete(layers, init) if "blocks" in units else None
        self.hidden = HardConcrete(self.width, init) if "hidden" in units else None
        # with a latency table the gates are driven to a latency instead of a size (Learned.target_speedup)
        self.latency: LatencyTable | None = None

    @torch.no_grad()
    def spread_by_importance(self, head_scores, neuron_scores, spread: float) -> None:
        """Spread the head gates' and the neuron gates' starting ``log_alpha`` by importance: each unit moves by
        ``spread * (rank - 1/2)``, with rank its importance percentile among all units of its kind (every
        layer together, as Kwon et al.'s search compares them). With every gate starting alike, the Lagrangian
        pushes them down in lockstep; started in order, the least important close first. Meant against the
        early overshoot of bench/results/learned_sst2.md, where it measured no gain at 8x in 1,000 steps (81.88
        against 81.31, one seed). Scores: one array per layer."""
        for groups, scores in ((self.heads, head_scores), (self.neurons, neuron_scores)):
            if groups is None or not spread:
                continue
            flat = torch.cat([torch.as_tensor(s, dtype=torch.float64).flatten() for s in scores])
            if flat.numel() != sum(g.log_alpha.numel() for g in groups):
                raise ValueError("one importance score per gate is needed")
            ranks = flat.argsort(stable=True).argsort().double() / max(flat.numel() - 1, 1)
            offsets = (ranks - 0.5) * spread
            start = 0
            for gate in groups:
                n = gate.log_alpha.numel()
                gate.log_alpha.add_(offsets[start : start + n].to(gate.log_alpha))
                start += n

    # ---------------------------------------------------------------------------------------------- sampling
    def sample(self) -> Gates:
        """One draw of every gate (training mode) or the deterministic gates (eval mode), as model gates: a
        block's gate multiplies the gates of the units in it."""
        device = next(self.parameters()).device
        heads, neurons = [], []
        attn = self.attn_blocks() if self.attn_blocks is not None else None
        ffn = self.ffn_blocks() if self.ffn_blocks is not None else None
        for layer, (n_heads, n_neurons) in enumerate(zip(self.head_counts, self.ffn_sizes, strict=True)):
            head = self.heads[layer]() if self.heads is not None else torch.ones(n_heads, device=device)
            neuron = self.neurons[layer]() if self.neurons is not None else torch.ones(n_neurons, device=device)
            heads.append(head * attn[layer] if attn is not None else head)
            neurons.append(neuron * ffn[layer] if ffn is not None else neuron)
        hidden = self.hidden() if self.hidden is not None else None
        return Gates(heads=heads, neurons=neurons, hidden=hidden)

    # --------------------------------------------------------------------------------------------- model size
    def _expected_counts(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        device = next(self.parameters()).device
        attn = self.attn_blocks.open_probability() if self.attn_blocks is not None else None
        ffn = self.ffn_blocks.open_probability() if self.ffn_blocks is not None else None
        heads, neurons = [], []
        for layer, (n_heads, n_neurons) in enumerate(zip(self.head_counts, self.ffn_sizes, strict=True)):
            h = self.heads[layer].open_probability().sum() if self.heads is not None else torch.tensor(float(n_heads))
            f = (
                self.neurons[layer].open_probability().sum()
                if self.neurons is not None
                else torch.tensor(float(n_neurons))
            )
            heads.append((h * attn[layer] if attn is not None else h).to(device))
            neurons.append((f * ffn[layer] if ffn is not None else f).to(device))
        hidden = self.hidden.open_probability().sum() if self.hidden is not None else torch.tensor(float(self.width))
        return heads, neurons, hidden.to(device)

    def encoder_weights(self, heads, neurons, hidden) -> torch.Tensor:
        """Weights of the encoder's linear layers for per-layer head and neuron counts and a stream width (what
        CoFi counts: q, k, v and output projections, FFN up and down; biases and LayerNorms are negligible)."""
        per_layer = [4 * self.head_size * h * hidden + 2 * f * hidden for h, f in zip(heads, neurons, strict=True)]
        return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in per_layer]).sum()

    def dense_weights(self) -> float:
        return float(self.encoder_weights(self.head_counts, self.ffn_sizes, self.width))

    def expected_sparsity(self) -> torch.Tensor:
        """The expected share of the encoder's weights removed (differentiable in every ``log_alpha``)."""
        return 1 - self.encoder_weights(*self._expected_counts()) / self.dense_weights()

    # ------------------------------------------------------------------------------------------ model latency
    def predicted_ms(self, heads, neurons) -> torch.Tensor:
        """The latency table's prediction for per-layer head and neuron counts (tensors: differentiable, the
        table's curves interpolated piecewise linearly, as :meth:`LatencyTable.layer_ms` does)."""
        table = self.latency
        total = torch.tensor(table.rest_ms)
        for h, f in zip(heads, neurons, strict=True):
            attention = _interpolate(torch.as_tensor(h, dtype=torch.float32), table.head_counts, table.attn_ms)
            ffn = _interpolate(torch.as_tensor(f, dtype=torch.float32), table.neuron_counts, table.ffn_ms)
            total = total + (attention + ffn - table.fixed_ms).clamp_min(0.0)
        return total

    def priced_ms(self, heads, neurons) -> torch.Tensor:
        """The latency the gates are trained against: each of the table's curves replaced by its least-squares
        line, i.e. one price per head and one per neuron. The measured curves are noisy: on our 2-core machine
        MiniLM's FFN curve falls in 5 of its 24 steps and its last step costs a quarter of the mean, and
        following those slopes the Lagrangian closed every head of an SST-2 model before it moved a neuron
        (then no attention was left: chance accuracy). A line keeps every unit's price positive and steady."""
        (head_price, attn_base), (neuron_price, ffn_base) = self._prices()
        total = torch.tensor(self.latency.rest_ms)
        for h, f in zip(heads, neurons, strict=True):
            h, f = torch.as_tensor(h, dtype=torch.float32), torch.as_tensor(f, dtype=torch.float32)
            layer = attn_base + head_price * h + ffn_base + neuron_price * f - self.latency.fixed_ms
            total = total + layer.clamp_min(0.0)
        return total

    def _prices(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(price per unit, intercept) of the attention and FFN curves; a fit of a few dozen points, cheap next to
        the training step that asks for it."""
        import numpy as np

        lines = []
        for counts, ms in (
            (self.latency.head_counts, self.latency.attn_ms),
            (self.latency.neuron_counts, self.latency.ffn_ms),
        ):
            if len(counts) < 2:  # one measured point: no slope to read, price by the point's mean cost
                lines.append((ms[0] / max(counts[0], 1), 0.0))
                continue
            slope, intercept = np.polyfit(np.asarray(counts, float), np.asarray(ms, float), 1)
            # a curve that does not rise is noise at this size: never reward keeping a unit
            lines.append((max(float(slope), 1e-6), float(intercept)))
        return lines[0], lines[1]

    def expected_latency_reduction(self) -> torch.Tensor:
        """1 - the latency at the expected head and neuron counts over the dense model's, from the per-unit
        prices of :meth:`priced_ms` (the table's curves as lines)."""
        heads, neurons, _ = self._expected_counts()
        dense = self.priced_ms(self.head_counts, self.ffn_sizes)
        return 1 - self.priced_ms([h.cpu() for h in heads], [f.cpu() for f in neurons]) / dense

    def expected_reduction(self) -> torch.Tensor:
        """What the Lagrangian pushes to its target: the expected latency reduction with a latency table, the
        expected sparsity without."""
        return self.expected_latency_reduction() if self.latency is not None else self.expected_sparsity()

    def structure_speedup(self, structure) -> float | None:
        """The latency table's predicted speedup of a fixed structure (None without a table)."""
        if self.latency is None:
            return None
        kept_heads, kept_neurons, _ = structure
        dense = self.predicted_ms(self.head_counts, self.ffn_sizes)
        pruned = self.predicted_ms([len(k) for k in kept_heads], [len(k) for k in kept_neurons])
        return float(dense / pruned)

    @torch.no_grad()
    def meet_target(self, target: float, tolerance: float = 0.01) -> float:
        """Where the expected reduction (:meth:`expected_reduction`) is more than ``tolerance`` from ``target``,
        add one shift to every
        log_alpha so that it meets the target (bisection); the ranking within each group is unchanged. Returns
        the shift (0.0 when none was needed)."""
        if abs(float(self.expected_reduction()) - target) <= tolerance:
            return 0.0
        alphas = [p for p in self.parameters()]
        original = [p.detach().clone() for p in alphas]

        def sparsity_at(shift: float) -> float:
            for p, o in zip(alphas, original, strict=True):
                p.copy_(o + shift)
            return float(self.expected_reduction())

        low, high = -30.0, 30.0  # sparsity falls as the shift grows
        for _ in range(60):
            middle = (low + high) / 2
            if sparsity_at(middle) > target:
                low = middle
            else:
                high = middle
        shift = (low + high) / 2
        sparsity_at(shift)
        return shift

    # ------------------------------------------------------------------------------------------ final structure
    def final_structure(self) -> tuple[list[list[int]], list[list[int]], list[int] | None]:
        """(kept heads per layer, kept neurons per layer, kept hidden dimensions or None): every group keeps its
        expected number of open gates, those with the largest ``log_alpha`` (CoFi's deterministic gates); a
        closed block keeps nothing of its layer."""
        layers = range(len(self.head_counts))
        attn_kept = set(self.attn_blocks.keep_top()) if self.attn_blocks is not None else set(layers)
        ffn_kept = set(self.ffn_blocks.keep_top()) if self.ffn_blocks is not None else set(layers)
        kept_heads = [
            (self.heads[i].keep_top() if self.heads is not None else list(range(n))) if i in attn_kept else []
            for i, n in zip(layers, self.head_counts, strict=True)
        ]
        kept_neurons = [
            (self.neurons[i].keep_top() if self.neurons is not None else list(range(n))) if i in ffn_kept else []
            for i, n in zip(layers, self.ffn_sizes, strict=True)
        ]
        kept_hidden = None
        if self.hidden is not None:
            kept_hidden = self.hidden.keep_top(max(1, self.hidden.expected_open()))
        return kept_heads, kept_neurons, kept_hidden

    def fixed_gates(self, structure) -> Gates:
        """0/1 gates that keep exactly ``structure`` (the final phase trains under them)."""
        kept_heads, kept_neurons, kept_hidden = structure
        device = next(self.parameters()).device

        def mask(size: int, keep: list[int]) -> torch.Tensor:
            gate = torch.zeros(size, device=device)
            gate[keep] = 1.0
            return gate

        return Gates(
            heads=[mask(n, k) for n, k in zip(self.head_counts, kept_heads, strict=True)],
            neurons=[mask(n, k) for n, k in zip(self.ffn_sizes, kept_neurons, strict=True)],
            hidden=mask(self.width, kept_hidden) if kept_hidden is not None else None,
        )

    def structure_sparsity(self, structure) -> float:
        kept_heads, kept_neurons, kept_hidden = structure
        width = len(kept_hidden) if kept_hidden is not None else self.width
        kept = self.encoder_weights([len(k) for k in kept_heads], [len(k) for k in kept_neurons], width)
        return 1 - float(kept) / self.dense_weights()

    @torch.no_grad()
    def head_open_probabilities(self) -> list[list[float]] | None:
        """P(open) of every head (times its layer's attention-block gate), per layer; None without head gates."""
        if self.heads is None:
            return None
        blocks = self.attn_blocks.open_probability() if self.attn_blocks is not None else None
        return [
            [round(float(p * (blocks[i] if blocks is not None else 1.0)), 4) for p in gate.open_probability()]
            for i, gate in enumerate(self.heads)
        ]

    def describe(self) -> dict[str, Any]:
        """Open probabilities per group, for the report and the closing-order analysis."""

        def probs(gate: HardConcrete | None) -> list[float] | None:
            return None if gate is None else [round(float(p), 4) for p in gate.open_probability()]

        return {
            "heads": [probs(g) for g in self.heads] if self.heads is not None else None,
            "attention_blocks": probs(self.attn_blocks),
            "ffn_blocks": probs(self.ffn_blocks),
            "hidden_open": None if self.hidden is None else self.hidden.expected_open(),
            "ffn_open": [g.expected_open() for g in self.neurons] if self.neurons is not None else None,
        }


def _interpolate(x: torch.Tensor, points: list[int], values: list[float]) -> torch.Tensor:
    """``np.interp`` in torch, differentiable in ``x`` (clamped to the measured range)."""
    if len(points) == 1:
        return torch.tensor(float(values[0]))
    x = x.clamp(float(points[0]), float(points[-1]))
    grid = torch.tensor(points, dtype=torch.float32)
    upper = int(torch.searchsorted(grid, x.detach().reshape(1), right=True).clamp(1, len(points) - 1))
    x0, x1, y0, y1 = points[upper - 1], points[upper], values[upper - 1], values[upper]
    return y0 + (x - x0) * ((y1 - y0) / (x1 - x0))
