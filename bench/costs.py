"""Benchmark: what compression costs beyond the dev score (issue 17's analyses) on MiniLM-L6 for SST-2.

For the dense SST-2 model and its compressed versions (retraining-free budget pruning to 50% and 30% of the FLOPs,
one-shot magnitude pruning of 50% of the encoder's linear weights), every analysis of ``slimformer analyze``:

- loyalty to the dense model (Xu et al. 2021) on SST-2 dev and on AdvGLUE SST-2: label and probability loyalty;
- robustness: AdvGLUE SST-2 accuracy beside the clean one, PGD on the word embeddings (5 steps, 256 dev sentences)
  at bounds of 1 / 2 / 5 / 10% of the mean word-embedding norm (int8 models: no PGD, the runtime has no gradients);
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
        "budget 30% FLOPs": variant(dense, "budget-30", FlopsBudget(0.3)),
        "magnitude 50% of weights": variant(dense, "magnitude-50", Magnitude(sparsity=0.5)),
    }
    kd = RUNS / "fairness" / "budget-50-KD-seed0"  # bench/fairness.py's KD student (seed 0), when built
    if (kd / "metrics.json").is_file():
        models["budget 50% FLOPs + KD"] = kd
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
    rows += int8_rows(dense, {"dense": dense, "budget 50% FLOPs": models["budget 50% FLOPs"]})
    write(rows, converged)


def int8_rows(dense: Path, sources: dict[str, Path]) -> list[dict]:
    """Dynamic int8 on ONNX Runtime of each source: dev and AdvGLUE accuracy, loyalty to the dense fp32 model and
    the EEC gaps through the runtime (no PGD: the runtime has no gradients)."""
    from slimformer.analyze.costs import compression_costs
    from slimformer.deploy.quantize import Quantize, quantize
    from slimformer.evaluation import evaluate_model
    from slimformer.tasks import load_task

    data = load_task("sst2")
    reference = load_model(dense, "sst2")
    rows = []
    for name, folder in sources.items():
        started = time.perf_counter()
        quantized = quantize(load_model(folder, "sst2"), Quantize(runtime="onnxruntime"), data, evaluate=False,
                             measure=False, max_length=64, progress=False)  # fmt: skip
        nets = {"dense": reference.model, "int8": quantized.model}
        costs = compression_costs(nets, "dense", reference.tokenizer, data, max_length=64)["int8"]
        dev = evaluate_model(quantized.model, reference.tokenizer, data, max_length=64, progress=False)
        row = {
            "model": f"{name} int8 (ONNX Runtime)",
            "folder": str(folder),
            "clean": dev["dev"]["accuracy"],
            "advglue": costs["advglue"],
            "pgd": [],
            "gender_gap": {"mean": costs["eec_gender_gap"]},
            "race_gap": {"mean": costs["eec_race_gap"]},
            "loyalty": {
                k: {"label_loyalty": v["label_loyalty"], "probability_loyalty": v["probability_loyalty"]}
                for k, v in costs["loyalty"].items()
            },
            "seconds": {"int8 costs": round(time.perf_counter() - started, 1)},
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _gap(entry: dict) -> str:
    if "ci95" not in entry:
        return f"{entry['mean'] * 100:+.2f}"
    low, high = entry["ci95"]
    return f"{entry['mean'] * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] p={entry['p_value']:.2g}"


def write(rows: list[dict], converged: bool) -> None:
    bounds = next((row["pgd"] for row in rows if row["pgd"]), [])
    headers = [
        "model", "SST-2 dev", "AdvGLUE SST-2",
        "PGD success " + "/".join(f"{p['epsilon'] * 100:g}" for p in bounds) + "%", "label loyalty dev / AdvGLUE",
        "prob. loyalty dev / AdvGLUE", "gender gap (F-M)", "race gap (AA-EU)", "seconds (robust / bias / loyal)",
    ]  # fmt: skip
    table = []
    for row in rows:
        pgd = " / ".join(f"{p['success_rate'] * 100:.0f}%" for p in row["pgd"])
        loyal = row.get("loyalty") or {}
        labels = " / ".join(f"{v['label_loyalty']:.3f}" for v in loyal.values()) if loyal else ""
        probs = " / ".join(f"{v['probability_loyalty']:.3f}" for v in loyal.values()) if loyal else ""
        seconds = " / ".join(str(row["seconds"].get(k, "")) for k in ("robustness", "bias", "loyalty"))
        if "int8 costs" in row["seconds"]:
            seconds = f"{row['seconds']['int8 costs']} (quantize + all)"
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
        "Compressed models: retraining-free budget pruning to 50% and 30% of the encoder FLOPs (Kwon et al. 2022 + "
        "refit), "
        "and one-shot magnitude pruning of 50% of the encoder's linear weights, no retraining. PGD: 5 steps on the "
        "word embeddings of 256 dev sentences, bound = the share of the mean word-embedding norm; success = correct "
        "predictions flipped. Gaps: points of P(positive), per template x emotion word pair, 95% CI, paired t-test "
        "(EEC, 8,640 sentences). 2 threads.\n\n" + markdown_table(headers, table)
    )
    write_results("costs", {"machine": machine(), "converged_teacher": converged, "rows": rows}, text)
    print(text)


if __name__ == "__main__":
    main()
