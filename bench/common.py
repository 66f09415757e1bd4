"""Shared helpers for benchmarks: where results go, writing JSON + markdown atomically, and which teacher each
benchmark compares against."""

from __future__ import annotations

import json
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


def cpu_features() -> list[str]:
    """The CPU's vector extensions that decide which int8 kernels run (AVX2 only, AVX-512, VNNI, AMX)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return [flag for flag in flags.split(":", 1)[1].split() if flag in wanted]


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu_features": cpu_features(),
    }


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, data: dict, markdown: str, results_dir: Path = RESULTS) -> None:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / f"{name}.json", data)
    tmp = results_dir / f".{name}.md.tmp"
    tmp.write_text(markdown)
    tmp.replace(results_dir / f"{name}.md")


# --------------------------------------------------------------------------------------------- teachers

TEACHERS_ENV = "SLIMFORMER_BENCH_TEACHERS"


def teacher_folder(task: str, teachers_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converged teacher of ``task`` (``runs/bench/teacher-<task>/``, built by bench/teachers.py), or
    ``<teachers_dir>/teacher-<task>`` when a folder is given (or ``$SLIMFORMER_BENCH_TEACHERS`` is set): for smoke
    runs against a throwaway teacher."""
    teachers_dir = teachers_dir or os.environ.get(TEACHERS_ENV) or None
    if teachers_dir:
        return Path(teachers_dir) / f"teacher-{task}"
    from teachers import teacher_dir

    return teacher_dir(task)


def teacher_summary(task: str, folder: Path) -> dict:
    """What a benchmark says about its teacher: where it is, its dev score and how it was trained (from its
    metrics.json; ``recipe`` is there for the teachers of bench/teachers.py)."""
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(
            f"No teacher for {task} at {folder} (no metrics.json): build it first with "
            f"`python bench/teachers.py --tasks {task}`, or point --teachers-dir / ${TEACHERS_ENV} at a folder "
            f"holding teacher-{task}/."
        )
    metrics = json.loads(metrics_file.read_text())
    recipe = metrics.get("recipe") or {}
    # the report schema keeps the score before/after and training details under "details"; the first teachers
    # were written before it
    score = metrics["score"]["after"] if isinstance(metrics["score"], dict) else metrics["score"]
    train = (metrics.get("details") or {}).get("train") or metrics.get("train") or {}
    config = metrics.get("config") or {}
    return {
        "task": task,
        "path": str(folder),
        "name": folder.name,
        "score": score,
        "primary_metric": metrics.get("primary_metric"),
        "train_samples": train.get("samples"),
        "max_length": config.get("max_length"),
        "epochs_trained": recipe.get("epochs_trained"),
        "best_epoch": recipe.get("best_epoch"),
        "max_epochs": recipe.get("max_epochs"),
        "converged_recipe": bool(recipe),
    }


def task_fraction_cells(rows: list[dict]):
    """The teachers of ``rows`` (task -> :func:`teacher_summary`), and each (task, teacher, fraction, that cell's
    rows) in task order, fractions from the largest: the cells of the budget benchmarks' tables."""
    teachers = {task: teacher_summary(task, teacher_folder(task)) for task in dict.fromkeys(r["task"] for r in rows)}
    cells = [
        (task, teacher, fraction, [r for r in rows if r["task"] == task and r["fraction"] == fraction])
        for task, teacher in teachers.items()
        for fraction in sorted({r["fraction"] for r in rows if r["task"] == task}, reverse=True)
    ]
    return teachers, cells


def _shown_path(path: str) -> str:
    """A path inside the repository as a repository-relative one (results tables are committed)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def describe_teacher(teacher: dict) -> str:
    """One sentence for a results table: the teacher's dev score and where it came from."""
    text = (
        f"teacher `{_shown_path(teacher['path'])}`: dev {teacher['primary_metric']} {teacher['score'] * 100:.2f}, "
        f"MiniLM-L6 fine-tuned on {teacher['train_samples']} training examples (max length {teacher['max_length']})"
    )
    if teacher["converged_recipe"]:
        text += (
            f", trained {_number(teacher['epochs_trained'])} of at most {_number(teacher['max_epochs'])} epochs and "
            f"kept at its best dev score (epoch {_number(teacher['best_epoch'])}) by bench/teachers.py"
        )
    else:
        text += " (NOT a converged teacher of bench/teachers.py: no recipe in its metrics.json)"
    return text + "."


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


SHAPES = (("32x128", 32, 128), ("1x32", 1, 32))


def add_latency(rows: list[dict], runtimes: dict[str, dict], *, threads: int, rounds: int, repeats: int) -> None:
    """Time every model of each runtime (``{"pytorch": {name: model}, "int8": {...}}``) in one interleaved run
    per input shape, and write ``ms_<runtime>_<shape>`` and ``speedup_<runtime>_<shape>`` (over the first row's
    PyTorch fp32) into the rows. A row's model is ``"dense"`` for a variant named ``dense ...``, else its name."""
    from slimformer.report import interleaved_latency

    for key, batch, seq in SHAPES:
        for runtime_name, models in runtimes.items():
            timing = interleaved_latency(
                models, batch_size=batch, seq_len=seq, threads=threads, rounds=rounds, repeats=repeats
            )
            for row in rows:
                name = "dense" if row["variant"].startswith("dense") else row["variant"]
                if name in timing:
                    row[f"ms_{runtime_name}_{key}"] = timing[name]["median_ms"]
    base = rows[0]
    for row in rows:
        for key, _, _ in SHAPES:
            for runtime_name in runtimes:
                ms = row.get(f"ms_{runtime_name}_{key}")
                if ms and base.get(f"ms_pytorch_{key}"):
                    row[f"speedup_{runtime_name}_{key}"] = base[f"ms_pytorch_{key}"] / ms


def int8(folder: Path, data, source: Path | None = None) -> Path:
    """Dynamic int8 on ONNX Runtime of the model in ``source`` (default ``folder``), cached beside ``folder``."""
    target = folder.with_name(folder.name + "-int8")
    if not (target / "slimformer.json").is_file():
        import slimformer

        slimformer.quantize(
            source or folder, slimformer.Quantize(mode="dynamic"), data, out=target, evaluate=False, measure=False,
            overwrite=True, progress=False,
        )  # fmt: skip
    return target


# What every trained variant of a task sees in bench/learned.py and bench/sparse.py: STS-B's whole training set at
# the teacher's length; on SST-2 (67k sentences, about 6 minutes an epoch here) the first 8,000 sentences drawn by
# load_task, at the teacher's max length of 64 (as bench/fairness.py)
TRAINING = {
    "stsb": {"max_length": 128, "max_train_samples": None, "what": "the whole STS-B training set (5,749 pairs)"},
    "sst2": {"max_length": 64, "max_train_samples": 8000, "what": "8,000 SST-2 training sentences (max length 64)"},
}
DISPLAY = {"stsb": "STS-B", "sst2": "SST-2"}


def budget_then_kd(teacher: Path, config, data, folder: Path, *, epochs: float, task: str) -> None:
    """The baseline every trained variant of bench/learned.py and bench/sparse.py is compared with: retraining-free
    budget pruning (cached in ``<folder>-pruned``), then logit KD from the teacher (alpha 0.9, temperature 2,
    lr 3e-5) on the same training table as the trained variants (:data:`TRAINING`)."""
    import slimformer
    from slimformer.distill import DistillConfig
    from slimformer.models import load_model
    from slimformer.train import TrainConfig

    pruned = folder.with_name(folder.name + "-pruned")
    if not (pruned / "metrics.json").is_file():
        slimformer.prune(load_model(teacher), config, data, out=pruned, measure=False, overwrite=True)
    training = TRAINING[task]
    settings = TrainConfig(
        epochs=epochs, learning_rate=3e-5, max_length=training["max_length"], batch_size=32, save_steps=200,
        max_train_samples=training["max_train_samples"],
    )  # fmt: skip
    slimformer.distill(
        teacher, pruned, folder, data, config=settings, distill_config=DistillConfig(alpha=0.9, temperature=2.0)
    )


def dev_scorer(tokenizer, data, metric: str):
    """``scored(model) -> (score, dev logits)`` for PyTorch models and int8 runtimes alike, with the dev split
    tokenized and batched once for every model a benchmark scores."""
    from slimformer.evaluation import Evaluator
    from slimformer.tasks.metrics import compute_metrics

    evaluator = Evaluator(tokenizer, data)
    labels = evaluator.splits["dev"][2]

    def scored(model):
        logits = evaluator.logits(model)["dev"]
        return compute_metrics(data.spec, logits, labels)[metric], logits

    return scored
