"""Per-layer latency lookup table, for pruning to a latency budget instead of a FLOPs budget.

Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers") note that latency is not
proportional to FLOPs (small matrices under-use the hardware) and search masks under a latency constraint with a
lookup table measured on the target machine: the latency of one layer's attention for every number of heads and
of its FFN for every number of neurons, summed over the layers. This module measures that table on the CPU for a
model shape, caches it per machine, and predicts the latency of any pruned layout from it:

    layer(h, n) = attn(h) + ffn(n) - fixed          model = rest + sum over kept layers of layer(h_l, n_l)

where ``attn(h)`` is a whole layer with ``h`` heads and no FFN neurons, ``ffn(n)`` one with no heads and ``n``
neurons, and ``fixed`` one with neither (layer norms, residual adds, biases), which both of the others include
once. ``rest`` is everything outside the layers (embeddings, pooler, classifier).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from slimformer.arch import ArchSpec, LayerView, get_spec, layer_list, layer_views, resolve
from slimformer.io import write_json_atomic
from slimformer.layout import current_head_ids, model_width, prune_layer_heads, prune_layer_neurons
from slimformer.measure.base import MeasureError, require_positive
from slimformer.measure.latency import measure_latency
from slimformer.prune.plan import Layout, PruningPlan

TABLE_FORMAT = 1
CACHE_ENV = "SLIMFORMER_CACHE"
# The default neuron grid has about this many steps from 0 to the full FFN width; in between is interpolated.
NEURON_GRID_STEPS = 24
_LINEAR_PARTS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")


@dataclass
class LatencyTable:
    """Latency in milliseconds of one transformer layer by kept heads and by kept FFN neurons (Kwon et al. 2022).

    ``attn_ms[i]``: a layer with ``head_counts[i]`` heads and no FFN neurons; ``ffn_ms[i]``: a layer with no heads
    and ``neuron_counts[i]`` neurons; ``fixed_ms``: a layer with neither; ``rest_ms``: the dense model minus the
    sum of its predicted layers (embeddings and classifier), floored at 0. ``key`` says what was measured (machine,
    threads, model shape, batch size and sequence length); ``dense_ms`` is the measured dense model.
    """

    head_counts: list[int]
    attn_ms: list[float]
    neuron_counts: list[int]
    ffn_ms: list[float]
    fixed_ms: float
    rest_ms: float
    key: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""
    dense_ms: float | None = None

    def __post_init__(self) -> None:
        self.head_counts = [int(c) for c in self.head_counts]
        self.neuron_counts = [int(c) for c in self.neuron_counts]
        self.attn_ms = [float(v) for v in self.attn_ms]
        self.ffn_ms = [float(v) for v in self.ffn_ms]
        self.fixed_ms, self.rest_ms = float(self.fixed_ms), float(self.rest_ms)
        _check_curve("heads", self.head_counts, self.attn_ms)
        _check_curve("neurons", self.neuron_counts, self.ffn_ms)
        for name in ("fixed_ms", "rest_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def max_heads(self) -> int:
        return self.head_counts[-1]

    @property
    def max_neurons(self) -> int:
        return self.neuron_counts[-1]

    def attn_layer_ms(self, heads: float) -> float:
        """A layer with ``heads`` heads and no FFN neurons, interpolated between measured head counts."""
        return _interp("heads", heads, self.head_counts, self.attn_ms)

    def ffn_layer_ms(self, neurons: float) -> float:
        """A layer with no heads and ``neurons`` FFN neurons, interpolated between measured neuron counts."""
        return _interp("neurons", neurons, self.neuron_counts, self.ffn_ms)

    def layer_ms(self, heads: float, neurons: float) -> float:
        """Predicted latency of one layer keeping ``heads`` heads and ``neurons`` FFN neurons."""
        # both halves include the layer's fixed part (norms, residuals, biases): count it once; noise could
        # otherwise push a nearly empty layer below zero
        return max(self.attn_layer_ms(heads) + self.ffn_layer_ms(neurons) - self.fixed_ms, 0.0)

    def model_ms(self, layout_or_plan: Layout | PruningPlan) -> float:
        """Predicted latency of a model with this layout (or a plan's result): rest + its layers.

        Dropped layers are absent from a plan's result layout, so they cost nothing; a layer left with no heads
        and no neurons still costs ``fixed_ms``, as it still runs.
        """
        layout = layout_or_plan.result_layout() if isinstance(layout_or_plan, PruningPlan) else layout_or_plan
        self._check_shape(layout)
        return self.rest_ms + sum(self.layer_ms(h, n) for h, n in zip(layout.heads, layout.ffn, strict=True))

    def _check_shape(self, layout: Layout) -> None:
        model = self.key.get("model", {})
        for name, value in (("hidden", layout.hidden), ("head_size", layout.head_size)):
            if name in model and model[name] != value:
                raise ValueError(
                    f"This latency table was measured for {name} {model[name]}, the layout has {name} {value}; "
                    "measure a table for this model."
                )

    # serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "slimformer_latency_table": TABLE_FORMAT,
            "key": self.key,
            "measured_at": self.measured_at,
            "head_counts": self.head_counts,
            "attn_ms": self.attn_ms,
            "neuron_counts": self.neuron_counts,
            "ffn_ms": self.ffn_ms,
            "fixed_ms": self.fixed_ms,
            "rest_ms": self.rest_ms,
            "dense_ms": self.dense_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        """Rebuild a table from :meth:`to_dict`; ``ValueError`` if it is not one (or another format version)."""
        if not isinstance(data, dict) or data.get("slimformer_latency_table") != TABLE_FORMAT:
            raise ValueError(f'Not a slimformer latency table: expected "slimformer_latency_table": {TABLE_FORMAT}.')
        try:
            dense = data.get("dense_ms")
            return cls(
                head_counts=data["head_counts"],
                attn_ms=data["attn_ms"],
                neuron_counts=data["neuron_counts"],
                ffn_ms=data["ffn_ms"],
                fixed_ms=data["fixed_ms"],
                rest_ms=data["rest_ms"],
                key=dict(data.get("key") or {}),
                measured_at=str(data.get("measured_at", "")),
                dense_ms=None if dense is None else float(dense),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"Malformed latency table: {error!r}") from error


def _check_curve(name: str, counts: Sequence[int], values: Sequence[float]) -> None:
    if not counts or len(counts) != len(values):
        raise ValueError(f"{name}: {len(counts)} counts and {len(values)} latencies; need as many, at least one.")
    if counts[0] != 0 or any(b <= a for a, b in pairwise(counts)):
        raise ValueError(f"{name} counts must start at 0 and increase, got {list(counts)}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} latencies must be finite and >= 0, got {list(values)}")


def _interp(name: str, count: float, counts: list[int], values: list[float]) -> float:
    if not 0 <= count <= counts[-1]:
        raise ValueError(f"{count} {name} is outside this latency table (measured 0..{counts[-1]}).")
    return float(np.interp(count, counts, values))


# what a table is measured for -------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_neuron_step(ffn: int) -> int:
    """About :data:`NEURON_GRID_STEPS` steps up to ``ffn``, rounded to a multiple of 8 (matmul-friendly widths)."""
    step = max(1, ffn // NEURON_GRID_STEPS)
    return max(8, round(step / 8) * 8) if ffn >= 8 else step


def neuron_grid(ffn: int, step: int) -> list[int]:
    """0, step, 2*step, ... and always ``ffn`` itself."""
    return sorted({*range(0, ffn, step), ffn})


def table_key(
    model: PreTrainedModel, *, batch_size: int, seq_len: int, threads: int, neuron_step: int | None = None
) -> dict[str, Any]:
    """What a table for ``model`` depends on: the machine and thread count, the model's shape, the input size."""
    spec = get_spec(model)
    layout = Layout.of(model)
    max_ffn = max(layout.ffn, default=0)
    first = next(model.parameters(), None)
    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": threads,
        },
        "model": {
            "model_type": model.config.model_type,
            "hidden": model_width(model),
            "head_size": spec.head_size(model.config),
            "max_heads": max(layout.heads, default=0),
            "max_ffn": max_ffn,
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        },
        "batch_size": batch_size,
        "seq_len": seq_len,
        "neuron_step": neuron_step or default_neuron_step(max_ffn),
    }


# measuring ----------------------------------------------------------------------------------------------------
@contextmanager
def _threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _view_of(layer: nn.Module, spec: ArchSpec, head_size: int) -> LayerView:
    parts: dict[str, Any] = {name: resolve(layer, getattr(spec, name)) for name in _LINEAR_PARTS}
    return LayerView(index=0, layer=layer, attention=resolve(layer, spec.attention), head_size=head_size, **parts)


def _pruned_layer_copy(view: LayerView, spec: ArchSpec, head_ids: list[int], heads: int, neurons: int) -> nn.Module:
    """A copy of ``view``'s layer with its first ``heads`` heads and ``neurons`` neurons, sliced as
    :func:`~slimformer.layout.slice_model` slices (which units are kept does not matter for timing)."""
    layer = copy.deepcopy(view.layer).to("cpu").eval()
    copied = _view_of(layer, spec, view.head_size)
    if heads != copied.num_heads:
        prune_layer_heads(copied, spec, list(range(heads)), head_ids)
    if neurons != copied.ffn_size:
        prune_layer_neurons(copied, spec, list(range(neurons)))
    return layer


def measure_latency_table(
    model: PreTrainedModel,
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    threads: int = 2,
    neuron_step: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    progress: bool = True,
) -> LatencyTable:
    """Measure a :class:`LatencyTable` for ``model`` on the CPU (Kwon et al. 2022's latency lookup table).

    Times pruned single-layer copies of the model's widest layer, for every head count 0..H (no neurons) and
    for a neuron grid 0, step, ..., F (no heads), each the median of ``repeats`` forward passes on a
    ``batch_size`` × ``seq_len`` batch, with ``threads`` CPU threads; then times the dense model once with
    :func:`~slimformer.measure.measure_latency` to get ``rest_ms``. ``model`` is not modified.
    """
    require_positive(batch_size=batch_size, seq_len=seq_len, threads=threads, repeats=repeats)
    if neuron_step is not None:
        require_positive(neuron_step=neuron_step)
    if warmup < 0:
        raise MeasureError(f"warmup must be zero or more, got {warmup!r}")
    spec = get_spec(model)
    layout = Layout.of(model)
    key = table_key(model, batch_size=batch_size, seq_len=seq_len, threads=threads, neuron_step=neuron_step)

    # The dense model first; a hook keeps the arguments the encoder passes its first layer (hidden states, and
    # whatever else the family needs, e.g. MPNet's position bias), so that single layers are timed as they run.
    captured: dict[str, Any] = {}

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.setdefault("call", (args, kwargs))

    hook = layer_list(model, spec)[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        dense = measure_latency(
            model, batch_size=batch_size, seq_len=seq_len, threads=threads, warmup=warmup, repeats=repeats
        )
    finally:
        hook.remove()
    if "call" not in captured:  # the layers were not called as modules: plain random hidden states will do
        hidden = torch.randn(batch_size, seq_len, layout.hidden, generator=torch.Generator().manual_seed(0))
        captured["call"] = ((hidden.to(next(model.parameters()).dtype),), {})
    args, kwargs = captured["call"]

    views = layer_views(model, spec)
    head_ids = current_head_ids(model)
    # the widest layers give every smaller shape; heads and neurons may be widest in different layers
    attn_source = max(views, key=lambda v: v.num_heads)
    ffn_source = max(views, key=lambda v: v.ffn_size)
    heads = list(range(attn_source.num_heads + 1))
    neurons = neuron_grid(ffn_source.ffn_size, key["neuron_step"])
    layers: dict[tuple[int, int], nn.Module] = {
        (0, 0): _pruned_layer_copy(attn_source, spec, head_ids[attn_source.index], 0, 0)
    }
    for h in heads[1:]:
        layers[(h, 0)] = _pruned_layer_copy(attn_source, spec, head_ids[attn_source.index], h, 0)
    for n in neurons[1:]:
        layers[(0, n)] = _pruned_layer_copy(ffn_source, spec, head_ids[ffn_source.index], 0, n)

    # Round-robin over the shapes rather than one shape at a time: load from other processes drifts, and this
    # spreads the drift over every shape instead of biasing some; each layer also starts with colder caches,
    # as it does in the real model after the previous layer has run. The empty layer is timed at the start, the
    # middle and the end of each round: its latency is subtracted once per layer of every prediction, so its
    # noise counts L times, and it is the cheapest shape to time.
    shapes = list(layers)
    middle = len(shapes) // 2
    schedule = [*shapes[:middle], (0, 0), *shapes[middle:], (0, 0)] if len(shapes) > 1 else shapes
    samples: dict[tuple[int, int], list[float]] = {shape: [] for shape in layers}
    bar = tqdm(total=len(schedule) * (warmup + repeats), desc="latency table", unit="run", disable=not progress)
    with bar, _threads(threads), torch.inference_mode():
        for round_index in range(warmup + repeats):
            for shape in schedule:
                start = time.perf_counter()
                layers[shape](*args, **kwargs)
                elapsed = (time.perf_counter() - start) * 1000
                if round_index >= warmup:
                    samples[shape].append(elapsed)
                bar.update()
    median = {shape: float(np.median(times)) for shape, times in samples.items()}

    fixed = median[(0, 0)]  # one measurement serves attn(0), ffn(0) and fixed, so layer_ms(0, 0) == fixed
    table = LatencyTable(
        head_counts=heads,
        attn_ms=[median[(h, 0)] for h in heads],
        neuron_counts=neurons,
        ffn_ms=[median[(0, n)] for n in neurons],
        fixed_ms=fixed,
        rest_ms=0.0,
        key=key,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        dense_ms=dense.median_ms,
    )
    table.rest_ms = max(dense.median_ms - table.model_ms(layout), 0.0)
    return table


# caching --------------------------------------------------------------------------------------------------------
def latency_cache_dir() -> Path:
    """``$SLIMFORMER_CACHE/latency``, else ``~/.cache/slimformer/latency``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "slimformer"
    return root / "latency"


def cache_path(key: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``latency-<hash of key>.json`` in ``cache_dir`` (default :func:`latency_cache_dir`)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir if cache_dir is not None else latency_cache_dir()) / f"latency-{digest}.json"


def _load_cached(path: Path, key: dict[str, Any]) -> LatencyTable | None:
    """The cached table, or ``None`` (with a warning) when the file is unreadable or was made for another key."""
    try:
        table = LatencyTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as error:
        warnings.warn(f"Latency table cache {path} is unreadable ({error}); measuring again.", stacklevel=3)
        return None
    if table.key != key:
        warnings.warn(f"Latency table cache {path} was measured for another setup; measuring again.", stacklevel=3)
        return None
    return table


def latency_table(
    model: PreTrainedModel,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    seq_len: int = 128,
    threads: int = 2,
    refresh: bool = False,
    **kw: Any,
) -> LatencyTable:
    """The latency table for ``model`` on this machine: from the cache when one was measured for the same
    machine, threads, model shape and input size, else measured (:func:`measure_latency_table`, which ``kw``
    goes to) and cached. ``refresh=True`` measures again and overwrites the cache."""
    key = table_key(model, batch_size=batch_size, seq_len=seq_len, threads=threads, neuron_step=kw.get("neuron_step"))
    path = cache_path(key, cache_dir)
    if not refresh and path.exists():
        cached = _load_cached(path, key)
        if cached is not None:
            return cached
    table = measure_latency_table(model, batch_size=batch_size, seq_len=seq_len, threads=threads, **kw)
    write_json_atomic(path, table.to_dict())
    return table


def table_for_config(model: PreTrainedModel, config: Any, ctx: Any) -> LatencyTable:
    """:func:`latency_table` with a pruning config's measuring settings (``latency_batch_size``, ``seq_len``,
    ``threads``) and the context's cache folder and progress setting."""
    return latency_table(
        model,
        cache_dir=ctx.cache_dir,
        batch_size=config.latency_batch_size,
        seq_len=config.seq_len,
        threads=config.threads,
        progress=ctx.progress,
    )


__all__ = [
    "LatencyTable",
    "cache_path",
    "cpu_name",
    "default_neuron_step",
    "latency_cache_dir",
    "latency_table",
    "measure_latency_table",
    "neuron_grid",
    "table_for_config",
    "table_key",
]
