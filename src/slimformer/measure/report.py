"""Every measurement of a model in one JSON-serialisable dict, and its human-readable rendering."""

from __future__ import annotations

import os
from typing import Any

from rich.table import Table
from transformers import PreTrainedModel

from slimformer.arch import get_spec, layer_views
from slimformer.layout import model_width
from slimformer.measure.disk import model_size_on_disk, size_on_disk
from slimformer.measure.flops import flops
from slimformer.measure.latency import measure_latency
from slimformer.measure.params import count_parameters


def model_summary(model: PreTrainedModel) -> dict[str, Any]:
    """Family and shape of ``model`` as it is now: heads and FFN width of every layer."""
    spec = get_spec(model)
    views = layer_views(model, spec)
    return {
        "family": spec.family,
        "model_type": model.config.model_type,
        "layers": len(views),
        "hidden": model_width(model),
        "head_size": spec.head_size(model.config),
        "heads": [view.num_heads for view in views],
        "ffn": [view.ffn_size for view in views],
    }


def measure_model(
    model: PreTrainedModel,
    *,
    seq_len: int = 128,
    batch_size: int = 32,
    threads: int | None = 2,
    repeats: int = 10,
    warmup: int = 3,
    model_dir: str | os.PathLike[str] | None = None,
    latency: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Parameters, FLOPs, latency, size on disk and shape of ``model`` as one JSON-serialisable dict.

    Keys: ``params``, ``flops`` (at ``seq_len`` for one sequence, so budgets compare across batch sizes),
    ``latency`` (``batch_size`` × ``seq_len``, or ``None`` when ``latency`` is false), ``disk`` (of
    ``model_dir`` when given, else of a temporary ``save_pretrained`` copy) and ``config``.
    """
    timing = None
    if latency:
        timing = measure_latency(
            model,
            batch_size=batch_size,
            seq_len=seq_len,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            device=device,
        ).as_dict()
    disk = size_on_disk(model_dir) if model_dir is not None else model_size_on_disk(model)
    return {
        "params": count_parameters(model).as_dict(),
        "flops": flops(model, seq_len=seq_len, batch_size=1).as_dict(),
        "latency": timing,
        "disk": disk.as_dict(),
        "config": model_summary(model),
    }


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def _gflops(count: int) -> str:
    return f"{count / 1e9:.3f} GFLOPs"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _per_layer(values: list[int]) -> str:
    # "6 × 12" when every layer is the same, else the list (pruned layers differ).
    if values and all(v == values[0] for v in values):
        return f"{len(values)} × {values[0]}"
    return ", ".join(str(v) for v in values)


def measurement_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of a :func:`measure_model` result, formatted for people."""
    params, flop, config, disk = result["params"], result["flops"], result["config"], result["disk"]
    model = f"{config['family']} ({config['model_type']}), {config['layers']} layers, hidden {config['hidden']}"
    param_split = ", ".join(f"{key} {_millions(params[key])}" for key in ("embeddings", "encoder", "head"))
    flop_split = ", ".join(
        f"{label} {_gflops(flop[key])}"
        for label, key in (("qkv", "qkv"), ("attention", "attn_scores"), ("out", "attn_out"), ("ffn", "ffn"))
    )
    rows = [
        ("Model", model + (f", run by {result['runtime']}" if result.get("runtime") else "")),
        ("Heads per layer", _per_layer(config["heads"])),
        ("FFN per layer", _per_layer(config["ffn"])),
        ("Parameters", f"{_millions(params['total'])} ({param_split})"),
        (f"Encoder FLOPs (seq {flop['seq_len']})", f"{_gflops(flop['encoder'])} ({flop_split})"),
        (f"Total FLOPs (seq {flop['seq_len']})", _gflops(flop["total"])),
    ]
    timing = result.get("latency")
    if timing:
        threads = "default threads" if timing["threads"] is None else f"{timing['threads']} threads"
        label = f"Latency ({timing['batch_size']} × {timing['seq_len']}, {timing['device']}, {threads})"
        spread = f"p10 {timing['p10_ms']:.1f}, p90 {timing['p90_ms']:.1f}, {timing['repeats']} runs"
        value = f"{timing['median_ms']:.1f} ms median ({spread}), {timing['sequences_per_s']:.0f} seq/s"
        rows.append((label, value))
    sizes = f"{_megabytes(disk['weights_bytes'])} weights, {_megabytes(disk['total_bytes'])} in all"
    rows.append(("Size on disk", sizes))
    return rows


def format_measurements(result: dict[str, Any]) -> str:
    """A :func:`measure_model` result as aligned plain-text lines."""
    rows = measurement_rows(result)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def measurements_table(result: dict[str, Any], title: str | None = "Measurements") -> Table:
    """A :func:`measure_model` result as a two-column rich table, for the CLI."""
    table = Table(title=title, show_header=False)
    table.add_column("Measure", style="bold")
    table.add_column("Value")
    for label, value in measurement_rows(result):
        table.add_row(label, value)
    return table
