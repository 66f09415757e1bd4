"""Benchmark: what compression costs beyond the dev score (issue 17's analyses) on MiniLM-L6 for SST-2.

For the dense SST-2 model and its compressed versions (retraining-free budget pruning to 50% of the FLOPs, one-shot
magnitude pruning of 50% of the encoder's linear weights), every analysis of ``slimformer analyze``:

- loyalty to the dense model (Xu et al. 2021) on SST-2 dev and on AdvGLUE SST-2: label and probability loyalty;
- robustness: AdvGLUE SST-2 accuracy beside the clean one, PGD on the word embeddings (5 steps, 512 dev sentences)
  at bounds of 5 / 10 / 20 / 50% of the mean word-embedding norm;
- bias: EEC gender and race gaps in P(positive) with 95% CIs and paired t-tests.

The dense model is the converged teacher of bench/teachers.py when ``runs/bench/teacher-sst2`` exists; otherwise a
quick one is fine-tuned (1 epoch on 8,000 SST-2 sentences) and the table says so: it is NOT a converged teacher,
so the numbers show what the analyses report and how long they take, not settled findings. Wall time of each
analysis is measured (2 threads). Writes ``bench/results/costs.{json,md}``.

    python bench/costs.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import slimformer
from common import RUNS, machine, markdown_table, write_results
from slimformer.analyze import bias, loyalty, robustness
from slimformer.configs import FlopsBudget, Magnitude
from slimformer.models import load_model
from slimformer.train import TrainConfig

OUT = RUNS / "costs"


def dense_model() -> tuple[Path, bool]:
    converged = RUNS / "teacher-sst2"
    if (converged / "metrics.json").is_file():
        return converged, True
    quick = OUT / "sst2-quick"
    if not (quick / "metrics.json").is_file():
        config = TrainConfig(epochs=1, max_length=64, max_train_samples=8000, group_by_length=True, save_steps=500)
        slimformer.finetune("minilm-l6", "sst2", quick, config=config, overwrite=True)
    return quick, False


def variant(dense: Path, name: str, config) -> Path:
    folder = OUT / name
    if not (folder / "metrics.json").is_file():
        slimformer.prune(load_model(dense), config, "sst2", out=folder, max_length=64, measure=False, overwrite=True)
    return folder


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - started, 1)


def main() -> None:
    torch.set_num_threads(2)
    dense, converged = dense_model()
    models = {
        "dense": dense,
        "budget 50% FLOPs": variant(dense, "budget-50", FlopsBudget(0.5)),
        "magnitude 50% of weights": variant(dense, "magnitude-50", Magnitude(sparsity=0.5)),
    }
    rows = []
    for name, folder in models.items():
        robust, robust_s = timed(robustness, folder, "sst2", max_length=64)
        gaps, bias_s = timed(bias, folder)
        row = {
            "model": name,
            "folder": str(folder),
            "clean": robust.clean["dev"],
            "advglue": robust.advglue["dev"],
            "pgd": robust.pgd,
            "gender_gap": gaps.gaps["gender"]["all"],
            "race_gap": gaps.gaps["race"]["all"],
            "seconds": {"robustness": robust_s, "bias": bias_s},
        }
        if name != "dense":
            loyal, loyal_s = timed(loyalty, dense, folder, "sst2", max_length=64)
            row["loyalty"] = {k: v["loyalty"] for k, v in loyal.sets.items()}
            row["seconds"]["loyalty"] = loyal_s
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows, converged)


def _gap(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean'] * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] p={entry['p_value']:.2g}"


def write(rows: list[dict], converged: bool) -> None:
    headers = [
        "model", "SST-2 dev", "AdvGLUE SST-2", "PGD success 5/10/20/50%", "label loyalty dev / AdvGLUE",
        "prob. loyalty dev / AdvGLUE", "gender gap (F-M)", "race gap (AA-EU)", "seconds (robust / bias / loyal)",
    ]  # fmt: skip
    table = []
    for row in rows:
        pgd = " / ".join(f"{p['success_rate'] * 100:.0f}%" for p in row["pgd"])
        loyal = row.get("loyalty") or {}
        labels = " / ".join(f"{v['label_loyalty']:.3f}" for v in loyal.values()) if loyal else ""
        probs = " / ".join(f"{v['probability_loyalty']:.3f}" for v in loyal.values()) if loyal else ""
        seconds = " / ".join(str(row["seconds"].get(k, "")) for k in ("robustness", "bias", "loyalty"))
        table.append([row["model"], f"{row['clean'] * 100:.2f}", f"{row['advglue'] * 100:.2f}", pgd, labels, probs,
                      _gap(row["gender_gap"]), _gap(row["race_gap"]), seconds])  # fmt: skip
    dense = rows[0]["folder"]
    teacher = (
        f"Dense model: the converged SST-2 teacher of bench/teachers.py (`{dense}`)."
        if converged
        else f"Dense model: `{dense}`, MiniLM-L6 fine-tuned for 1 epoch on 8,000 SST-2 sentences: **not** a "
        "converged teacher (the converged one takes about an hour on 2 cores and was not built here), so read the "
        "rows as what the analyses measure and how long they take."
    )
    text = (
        "# What compression costs beyond the dev score (SST-2, MiniLM-L6)\n\n" + teacher + "\n\n"
        "Compressed models: retraining-free budget pruning to 50% of the encoder FLOPs (Kwon et al. 2022 + refit), "
        "and one-shot magnitude pruning of 50% of the encoder's linear weights, no retraining. PGD: 5 steps on the "
        "word embeddings of 512 dev sentences, bound = the share of the mean word-embedding norm; success = correct "
        "predictions flipped. Gaps: points of P(positive), per template x emotion word pair, 95% CI, paired t-test "
        "(EEC, 8,640 sentences). 2 threads.\n\n" + markdown_table(headers, table)
    )
    write_results("costs", {"machine": machine(), "converged_teacher": converged, "rows": rows}, text)
    print(text)


if __name__ == "__main__":
    main()
