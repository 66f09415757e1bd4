"""One report for every command that produces a model (finetune, prune, distill): one schema, one printer.

``metrics.json`` in every output folder is such a report::

    schema_version, command, invocation (the command line, when run from the CLI), slimformer_version,
    model, task, primary_metric, config,
    score:   {"before": float | None, "after": float | None[, "teacher": float]}
    eval:    {"before": {split: {metric: value}}, "after": {...}}
    models:  {"before": stats | None, "after": stats}   stats = params, encoder_flops (at flops_seq_len tokens),
             layers, heads, neurons, heads_per_layer, neurons_per_layer, disk_bytes
    flops_seq_len: int
    latency: None | {batch_size, seq_len, threads, before, after, speedup}  (medians of interleaved repeats)
    seconds: {phase: seconds, ..., "total": seconds}
    details: what the method adds (its plan summary, curves, losses)

"before" is the model the command started from (the dense model for prune, the student before training for
distill, nothing for finetune, whose head starts random).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

from slimformer._version import __version__
from slimformer.arch import layer_views
from slimformer.measure import count_parameters, flops, measure_latency

REPORT_SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"  # the report's name in a model folder

# The command line that is running, when slimformer runs from its CLI (set by slimformer.cli.main): reports and
# model cards quote it so a result says how to make it again.
INVOCATION: ContextVar[str | None] = ContextVar("slimformer_invocation", default=None)


def model_stats(model: PreTrainedModel, *, seq_len: int = 128, disk_bytes: int | None = None) -> dict[str, Any]:
    """Size of ``model`` as it is now: parameters, encoder FLOPs of one ``seq_len``-token sequence, shape."""
    views = layer_views(model)
    heads = [view.num_heads for view in views]
    neurons = [view.ffn_size for view in views]
    return {
        "params": count_parameters(model).as_dict(),
        "encoder_flops": flops(model, seq_len=seq_len).encoder,
        "layers": len(views),
        "heads": sum(heads),
        "neurons": sum(neurons),
        "heads_per_layer": heads,
        "neurons_per_layer": neurons,
        "disk_bytes": disk_bytes,
        "linear_weights": linear_weight_counts(model),
    }


def linear_weight_counts(model: PreTrainedModel) -> dict[str, int] | None:
    """Entries and non-zero entries of the encoder's linear weight matrices (what sparse pruning removes); None
    for a model on the meta device."""
    from slimformer.sparse.masks import encoder_linears

    weights = [module.weight for module in encoder_linears(model).values()]
    if any(weight.is_meta for weight in weights):
        return None
    return {
        "total": sum(weight.numel() for weight in weights),
        "nonzero": int(sum(int(torch.count_nonzero(weight)) for weight in weights)),
    }


def interleaved_latency(
    models: dict[str, PreTrainedModel],
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    threads: int | None = 2,
    rounds: int = 3,
    repeats: int = 5,
    warmup: int = 2,
) -> dict[str, Any]:
    """Latency of several models measured in ``rounds`` that each visit every model once, so that drift in the
    machine's load spreads evenly; per model the median of all its samples (ms). ``speedup`` is the first
    model's median over each other's.

    A model run by ONNX Runtime or OpenVINO is closed before and after each of its turns (it reopens on its next
    forward): an idle session's threads keep spin-waiting for work and would compete with the model being timed
    (see :meth:`slimformer.deploy.runtime._RuntimeClassifier.close`)."""
    from slimformer.deploy.runtime import is_runtime_model

    runtime_models = [model for model in models.values() if is_runtime_model(model)]
    for model in runtime_models:
        model.close()
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            stats = measure_latency(
                model, batch_size=batch_size, seq_len=seq_len, threads=threads, warmup=warmup, repeats=repeats
            )
            samples[name].extend(stats.samples_ms)
            if is_runtime_model(model):
                model.close()
    result: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len, "threads": threads}
    for name, values in samples.items():
        ordered = sorted(values)
        result[name] = {"median_ms": ordered[len(ordered) // 2], "samples_ms": values}
    first = next(iter(models))
    result["speedup"] = {
        name: result[first]["median_ms"] / result[name]["median_ms"] for name in models if name != first
    }
    return result


def build_report(
    command: str,
    *,
    model: str,
    task: dict[str, Any] | None,
    primary_metric: str | None,
    config: dict[str, Any],
    before: PreTrainedModel | dict[str, Any] | None,
    after: PreTrainedModel | dict[str, Any],
    eval_before: dict[str, dict[str, float]] | None = None,
    eval_after: dict[str, dict[str, float]] | None = None,
    extra_scores: dict[str, float] | None = None,
    latency: dict[str, Any] | None = None,
    seconds: dict[str, float] | None = None,
    details: dict[str, Any] | None = None,
    seq_len: int = 128,
) -> dict[str, Any]:
    """Assemble a report (see the module docstring); models are measured here, stats dicts are taken as is."""
    from slimformer.evaluation import headline_score

    def stats(value: PreTrainedModel | dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None or isinstance(value, dict):
            return value
        return model_stats(value, seq_len=seq_len)

    def score(evaluation: dict[str, dict[str, float]] | None) -> float | None:
        return headline_score(evaluation, primary_metric) if evaluation and primary_metric else None

    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "command": command,
        "invocation": INVOCATION.get(),
        "slimformer_version": __version__,
        "model": model,
        "task": task,
        "primary_metric": primary_metric,
        "config": config,
        "score": {"before": score(eval_before), "after": score(eval_after), **(extra_scores or {})},
        "eval": {"before": eval_before, "after": eval_after},
        "models": {"before": stats(before), "after": stats(after)},
        "flops_seq_len": seq_len,
        "latency": latency,
        "seconds": {**(seconds or {}), "total": round(sum((seconds or {}).values()), 2)},
        "details": details or {},
    }


def _ratio(before: float | None, after: float | None, *, inverse: bool = False) -> str:
    if not before or not after:
        return ""
    return f"{(before / after if inverse else after / before):.2f}x"


def report_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The report's before / after values as text rows ``(label, before, after, after / before)``: what the terminal
    table and the model card both show."""
    rows: list[tuple[str, str, str, str]] = []
    score = report.get("score") or {}
    metric = report.get("primary_metric") or "score"
    if "teacher" in score:
        rows.append((f"{metric} (teacher)", "", f"{score['teacher']:.4f}", ""))
    if score.get("before") is not None or score.get("after") is not None:
        before_score, after_score = score.get("before"), score.get("after")
        rows.append(
            (
                metric,
                "" if before_score is None else f"{before_score:.4f}",
                "" if after_score is None else f"{after_score:.4f}",
                "",
            )
        )
    models = report.get("models") or {}
    before, after = models.get("before") or {}, models.get("after") or {}

    def row(label: str, key: str, fmt, scale: float = 1.0) -> None:
        b, a = before.get(key), after.get(key)
        if key == "params":
            b, a = (b or {}).get("total"), (a or {}).get("total")
        if b is None and a is None:
            return

        def text(value: float | None) -> str:  # counts stay integers: only scaled values are divided
            return "" if value is None else fmt(value if scale == 1 else value / scale)

        rows.append((label, text(b), text(a), _ratio(b, a)))

    row("layers", "layers", str)
    row("heads", "heads", str)
    row("FFN neurons", "neurons", str)
    row("parameters (M)", "params", lambda v: f"{v:.2f}", 1e6)
    linear_before, linear_after = before.get("linear_weights"), after.get("linear_weights")
    if linear_before and linear_after and linear_after["nonzero"] < linear_after["total"]:
        # weight-level sparsity: the zeros stay in the matrices, so say how many entries are left
        rows.append(
            (
                "encoder linear weights non-zero (M)",
                f"{linear_before['nonzero'] / 1e6:.2f}",
                f"{linear_after['nonzero'] / 1e6:.2f}",
                _ratio(linear_before["nonzero"], linear_after["nonzero"]),
            )
        )
    row(f"encoder GFLOPs ({report.get('flops_seq_len', 128)} tokens)", "encoder_flops", lambda v: f"{v:.3f}", 1e9)
    row("size on disk (MB)", "disk_bytes", lambda v: f"{v:.1f}", 1e6)
    latency = report.get("latency")
    if latency and "before" in latency and "after" in latency:
        label = f"latency ms ({latency['batch_size']}x{latency['seq_len']}, {latency['threads']} threads)"
        b, a = latency["before"]["median_ms"], latency["after"]["median_ms"]
        rows.append((label, f"{b:.1f}", f"{a:.1f}", f"speedup {b / a:.2f}x"))
    return rows


def report_table(report: dict[str, Any], title: str | None = None) -> Table:
    """The report's before / after columns side by side."""
    name = (report.get("task") or {}).get("name", "") if isinstance(report.get("task"), dict) else ""
    table = Table(title=title or f"{report['command']} {report['model']}" + (f" on {name}" if name else ""))
    for column, justify in (("", "left"), ("before", "right"), ("after", "right"), ("after / before", "right")):
        table.add_column(column, justify=justify)
    for row in report_rows(report):
        table.add_row(*row)
    return table


def print_report(report: dict[str, Any], console: Console | None = None, out: str | None = None) -> None:
    """Print a report: the side-by-side table, the shape per layer, time per phase and where it went."""
    console = console or Console()
    console.print(report_table(report))
    after = (report.get("models") or {}).get("after") or {}
    if after.get("heads_per_layer") is not None:
        console.print(f"heads per layer {after['heads_per_layer']}, FFN neurons per layer {after['neurons_per_layer']}")
    sparse = (report.get("details") or {}).get("sparse")
    if sparse:
        removed = sparse.get("heads_removed", 0) + sparse.get("heads_folded", 0)
        neurons = sparse.get("neurons_removed", 0) + sparse.get("neurons_folded", 0)
        console.print(
            f"sparsity {sparse['sparsity']:.1%} of the encoder's linear weights ({sparse['granularity']}); "
            f"{removed} heads and {neurons} FFN neurons were left empty and removed. The zeros that stay give no "
            "speedup on dense CPU kernels; they make the folder smaller (sparse-bitmask storage)."
        )
    learned = (report.get("details") or {}).get("learned")
    if learned:
        shift = learned.get("log_alpha_shift") or 0.0
        hidden = ((report.get("details") or {}).get("plan") or {}).get("hidden")
        target = (
            f"target {learned['target_speedup']:g}x, predicted {learned['predicted_speedup']:.2f}x by the latency table"
            if learned.get("target_speedup")
            else f"target {learned['target_sparsity']:.0%}"
        )
        console.print(
            f"learned gates ({', '.join(learned['units'])}): {learned['reached_sparsity']:.1%} of the encoder's "
            f"weights removed ({target})"
            + (f", hidden size {hidden['before']} -> {hidden['after']}" if hidden and "after" in hidden else "")
            + (f"; the gates were shifted by {shift:+.2f} in log-alpha to meet the target" if shift else "")
            + "."
        )
        for warning in learned.get("warnings") or []:
            console.print(f"[bold yellow]warning:[/] {warning}.")
    seconds = report.get("seconds") or {}
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items() if k != "total")
    console.print(f"took {seconds.get('total', 0):.0f} s" + (f" ({phases})" if phases else ""))
    if out:
        console.print(f"-> {out}")


__all__ = [
    "METRICS_FILE",
    "REPORT_SCHEMA_VERSION",
    "build_report",
    "interleaved_latency",
    "model_stats",
    "print_report",
    "report_rows",
    "report_table",
]
