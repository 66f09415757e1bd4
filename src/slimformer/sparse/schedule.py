"""When sparsity rises during training: the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune"), used
by gradual magnitude pruning (and GMP*, Kurtic & Alistarh 2022) and by movement pruning (Sanh et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    """Sparsity ``s(t)`` over ``total`` steps: 0 before ``start`` (a dense warm-up), then
    ``final + (initial - final) * (1 - progress)^3`` until ``end`` (fast early, gentle near the target), then
    ``final`` (a last phase that only trains the sparse model). ``start`` and ``end`` are fractions of training.

    ``initial`` > 0 makes the first pruning step large at once (GMP*: a large first step costs little, the weights
    it removes are redundant); ``steps`` > 0 moves sparsity only at that many evenly spaced pruning events (GMP),
    0 changes it at every step (movement pruning)."""

    final: float
    total: int
    initial: float = 0.0
    start: float = 0.1
    end: float = 0.7
    steps: int = 0

    @property
    def start_step(self) -> int:
        return round(self.start * self.total)

    @property
    def end_step(self) -> int:
        return max(self.start_step + 1, round(self.end * self.total))

    def events(self) -> list[int]:
        """The steps at which GMP recomputes its masks (``steps`` of them, the first at ``start``)."""
        if self.steps <= 0:
            return list(range(self.start_step, self.end_step + 1))
        if self.steps == 1:
            return [self.end_step]
        span = self.end_step - self.start_step
        return sorted({self.start_step + round(i * span / (self.steps - 1)) for i in range(self.steps)})

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.steps > 0:  # hold the value of the last pruning event
            step = max(e for e in self.events() if e <= step) if step >= self.events()[0] else self.start_step
        if step >= self.end_step:
            return self.final
        initial = min(self.initial, self.final)
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final + (initial - self.final) * (1.0 - progress) ** 3

    def describe(self) -> dict[str, float | int | str]:
        return {
            "final": self.final,
            "initial": min(self.initial, self.final),
            "total_steps": self.total,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "pruning_events": len(self.events()) if self.steps > 0 else "every step",
        }
