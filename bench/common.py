"""Shared helpers for benchmarks: where results go, and writing JSON + markdown atomically."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from slimformer.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "bench"
DEFAULT_GLUE = ROOT.parent / "shared" / "data" / "glue"


def glue_dir() -> Path:
    return Path(os.environ.get("GLUE_DIR") or DEFAULT_GLUE)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", data)
    tmp = RESULTS / f".{name}.md.tmp"
    tmp.write_text(markdown)
    tmp.replace(RESULTS / f"{name}.md")


def interleaved_latency(models: dict, *, rounds: int = 3, repeats: int = 5) -> dict[str, list[float]]:
    """Latency samples (ms; batch 32 x 128 tokens, 2 threads) per model, measured in ``rounds`` that each visit
    every model once, so that drift in machine load spreads evenly over the models compared."""
    from slimformer.measure import measure_latency

    samples: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds):
        for name, net in models.items():
            stats = measure_latency(net, batch_size=32, seq_len=128, threads=2, warmup=2, repeats=repeats)
            samples[name].extend(stats.samples_ms)
        print(f"latency round {round_index + 1}/{rounds} done", flush=True)
    return samples
