"""``slimformer.compress``: the one-command recipe from a fine-tuned model to the fastest int8 artifact that keeps
its score, with every stage measured side by side.

Stages: dense fp32 (PyTorch) -> dense int8 on the runtime (what a user gets without slimformer) -> retraining-free
budget pruning (Kwon et al. 2022 with the least-squares refit, :class:`~slimformer.configs.FlopsBudget`) ->
optional recovery (``recover="kd"``: logit distillation from the dense model; ``"finetune"``) -> int8 of the pruned
model on the same runtime. The speedup aimed at is *measured* on the target runtime against dense PyTorch fp32, not
assumed: the first FLOPs fraction is the one that the dense int8 speedup says is needed (latency taken as
proportional to FLOPs), and while the measured speedup falls short, the fraction shrinks by the shortfall and the
pruning is redone (``max_attempts``). Recovery never changes the shapes, so it runs once, on the final shape.

The output folder is the final int8 artifact (:func:`slimformer.quantize`'s layout: it runs with the runtime
alone) plus ``report.md``, ``pareto.png`` (score against measured latency of every stage), ``metrics.json`` (the
one report schema, stages under ``details``) and ``pruned/`` (the pruned PyTorch model folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimformer.configs import ConfigError
from slimformer.deploy.quantize import DeployResult
from slimformer.errors import SlimformerError
from slimformer.io import atomic_directory, write_json_atomic
from slimformer.report import METRICS_FILE, build_report, interleaved_latency, model_stats

RECOVERIES = ("kd", "finetune")
SHAPES = ((32, 128), (1, 32))  # throughput and one online request
# the smallest FLOPs fraction the search may ask for: below it a MiniLM-sized model has nothing left to prune
MIN_FRACTION = 0.05


@dataclass(frozen=True)
class Compress:
    """What :func:`compress` aims at: ``target_speedup`` (measured on ``runtime`` int8 against dense PyTorch fp32
    at batch 32 x ``seq_len``) or ``budget_flops`` (the fraction of FLOPs to keep), one of the two."""

    target_speedup: float | None = None
    budget_flops: float | None = None
    runtime: str = "onnxruntime"
    mode: str | None = None
    recover: str | None = None
    epochs: float = 1.0
    masked_copies: int = 0
    """With ``recover="kd"``: masked copies of the training texts in the distillation
    (:attr:`slimformer.distill.DistillConfig.masked_copies`)."""
    calibration_examples: int = 2048
    int8_calibration_examples: int = 256
    max_attempts: int = 3
    seed: int = 0

    method = "compress"

    def __post_init__(self) -> None:
        if (self.target_speedup is None) == (self.budget_flops is None):
            raise ConfigError("Give one of --target-speedup or --budget-flops.")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise ConfigError(f"--target-speedup must be above 1, got {self.target_speedup}.")
        if self.budget_flops is not None and not 0 < self.budget_flops <= 1:
            raise ConfigError(f"--budget-flops is the fraction of FLOPs to keep, in (0, 1]; got {self.budget_flops}.")
        if self.recover is not None and self.recover not in RECOVERIES:
            raise ConfigError(f"Unknown recovery {self.recover!r}; choose one of: {', '.join(RECOVERIES)}.")
        if self.max_attempts < 1 or self.epochs <= 0:
            raise ConfigError("max_attempts must be at least 1 and epochs positive.")
        if self.masked_copies < 0 or (self.masked_copies and self.recover != "kd"):
            raise ConfigError("--masked-copies is a count (>= 0) of the distillation's copies: it needs --recover kd.")
        self.quantize_config()  # refuses an unknown runtime or mode now, not after pruning

    def quantize_config(self):
        from slimformer.deploy.quantize import Quantize

        return Quantize(
            runtime=self.runtime, mode=self.mode, calibration_examples=self.int8_calibration_examples, seed=self.seed
        )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": 1, **asdict(self)}


CompressResult = DeployResult  # what compress returns: the final int8 model, the report, the folder


def compress(
    model,
    config: Compress,
    data=None,
    *,
    out: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    seq_len: int = 128,
    threads: int | None = 2,
    rounds: int = 3,
    costs: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    calibration_file: str | os.PathLike[str] | None = None,
) -> DeployResult:
    """Prune ``model`` (a fine-tuned folder, hub id or loaded model) to ``config``'s target, optionally recover,
    quantize on ``config.runtime``, and evaluate and time every stage (interleaved, batch 32 x ``seq_len`` and 1 x
    32, ``threads`` threads); with ``out``, write the final artifact with ``report.md`` and ``pareto.png``.
    With ``costs``, every stage also gets what :func:`slimformer.analyze.costs.compression_costs` measures where
    its data is there: AdvGLUE accuracy, loyalty to the dense model, EEC gender and race gaps.
    ``calibration_file`` (sentence-embedding tasks): a plain text file, one sentence per line, that every stage
    reads instead of the task's training texts: the pruner's calibration, the distillation and static int8."""
    from slimformer.api import _loaded, _task_record, check_label_set, resolve_data
    from slimformer.configs import FlopsBudget
    from slimformer.deploy.quantize import quantize
    from slimformer.evaluation import Evaluator, headline_score
    from slimformer.models import LoadedModel

    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not overwrite:
        raise SlimformerError(f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite.")
    task = resolve_data(model, data, data_dir=data_dir, max_eval_samples=max_eval_samples)
    if calibration_file is not None:
        from slimformer.tasks import with_calibration_texts

        task = with_calibration_texts(task, calibration_file)
    loaded = _loaded(model, None, task)
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    check_label_set(dense, task)
    int8_config = config.quantize_config()
    runtime_label = f"{int8_config.runtime} int8 ({int8_config.mode})"
    seconds: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="slimformer-compress-"))

    def int8_of(net, name: str):
        source = LoadedModel(net, tokenizer, loaded.spec, name)
        return quantize(
            source,
            int8_config,
            task,
            out=work / name,
            max_length=max_length,
            evaluate=False,
            measure=False,
            seq_len=seq_len,
            threads=threads,
            progress=progress,
        )

    def speedup(reference, candidate) -> float:
        timing = interleaved_latency(
            {"reference": reference, "candidate": candidate}, seq_len=seq_len, threads=threads, rounds=rounds
        )
        return timing["speedup"]["candidate"]

    try:
        clock = time.perf_counter()
        dense_int8 = int8_of(dense, "dense-int8")
        int8_speedup = speedup(dense, dense_int8.model)
        seconds["dense int8"] = round(time.perf_counter() - clock, 2)
        fraction = config.budget_flops or min(1.0, int8_speedup / config.target_speedup)
        attempts: list[dict[str, Any]] = []
        best = None
        clock = time.perf_counter()
        for _ in range(config.max_attempts if config.target_speedup else 1):
            if fraction < MIN_FRACTION:
                break
            pruned, plan = _pruned(
                loaded,
                task,
                FlopsBudget(
                    fraction, calibration_examples=config.calibration_examples, seq_len=seq_len, seed=config.seed
                ),  # FLOPs counted at the length the report counts them at,
                max_length,
            )
            pruned_int8 = int8_of(pruned, f"pruned-int8-{len(attempts)}")
            measured = speedup(dense, pruned_int8.model)
            attempts.append({"flops_fraction": round(fraction, 4), "measured_speedup": round(measured, 3)})
            if best is None or measured > best[3]:
                best = (pruned, plan, pruned_int8, measured, fraction)
            if config.target_speedup is None or measured >= config.target_speedup:
                break
            fraction *= measured / config.target_speedup  # latency ~ FLOPs: shrink by the shortfall
        seconds["prune"] = round(time.perf_counter() - clock, 2)
        if best is None:
            raise SlimformerError(
                f"A {config.target_speedup}x target needs less than {MIN_FRACTION:.0%} of the FLOPs on this machine "
                f"(dense {runtime_label} alone is {int8_speedup:.2f}x); ask for a smaller --target-speedup."
            )
        pruned, plan, pruned_int8, _, fraction = best

        stages: dict[str, dict[str, Any]] = {
            "dense": {"runtime": "pytorch fp32", "net": dense},
            "dense int8": {"runtime": runtime_label, "net": dense_int8.model, "disk": dense_int8.report},
            "pruned": {"runtime": "pytorch fp32", "net": pruned},
        }
        if config.recover is not None:
            clock = time.perf_counter()
            pruned = _recovered(loaded, pruned, tokenizer, task, config, work, progress)
            stages["pruned + " + config.recover] = {"runtime": "pytorch fp32", "net": pruned}
            pruned_int8 = int8_of(pruned, "recovered-int8")
            seconds["recover"] = round(time.perf_counter() - clock, 2)
        final_name = "pruned" + (f" + {config.recover}" if config.recover else "") + " int8"
        stages[final_name] = {"runtime": runtime_label, "net": pruned_int8.model, "disk": pruned_int8.report}

        clock = time.perf_counter()
        # tokenized once for every stage; the dev logits are kept for the loyalty in the costs below
        evaluator = Evaluator(tokenizer, task, max_length=max_length)
        dev_logits = {}
        for name, stage in stages.items():
            if task.spec.is_embedding:
                stage["eval"] = evaluator.evaluate(stage["net"], progress=progress)
            else:
                dev_logits[name] = evaluator.logits(stage["net"], progress=progress)
                stage["eval"] = evaluator.metrics(dev_logits[name])
            stage["score"] = headline_score(stage["eval"], task.spec.primary_metric)
        seconds["evaluate"] = round(time.perf_counter() - clock, 2)
        if costs:
            from slimformer.analyze.costs import compression_costs

            clock = time.perf_counter()
            nets = {name: stage["net"] for name, stage in stages.items()}
            measured = compression_costs(
                nets, "dense", tokenizer, task, data_dir=data_dir, max_length=max_length, dev_logits=dev_logits or None
            )
            for name, stage in stages.items():
                stage["costs"] = measured[name]
            seconds["costs"] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        for batch, length in SHAPES:
            timing = interleaved_latency(
                {name: stage["net"] for name, stage in stages.items()},
                batch_size=batch,
                seq_len=min(length, seq_len),
                threads=threads,
                rounds=rounds,
            )
            for name, stage in stages.items():
                stage[f"ms_{batch}x{length}"] = timing[name]["median_ms"]
        seconds["measure"] = round(time.perf_counter() - clock, 2)
        table = _stage_rows(stages, dense, pruned, seq_len)
        report = build_report(
            "compress",
            model=str(loaded.source),
            task=_task_record(task, model),
            primary_metric=task.spec.primary_metric,
            config=config.to_dict(),
            before=model_stats(dense, seq_len=seq_len),
            after={**model_stats(pruned, seq_len=seq_len), "disk_bytes": table[-1]["disk_bytes"]},
            eval_before=stages["dense"]["eval"],
            eval_after=stages[final_name]["eval"],
            extra_scores={name: stage["score"] for name, stage in stages.items()},
            latency={
                "batch_size": 32,
                "seq_len": seq_len,
                "threads": threads,
                "before": {"median_ms": stages["dense"]["ms_32x128"]},
                "after": {"median_ms": stages[final_name]["ms_32x128"]},
                "speedup": stages["dense"]["ms_32x128"] / stages[final_name]["ms_32x128"],
                "runtimes": {"before": "pytorch fp32", "after": runtime_label},
            },
            seconds=seconds,
            details={
                "stages": table,
                "attempts": attempts,
                "flops_fraction": round(fraction, 4),
                "dense_int8_speedup": round(int8_speedup, 3),
                "quantization": pruned_int8.report["details"]["quantization"],
                **(
                    {"calibration_file": str(Path(calibration_file).expanduser().resolve())}
                    if calibration_file is not None
                    else {}
                ),
            },
            seq_len=seq_len,
        )
        if out_dir is not None:
            _save(pruned_int8, pruned, plan, tokenizer, task, report, out_dir, overwrite)
            pruned_int8.model.path = out_dir / pruned_int8.model.path.name
        else:
            pruned_int8.model.open()  # unsaved: its file goes with the work folder below; the session holds it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DeployResult(model=pruned_int8.model, report=report, out_dir=out_dir)


def _pruned(loaded, task, budget, max_length: int):
    """A pruned copy of the dense model (the dense one stays as it is for the next attempt and the table)."""
    from copy import deepcopy

    from slimformer.api import prune
    from slimformer.models import LoadedModel

    copy = LoadedModel(deepcopy(loaded.model), loaded.tokenizer, loaded.spec, loaded.source)
    result = prune(copy, budget, task, max_length=max_length, evaluate=False, progress=False)
    return result.model.eval(), result.plan


def _recovered(loaded, pruned, tokenizer, task, config: Compress, work: Path, progress: bool):
    """The pruned model after logit distillation from the dense one (``kd``) or plain fine-tuning."""
    from slimformer.api import distill, finetune, save
    from slimformer.distill import DistillConfig
    from slimformer.models import load_model
    from slimformer.train import TrainConfig

    teacher_dir, student_dir = work / "teacher", work / "student"
    save(loaded.model, teacher_dir, tokenizer=tokenizer, task=task)
    save(pruned, student_dir, tokenizer=tokenizer, task=task)
    train = TrainConfig(epochs=config.epochs, seed=config.seed)
    if config.recover == "kd":
        settings = DistillConfig(masked_copies=config.masked_copies)
        result = distill(
            teacher_dir, student_dir, work / "recovered", task, config=train, distill_config=settings, progress=progress
        )
    else:
        result = finetune(student_dir, task, work / "recovered", config=train)
    return load_model(result.out_dir, task.spec).model.eval()


def _stage_rows(stages: dict[str, dict[str, Any]], dense, pruned, seq_len: int) -> list[dict[str, Any]]:
    """One JSON row per stage: score, drop, latency at both shapes, speedups, size on disk."""
    from slimformer.measure.flops import flops

    base = stages["dense"]
    dense_flops, pruned_flops = (flops(m, seq_len=seq_len).encoder for m in (dense, pruned))  # what budgets count
    rows = []
    for name, stage in stages.items():
        disk = stage.get("disk")
        rows.append(
            {
                "stage": name,
                "runtime": stage["runtime"],
                "score": stage["score"],
                "drop": stage["score"] - base["score"],
                "encoder_flops_fraction": (dense_flops if name.startswith("dense") else pruned_flops) / dense_flops,
                **{f"ms_{b}x{s}": stage[f"ms_{b}x{s}"] for b, s in SHAPES},
                **{f"speedup_{b}x{s}": base[f"ms_{b}x{s}"] / stage[f"ms_{b}x{s}"] for b, s in SHAPES},
                "disk_bytes": disk["models"]["after"]["disk_bytes"] if disk else None,
                **({"costs": stage["costs"]} if stage.get("costs") else {}),
            }
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: what was asked, what was found, every stage side by side."""
    from slimformer.analyze.costs import costs_markdown

    details, config = report["details"], report["config"]
    asked = (
        f"a {config['target_speedup']}x speedup on {config['runtime']}"
        if config.get("target_speedup")
        else f"{config['budget_flops']:.0%} of the FLOPs"
    )
    lines = [
        f"# Compressed: {report['model']}",
        "",
        f"Asked for {asked}. Dense int8 alone is {details['dense_int8_speedup']:.2f}x; the pruned model keeps "
        f"{details['flops_fraction']:.1%} of the FLOPs. Latency: medians of interleaved runs, "
        f"{report['latency']['threads']} threads; speedups against dense PyTorch fp32.",
        "",
        "| stage | runtime | score | vs dense | encoder FLOPs | ms 32x128 | ms 1x32 | speedup 32x128 | speedup 1x32 "
        "| MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in details["stages"]:
        size = f"{row['disk_bytes'] / 1e6:.1f}" if row["disk_bytes"] else "-"
        lines.append(
            f"| {row['stage']} | {row['runtime']} | {row['score'] * 100:.2f} | {row['drop'] * 100:+.2f} | "
            f"{row['encoder_flops_fraction']:.0%} | {row['ms_32x128']:.1f} | {row['ms_1x32']:.1f} | "
            f"{row['speedup_32x128']:.2f}x | {row['speedup_1x32']:.2f}x | {size} |"
        )
    reached = details["stages"][-1]["speedup_32x128"]
    if config.get("target_speedup") and reached < config["target_speedup"]:
        lines += [
            "",
            f"The target was not reached: {reached:.2f}x after {len(details['attempts'])} attempt(s); the fastest "
            "attempt is kept. Allow more attempts (--max-attempts), add recovery to prune deeper, or pick a runtime "
            "with faster int8 kernels on this CPU.",
        ]
    if len(details["attempts"]) > 1:
        tried = ", ".join(f"{a['flops_fraction']:.0%} -> {a['measured_speedup']:.2f}x" for a in details["attempts"])
        lines += ["", f"FLOPs fractions tried (measured int8 speedup): {tried}."]
    costs = costs_markdown({row["stage"]: row.get("costs", {}) for row in details["stages"]})
    if costs:
        lines += ["", "## Beyond the score", "", *costs]
    lines += ["", "![score against latency](pareto.png)", ""]
    return "\n".join(lines)


def plot_pareto(report: dict[str, Any], path: Path) -> Path:
    """Score against measured latency (batch 32 x 128) of every stage."""
    from matplotlib.figure import Figure

    from slimformer.plots import save_png_atomic

    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.add_subplot()
    for row in report["details"]["stages"]:
        axes.scatter(row["ms_32x128"], row["score"] * 100, s=30)
        axes.annotate(
            row["stage"], (row["ms_32x128"], row["score"] * 100), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    axes.set_xlabel("latency, batch 32 x 128 (ms)")
    axes.set_ylabel(f"{report.get('primary_metric') or 'score'} (x100)")
    axes.grid(True, alpha=0.3)
    return save_png_atomic(figure, path)


def _save(pruned_int8, pruned, plan, tokenizer, task, report, out_dir: Path, overwrite: bool) -> None:
    from slimformer.deploy.quantize import write_artifact_card
    from slimformer.folders import MANIFEST, read_manifest, save_model_folder

    source = pruned_int8.out_dir  # the int8 artifact written by quantize into the work folder
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        save_model_folder(pruned, tokenizer, staging / "pruned", plan=plan, task=task.record())
        write_json_atomic(staging / METRICS_FILE, report)
        manifest = read_manifest(staging) or {}
        pruned_manifest = read_manifest(staging / "pruned") or {}
        manifest = {**manifest, "plan": pruned_manifest.get("plan"), "compress": config_of(report)}
        write_json_atomic(staging / MANIFEST, manifest)
        (staging / "report.md").write_text(render_markdown(report))
        plot_pareto(report, staging / "pareto.png")
        write_artifact_card(staging, out_dir, manifest.get("format", "onnx"))


def config_of(report: dict[str, Any]) -> dict[str, Any]:
    """What compress was asked and what it chose, for the artifact's manifest."""
    details = report["details"]
    return {**report["config"], "flops_fraction": details["flops_fraction"], "attempts": details["attempts"]}


__all__ = ["Compress", "CompressResult", "compress", "render_markdown"]
