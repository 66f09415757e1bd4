"""``slimformer compress`` end to end on a converged teacher (issue 12): to a target speedup measured on the runtime,
with and without KD recovery, on ONNX Runtime and OpenVINO. Every stage of every run (dense fp32, dense int8, pruned
fp32, recovered fp32, pruned int8) is scored on the full dev set through its runtime and timed interleaved within
its run (batch 32 x 128 and 1 x 32, 2 threads). Writes ``bench/results/compress.{json,md}`` and one Pareto plot per
run; the artifacts go to ``runs/bench/compress/``, and a run whose folder is finished there is not run again
(``--redo`` forces it).

    python bench/compress.py [--task stsb] [--targets 2.5,3] [--runtimes onnxruntime,openvino] [--kd-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import slimformer
from common import RESULTS, RUNS, machine, teacher_folder, teacher_summary, write_results
from slimformer.deploy.compress import render_markdown
from slimformer.report import METRICS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="stsb")
    parser.add_argument("--targets", default="3")
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--kd-epochs", type=float, default=2.0, help="0: no KD run")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--teachers-dir", default=None)
    parser.add_argument("--runs-dir", type=Path, default=RUNS / "compress")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--redo", action="store_true", help="run again even where a finished run is on disk")
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher = teacher_folder(args.task, args.teachers_dir)
    summary = teacher_summary(args.task, teacher)
    data = slimformer.load_task(args.task)
    runs = []
    for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
        for target in [float(t) for t in args.targets.split(",") if t.strip()]:
            for recover in [None, "kd"] if args.kd_epochs > 0 else [None]:
                name = f"{args.task}-{runtime}-{target:g}x" + (f"-{recover}" if recover else "")
                folder = args.runs_dir / name
                if args.redo or not (folder / METRICS_FILE).is_file():  # a finished run is kept: the bench resumes
                    settings = slimformer.Compress(
                        target_speedup=target, runtime=runtime, recover=recover, epochs=args.kd_epochs or 1.0
                    )
                    slimformer.compress(
                        teacher, settings, data, out=folder, overwrite=True, max_length=args.max_length, progress=False
                    )
                runs.append(collect(name, folder, args.results_dir))
                write(args, summary, runs)  # after every run, so an interrupted bench still leaves its table


def collect(name: str, folder: Path, results_dir: Path) -> dict:
    """One finished run: its report, its section of the table and its Pareto plot copied beside the results."""
    report = json.loads((folder / METRICS_FILE).read_text())
    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "pareto.png", results_dir / f"compress_{name}.png")
    # without its title: the run's name heads its section here
    markdown = "\n".join(render_markdown(report).splitlines()[2:]).replace("pareto.png", f"compress_{name}.png")
    return {"name": name, "report": report, "markdown": markdown, "minutes": round(report["seconds"]["total"] / 60, 1)}


def write(args, summary: dict, runs: list[dict]) -> None:
    markdown = (
        f"# slimformer compress on {args.task} (MiniLM-L6, teacher {summary['score'] * 100:.2f})\n\n"
        f"CPU: {', '.join(machine()['cpu_features']) or 'unknown'}; 2 threads. Each run is one "
        "`slimformer compress` (retraining-free budget pruning to the target speedup, measured on the runtime; "
        f"KD runs: {args.kd_epochs:g} epochs of logit distillation from the teacher); speedups are against dense "
        "PyTorch fp32 within that run.\n"
        + "".join(f"\n## {run['name']} ({run['minutes']} min)\n\n" + run["markdown"] for run in runs)
    )
    paths = {"runs_dir": str(args.runs_dir), "results_dir": str(args.results_dir)}
    record = {"machine": machine(), "teacher": summary, "args": {**vars(args), **paths}, "runs": runs}
    write_results("compress", record, markdown, args.results_dir)


if __name__ == "__main__":
    main()
