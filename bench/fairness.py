"""Benchmark (issue 17, items 4-6): can compression be steered toward less bias and more robustness?

On the converged MiniLM-L6 SST-2 teacher, each variant trained with three seeds (0, 1, 2) on the same budget (one
epoch over 8,000 SST-2 training sentences, batch 32, max length 64, logit distillation from the teacher):

- head movement pruning to 50% of the encoder weights (whole heads and FFN neurons: Lagunas et al. 2021's block
  movement at head granularity, the subset Joniak & Aizawa 2022 search for bias), with the debiasing objective
  (a symmetric KL between predictions on each sentence and on it with gendered words swapped, and first names too
  in the "(words + names)" variants) at weight 0 / 1 / 10;
- the same with the robust-ticket objective (the task loss under a PGD attack on the word embeddings, bound 2%
  of the mean embedding norm in 2 steps, or 10% in 3, the library's default; Zheng et al. 2022) at weight 1;
- retraining-free budget pruning to 50% of the FLOPs, then logit distillation with and without fair distillation's
  counterfactual pairs (Delobelle & Berendt 2022).

Each model is scored on SST-2 dev, on AdvGLUE SST-2 (148 sentences), under PGD (2% and 5% bounds, 256 dev
sentences, 5 steps) and on the EEC gender and race gaps. Per variant: mean and standard deviation over the seeds.
Writes ``bench/results/fairness.{json,md,png}``; every finished run is kept in ``runs/bench/fairness/runs.jsonl``
and skipped when the benchmark is run again (without that folder, the runs in the results file count as done).

    python bench/fairness.py [--seeds 0,1,2] [--variants all|name,name]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import slimformer
from common import (
    RESULTS,
    RUNS,
    describe_teacher,
    machine,
    markdown_table,
    teacher_folder,
    teacher_summary,
    write_results,
)
from slimformer.analyze import bias, robustness
from slimformer.configs import FlopsBudget, Movement
from slimformer.distill import DistillConfig
from slimformer.models import load_model
from slimformer.tasks import load_task
from slimformer.train import TrainConfig

OUT = RUNS / "fairness"
SAMPLES, EPOCHS, LENGTH = 8000, 1.0, 64
HEADS = {"sparsity": 0.5, "granularity": "head", "epochs": EPOCHS, "max_length": LENGTH, "max_train_samples": SAMPLES}

WORDS, NAMES = {"debias_names": False}, {"debias_names": True}
VARIANTS = {
    "head movement 50%": {"kind": "prune", "config": HEADS},
    "head movement 50% + debias 1 (words)": {"kind": "prune", "config": {**HEADS, "debias_weight": 1.0, **WORDS}},
    "head movement 50% + debias 10 (words)": {"kind": "prune", "config": {**HEADS, "debias_weight": 10.0, **WORDS}},
    "head movement 50% + debias 1 (words + names)": {
        "kind": "prune",
        "config": {**HEADS, "debias_weight": 1.0, **NAMES},
    },
    "head movement 50% + debias 10 (words + names)": {
        "kind": "prune",
        "config": {**HEADS, "debias_weight": 10.0, **NAMES},
    },
    "head movement 50% + adversarial 1": {
        "kind": "prune",
        "config": {**HEADS, "adversarial_weight": 1.0, "adversarial_epsilon": 0.02, "adversarial_steps": 2},
    },
    # the library's default attack (10% of the embedding norm, 3 steps): a word substitution, which AdvGLUE makes,
    # moves a token much further than 2%
    "head movement 50% + adversarial 1 (10% in 3 steps)": {
        "kind": "prune",
        "config": {**HEADS, "adversarial_weight": 1.0},
    },
    "budget 50% + KD": {"kind": "distill", "counterfactual": False},
    "budget 50% + fair KD (words)": {"kind": "distill", "counterfactual": True, "names": False},
}
# labels of the runs measured before first names were swapped too (then the only swap): read from the results file
RENAMED = {
    "head movement 50% + debias 1": "head movement 50% + debias 1 (words)",
    "head movement 50% + debias 10": "head movement 50% + debias 10 (words)",
    "budget 50% + fair KD": "budget 50% + fair KD (words)",
}


def slug(label: str) -> str:
    return label.replace(" + ", "-").replace(" ", "-").replace("%", "")


def build(label: str, seed: int, teacher: Path) -> Path:
    spec = VARIANTS[label]
    folder = OUT / f"{slug(label)}-seed{seed}"
    if (folder / "metrics.json").is_file():
        return folder
    if spec["kind"] == "prune":
        config = Movement(**spec["config"], seed=seed)
        slimformer.prune(load_model(teacher), config, "sst2", out=folder, measure=False, overwrite=True)
        return folder
    pruned = OUT / "budget-50-pruned"
    if not (pruned / "metrics.json").is_file():
        slimformer.prune(load_model(teacher), FlopsBudget(0.5), "sst2", out=pruned, measure=False, overwrite=True)
    train = TrainConfig(epochs=EPOCHS, max_length=LENGTH, max_train_samples=SAMPLES, batch_size=32, seed=seed)
    settings = DistillConfig(
        alpha=0.9,
        temperature=2.0,
        counterfactual=spec["counterfactual"],
        counterfactual_names=spec.get("names", False),
    )
    slimformer.distill(teacher, pruned, folder, "sst2", config=train, distill_config=settings, overwrite=True)
    return folder


def score(folder: Path, seed: int, label: str, built_s: float) -> dict:
    robust = robustness(folder, "sst2", epsilons=(0.02, 0.05), attack_examples=256, max_length=LENGTH)
    gaps = bias(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    per_emotion = _pair_gaps(gaps, "gender")
    return {
        "variant": label,
        "seed": seed,
        "folder": str(folder),
        "dev": robust.clean["dev"],
        "advglue": robust.advglue["dev"],
        "pgd": {f"{p['epsilon']:g}": p["success_rate"] for p in robust.pgd},
        "gender_gap": gaps.gaps["gender"]["all"]["mean"],
        "race_gap": gaps.gaps["race"]["all"]["mean"],
        "gender_gap_abs": float(np.mean(np.abs(per_emotion))) if per_emotion else None,
        "train_seconds": metrics.get("seconds", {}).get("train"),
        "build_seconds": round(built_s, 1),
    }


def _pair_gaps(gaps, comparison: str) -> list[float]:
    """The per-emotion mean gaps (their absolute mean says how far the model is from no gap in any emotion)."""
    return [v["mean"] for k, v in gaps.gaps[comparison].items() if k != "all"]


def dense_row(teacher: Path) -> dict:
    cached = OUT / "dense.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    earlier = [r for r in previous_runs() if r["variant"] == "dense (teacher)"]
    if earlier and Path(earlier[0]["folder"]).resolve() == teacher.resolve():
        cached.write_text(json.dumps(earlier[0]))
        return earlier[0]
    row = score(teacher, 0, "dense (teacher)", 0.0)
    cached.write_text(json.dumps(row))
    return row


def previous_runs() -> list[dict]:
    """The runs in ``bench/results/fairness.json`` (under today's labels): a fresh ``runs/`` folder resumes from
    them instead of training every variant again."""
    results = RESULTS / "fairness.json"
    runs = json.loads(results.read_text())["runs"] if results.is_file() else []
    return [{**r, "variant": RENAMED.get(r["variant"], r["variant"])} for r in runs]


def summarise(runs: list[dict]) -> list[dict]:
    summary = []
    for label in ["dense (teacher)", *VARIANTS]:
        rows = [r for r in runs if r["variant"] == label]
        if not rows:
            continue
        entry = {"variant": label, "seeds": [r["seed"] for r in rows]}
        for key in ("dev", "advglue", "gender_gap", "race_gap", "gender_gap_abs"):
            values = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
            entry[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        for bound in rows[0]["pgd"]:
            values = np.array([r["pgd"][bound] for r in rows], dtype=float)
            entry[f"pgd {bound}"] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }
        summary.append(entry)
    return summary


def _cell(entry: dict, key: str, scale: float = 100.0, signed: bool = False) -> str:
    value = entry[key]
    sign = "+" if signed else ""
    return f"{value['mean'] * scale:{sign}.2f} ± {value['std'] * scale:.2f}"


def plot(summary: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for entry in summary:
        for axes, key in ((left, "gender_gap"), (right, "advglue")):
            axes.errorbar(
                entry["dev"]["mean"] * 100,
                entry[key]["mean"] * 100,
                xerr=entry["dev"]["std"] * 100,
                yerr=entry[key]["std"] * 100,
                fmt="o",
                capsize=3,
                label=entry["variant"],
            )
    left.set_xlabel("SST-2 dev accuracy")
    left.set_ylabel("EEC gender gap, P(positive) F - M (points)")
    left.axhline(0, color="grey", lw=0.5)
    right.set_xlabel("SST-2 dev accuracy")
    right.set_ylabel("AdvGLUE SST-2 accuracy")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write(runs: list[dict], teacher: dict) -> None:
    summary = summarise(runs)
    bounds = [k for k in summary[0] if k.startswith("pgd ")]
    headers = ["variant", "seeds", "SST-2 dev", "AdvGLUE SST-2",
               *[f"PGD success {float(b[4:]) * 100:g}%" for b in bounds], "EEC gender gap (F-M)",
               "EEC race gap (AA-EU)", "mean abs. gender gap per emotion"]  # fmt: skip
    table = [
        [e["variant"], len(e["seeds"]), _cell(e, "dev"), _cell(e, "advglue"), *[_cell(e, b) for b in bounds],
         _cell(e, "gender_gap", signed=True), _cell(e, "race_gap", signed=True), _cell(e, "gender_gap_abs")]
        for e in summary
    ]  # fmt: skip
    text = (
        "# Steering compression toward fairness and robustness (SST-2, MiniLM-L6)\n\n"
        + describe_teacher(teacher)
        + "\n\n"
        + f"Every variant: {EPOCHS:g} epoch over {SAMPLES:,} SST-2 training sentences, batch 32, max length {LENGTH}, "
        "logit distillation from the teacher (alpha 0.9, T 2); mean ± standard deviation over the seeds listed. "
        "Head movement: whole heads and FFN neurons, 50% of the encoder weights. Debias W: symmetric KL between "
        "predictions on each sentence and on its gender-swapped copy, weight W; (words): gendered words swapped "
        "(he / she, brother / sister, ...), (words + names): common first names too (john / mary, ...; none of "
        "them an EEC name). Adversarial 1: task loss under a "
        "2-step PGD attack (bound 2% of the mean word-embedding norm; 10% in 3 steps where the label says so). "
        "Budget 50% + (fair) KD: retraining-free "
        "pruning to 50% of the FLOPs, then logit distillation; fair KD adds gender-swapped copies of the training "
        "sentences taught the teacher's averaged prediction. PGD: 5 steps, 256 dev sentences, success = correct "
        "predictions flipped. EEC gaps in points of P(positive).\n\n" + markdown_table(headers, table) + "\n\n"
        "![gender gap and AdvGLUE against accuracy](fairness.png)\n"
    )
    write_results("fairness", {"machine": machine(), "teacher": teacher, "runs": runs, "summary": summary}, text)
    plot(summary, RESULTS / "fairness.png")
    print(text)


# ------------------------------------------------------------------------------------------------ findings

FINDINGS = Path(__file__).resolve().parent.parent / "docs" / "findings" / "compression-costs.md"


def _separated(a: dict, b: dict) -> bool:
    """Whether two seed means differ by more than the sum of their standard deviations (beyond the seed spread)."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def findings(costs: dict | None, fairness: dict) -> str:
    """docs/findings/compression-costs.md: the questions of issue 17 answered from the two results files."""
    lines = ["# What compression costs beyond accuracy: fairness and robustness (SST-2, MiniLM-L6)", "",
             "Generated by `bench/fairness.py` from `bench/results/costs.json` and `bench/results/fairness.json`; "
             "every number below is read from them.", ""]  # fmt: skip
    if costs:
        rows = costs["rows"]
        dense = rows[0]
        lines += ["## Does compression widen the EEC gaps, and cost more on AdvGLUE than on clean dev?", "",
                  "| model | clean drop | AdvGLUE drop | gender gap (F-M) | race gap (AA-EU) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            gaps = []
            for key in ("gender_gap", "race_gap"):
                entry = row[key]
                text = f"{entry['mean'] * 100:+.2f}"
                if "ci95" in entry:
                    low, high = entry["ci95"]
                    text += f" [{low * 100:+.2f}, {high * 100:+.2f}]"
                    reference = dense[key]["mean"]
                    if row is not dense and not low <= reference <= high:
                        text += " (dense value outside the CI)"
                gaps.append(text)
            clean = (dense["clean"] - row["clean"]) * 100
            adversarial = (dense["advglue"] - row["advglue"]) * 100
            lines.append(f"| {row['model']} | {clean:+.2f} | {adversarial:+.2f} | {gaps[0]} | {gaps[1]} |")
        lines += ["", "Drops are dense minus model, in points (positive = worse). AdvGLUE SST-2 has 148 sentences: one "
                  "sentence is 0.68 points and the binomial standard error at ~30% accuracy is about 3.8 points, so "
                  "AdvGLUE differences under ~7 points are not evidence either way.", ""]  # fmt: skip
    summary = {entry["variant"]: entry for entry in fairness["summary"]}
    dense = summary.get("dense (teacher)")
    ordinary = summary.get("head movement 50%")
    if dense and ordinary:
        lines += ["## Does the debiasing objective shrink the gap, and at what accuracy cost?", "",
                  "| variant | seeds | SST-2 dev | EEC gender gap | vs dense gap | accuracy vs dense |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        movement, fair = [n for n in VARIANTS if "debias" in n], [n for n in VARIANTS if "fair KD" in n]
        debiased = [*movement, *fair]
        for name in ("dense (teacher)", "head movement 50%", *movement, "budget 50% + KD", *fair):
            if name not in summary:
                continue
            entry = summary[name]
            ratio = entry["gender_gap"]["mean"] / dense["gender_gap"]["mean"] if dense["gender_gap"]["mean"] else None
            shown = "" if ratio is None else f"{ratio:.2f}x"
            accuracy = (entry["dev"]["mean"] - dense["dev"]["mean"]) * 100
            lines.append(
                f"| {name} | {len(entry['seeds'])} | {_cell(entry, 'dev')} | {_cell(entry, 'gender_gap', signed=True)} "
                f"| {shown} | {accuracy:+.2f} |"
            )
        target = [
            name for name in debiased
            if name in summary
            and abs(summary[name]["gender_gap"]["mean"]) <= 0.5 * abs(dense["gender_gap"]["mean"])
            and summary[name]["dev"]["mean"] >= dense["dev"]["mean"] - 0.01
        ]  # fmt: skip
        lines += ["", "Target (issue 17): a gap at most half of the dense model's, within 1.0 point of its accuracy. "
                  + (f"Met by: {', '.join(target)}." if target else "Not met by any variant here; see the table for "
                     "how far each got.")]  # fmt: skip
        lines += [""]
    robust = {name: summary[name] for name in VARIANTS if "adversarial" in name and name in summary}
    if ordinary and robust:
        bounds = [k for k in ordinary if k.startswith("pgd ")]
        lines += ["## Do robust tickets beat ordinary ones?", "",
                  "| variant | SST-2 dev | AdvGLUE SST-2 | "
                  + " | ".join(f"PGD success {float(b[4:]) * 100:g}%" for b in bounds) + " |",
                  "|---|---|---|" + "---|" * len(bounds)]  # fmt: skip
        for name, entry in (("ordinary (head movement 50%)", ordinary), *robust.items()):
            lines.append(f"| {name} | {_cell(entry, 'dev')} | {_cell(entry, 'advglue')} | "
                         + " | ".join(_cell(entry, b) for b in bounds) + " |")  # fmt: skip
        for name, entry in robust.items():
            better = entry["advglue"]["mean"] > ordinary["advglue"]["mean"]
            lines += ["", f"{name}, AdvGLUE: {'above' if better else 'not above'} ordinary by "
                      f"{(entry['advglue']['mean'] - ordinary['advglue']['mean']) * 100:+.2f} points, "
                      f"{'beyond' if _separated(entry['advglue'], ordinary['advglue']) else 'within'} the seed "
                      "spread (difference of the means against the sum of the standard deviations)."]  # fmt: skip
            for bound in bounds:
                moved = (entry[bound]["mean"] - ordinary[bound]["mean"]) * 100
                lines.append(f"PGD success at {float(bound[4:]) * 100:g}%: {moved:+.2f} points, "
                             f"{'beyond' if _separated(entry[bound], ordinary[bound]) else 'within'} the seed "
                             "spread.")  # fmt: skip
        lines += [""]
    return "\n".join(lines) + "\n"


PRONOUNS = {"he", "she", "him", "her"}


def _is_name(person: str) -> bool:
    """EEC persons are first names ("Amanda"), noun phrases ("my sister", "this man") or pronouns."""
    return not (person.lower() in PRONOUNS or person.lower().startswith(("my ", "this ")))


def person_split(folders: dict[str, str]) -> dict[str, dict]:
    """The EEC gender gap of each model on the pairs whose person is a first name, and on those whose person is a
    gendered noun phrase or pronoun (the words the debiasing objective swaps): kept in
    ``bench/results/fairness_person_split.json``."""
    import csv

    from slimformer.analyze.bias import find_eec_file

    cache = RESULTS / "fairness_person_split.json"  # with the results: the run folders may be gone
    known = {RENAMED.get(k, k): v for k, v in (json.loads(cache.read_text()) if cache.is_file() else {}).items()}
    source = find_eec_file()
    with open(source, newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    files = {}
    for kind, keep in (("names", True), ("words", False)):
        files[kind] = OUT / f"eec-{kind}.csv"
        with open(files[kind], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for r in rows if (not r["Gender"]) or _is_name(r["Person"]) == keep)
    for label, folder in folders.items():
        if label not in known:
            known[label] = {kind: bias(folder, eec_file=path).gaps["gender"]["all"] for kind, path in files.items()}
            cache.write_text(json.dumps(known))
    return known


def write_findings() -> None:
    """The results table again from every finished run (``runs.jsonl``), then docs/findings/compression-costs.md."""
    runs = [json.loads(line) for line in (OUT / "runs.jsonl").read_text().splitlines()]
    write([json.loads((OUT / "dense.json").read_text()), *runs], teacher_summary("sst2", teacher_folder("sst2")))

    costs_file, fairness_file = RESULTS / "costs.json", RESULTS / "fairness.json"
    costs = json.loads(costs_file.read_text()) if costs_file.is_file() else None
    fairness = json.loads(fairness_file.read_text())
    seed0 = {r["variant"]: r["folder"] for r in fairness["runs"] if r["seed"] == 0}
    split = person_split(seed0)
    text = findings(costs, fairness)
    table = ["## Which EEC pairs carry the gap: first names or gendered words?", "",
             "The (words) variants of the debiasing objective and fair distillation swap gendered words (he / she, "
             f"brother / sister, ...; {SWAPPABLE_WORDS}); the (words + names) variants also swap 48 pairs of common "
             f"first names, none of them an EEC name ({SWAPPABLE_NAMES}). 40 of the EEC's 62 persons are first "
             "names. Seed 0 of each variant; gap in points of P(positive), female - male, 95% CI.", "",
             "| model | first-name pairs | gendered-word pairs |", "|---|---|---|"]  # fmt: skip
    for label, kinds in split.items():
        cells = []
        for kind in ("names", "words"):
            entry = kinds[kind]
            low, high = entry["ci95"]
            cells.append(f"{entry['mean'] * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}]")
        table.append(f"| {label} | {cells[0]} | {cells[1]} |")
    FINDINGS.write_text(text + "\n".join(table) + "\n")


# measured on the 8,000-sentence training subset of seed 0 (MiniLM tokenizer, the package's lists)
SWAPPABLE_WORDS = "688 of the 8,000 SST-2 training sentences (8.6%) contain one"
SWAPPABLE_NAMES = "803 sentences, 10.0%, have a word or a name to swap"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    teacher_path = teacher_folder("sst2")
    teacher = teacher_summary("sst2", teacher_path)
    load_task("sst2")  # fail early without the data
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "runs.jsonl"
    if not log.is_file():
        log.write_text("".join(json.dumps(r) + "\n" for r in previous_runs() if r["variant"] != "dense (teacher)"))
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    done = {(r["variant"], r["seed"]) for r in runs}
    dense = dense_row(teacher_path)
    for seed in seeds:  # seed-major: a cut-short run still has one seed of every variant
        for label in chosen:
            if (label, seed) in done:
                continue
            started = time.perf_counter()
            folder = build(label, seed, teacher_path)
            row = score(folder, seed, label, time.perf_counter() - started)
            print(json.dumps(row), flush=True)
            with log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            runs.append(row)
            write([dense, *runs], teacher)
    write([dense, *runs], teacher)
    write_findings()


if __name__ == "__main__":
    main()
