"""Findings: what the heads, layers and subnetworks of MiniLM-L6 do on SST-2 and STS-B (`slimformer analyze`).

Runs, for each task, on the fine-tuned models of bench/glue_finetune.py (runs/bench/<task>; fine-tuned here
with `slimformer finetune` if missing):

1. ablate  (Michel et al. 2019): every head masked alone, one head kept per layer, each layer's attention / FFN /
   whole layer removed;
2. lottery (Prasanna et al. 2020): s-pruning and m-pruning of the fine-tuned model, then the good, random and
   bad subnetworks and the full model re-fine-tuned from the pre-trained MiniLM on a training subset;
3. stability: Jaccard overlap of the s-pruning survivors across seeds (more s-pruning runs of the same model with
   other importance samples; with --finetune-per-seed, of models fine-tuned here per seed) and across tasks;
4. papa    (Hassid et al. 2022): attention replaced by constant patterns in none / first half / last half / all
   layers (post-hoc, no retraining), over several pattern samples (seeds).

Everything goes under runs/findings/; the reports and the small PNGs (< 100 KB) are copied to docs/findings/,
with docs/findings/README.md collecting the tables; every number in it is read from the results just written.
A finished step is not re-run (delete its folder to redo it); the lottery runs resume from <out>.work/.

Subsampling (chosen for about an hour on 2 CPU cores; see SETTINGS): ablations on 500 random dev rows; SST-2
lottery re-fine-tuning (s and m, good / random / bad / full) on 3,000 training sentences, one epoch, lr 1e-4, on
the full dev set; STS-B lottery for s-pruning only (good / random / bad) on 2,000 pairs, 2 epochs, 500 dev pairs;
MRPC and CoLA only add s-pruning survivors to the stability matrices; constant attention from 256 training examples per
seed. docs/findings/verdict.md, when present, is a person's reading of the tables and is put at the top.

    python bench/findings.py [--tasks sst2,stsb] [--stability-tasks mrpc,cola] [--lottery-seeds 1]
                             [--stability-seeds 3] [--papa-seeds 3] [--finetune-per-seed] [--smoke]

--smoke runs everything with tiny settings (a few examples, one training step) to check the pipeline in minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import ROOT, RUNS, glue_dir, machine, markdown_table
from slimformer.analyze import RetrainConfig, ablate, lottery, papa, stability
from slimformer.analyze.common import output_folder
from slimformer.io import write_json_atomic

PNG_LIMIT = 100_000  # bytes: larger plots stay in runs/findings only


@dataclass(frozen=True)
class TaskSettings:
    max_length: int
    ablate_eval: int | None  # dev rows for the ablations (None: all)
    eval_rows: int | None  # dev rows for lottery and papa (None: all)
    train_rows: int  # training examples for each re-fine-tuning
    epochs: float = 1.0
    learning_rate: float = 1e-4
    max_steps: int = -1
    n_examples: int = 256  # importance sample (s-pruning) and pattern sample (papa)
    prune_kinds: str = "s,m"  # lottery: s-pruning and / or m-pruning
    subnetworks: str = "good,random,bad,full"  # lottery: which subnetworks are re-fine-tuned
    finetune_args: tuple[str, ...] = ()  # extra `slimformer finetune` options when no model is in runs/bench
    ablate_layers: str | None = None
    max_prune_iterations: int | None = None


SETTINGS = {
    "sst2": TaskSettings(max_length=64, ablate_eval=500, eval_rows=None, train_rows=3000),
    # the second task: sentence pairs cost ~3x the tokens of SST-2, so 500 dev pairs for the ablations, s-pruning
    # and papa, and the lottery re-fine-tunes s-pruning's good / random / bad subnetworks only (2,000 pairs, 2 epochs)
    "stsb": TaskSettings(
        max_length=128,
        ablate_eval=500,
        eval_rows=500,
        train_rows=2000,
        epochs=2,
        prune_kinds="s",
        subnetworks="good,random,bad",
    ),
    # stability only (s-pruning survivors of the fine-tuned model, no re-fine-tuning), all 408 dev pairs
    "mrpc": TaskSettings(max_length=128, ablate_eval=None, eval_rows=None, train_rows=0),
    # stability only; no CoLA model in runs/bench, so one is fine-tuned here (1 epoch at lr 5e-5 leaves MiniLM at
    # the majority class, Matthews 0: 3 epochs at 1e-4 on all 8,551 sentences)
    "cola": TaskSettings(
        max_length=64,
        ablate_eval=None,
        eval_rows=None,
        train_rows=0,
        finetune_args=("--epochs", "3", "--lr", "1e-4", "--warmup-steps", "50"),
    ),
}
SMOKE = {"ablate_eval": 16, "eval_rows": 16, "train_rows": 16, "max_steps": 1, "n_examples": 8}
SMOKE_EXTRA = {"ablate_layers": "0", "max_prune_iterations": 1}
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def done(folder: Path) -> bool:
    return (folder / "results.json").is_file()


def finetuned_model(task: str, settings: TaskSettings, runs: Path, smoke: bool) -> Path:
    """runs/bench/<task> when it is there, else a model fine-tuned here with `slimformer finetune`."""
    bench = RUNS / task
    if (bench / "config.json").is_file():
        return bench
    out = runs / "finetuned" / task
    if not (out / "config.json").is_file():
        log(f"{task}: no fine-tuned model in {bench}; fine-tuning one in {out}")
        command = [sys.executable, "-m", "slimformer.cli", "finetune", "--model", "minilm-l6", "--task", task]
        command += ["--data-dir", str(glue_dir()), "--out", str(out), "--max-length", str(settings.max_length)]
        command += ["--overwrite"]
        if smoke:
            command += ["--max-steps", "1", "--max-train-samples", "16", "--max-eval-samples", "16"]
        elif settings.finetune_args:
            command += list(settings.finetune_args)
        else:
            command += ["--max-train-samples", str(max(settings.train_rows, 8000))]
        subprocess.run(command, check=True)
    return out


def run_task(
    task: str, settings: TaskSettings, runs: Path, args: argparse.Namespace, timings: dict, stability_only: bool = False
) -> dict:
    """Every analysis of one task (or only the s-pruning runs for stability); returns their output folders."""
    folder = runs / task
    tuned = finetuned_model(task, settings, runs, args.smoke)
    data = glue_dir()
    train = RetrainConfig(epochs=settings.epochs, max_steps=settings.max_steps, learning_rate=settings.learning_rate)
    outs = {
        "ablate": folder / "ablate",
        "lottery": folder / "lottery",
        "lottery_seeds": folder / "lottery_seeds",
        "papa": folder / "papa",
    }

    def step(name: str, function) -> None:
        out = outs[name]
        if done(out):
            log(f"{task} {name}: done before, kept ({out})")
            return
        log(f"{task} {name}: running")
        started = time.perf_counter()
        result = function()
        with output_folder(out, overwrite=True) as staging:
            result.save(staging)
        timings[f"{task}/{name}"] = round(time.perf_counter() - started, 1)
        log(f"{task} {name}: {timings[f'{task}/{name}']} s -> {out}")

    if stability_only:
        step(
            "lottery_seeds",
            lambda: lottery(
                task,
                finetuned=str(tuned),
                prune_kinds="s",
                subnetworks="none",
                seeds=args.stability_seeds,
                model="minilm-l6",
                data_dir=data,
                max_length=settings.max_length,
                max_eval_samples=settings.eval_rows,
                n_examples=settings.n_examples,
                max_prune_iterations=settings.max_prune_iterations,
                train_config=train,
                work_dir=folder / "lottery_seeds.work",
            ),
        )
        shutil.rmtree(folder / "lottery_seeds.work", ignore_errors=True)
        return {name: out for name, out in outs.items() if done(out)}
    step(
        "ablate",
        lambda: ablate(
            str(tuned),
            task,
            data_dir=data,
            layers=settings.ablate_layers,
            max_length=settings.max_length,
            max_eval_samples=settings.ablate_eval,
        ),
    )
    common = {
        "model": "minilm-l6",
        "data_dir": data,
        "max_length": settings.max_length,
        "max_train_samples": settings.train_rows,
        "max_eval_samples": settings.eval_rows,
        "n_examples": settings.n_examples,
        "max_prune_iterations": settings.max_prune_iterations,
        "train_config": train,
    }
    step(
        "lottery",
        lambda: lottery(
            task,
            finetuned=str(tuned),
            prune_kinds=settings.prune_kinds,
            subnetworks=settings.subnetworks,
            seeds=args.lottery_seeds,
            work_dir=folder / "lottery.work",
            **common,
        ),
    )
    extra_seeds = args.stability_seeds if args.finetune_per_seed else args.stability_seeds - args.lottery_seeds
    if extra_seeds > 0:
        step(
            "lottery_seeds",
            lambda: lottery(
                task,
                finetuned=None if args.finetune_per_seed else str(tuned),
                prune_kinds="s",
                subnetworks="none",
                seeds=extra_seeds,
                seed=0 if args.finetune_per_seed else args.lottery_seeds,
                work_dir=folder / "lottery_seeds.work",
                **common,
            ),
        )
    step(
        "papa",
        lambda: papa(
            str(tuned),
            task,
            data_dir=data,
            n_examples=settings.n_examples,
            max_length=settings.max_length,
            max_eval_samples=settings.eval_rows,
            seeds=args.papa_seeds,
        ),
    )
    for name in ("lottery", "lottery_seeds"):
        shutil.rmtree(folder / f"{name}.work", ignore_errors=True)
    return {name: out for name, out in outs.items() if done(out)}


# ------------------------------------------------------------------------------------------------ README


def pts(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def pm(entry: dict[str, Any] | None, signed: bool = False, scale: float = 100.0, digits: int = 2) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    text = f"{entry['mean'] * scale:+.{digits}f}" if signed else f"{entry['mean'] * scale:.{digits}f}"
    if entry.get("n", 0) > 1:
        text += f" ± {entry['std'] * scale:.{digits}f}"
    return text


def compare(a: float, b: float, unit: str = "points") -> str:
    """'higher than ... by X points' / 'lower ...' / 'equal to' from two scores in [0, 1]."""
    difference = (a - b) * 100
    if abs(difference) < 0.005:
        return "equal to"
    return f"{abs(difference):.2f} {unit} {'higher' if difference > 0 else 'lower'} than"


def ablate_section(task: str, results: dict) -> list[str]:
    name = TASK_NAMES.get(task, task)
    metric = results["metric"]
    deltas = [d for row in results["single_head_delta"]["mean"] for d in row if d is not None]
    rows = []
    for layer in results["layers"]:
        best = results["best_head_per_layer"][layer]
        rows.append(
            [
                layer,
                pm(results["components_delta"]["attention"][layer], signed=True),
                pm(results["components_delta"]["ffn"][layer], signed=True),
                pm(results["components_delta"]["layer"][layer], signed=True),
                f"{best['head']}: {pm(best['score'])} ({pm(best['delta'], signed=True)})",
            ]
        )
    lines = [
        f"### {name}: ablations ({metric}, full model {pm(results['base'])}, {results['meta']['eval_rows']} dev rows)",
        "",
        markdown_table(["layer", "Δ no attention", "Δ no FFN", "Δ no layer", "best head kept alone: score (Δ)"], rows),
    ]
    if deltas:
        small = sum(1 for d in deltas if abs(d) < 0.01)
        worst = min(deltas)
        best_drop = [results["best_head_per_layer"][layer]["delta"]["mean"] for layer in results["layers"]]
        attention = [results["components_delta"]["attention"][layer]["mean"] for layer in results["layers"]]
        ffn = [results["components_delta"]["ffn"][layer]["mean"] for layer in results["layers"]]
        drops = [(d, "attention", layer) for d, layer in zip(attention, results["layers"], strict=True)]
        drops += [(d, "FFN", layer) for d, layer in zip(ffn, results["layers"], strict=True)]
        largest = min(drops)
        lines.append(
            f"Masking a single head changes {metric} by {pts(worst, True)} to {pts(max(deltas), True)} points; "
            f"{small} of {len(deltas)} heads change it by less than 1 point. Keeping only the best head of a layer "
            f"changes it by {pts(min(best_drop), True)} to {pts(max(best_drop), True)} points, depending on the layer. "
            f"Removing a layer's attention changes it by {pts(min(attention), True)} to {pts(max(attention), True)} "
            f"points, removing its FFN by {pts(min(ffn), True)} to {pts(max(ffn), True)} points (the largest change "
            f"down: the {largest[1]} of layer {largest[2]})."
        )
    lines.append("")
    return lines


def lottery_section(task: str, results: dict) -> list[str]:
    name = TASK_NAMES.get(task, task)
    summary, meta = results["summary"], results["meta"]
    per_seed = results["per_seed"]
    seeds = len(results["seeds"])
    lines = [
        f"### {name}: lottery tickets ({results['metric']}, {seeds} seed{'s' if seeds > 1 else ''}; re-fine-tuning "
        f"on {meta['train_rows']} training examples, {meta['train']['epochs']} epoch, lr "
        f"{meta['train']['learning_rate']}, dev {meta['eval_rows']} rows)",
        "",
    ]
    s_heads = [e["s"]["heads_kept"] for e in per_seed if "s" in e]
    s_mlps = [e["s"]["mlps_kept"] for e in per_seed if "s" in e]
    sparsity = [e["m"]["sparsity"] for e in per_seed if "m" in e]
    rows = []
    for sub in ("good", "random", "bad"):
        rows.append([sub, pm(summary.get(f"s-{sub}")), pm(summary.get(f"m-{sub}"))])
    rows.append(["full (no mask)", pm(summary.get("full")), pm(summary.get("full"))])
    lines.append(markdown_table(["subnetwork", "s-pruning (heads + MLPs)", "m-pruning (weights)"], rows))
    fine = summary["finetuned"]["mean"]
    text = (
        f"The fine-tuned model scores {pm(summary['finetuned'])}. s-pruning kept {sum(s_heads) / len(s_heads):.1f} of "
        f"{meta['total_heads']} heads and {sum(s_mlps) / len(s_mlps):.1f} of {meta['total_mlps']} MLPs (mean over "
        f"seeds); m-pruning removed {100 * sum(sparsity) / len(sparsity):.1f}% of the encoder weights, both while "
        f"keeping ≥ {meta['keep_score']} x {pts(fine)}. "
        if s_heads and sparsity
        else ""
    )
    for kind, label in (("s", "s-pruning"), ("m", "m-pruning")):
        good, random_, bad = (summary.get(f"{kind}-{s}") for s in ("good", "random", "bad"))
        if good and random_ and bad:
            text += (
                f"Re-fine-tuned from pre-trained weights, the {label} good subnetwork scores "
                f"{compare(good['mean'], random_['mean'])} the random one and {compare(good['mean'], bad['mean'])} "
                "the bad one"
            )
            if summary.get("full"):
                text += f", and {compare(good['mean'], summary['full']['mean'])} the full model"
            text += ". "
    if seeds == 1:
        text += "One seed: these differences have no error bars."
    lines += [text, ""]
    return lines


def stability_section(results: dict) -> list[str]:
    rows = []
    chance = {}
    for unit in ("heads", "mlps"):
        matrix = results["chance_runs"][unit]
        values = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i < j]
        chance[unit] = sum(values) / len(values) if values else None
    for task in results["tasks"]:
        heads, mlps = results["across_seeds"]["heads"][task], results["across_seeds"]["mlps"][task]
        if heads["n"]:
            rows.append(
                [f"{TASK_NAMES.get(task, task)}, across seeds", pm(heads, scale=1), pm(mlps, scale=1), heads["n"]]
            )
    heads, mlps = results["across_tasks"]["heads"], results["across_tasks"]["mlps"]
    if heads["n"]:
        rows.append(["across tasks", pm(heads, scale=1), pm(mlps, scale=1), heads["n"]])
    rows.append(
        [
            "chance (random sets of the same sizes)",
            "n/a" if chance["heads"] is None else f"{chance['heads']:.2f}",
            "n/a" if chance["mlps"] is None else f"{chance['mlps']:.2f}",
            "",
        ]
    )
    lines = [
        f"### Stability of s-pruning survivors ({len(results['labels'])} runs: {', '.join(results['labels'])})",
        "",
        markdown_table(["pairs", "Jaccard, heads", "Jaccard, MLPs", "pairs"], rows),
    ]
    within = [
        results["across_seeds"]["heads"][t]["mean"]
        for t in results["tasks"]
        if results["across_seeds"]["heads"][t]["n"]
    ]
    if within and heads["n"] and chance["heads"] is not None:
        lines.append(
            f"Surviving heads overlap {sum(within) / len(within):.2f} (mean Jaccard) across seeds of one task and "
            f"{heads['mean']:.2f} across tasks, against {chance['heads']:.2f} for random sets of the same sizes."
        )
    lines.append("")
    return lines


def papa_section(task: str, results: dict) -> list[str]:
    name = TASK_NAMES.get(task, task)
    rows = [
        [
            c["name"],
            f"{c['heads_replaced']}/{results['meta']['total_heads']}",
            pm(c["score"]),
            pm(c["delta"], signed=True),
        ]
        for c in results["configs"]
    ]
    seeds = len(results["seeds"])
    lines = [
        f"### {name}: constant attention ({results['metric']}, {results['mode']}, {seeds} pattern sample"
        f"{'s' if seeds > 1 else ''} of {results['meta']['pattern_examples']} examples, dev "
        f"{results['meta']['eval_rows']} rows)",
        "",
        markdown_table(["layers replaced", "heads", "score", "Δ vs none"], rows),
    ]
    by_name = {c["name"]: c for c in results["configs"]}
    if {"all", "first-half", "last-half"} <= set(by_name):
        lines.append(
            f"With every head's attention constant the score changes by {pm(by_name['all']['delta'], signed=True)} "
            f"points; with the first half of the layers constant by {pm(by_name['first-half']['delta'], signed=True)}, "
            f"with the last half by {pm(by_name['last-half']['delta'], signed=True)}."
        )
    lines.append("")
    return lines


def copy_docs(outs: dict[str, dict[str, Path]], stability_out: Path | None, docs: Path) -> list[str]:
    """Reports and PNGs under the size limit to docs/findings/<task>/<analysis>/; returns what was left out."""
    left_out = []
    pairs = [(f"{task}/{name}", out) for task, by_name in outs.items() for name, out in by_name.items()]
    if stability_out is not None:
        pairs.append(("stability", stability_out))
    for relative, out in pairs:
        target = docs / relative
        target.mkdir(parents=True, exist_ok=True)
        # paths relative to the repository, so the committed reports do not name this machine's folders
        report = (out / "report.md").read_text().replace(f"{ROOT}/", "")
        (target / "report.md").write_text(report)
        for png in sorted(out.glob("*.png")):
            if png.stat().st_size < PNG_LIMIT:
                shutil.copy2(png, target / png.name)
            else:
                left_out.append(f"{relative}/{png.name} ({png.stat().st_size // 1000} KB)")
    return left_out


def write_readme(
    outs: dict[str, dict[str, Path]],
    stability_out: Path | None,
    docs: Path,
    timings: dict,
    args: argparse.Namespace,
    left_out: list[str],
) -> Path:
    def load(path: Path) -> dict:
        return json.loads((path / "results.json").read_text())

    verdict = docs / "verdict.md"
    lines = [
        f"# Findings: dissecting MiniLM-L6 on {' and '.join(TASK_NAMES.get(t, t) for t in outs)}",
        "",
        *([verdict.read_text().strip(), ""] if verdict.is_file() else []),
        "Generated by `python bench/findings.py` with `slimformer analyze` (every number below is read from the "
        "results.json files under runs/findings/). Model: all-MiniLM-L6-v2 (6 layers x 12 heads), fine-tuned per task "
        "by bench/glue_finetune.py. Scores in points (x100); ± is the standard deviation over seeds."
        + (" **Smoke run: tiny settings, the numbers mean nothing.**" if args.smoke else ""),
        "",
        "Settings: "
        + "; ".join(
            f"{TASK_NAMES.get(t, t)}: max length {s.max_length}, ablations on "
            f"{'all' if s.ablate_eval is None else s.ablate_eval} dev rows, lottery and constant attention on "
            f"{'all' if s.eval_rows is None else s.eval_rows} dev rows, re-fine-tuning on {s.train_rows} training "
            f"examples ({s.epochs:g} epoch, lr {s.learning_rate:g})"
            for t, s in ((t, effective_settings(t, args)) for t in outs)
        )
        + ".",
        "",
        "## 1. Are sixteen heads better than one? (Michel et al. 2019)",
        "",
    ]
    for task, by_name in outs.items():
        if "ablate" in by_name:
            lines += ablate_section(task, load(by_name["ablate"]))
            lines += [f"Plots and details: [{task}/ablate/report.md]({task}/ablate/report.md)", ""]
    lines += ["## 2. All tickets are winning? (Prasanna et al. 2020)", ""]
    for task, by_name in outs.items():
        if "lottery" in by_name:
            lines += lottery_section(task, load(by_name["lottery"]))
            lines += [f"Plots and details: [{task}/lottery/report.md]({task}/lottery/report.md)", ""]
    if stability_out is not None:
        lines += stability_section(load(stability_out))
        lines += ["Heatmaps: [stability/report.md](stability/report.md)", ""]
    lines += ["## 3. How much does attention attend? (Hassid et al. 2022)", ""]
    for task, by_name in outs.items():
        if "papa" in by_name:
            lines += papa_section(task, load(by_name["papa"]))
            lines += [f"Plots and details: [{task}/papa/report.md]({task}/papa/report.md)", ""]
    lines += ["## Time", "", markdown_table(["step", "seconds"], [[k, v] for k, v in timings.items()])]
    lines += [f"Machine: {json.dumps(machine())}", ""]
    if left_out:
        lines += ["Plots over 100 KB left in runs/findings only: " + ", ".join(left_out), ""]
    path = docs / "README.md"
    path.write_text("\n".join(lines))
    return path


def effective_settings(task: str, args: argparse.Namespace) -> TaskSettings:
    settings = SETTINGS[task]
    if args.smoke:
        settings = replace(settings, **SMOKE, **SMOKE_EXTRA)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument(
        "--stability-tasks", default="mrpc,cola", help="tasks that only add s-pruning runs to stability"
    )
    parser.add_argument("--lottery-seeds", type=int, default=1, help="seeds of the re-fine-tuning experiment")
    parser.add_argument("--stability-seeds", type=int, default=3, help="s-pruning runs per task for stability")
    parser.add_argument("--papa-seeds", type=int, default=3, help="pattern samples for constant attention")
    parser.add_argument("--finetune-per-seed", action="store_true", help="stability over models fine-tuned per seed")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "findings")
    parser.add_argument("--docs-dir", type=Path, default=ROOT / "docs" / "findings")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the pipeline in minutes")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SETTINGS]
    if unknown:
        parser.error(f"no settings for {unknown}; known: {', '.join(SETTINGS)}")

    started = time.perf_counter()
    # seconds per step, kept across invocations (a resumed run only times the steps it ran)
    timings_file = args.runs_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings.pop("total (this invocation)", None)
    outs = {}
    for task in tasks:
        outs[task] = run_task(task, effective_settings(task, args), args.runs_dir, args, timings)

    extra = {
        task: run_task(task, effective_settings(task, args), args.runs_dir, args, timings, stability_only=True)
        for task in (t.strip() for t in args.stability_tasks.split(",") if t.strip())
        if task not in tasks
    }
    stability_out = args.runs_dir / "stability"
    sources = [
        out
        for by_name in [*outs.values(), *extra.values()]
        for key, out in by_name.items()
        if key.startswith("lottery")
    ]
    if not done(stability_out) and len(sources) >= 1:
        log("stability: running")
        result = stability(sources)
        with output_folder(stability_out, overwrite=True) as staging:
            result.save(staging)
    timings["total (this invocation)"] = round(time.perf_counter() - started, 1)
    write_json_atomic(timings_file, timings)

    docs = args.docs_dir
    left_out = copy_docs(outs, stability_out if done(stability_out) else None, docs)
    readme = write_readme(outs, stability_out if done(stability_out) else None, docs, timings, args, left_out)
    log(f"done in {timings['total (this invocation)']} s: {readme}")


if __name__ == "__main__":
    main()
