"""Does pruning stack with int8 on a real runtime? (issue 12) Dense and budget-pruned MiniLM-L6 on PyTorch fp32, ONNX
Runtime fp32, ONNX Runtime int8 (dynamic; static QDQ calibrated on 256 training examples) and OpenVINO int8 (NNCF,
static, the same 256 examples), against the converged teachers of bench/teachers.py.

Every variant is scored on the full dev set *through its runtime* (``slimformer.quantize`` evaluates the int8 model
with its runtime) and timed in one interleaved run (``slimformer.report.interleaved_latency``: 3 rounds x 5 timed
runs per model, medians, 2 threads) at batch 32 x 128 and 1 x 32 tokens. Speedups are against dense PyTorch fp32 and
against dense int8 on the same runtime (the strongest baseline a user has without slimformer). Writes
``bench/results/deploy.{json,md}``, keeping the sections of tasks this run did not measure (each with the machine it
was measured on: int8 kernels differ between AVX2-only and AVX-512 VNNI CPUs); int8 folders go to
``runs/bench/deploy/``.

    python bench/deploy.py [--tasks sst2] [--budgets 0.5,0.4] [--int8 onnxruntime:dynamic,openvino:static]

A smoke run (``--max-eval-samples``, another ``--teachers-dir``) must write elsewhere (``--results-dir``,
``--runs-dir``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import slimformer
from common import RESULTS, RUNS, machine, markdown_table, teacher_folder, teacher_summary, write_results
from slimformer.deploy.runtime import OnnxClassifier
from slimformer.export import export_onnx
from slimformer.report import interleaved_latency

SHAPES = ((32, 128), (1, 32))


def variants(task: str, teacher_dir: Path, args) -> list[dict]:
    """Every model of the table, with its score; the models themselves under ``model``."""
    runs = args.runs_dir / task
    data = slimformer.load_task(task, max_eval_samples=args.max_eval_samples)
    sources = {"dense": slimformer.load_model(teacher_dir)}
    for budget in args.budgets:
        name = f"budget {budget:.0%} FLOPs"
        pruned = slimformer.prune(
            teacher_dir,
            slimformer.FlopsBudget(budget, calibration_examples=args.calibration),
            data,
            max_length=args.max_length,
            evaluate=False,
            progress=False,
        )
        sources[name] = slimformer.LoadedModel(pruned.model, pruned.tokenizer, sources["dense"].spec, name)
    rows = []
    for name, loaded in sources.items():
        fp32_score = slimformer.evaluate(loaded, data, max_length=args.max_length)["score"]
        rows.append({"model": name, "runtime": "pytorch fp32", "score": fp32_score, "net": loaded.model})
        onnx = export_onnx(loaded.model, runs / f"{name.replace(' ', '_')}-fp32.onnx")
        rows.append(
            {
                "model": name,
                "runtime": "onnxruntime fp32",
                "score": fp32_score,  # checked equal to PyTorch within 1e-5 by export_onnx
                "net": OnnxClassifier(onnx.path, loaded.model.config, threads=2),
                "disk_bytes": onnx.size_bytes,
            }
        )
        for runtime, mode in args.int8:
            result = slimformer.quantize(
                loaded,
                slimformer.Quantize(runtime=runtime, mode=mode, calibration_examples=args.calibration_int8),
                data,
                out=runs / f"{name.replace(' ', '_')}-{runtime}-int8-{mode}",
                overwrite=True,
                max_length=args.max_length,
                measure=False,
                progress=False,
            )
            rows.append(
                {
                    "model": name,
                    "runtime": f"{runtime} int8 {mode}",
                    "score": result.score,
                    "net": result.model,
                    "disk_bytes": result.report["models"]["after"]["disk_bytes"],
                    "quantization": result.report["details"]["quantization"],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--budgets", default="0.5,0.4")
    parser.add_argument("--int8", default="onnxruntime:dynamic,onnxruntime:static,openvino:static")
    parser.add_argument("--calibration", type=int, default=2048, help="budget pruner calibration examples")
    parser.add_argument("--calibration-int8", type=int, default=256, help="static int8 calibration examples")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teachers-dir", default=None)
    parser.add_argument("--runs-dir", type=Path, default=RUNS / "deploy")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    args.int8 = [tuple(item.strip().split(":")) for item in args.int8.split(",") if item.strip()]
    smoke = args.max_eval_samples or args.teachers_dir
    defaults = args.results_dir.resolve() == RESULTS.resolve() or args.runs_dir.resolve() == (RUNS / "deploy").resolve()
    if smoke and defaults:
        parser.error("smoke settings need --results-dir and --runs-dir outside bench/results and runs/bench/deploy")
    torch.set_num_threads(2)
    started = time.perf_counter()
    sections, records, teachers = {}, [], {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        folder = teacher_folder(task, args.teachers_dir)
        teachers[task] = teacher_summary(task, folder)
        rows = variants(task, folder, args)
        for batch, seq in SHAPES:
            latency = interleaved_latency(
                {f"{r['model']} | {r['runtime']}": r["net"] for r in rows},
                batch_size=batch,
                seq_len=seq,
                threads=2,
                rounds=args.rounds,
                repeats=args.repeats,
            )
            for row in rows:
                row[f"ms_{batch}x{seq}"] = latency[f"{row['model']} | {row['runtime']}"]["median_ms"]
        dense = {r["runtime"]: r for r in rows if r["model"] == "dense"}
        base = dense["pytorch fp32"]
        table = []
        for row in rows:
            same_runtime = dense.get(row["runtime"], base)
            table.append(
                [
                    row["model"],
                    row["runtime"],
                    f"{row['score'] * 100:.2f}",
                    f"{(row['score'] - base['score']) * 100:+.2f}",
                    *[f"{row[f'ms_{b}x{s}']:.1f}" for b, s in SHAPES],
                    *[f"{base[f'ms_{b}x{s}'] / row[f'ms_{b}x{s}']:.2f}x" for b, s in SHAPES],
                    *[f"{same_runtime[f'ms_{b}x{s}'] / row[f'ms_{b}x{s}']:.2f}x" for b, s in SHAPES],
                    f"{row['disk_bytes'] / 1e6:.1f}" if row.get("disk_bytes") else "-",
                ]
            )
            records.append({"task": task, **{k: v for k, v in row.items() if k != "net"}})
        headers = ["model", "runtime", "score", "vs dense fp32", "ms 32x128", "ms 1x32"]
        headers += ["x PyTorch fp32, 32x128", "x PyTorch fp32, 1x32", "x dense same runtime, 32x128"]
        headers += ["x dense same runtime, 1x32", "size MB"]
        sections[task] = {
            "markdown": f"\n## {task}: teacher {teachers[task]['score'] * 100:.2f}\n\n"
            + f"CPU: {', '.join(machine()['cpu_features']) or 'unknown'}; "
            + f"{time.perf_counter() - started:.0f} s so far.\n\n"
            + markdown_table(headers, table)
            + "\n",
            "machine": machine(),
        }
    args_record = {**vars(args), "runs_dir": str(args.runs_dir), "results_dir": str(args.results_dir)}
    data = {"args": args_record, "teachers": teachers, "rows": records, "sections": sections}
    data = merge_previous(args.results_dir / "deploy.json", data)
    markdown = (
        "# Pruning stacked with int8 (MiniLM-L6, ONNX Runtime and OpenVINO)\n\n"
        "Scores through each runtime on the full dev set"
        + (f" (a smoke subset of {args.max_eval_samples})" if args.max_eval_samples else "")
        + f"; latency medians of one interleaved run per task ({args.rounds} rounds x {args.repeats} runs), "
        "2 threads. Budget students: retraining-free, "
        f"{args.calibration} calibration examples; static int8: {args.calibration_int8} training examples. "
        "Each task's section names the CPU's int8-relevant features: without AVX-512 VNNI, int8 matrix products "
        "run on AVX2's slower u8 x s8 instructions.\n"
        + "".join(section["markdown"] for section in data["sections"].values())
    )
    write_results("deploy", data, markdown, args.results_dir)
    print(markdown)


def merge_previous(path: Path, data: dict) -> dict:
    """Keep the sections, rows and teachers of tasks this run did not measure (``--tasks stsb`` adds to
    ``deploy.json`` instead of replacing it); a section written before sections existed is dropped."""
    if not path.is_file():
        return data
    previous = json.loads(path.read_text())
    kept = {t: s for t, s in previous.get("sections", {}).items() if t not in data["sections"]}
    if not kept:
        return data
    return {
        **data,
        "teachers": {**{t: previous["teachers"][t] for t in kept}, **data["teachers"]},
        "rows": [r for r in previous.get("rows", []) if r["task"] in kept] + data["rows"],
        "sections": {**kept, **data["sections"]},
    }


if __name__ == "__main__":
    main()
