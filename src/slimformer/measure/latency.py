"""Wall-clock latency of a forward pass on random inputs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimformer.measure.base import MeasureError, require_positive

# Below this many timed runs a progress bar is only noise.
PROGRESS_MIN_REPEATS = 50


@dataclass(frozen=True)
class LatencyStats:
    """Timings of ``repeats`` forward passes of a ``batch_size`` × ``seq_len`` batch, in milliseconds."""

    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    batch_size: int
    seq_len: int
    threads: int | None
    device: str
    samples_ms: list[float] = field(default_factory=list)

    @property
    def sequences_per_s(self) -> float:
        """Throughput at the median latency."""
        return self.batch_size / (self.median_ms / 1000) if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "sequences_per_s": self.sequences_per_s,
            "repeats": self.repeats,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "threads": self.threads,
            "device": self.device,
            "samples_ms": list(self.samples_ms),
        }


def random_inputs(
    model: PreTrainedModel, batch_size: int, seq_len: int, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids from the model's vocabulary, with a full attention mask (no padding)."""
    vocab_size = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None and vocab_size > 1:
        # RoBERTa-style models derive position ids from non-pad tokens; keep every token a real one.
        input_ids[input_ids == pad] = (pad + 1) % vocab_size
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _max_positions(model: PreTrainedModel) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block, then restore the previous setting."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise MeasureError(f"Unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MeasureError(f"Device {device!r} was asked for, but CUDA is not available here. Use --device cpu.")
    return resolved


def measure_latency(
    model: PreTrainedModel,
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    threads: int | None = 2,
    warmup: int = 3,
    repeats: int = 10,
    device: str = "cpu",
) -> LatencyStats:
    """Time ``repeats`` forward passes on random inputs after ``warmup`` untimed ones.

    Runs under ``torch.inference_mode()`` in eval mode with ``threads`` CPU threads (``None`` keeps the
    current setting); the thread count, the model's device and its train/eval mode are restored afterwards.
    On CUDA each run is synchronised before the clock is read, so the time covers the kernels, not just their
    launch.
    """
    require_positive(batch_size=batch_size, seq_len=seq_len, repeats=repeats)
    if threads is not None:
        require_positive(threads=threads)
    if warmup < 0:
        raise MeasureError(f"warmup must be zero or more, got {warmup!r}")
    max_positions = _max_positions(model)
    if max_positions is not None and seq_len > max_positions:
        raise MeasureError(f"seq_len {seq_len} is longer than the model's {max_positions} positions")
    target = _resolve_device(device)
    first = next(model.parameters(), None)
    original_device = first.device if first is not None else target
    was_training = model.training
    inputs = random_inputs(model, batch_size, seq_len, target)
    on_cuda = target.type == "cuda"

    def run_once() -> float:
        if on_cuda:
            torch.cuda.synchronize(target)
        start = time.perf_counter()
        model(**inputs)
        if on_cuda:
            torch.cuda.synchronize(target)
        return (time.perf_counter() - start) * 1000

    samples: list[float] = []
    try:
        model.to(target)
        model.eval()
        with _threads(threads), torch.inference_mode():
            for _ in range(warmup):
                run_once()
            timed = tqdm(
                range(repeats),
                desc="latency",
                unit="run",
                leave=False,
                disable=repeats < PROGRESS_MIN_REPEATS,
            )
            samples = [run_once() for _ in timed]
    finally:
        model.to(original_device)
        model.train(was_training)

    array = np.asarray(samples, dtype=float)
    return LatencyStats(
        median_ms=float(np.median(array)),
        mean_ms=float(array.mean()),
        std_ms=float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        min_ms=float(array.min()),
        max_ms=float(array.max()),
        p10_ms=float(np.percentile(array, 10)),
        p90_ms=float(np.percentile(array, 90)),
        repeats=repeats,
        batch_size=batch_size,
        seq_len=seq_len,
        threads=threads,
        device=str(target),
        samples_ms=[float(x) for x in samples],
    )
