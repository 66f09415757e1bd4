"""Benchmark: learned structured pruning (hard-concrete gates + Lagrangian, CoFi) of a converged MiniLM-L6 teacher
(bench/teachers.py; STS-B or SST-2), against the retraining-free budget pruner at similar FLOPs, with and without KD.

Every variant is made through the front door, ``slimformer.prune(teacher, config, "stsb")``:

- ``Learned(target_sparsity=S)``: gates on heads, FFN neurons, whole attention / FFN blocks and hidden dimensions,
  ``epochs`` of gate training (the target raised over the first half) then ``final_epochs`` under the fixed
  structure, logit distillation from the dense teacher (alpha 0.9, temperature 2), batch 32, weights at 3e-5;
- the same without hidden-dimension gates (``units="heads,ffn,blocks"``);
- ``FlopsBudget(F)``: the retraining-free pruner (Kwon et al. 2022 + least-squares refit) at a FLOPs fraction
  close to the learned models'.

On SST-2 the targets are measured speedups instead (``Learned(target_speedup=S)``: the gates' expected latency
from the per-layer latency table driven to 1 / S of the dense model's), 4x / 8x / 12x, 8x also with layer
distillation, against budget pruning + the same KD budget.

Columns: dev score (the teacher's metric), encoder weight sparsity, encoder
FLOPs kept, the resulting shape (heads, FFN neurons, hidden size; per layer in the JSON), the score of dynamic int8
on ONNX Runtime, and latency at 32 x 128 and 1 x 32 tokens (2 threads; every model of a runtime in one
interleaved run, medians), as speedups over dense PyTorch fp32 and over dense int8. Writes
``bench/results/learned.{json,md,png}`` (STS-B) or ``learned_<task>.{json,md,png}``.

    python bench/learned.py [--task stsb|sst2] [--variants all|name,name] [--epochs 3] [--final-epochs 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import slimformer
from common import (
    DISPLAY,
    RESULTS,
    RUNS,
    TRAINING,
    add_latency,
    budget_then_kd,
    describe_teacher,
    dev_scorer,
    int8,
    machine,
    markdown_table,
    teacher_folder,
    teacher_summary,
    write_results,
)
from slimformer.configs import FlopsBudget, Learned
from slimformer.io import write_json_atomic
from slimformer.measure import flops
from slimformer.models import load_model
from slimformer.tasks import load_task

OUT = RUNS / "learned"


def variants(epochs: float, final_epochs: float, task: str = "stsb") -> dict[str, object]:
    data = {k: v for k, v in TRAINING[task].items() if k != "what"}
    if task != "stsb":
        train = {"epochs": epochs, "final_epochs": final_epochs, **data}
        return {
            # the issue's targets are measured speedups: the gates' expected latency is driven to 1 / S
            "learned 4x": Learned(target_speedup=4.0, **train),
            "learned 8x": Learned(target_speedup=8.0, **train),
            "learned 8x + layer KD": Learned(target_speedup=8.0, layer_distill_weight=1.0, **train),
            "learned 12x": Learned(target_speedup=12.0, **train),
            # against the early overshoot (expected latency cut 0.49 where the target was 0.24). "4x", "8x",
            # "12x", "90% + hidden" and "(ramp from 0)" were built before commit f3732e8, when the target ramp
            # started at 0 rather than at the gates' own starting point (rebuilt today they would ramp from there)
            "learned 8x + layer KD (ramp from 0)": Learned(target_speedup=8.0, layer_distill_weight=1.0, **train),
            "learned 8x + layer KD (multipliers 0.1)": Learned(
                target_speedup=8.0, layer_distill_weight=1.0, multiplier_learning_rate=0.1, **train
            ),
            "learned 8x + layer KD (Fisher-ranked gates)": Learned(
                target_speedup=8.0, layer_distill_weight=1.0, gate_init_spread=4.0, **train
            ),
            # budget pruning, then logit KD with the learned variants' whole training budget
            "budget 30% FLOPs + KD": FlopsBudget(0.3),
            "budget 15% FLOPs + KD": FlopsBudget(0.15),
            # the gates start on the retraining-free 30% model (2.86x) and aim for 8x overall; the KD teacher is
            # the model they start from (learned pruning distils from its input)
            "budget 30% then learned 2.8x + layer KD": Learned(target_speedup=2.8, layer_distill_weight=1.0, **train),
            # the size target with hidden-dimension gates (a latency target cannot gate the width)
            "learned 90% + hidden": Learned(target_sparsity=0.9, units="heads,ffn,blocks,hidden", **train),
        }
    train = {"epochs": epochs, "final_epochs": final_epochs}
    return {
        # "learned": all four kinds of unit gated, hidden dimensions included
        "learned 75%": Learned(target_sparsity=0.75, units="heads,ffn,blocks,hidden", **train),
        "learned 90%": Learned(target_sparsity=0.9, units="heads,ffn,blocks,hidden", **train),
        "learned 90% no hidden": Learned(target_sparsity=0.9, units="heads,ffn,blocks", **train),
        # CoFi's layer distillation on top (each layer's hidden states matched to the teacher's same layer)
        "learned 90% no hidden + layer KD": Learned(
            target_sparsity=0.9, units="heads,ffn,blocks", layer_distill_weight=1.0, **train
        ),
        "budget 30% FLOPs": FlopsBudget(0.3),
        "budget 15% FLOPs": FlopsBudget(0.15),
    }


# variants that start from another variant's model instead of the teacher: label -> that model's folder name
STARTS = {"budget 30% then learned 2.8x + layer KD": "budget-30-FLOPs-plus-KD-pruned"}


def slug(label: str) -> str:
    return label.replace(" ", "-").replace("%", "").replace("+", "plus")


def build(label: str, config, teacher: Path, data, kd_epochs: float, task: str) -> tuple[Path, dict]:
    folder = OUT / slug(label)
    if not (folder / "metrics.json").is_file():
        started = time.perf_counter()
        if label.endswith("+ KD") and isinstance(config, FlopsBudget):
            budget_then_kd(teacher, config, data, folder, epochs=kd_epochs, task=task)
        else:
            start = OUT / STARTS[label] if label in STARTS else teacher
            slimformer.prune(load_model(start), config, data, out=folder, measure=False, overwrite=True)
        print(f"{label}: built in {time.perf_counter() - started:.0f} s", flush=True)
    return folder, json.loads((folder / "metrics.json").read_text())


def shape(model) -> dict:
    from slimformer.arch import layer_views
    from slimformer.layout import model_width

    views = layer_views(model)
    return {
        "heads": [v.num_heads for v in views],
        "ffn": [v.ffn_size for v in views],
        "hidden": model_width(model),
    }


def encoder_weights(model) -> int:
    """The encoder's linear weights (q, k, v, output, FFN up and down): what the weight sparsity counts."""
    from slimformer.arch import layer_views

    parts = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")
    return sum(getattr(v, name).weight.numel() for v in layer_views(model) for name in parts)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="stsb", choices=sorted(TRAINING))
    parser.add_argument("--variants", default="all")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--final-epochs", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="smoke runs: write elsewhere")
    parser.add_argument("--runs-dir", type=Path, default=None, help="smoke runs: cache variants elsewhere")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="smoke runs only")
    parser.add_argument("--render", action="store_true", help="rewrite the tables from the results JSON only")
    args = parser.parse_args()
    task = args.task
    OUT = args.runs_dir or (RUNS / "learned" if task == "stsb" else RUNS / f"learned-{task}")
    if args.render:
        saved = json.loads((args.results_dir / f"{results_name(task)}.json").read_text())
        write([with_prediction(row) for row in saved["rows"]], saved["teacher"], args)
        return
    from slimformer.deploy.runtime import load_artifact_folder

    teacher_path = teacher_folder(task)
    teacher = teacher_summary(task, teacher_path)
    data = load_task(task, max_eval_samples=args.max_eval_samples)
    chosen = variants(args.epochs, args.final_epochs, task)
    if args.variants != "all":
        wanted = args.variants.split(",")
        chosen = {k: v for k, v in chosen.items() if slug(k) in wanted or k in wanted}
    dense = load_model(teacher_path)
    base_flops = flops(dense.model, seq_len=128).encoder
    scored = dev_scorer(dense.tokenizer, data, teacher["primary_metric"])

    def score(model) -> float:
        return scored(model)[0]

    dense_runtime = load_artifact_folder(int8(OUT / "dense", data, source=teacher_path), threads=args.threads).model
    rows = [
        {
            "variant": "dense (teacher)",
            "score": teacher["score"],
            "score_int8": score(dense_runtime),
            "sparsity": 0.0,
            "flops_kept": 1.0,
            "shape": shape(dense.model),
        }
    ]
    torch_models, runtime_models = {"dense": dense.model}, {"dense": dense_runtime}
    for label, config in chosen.items():
        folder, report = build(label, config, teacher_path, data, args.epochs + args.final_epochs, task)
        model = load_model(folder).model
        runtime = load_artifact_folder(int8(folder, data), threads=args.threads).model
        cached = folder / "bench_row.json"
        if cached.is_file():
            row = json.loads(cached.read_text())
        else:
            learned = report["details"].get("learned", {})
            row = {
                "variant": label,
                "config": config.to_dict(),
                "score": score(model),
                "score_int8": score(runtime),
                "sparsity": 1 - encoder_weights(model) / encoder_weights(dense.model),
                "expected_sparsity_at_fix": learned.get("expected_sparsity_at_fix"),
                "log_alpha_shift": learned.get("log_alpha_shift"),
                "flops_kept": flops(model, seq_len=128).encoder / base_flops,
                "shape": shape(model),
                "seconds": report["seconds"]["total"],
                "train_seconds": report["seconds"].get("train"),
            }
            if label in STARTS:  # the latency table's prediction is relative to the start model, not the dense one
                row["predicted_speedup"] = None
            write_json_atomic(cached, row)
        print(json.dumps(row), flush=True)
        rows.append(with_prediction(row))
        torch_models[label], runtime_models[label] = model, runtime
    if not args.no_latency:
        add_latency(
            rows, {"pytorch": torch_models, "int8": runtime_models}, threads=args.threads, rounds=args.rounds,
            repeats=args.repeats,
        )  # fmt: skip
        for row in rows:  # the strongest baseline a user has: the dense model in int8 on the same runtime
            for key in ("32x128", "1x32"):
                if row.get(f"ms_int8_{key}") and rows[0].get(f"ms_int8_{key}"):
                    row[f"vs_dense_int8_int8_{key}"] = rows[0][f"ms_int8_{key}"] / row[f"ms_int8_{key}"]
    write(rows, teacher, args)


def with_prediction(row: dict) -> dict:
    """The row with the speedup the latency table predicted for its structure (latency-target variants)."""
    metrics = OUT / slug(row["variant"]) / "metrics.json"
    if "predicted_speedup" not in row and metrics.is_file():
        learned = (json.loads(metrics.read_text()).get("details") or {}).get("learned") or {}
        row["predicted_speedup"] = learned.get("predicted_speedup")
    return row


def results_name(task: str) -> str:
    return "learned" if task == "stsb" else f"learned_{task}"


def _x(row, key) -> str:
    value = row.get(key)
    return f"{value:.2f}x" if value else "-"


def write(rows: list[dict], teacher: dict, args) -> None:
    name = DISPLAY[args.task]
    headers = [
        "variant", name, f"int8 {name}", "weight sparsity", "FLOPs kept", "heads", "FFN", "hidden",
        "predicted 32x128", "fp32 32x128", "fp32 1x32", "int8 32x128", "int8 1x32", "int8 32x128 vs dense int8",
    ]  # fmt: skip
    table = []
    for row in rows:
        s = row["shape"]
        table.append(
            [
                row["variant"],
                f"{100 * row['score']:.2f}",
                f"{100 * row['score_int8']:.2f}",
                f"{100 * row['sparsity']:.1f}%" if row.get("sparsity") is not None else "-",
                f"{100 * row['flops_kept']:.1f}%",
                sum(s["heads"]),
                sum(s["ffn"]),
                s["hidden"],
                _x(row, "predicted_speedup"),
                _x(row, "speedup_pytorch_32x128"),
                _x(row, "speedup_pytorch_1x32"),
                _x(row, "speedup_int8_32x128"),
                _x(row, "speedup_int8_1x32"),
                _x(row, "vs_dense_int8_int8_32x128"),
            ]
        )
    markdown = "\n".join(
        [
            "# Learned structured pruning (hard-concrete gates, CoFi) vs the budget pruner",
            "",
            describe_teacher(teacher),
            "",
            f"Learned variants: {args.epochs:g} epochs of gate training + {args.final_epochs:g} under the fixed "
            f"structure on {TRAINING[args.task]['what']}, batch 32, weights at 3e-5, gates at 0.1, "
            "multipliers at 0.5, logit KD from the teacher (alpha 0.9, T 2); one seed. 'Nx': the target is a "
            "measured speedup (the gates' expected latency from the per-layer latency table, batch 32 x 128, "
            "driven to 1/N of the dense model's; 'predicted': the table's own prediction for the structure "
            "reached). Budget variants: retraining-free, 2,048 calibration examples; "
            f"'+ KD': then {args.epochs + args.final_epochs:g} epochs of logit KD on the same data (the learned "
            "variants' whole training budget). Speedups: over dense PyTorch fp32, same interleaved run "
            f"({args.threads} threads, medians of {args.repeats} x {args.rounds}). Weight sparsity: share of the "
            "encoder's linear weights removed (CoFi's measure).",
            "",
            markdown_table(headers, table),
            "",
            "Shapes per layer (heads / FFN neurons):",
            "",
            *[
                f"- {row['variant']}: heads {row['shape']['heads']}, FFN {row['shape']['ffn']}, hidden "
                f"{row['shape']['hidden']}"
                for row in rows
            ],
        ]
    )
    name = results_name(args.task)
    write_results(name, {"machine": machine(), "teacher": teacher, "rows": rows}, markdown, args.results_dir)
    plot(rows, teacher, args.results_dir / f"{name}.png", args.task)


def plot(rows: list[dict], teacher: dict, path: Path, task: str = "stsb") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, marker in (("learned", "o"), ("budget", "s"), ("dense", "*")):
        points = [r for r in rows if r["variant"].startswith(kind) and r.get("speedup_pytorch_32x128")]
        if points:
            ax.scatter(
                [r["speedup_pytorch_32x128"] for r in points], [100 * r["score"] for r in points], marker=marker,
                label=kind, s=60,
            )  # fmt: skip
            for r in points:
                label = r["variant"].replace(kind, "").strip() or kind
                point = (r["speedup_pytorch_32x128"], 100 * r["score"])
                ax.annotate(label, point, fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(100 * teacher["score"], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("measured speedup, PyTorch fp32, batch 32 x 128")
    ax.set_ylabel(f"{DISPLAY[task]} dev ({teacher['primary_metric']})")
    ax.set_title(f"MiniLM-L6 on {DISPLAY[task]}: learned gates vs budget pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
