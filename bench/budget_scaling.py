"""Cost of retraining-free budget pruning against model size and depth (issue 18): peak resident memory and wall
time of ``FlopsBudget(0.5)`` (Fisher, search, least-squares refit, removal) on real and randomly initialised
models, for slimformer's streamed layer-by-layer refit and, with ``--before SRC``, for another checkout's ``src/``
(the refit that kept every dense sub-layer output and re-ran the model up to each sub-layer).

Each run is a fresh process (its peak resident memory is its own). Models:

- ``minilm-l6``: the converged STS-B teacher of bench/teachers.py (scored on STS-B dev before and after);
- ``mpnet``: all-mpnet-base-v2 (``../shared/models/all-mpnet-base-v2.sh``) with a new classification head;
  ``mpnet-sst2``: the same on SST-2 sentences with the label-free Fisher (the issue's first measurement);
- ``minilm-l6-embed`` / ``mpnet-embed``: the sentence-embedding models as bench/embeddings.py prunes them (label-free,
  its calibration texts: STS-B train sentences, SQuAD questions and paragraphs of the held-out articles, read up to
  256 tokens; by default each layer's units chosen by the refit);
- ``bert-base`` / ``bert-large`` / ``bert-base-L<n>``: BERT shapes from a config, random weights (the score means
  nothing, the cost is real), the MiniLM word-piece tokenizer.

Calibration data: the task's training examples (MRPC sentence pairs unless the model has its own task), max length
128, length-grouped batches of 32 as the pruner takes them. Writes ``bench/results/budget_scaling.{json,md,png}``.

    python bench/budget_scaling.py --models minilm-l6,mpnet,bert-base,bert-large --examples 2048 \
        [--depths 2,4,8,12] [--before /tmp/slimformer-before/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, RUNS, glue_dir, machine, markdown_table, teacher_folder, write_results

SHAPES = {  # hidden, layers, heads, FFN
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
}
RESULT_MARK = "BUDGET_SCALING_RESULT "
EMBEDDING_MODELS = {"minilm-l6-embed": "minilm-l6", "mpnet-embed": "mpnet"}
EMBEDDING_TASK = "embedding-bench"  # bench/embeddings.py's calibration texts


def load_data(task: str, glue: str, examples: int):
    """(task data, max length): a GLUE task at 128 tokens, or the embeddings bench's calibration texts at its
    passage length."""
    import slimformer

    if task != EMBEDDING_TASK:
        return slimformer.load_task(task, data_dir=glue), 128
    from embeddings import PASSAGE_TOKENS, calibration_texts, split_articles, text_task

    sts = slimformer.load_task("stsb-embed", data_dir=glue)
    _, texts = split_articles(slimformer.load_task("squad-retrieval"))
    return text_task(sts, calibration_texts(sts, texts, examples), "calibration texts"), PASSAGE_TOKENS


def shape_of(name: str) -> tuple[int, int, int, int] | None:
    """A random BERT shape: ``bert-base``, ``bert-large`` or ``bert-base-L<layers>``."""
    base, _, depth = name.partition("-L")
    if base not in SHAPES:
        return None
    hidden, layers, heads, ffn = SHAPES[base]
    return hidden, int(depth) if depth else layers, heads, ffn


def random_model_folder(name: str) -> Path:
    """A BERT of the given shape with random weights, saved once under runs/bench/scaling/."""
    folder = RUNS / "scaling" / name
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    import slimformer

    hidden, layers, heads, ffn = shape_of(name)
    config = transformers.BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn, num_labels=2
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    tokenizer = slimformer.load_model("minilm-l6").tokenizer
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def mpnet_folder() -> Path:
    script = ROOT.parent / "shared" / "models" / "all-mpnet-base-v2.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def model_and_task(name: str) -> tuple[str, str, bool, bool]:
    """(model folder, task, whether its score means something, whether the Fisher is label-free)."""
    if name == "minilm-l6":
        return str(teacher_folder("stsb")), "stsb", True, False
    if name == "mpnet":
        return str(mpnet_folder()), "mrpc", False, False
    if name == "mpnet-sst2":  # the first measurement: a new SST-2 head, label-free Fisher, short sentences
        return str(mpnet_folder()), "sst2", False, True
    if name in EMBEDDING_MODELS:
        from embeddings import model_source

        return model_source(EMBEDDING_MODELS[name]), EMBEDDING_TASK, False, True
    if shape_of(name) is not None:
        return str(random_model_folder(name)), "mrpc", False, False
    raise SystemExit(f"Unknown model {name!r}: minilm-l6, mpnet, mpnet-sst2, bert-base, bert-large, bert-base-L<n>.")


def worker(spec: dict) -> dict:
    """One pruning run in this process (called with the slimformer under test first on sys.path)."""
    import resource

    import torch

    import slimformer

    torch.set_num_threads(spec["threads"])
    data, max_length = load_data(spec["task"], spec["glue_dir"], spec["examples"])
    options = {"fisher_precision": spec["fisher_precision"]} if spec.get("fisher_precision") else {}
    if spec.get("unit_choice"):
        options["unit_choice"] = spec["unit_choice"]
    config = slimformer.FlopsBudget(
        spec["fraction"], calibration_examples=spec["examples"], label_free=spec.get("label_free", False), **options
    )
    result = slimformer.prune(
        spec["model"], config, data, max_length=max_length, evaluate=spec["evaluate"], progress=False
    )
    seconds = result.report["seconds"]
    details = result.report.get("details") or {}
    try:  # how many tokens one backward pass of the Fisher takes (older checkouts: whole batches)
        from slimformer.budget.fisher import FISHER_TOKENS_PER_PASS as fisher_tokens
    except ImportError:
        fisher_tokens = None
    return {
        "slimformer": slimformer.__file__,
        "fisher_tokens_per_pass": fisher_tokens,
        "seconds": seconds,
        "pruning_seconds": sum(v for k, v in seconds.items() if k != "total" and not k.startswith("evaluate")),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kilobytes on Linux
        "score": result.score if spec["evaluate"] else None,
        "score_before": result.report.get("score", {}).get("before") if spec["evaluate"] else None,
        "calibration": details.get("calibration"),
        "refit_memory": details.get("refit_memory"),
        "peak_mib_by_phase": details.get("peak_memory_mib"),
        "layers": len(result.plan.kept_heads),
        "kept_heads": sum(len(h) for h in result.plan.kept_heads),
        "kept_neurons": sum(len(n) for n in result.plan.kept_neurons),
        "unit_choice": details.get("unit_choice"),
    }


def run_fresh(spec: dict, src: Path, log: Path) -> dict:
    """``worker(spec)`` in a new Python process with ``src`` first on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "bench")])}
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    with log.open("a") as out:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}; see {log}"}
    return json.loads(lines[-1][len(RESULT_MARK) :])


def fit_line(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares line y = a + b x and its R^2 (None for fewer than 3 points)."""
    if len(xs) < 3:
        return None
    import numpy as np

    b, a = np.polyfit(xs, ys, 1)
    predicted = a + b * np.asarray(xs)
    total = float(((np.asarray(ys) - np.mean(ys)) ** 2).sum())
    r2 = 1 - float(((np.asarray(ys) - predicted) ** 2).sum()) / total if total else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": r2}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth_rows = [r for r in rows if r["model"].startswith("bert-base") and "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for implementation, marker in (("streamed", "o"), ("streamed, dense pass", "^"), ("before", "s")):
        points = sorted((r["layers"], r) for r in depth_rows if r["implementation"] == implementation)
        if not points:
            continue
        layers = [p[0] for p in points]
        axes[0].plot(layers, [p[1]["seconds"]["tune"] for p in points], marker=marker, label=implementation)
        axes[1].plot(layers, [p[1]["peak_mib"] / 1024 for p in points], marker=marker, label=implementation)
    axes[0].set(xlabel="layers (BERT-base width)", ylabel="refit seconds", title="Refit time against depth")
    axes[1].set(xlabel="layers (BERT-base width)", ylabel="peak GiB (whole run)", title="Peak memory against depth")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="minilm-l6,mpnet,bert-base,bert-large")
    parser.add_argument("--depths", default="", help="also BERT-base width at these depths, e.g. 2,4,8,12")
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", type=Path, default=None, help="src/ of the checkout to compare against")
    parser.add_argument(
        "--before-name", default="before", help="its name in the table (e.g. 'streamed, 3 passes' for cfffbe2)"
    )
    parser.add_argument(
        "--fisher-precision",
        default="float32",
        help="the pruner's fisher_precision, or several (float32,bfloat16): one implementation each; rows other "
        "than float32 are named after theirs",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each implementation this many times, interleaved (one of each per round), and keep the run of "
        "median time: on a shared machine one run's time can be 10-20%% off",
    )
    parser.add_argument(
        "--unit-choice",
        default="",
        help="the pruner's unit_choice (fisher / refit), or several: one implementation each, named after it "
        "(empty: the pruner's default for the model)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--redo", action="store_true", help="re-run rows the results file already has")
    args = parser.parse_args()
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    names += [f"bert-base-L{d.strip()}" for d in args.depths.split(",") if d.strip()]
    implementations = []  # (name, src, fisher_precision, unit_choice)
    choices = [c.strip() for c in args.unit_choice.split(",") if c.strip()] or [None]
    for precision in [p.strip() for p in args.fisher_precision.split(",") if p.strip()]:
        for choice in choices:
            name = "streamed" if precision == "float32" else f"streamed, {precision} Fisher"
            name += f", units chosen by {'the refit' if choice == 'refit' else 'the Fisher'}" if choice else ""
            implementations.append((name, ROOT / "src", precision, choice))
    implementations += [(args.before_name, args.before.resolve(), None, None)] if args.before else []
    results_file = args.results_dir / "budget_scaling.json"
    rows = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    log = RUNS / "scaling" / "runs.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        model, task, scored, label_free = model_and_task(name)
        todo = []
        for implementation, src, precision, choice in implementations:
            key = (name, implementation, args.examples)
            done = [r for r in rows if (r["model"], r["implementation"], r["examples"]) == key]
            if done and not args.redo and "error" not in done[0]:
                continue
            todo.append((implementation, src, precision, choice))
        runs: dict[str, list[dict]] = {implementation: [] for implementation, *_ in todo}
        for round_ in range(args.repeats):
            for implementation, src, precision, choice in todo:
                spec = {
                    "model": model,
                    "task": task,
                    "examples": args.examples,
                    "fraction": args.fraction,
                    "threads": args.threads,
                    "evaluate": scored,
                    "label_free": label_free,
                    "glue_dir": str(glue_dir()),
                    "fisher_precision": precision,
                    "unit_choice": choice,
                }
                print(f"{name} / {implementation} / {args.examples} examples / run {round_ + 1} ...", flush=True)
                runs[implementation].append(run_fresh(spec, src, log))
                print(runs[implementation][-1], flush=True)
        for implementation, results in runs.items():
            key = (name, implementation, args.examples)
            rows = [r for r in rows if (r["model"], r["implementation"], r["examples"]) != key]
            row = {
                "model": name,
                "implementation": implementation,
                "examples": args.examples,
                "task": task,
                "cpu_features": machine()["cpu_features"],  # rows of one file may come from different machines
            }
            good = sorted((r for r in results if "error" not in r), key=lambda r: r["pruning_seconds"])
            if not good:
                rows.append({**row, **results[-1]})
                continue
            median = good[(len(good) - 1) // 2]
            rows.append({**row, **median, "runs": [{k: r[k] for k in ("pruning_seconds", "seconds")} for r in good]})
            print(rows[-1], flush=True)
        write(rows, args)
    write(rows, args)


def seconds_cell(row: dict) -> str:
    """The run's pruning seconds; for repeated runs the median's, with the range and the number of runs."""
    runs = row.get("runs") or []
    if len(runs) < 2:
        return f"{row['pruning_seconds']:.0f}"
    times = [r["pruning_seconds"] for r in runs]
    return f"{row['pruning_seconds']:.0f} ({min(times):.0f}-{max(times):.0f}, {len(runs)} runs)"


def write(rows: list[dict], args) -> None:
    table = []
    for r in sorted(rows, key=lambda r: (r["model"], r["examples"], r["implementation"])):
        if "error" in r:
            table.append([r["model"], r["implementation"], r["examples"], r["task"], "", "failed", "", "", "", "", ""])
            continue
        refit = (r.get("refit_memory") or {}).get("peak_bytes_in_ram")
        phases = r.get("peak_mib_by_phase") or {}
        by_phase = f"{phases['fisher'] / 1024:.2f} / {phases['tune'] / 1024:.2f}" if phases.get("tune") else ""
        score = "" if r.get("score") is None else f"{r['score_before'] * 100:.2f} -> {r['score'] * 100:.2f}"
        table.append(
            [
                r["model"],
                r["implementation"],
                r["examples"],
                r["task"],
                r.get("fisher_tokens_per_pass") or "batch of 32",
                seconds_cell(r),
                f"{r['seconds']['fisher']:.0f} / {r['seconds']['tune']:.0f}",
                f"{r['peak_mib'] / 1024:.2f}",
                by_phase,
                "" if refit is None else f"{refit / 2**30:.2f}",
                score,
            ]
        )
    fits = {}
    for implementation in ("streamed", "streamed, dense pass", "before"):
        depth_rows = [
            r
            for r in rows
            if r["model"].startswith("bert-base") and r["implementation"] == implementation and "error" not in r
        ]
        fit = fit_line([r["layers"] for r in depth_rows], [r["seconds"]["tune"] for r in depth_rows])
        if fit:
            fits[implementation] = fit
    fit_text = "".join(
        f"- {impl}: refit seconds = {f['intercept']:.1f} + {f['slope']:.2f} x layers (R^2 {f['r2']:.3f})\n"
        for impl, f in fits.items()
    )
    markdown = (
        f"# Cost of budget pruning ({args.fraction:.0%} of the FLOPs) against model size\n\n"
        "Peak resident memory and wall time of one `FlopsBudget` run (Fisher, search, least-squares refit, removal; "
        "dev evaluation not counted) in a fresh process, 2 threads. `streamed`: the layer-by-layer refit, one "
        "pass per layer of the pruned layer's attention with its pruned heads and neurons removed (its FFN computed "
        "from the contexts that pass saw, the layer's output from what the FFN step saw), its targets recorded "
        "during the Fisher's forward passes (no dense pass of its own; an eighth of the memory budget holds them in "
        "RAM, the rest is memory-mapped from disk); `before this stop (5d5256e)`: the same when the FFN step ran the "
        "layer's attention a second time, and its bfloat16 Fisher used PyTorch's SDPA attention (the mpnet rows "
        "`streamed` and `streamed, bfloat16 Fisher` were measured on fd83ac1, after this change, one run each); "
        "`streamed, recorded targets 1/4 in RAM`: the same with a quarter; `streamed, dense pass`: the same "
        "refit when it ran the dense layer beside the pruned one "
        "for its targets and the pruned layer at the dense layer's cost, with gates (slimformer 969deee); "
        "`streamed, 3 passes`: the same when it also ran the pruned layer a third time to leave it (slimformer "
        "cfffbe2); `before`: "
        "the refit that kept every dense sub-layer output and re-ran the model up to each sub-layer (slimformer "
        "243dd31). Random BERT shapes score nothing; their cost is real. MRPC sentence pairs at max length 128 "
        "unless the model has its own task. `Fisher tokens per pass`: the backward passes of the Fisher were whole "
        "batches of 32 examples before they were cut to 1,024 tokens; that backward is most of the peak memory. "
        "`no heap trim`: before freed heap was handed back to the system between the Fisher's backward passes and "
        "the refit's batches (glibc kept what each pass of another shape freed: on mpnet the Fisher's resident set "
        "grew with every pass). `peak GiB after Fisher / refit`: the process's high-water mark when each phase ended "
        "(the report's `details.peak_memory_mib`). `streamed, bfloat16 Fisher`: the Fisher's passes under bfloat16 "
        "autocast (`FlopsBudget(fisher_precision='bfloat16')`; eager attention since this stop: the CPU "
        "flash-attention backward is slow in bfloat16; what it costs in score: fisher_precision.md). Where "
        "a row gives several runs, the implementations ran interleaved (one run of each per round) and the row is "
        "the run of median time. `minilm-l6-embed` / `mpnet-embed`: the sentence-embedding models pruned as "
        "bench/embeddings.py prunes them (label-free; its calibration texts, up to 256 tokens: half STS-B sentences, "
        "3/8 SQuAD questions, 1/8 SQuAD paragraphs, which carry most of the tokens); `units chosen by the refit` "
        "(their default) / `by the Fisher`: `FlopsBudget(unit_choice=...)`. Each JSON row's `cpu_features` gives the "
        "processor it ran on: the `mpnet-embed` rows ran on a 2-core AMD EPYC with AVX2 only (no AVX-512, so the "
        "default float32 Fisher), the rows before them on 2 cores with AVX-512 VNNI and BF16.\n\n"
        + markdown_table(
            [
                "model",
                "refit",
                "calibration examples",
                "task",
                "Fisher tokens per pass",
                "seconds",
                "Fisher / refit s",
                "peak GiB",
                "peak GiB after Fisher / refit",
                "refit activations GiB",
                "score before -> after",
            ],
            table,
        )
        + ("\nRefit time against depth (BERT-base width, least-squares line):\n\n" + fit_text if fit_text else "")
    )
    write_results("budget_scaling", {"machine": machine(), "fits": fits, "rows": rows}, markdown, args.results_dir)
    if fits:
        plot(rows, args.results_dir / "budget_scaling.png")
    print(markdown)


if __name__ == "__main__":
    main()
