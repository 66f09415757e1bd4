"""Stability of s-pruning survivors across seeds and tasks (Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the
Lottery, All Tickets Are Winning", §6): the Jaccard overlap |A ∩ B| / |A ∪ B| of the sets of surviving heads and
of surviving MLPs of every pair of runs.

The inputs are ``survivors.json`` files written by :func:`slimformer.analyze.lottery` (or their folders); each
s-pruning run in them (one per seed) is one set. The result has the full run x run matrices, and task x task
matrices whose cell (A, B) averages the Jaccard of every pair of runs with one from task A and the other from
task B (on the diagonal: pairs of different runs of the same task, i.e. across seeds; NaN with a single run).
Two empty sets count as identical (Jaccard 1). For reference, ``chance`` is the Jaccard expected of two random
sets of the same sizes, |A||B|/n / (|A| + |B| - |A||B|/n) with n the number of heads (or MLPs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    fmt_stat,
    markdown_table,
    nan_to_none,
    results_folder,
    stat,
)
from slimformer.analyze.plots import heatmap

UNITS = ("heads", "mlps")
SURVIVORS_FILE = "survivors.json"


def jaccard(a: np.ndarray | Sequence[int], b: np.ndarray | Sequence[int]) -> float:
    """Jaccard overlap of two 0/1 membership vectors (1 when both are empty)."""
    a = np.asarray(a, dtype=bool).reshape(-1)
    b = np.asarray(b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise AnalyzeError(f"Cannot compare sets over {a.size} and {b.size} elements.")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def jaccard_matrix(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Symmetric matrix of pairwise Jaccard overlaps (1 on the diagonal)."""
    n = len(sets)
    matrix = np.ones((n, n))
    for i, j in combinations(range(n), 2):
        matrix[i, j] = matrix[j, i] = jaccard(sets[i], sets[j])
    return matrix


def chance_jaccard(size_a: int, size_b: int, n: int) -> float:
    """Expected Jaccard (ratio of expectations) of two uniformly random subsets of sizes a and b out of n."""
    if n == 0 or size_a + size_b == 0:
        return 1.0
    overlap = size_a * size_b / n
    return overlap / (size_a + size_b - overlap)


@dataclass
class SurvivorSet:
    """The heads and MLPs that survived one s-pruning run."""

    label: str
    task: str
    seed: int
    heads: np.ndarray  # flat 0/1 over every (layer, head)
    mlps: np.ndarray  # 0/1 per layer
    source: str


@dataclass
class StabilityResult:
    """Jaccard matrices of surviving heads and MLPs between runs and between tasks."""

    labels: list[str]
    tasks: list[str]
    layout: dict[str, Any]
    runs: dict[str, np.ndarray]  # unit -> [runs, runs]
    by_task: dict[str, np.ndarray]  # unit -> [tasks, tasks]
    across_seeds: dict[str, dict[str, dict[str, Any]]]  # unit -> task -> stat over seed pairs
    across_tasks: dict[str, dict[str, Any]]  # unit -> stat over pairs from different tasks
    chance: dict[str, np.ndarray]  # unit -> [runs, runs] expected Jaccard of random sets of the same sizes
    sizes: dict[str, list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return nan_to_none(
            {
                "analysis": "stability",
                "paper": 'Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning"',
                "labels": self.labels,
                "tasks": self.tasks,
                "layout": self.layout,
                "sizes": self.sizes,
                "jaccard_runs": {u: m.tolist() for u, m in self.runs.items()},
                "jaccard_tasks": {u: m.tolist() for u, m in self.by_task.items()},
                "across_seeds": self.across_seeds,
                "across_tasks": self.across_tasks,
                "chance_runs": {u: m.tolist() for u, m in self.chance.items()},
                "meta": self.meta,
            }
        )

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out_dir = results_folder(out_dir, self.to_dict())
        for unit in UNITS:
            matrices = [(self.runs[unit], "runs", self.labels, f"Jaccard overlap of surviving {unit} (s-pruning)")]
            if len(self.tasks) > 1:
                title = f"Mean Jaccard of surviving {unit} between tasks"
                matrices.append((self.by_task[unit], "tasks", self.tasks, title))
            for matrix, kind, labels, title in matrices:
                heatmap(
                    matrix,
                    out_dir / f"jaccard_{kind}_{unit}.png",
                    title=title,
                    xlabels=labels,
                    ylabels=labels,
                    xlabel="",
                    ylabel="",
                    colorbar_label="Jaccard",
                    vmin=0.0,
                    vmax=1.0,
                    digits=2,
                )
        (out_dir / REPORT_FILE).write_text(self.report())
        return out_dir

    def report(self) -> str:
        lines = [
            "# Stability of s-pruning survivors",
            "",
            'After Prasanna, Rogers & Rumshisky 2020, "When BERT Plays the Lottery, All Tickets Are Winning": '
            f"Jaccard overlap of the heads and MLPs that survive s-pruning, for {len(self.labels)} runs "
            f"({', '.join(self.labels)}) of {sum(self.layout['heads'])} heads and {len(self.layout['heads'])} MLPs. "
            "'chance': the overlap expected of random sets of the same sizes.",
            "",
        ]
        rows = []
        for task in self.tasks:
            for unit in UNITS:
                entry = self.across_seeds[unit].get(task)
                if entry and entry["n"]:
                    rows.append([f"{task}, across seeds", unit, fmt_stat(entry, scale=1, digits=2), entry["n"]])
        for unit in UNITS:
            entry = self.across_tasks[unit]
            if entry["n"]:
                rows.append(["across tasks", unit, fmt_stat(entry, scale=1, digits=2), entry["n"]])
        for unit in UNITS:
            chance = self.chance[unit][~np.eye(len(self.labels), dtype=bool)]
            if chance.size:
                rows.append(["chance (all pairs)", unit, f"{chance.mean():.2f}", chance.size // 2])
        if rows:
            lines.append(markdown_table(["pairs", "units", "Jaccard (mean ± std)", "pairs counted"], rows))
        lines += [
            "Surviving units per run: "
            + ", ".join(
                f"{label}: {h} heads / {m} MLPs"
                for label, h, m in zip(self.labels, self.sizes["heads"], self.sizes["mlps"], strict=True)
            ),
            "",
        ]
        lines += ["![heads](jaccard_runs_heads.png)", "![MLPs](jaccard_runs_mlps.png)"]
        if len(self.tasks) > 1:
            lines += ["![heads by task](jaccard_tasks_heads.png)", "![MLPs by task](jaccard_tasks_mlps.png)"]
        lines.append("")
        return "\n".join(lines)


def _read(source: str | os.PathLike[str] | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, dict):
        return source, "<dict>"
    path = Path(source)
    if path.is_dir():
        path = path / SURVIVORS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnalyzeError(
            f"{path} does not exist: pass the output folders (or survivors.json files) of `slimformer analyze "
            "lottery` runs."
        ) from None
    except ValueError as error:
        raise AnalyzeError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.get("slimformer_survivors") != 1:
        raise AnalyzeError(f"{path} is not a survivors.json written by `slimformer analyze lottery`.")
    return data, str(path)


def load_survivor_sets(sources: Sequence[str | os.PathLike[str] | dict[str, Any]]) -> tuple[list[SurvivorSet], dict]:
    """Every s-pruning run of the inputs, checked to share one layout."""
    sets: list[SurvivorSet] = []
    layout: dict[str, Any] | None = None
    layout_source = ""
    for source in sources:
        data, where = _read(source)
        try:
            this_layout = {
                "heads": [int(h) for h in data["layout"]["heads"]],
                "ffn": [int(f) for f in data["layout"]["ffn"]],
            }
            runs = data["runs"]
            task = str(data["task"])
        except (KeyError, TypeError, ValueError) as error:
            raise AnalyzeError(f"{where}: malformed survivors file ({error!r}).") from error
        if layout is None:
            layout, layout_source = this_layout, where
        elif this_layout != layout:
            raise AnalyzeError(
                f"{where} was made for a model with layout {this_layout}, {layout_source} for {layout}: overlaps "
                "are only defined between runs on models of the same shape."
            )
        for run in runs:
            if run.get("kind") != "s":
                continue
            heads = run["heads"]
            if [len(h) for h in heads] != layout["heads"] or len(run["mlps"]) != len(layout["heads"]):
                raise AnalyzeError(f"{where}: seed {run.get('seed')} has masks that do not match its layout.")
            sets.append(
                SurvivorSet(
                    label=f"{task}/seed{run['seed']}",
                    task=task,
                    seed=int(run["seed"]),
                    heads=np.asarray([v for row in heads for v in row], dtype=bool),
                    mlps=np.asarray(run["mlps"], dtype=bool),
                    source=where,
                )
            )
    if layout is None:
        raise AnalyzeError("No inputs: pass the outputs of one or more `slimformer analyze lottery` runs.")
    # the same task and seed twice (e.g. two runs with different settings): keep both, tell them apart
    counts: dict[str, int] = {}
    for item in sets:
        counts[item.label] = counts.get(item.label, 0) + 1
    seen: dict[str, int] = {}
    for item in sets:
        if counts[item.label] > 1:
            seen[item.label] = seen.get(item.label, 0) + 1
            item.label = f"{item.label}#{seen[item.label]}"
    return sets, layout


def stability(sources: Sequence[str | os.PathLike[str] | dict[str, Any]]) -> StabilityResult:
    """Jaccard overlaps of s-pruning survivors across the seeds and tasks of several lottery runs (see the module
    doc). ``sources`` are lottery output folders, ``survivors.json`` paths or their parsed contents."""
    sets, layout = load_survivor_sets(sources)
    if len(sets) < 2:
        raise AnalyzeError(
            f"Found {len(sets)} s-pruning run(s) in the inputs; overlaps need at least two (run lottery with "
            "--prune-kinds s and --seeds 2 or more, or pass runs on several tasks)."
        )
    tasks = list(dict.fromkeys(s.task for s in sets))
    runs, by_task, across_seeds, across_tasks, chance, sizes = {}, {}, {}, {}, {}, {}
    for unit in UNITS:
        vectors = [getattr(s, unit) for s in sets]
        matrix = jaccard_matrix(vectors)
        runs[unit] = matrix
        n = vectors[0].size
        sizes[unit] = [int(v.sum()) for v in vectors]
        chance[unit] = np.array([[chance_jaccard(a, b, n) for b in sizes[unit]] for a in sizes[unit]])
        task_matrix = np.full((len(tasks), len(tasks)), np.nan)
        pairs_by_task: dict[str, list[float]] = {t: [] for t in tasks}
        cross: list[float] = []
        for a, ta in enumerate(tasks):
            for b, tb in enumerate(tasks):
                values = [
                    matrix[i, j]
                    for i, si in enumerate(sets)
                    for j, sj in enumerate(sets)
                    if si.task == ta and sj.task == tb and i != j and (ta != tb or i < j)
                ]
                if values:
                    task_matrix[a, b] = float(np.mean(values))
                if a == b:
                    pairs_by_task[ta] = values
                elif a < b:
                    cross.extend(values)
        by_task[unit] = task_matrix
        across_seeds[unit] = {t: stat(v) for t, v in pairs_by_task.items()}
        across_tasks[unit] = stat(cross)
    return StabilityResult(
        labels=[s.label for s in sets],
        tasks=tasks,
        layout=layout,
        runs=runs,
        by_task=by_task,
        across_seeds=across_seeds,
        across_tasks=across_tasks,
        chance=chance,
        sizes=sizes,
        meta={"sources": list(dict.fromkeys(s.source for s in sets))},
    )
