"""slimformer's front door: one function per job, all importable from ``slimformer``.

``slimformer.prune(model, config, data=...)`` is shaped like peft's ``get_peft_model(model, config)`` and
torchao's ``quantize_(model, config)``: the config says which method and with what settings
(:mod:`slimformer.configs`), a registry finds its handler, and every method goes down the same path: resolve
model and data -> refuse impossible targets -> evaluate the dense model -> handler (importance / calibration ->
plan, maybe a refit) -> physical removal -> evaluate and measure -> save -> one report
(:mod:`slimformer.report`). The CLI builds the same configs and calls these functions.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

import slimformer.distill
import slimformer.measure
import slimformer.prune  # noqa: F401
from slimformer.arch import get_spec
from slimformer.configs import ConfigError, PruneConfig, PruneContext, handler_for
from slimformer.embedding import SentenceEmbedder, is_sentence_embedder
from slimformer.errors import SlimformerError, TaskError
from slimformer.folders import read_manifest, save_model_folder
from slimformer.models import LoadedModel, load_model, resolve_model_source
from slimformer.prune.apply import remove
from slimformer.prune.plan import PruningPlan
from slimformer.report import build_report, interleaved_latency, model_stats
from slimformer.tasks import TaskData, TaskRef, load_task

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike[str] | LoadedModel | PreTrainedModel | SentenceEmbedder
DataLike = str | TaskData | TaskRef | None


@dataclass
class PruneResult:
    """The pruned model (in memory, physically smaller), its tokenizer and plan, the report (also written as
    ``metrics.json`` when saved) and where it was saved."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    plan: PruningPlan
    report: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def score(self) -> float | None:
        return self.report["score"]["after"]


# --------------------------------------------------------------------------------------------- resolving


def _folder_of(model: ModelLike) -> Path | None:
    """The local folder a model came from, when there is one (it may remember its task)."""
    if isinstance(model, LoadedModel):
        model = model.source
    elif isinstance(model, PreTrainedModel) or is_sentence_embedder(model):
        model = getattr(model, "name_or_path", "") or ""
    if not model:
        return None
    try:
        source, local = resolve_model_source(model)
    except SlimformerError:
        return None
    return Path(source) if local else None


def remembered_task(model: ModelLike) -> TaskRef | None:
    """The task a model folder was trained on (written by finetune / prune / distill), if it says."""
    folder = _folder_of(model)
    manifest = read_manifest(folder) if folder is not None else None
    task = (manifest or {}).get("task")
    # a record without a kind came from data built in code: it says which task, not how to load it again
    return TaskRef.from_dict(task) if task and task.get("kind") else None


def resolve_data(
    model: ModelLike,
    data: DataLike,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    required: bool = True,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> TaskData | None:
    """The task data to use: ``data`` as given (TaskData, a GLUE name or a TaskRef), else the task the model's
    folder remembers. With neither, an error when ``required``."""
    limits = {"max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples, "seed": seed}
    if isinstance(data, TaskData):
        return data.limited(**limits)
    if isinstance(data, TaskRef):
        return data.load(data_dir=data_dir, **limits)
    remembered = remembered_task(model)
    if isinstance(data, str):
        if remembered is not None and remembered.name != data:
            logger.warning("The model was trained on %s; using %s data as asked.", remembered.describe(), data)
        return load_task(data, data_dir, **limits)
    if remembered is not None:
        return remembered.load(data_dir=data_dir, **limits)
    if required:
        raise TaskError(
            "No task given and the model folder does not say which task it was trained on: pass one "
            "(--task NAME, or --task custom with --train-file/--dev-file; data= in Python)."
        )
    return None


def check_label_set(model: PreTrainedModel, data: TaskData) -> None:
    """Refuse data whose labels do not match the model's trained head."""
    spec = data.spec
    if spec.is_embedding or is_sentence_embedder(model):
        if spec.is_embedding and not is_sentence_embedder(model):
            raise TaskError(
                f"{spec.name} scores sentence embeddings, but this model was built with a task head; load it with "
                "the embedding task (slimformer.load_model(path, task)) to use its encoder as an embedding model."
            )
        if not spec.is_embedding:
            raise TaskError(
                f"This is a sentence-embedding model (no task head); {spec.name} needs a head. Fine-tune it first "
                f"(slimformer finetune --model ... --task {spec.name}), or use an embedding task."
            )
        return
    config = model.config
    if config.num_labels != spec.num_labels:
        raise TaskError(
            f"The model's head predicts {config.num_labels} label(s) but {spec.name} has {spec.num_labels}. "
            "Use the task the model was trained on, or fine-tune it on this one first."
        )
    names = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
    generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    if spec.label_names and names and not generic and tuple(names) != tuple(str(n) for n in spec.label_names):
        raise TaskError(
            f"The model's labels {names} differ from the task's {list(spec.label_names)} "
            f"({spec.name}). Use the task the model was trained on, or pass the same label names."
        )


def _loaded(model: ModelLike, tokenizer: PreTrainedTokenizerBase | None, data: TaskData | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, PreTrainedModel) or is_sentence_embedder(model):
        return LoadedModel(
            model=model, tokenizer=tokenizer, spec=get_spec(model), source=getattr(model, "name_or_path", "")
        )
    folder = _folder_of(model)
    if folder is not None and (read_manifest(folder) or {}).get("format") is not None:
        from slimformer.deploy.runtime import load_artifact_folder  # an int8 artifact: run by its runtime

        return load_artifact_folder(folder)
    return load_model(model, data.spec if data is not None else None)


def _task_record(data: TaskData | None, model: ModelLike) -> dict[str, Any] | None:
    if data is not None:
        return data.record()
    folder = _folder_of(model)  # no data used (a plan file): pass on what the input folder remembers
    return ((read_manifest(folder) or {}).get("task")) if folder is not None else None


# --------------------------------------------------------------------------------------------- prune


def prune(
    model: ModelLike,
    config: PruneConfig,
    data: DataLike = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    evaluate: bool = True,
    measure: bool = False,
    seq_len: int = 128,
    threads: int | None = 2,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    weight_storage: str | None = None,
    calibration_file: str | os.PathLike[str] | None = None,
) -> PruneResult:
    """Prune ``model`` with the method ``config`` describes and return the physically smaller model.

    ``model``: a model folder, hub id, ``"minilm-l6"``, a :class:`~slimformer.LoadedModel`, or a transformers
    model (then pass ``tokenizer`` when the method needs data). ``data``: a :class:`~slimformer.tasks.TaskData`,
    a GLUE task name, a :class:`~slimformer.tasks.TaskRef`, or None for the task the model's folder remembers.
    ``evaluate`` scores the model on dev before and after; ``measure`` adds interleaved latency (batch 32 x
    ``seq_len``, ``threads`` threads) and size on disk. FLOPs are counted at ``seq_len`` tokens. With ``out``,
    the model is saved there with ``plan.json`` and ``metrics.json`` (the report), atomically; its weights as
    ``weight_storage`` says (``dense``, or ``sparse-bitmask`` for weight-level sparse models: smaller, read by
    :func:`slimformer.load_model`; default: ``sparse-bitmask`` after a sparse method, else ``dense``).
    ``calibration_file``: for a sentence-embedding task, a plain text file (one sentence per line) whose sentences
    the method calibrates (or trains) on instead of the task's training texts; the dev splits stay the task's.

    The model object passed in is changed in place (pruned); pass a copy to keep the dense one.
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(
            f"config must be a pruning config such as FlopsBudget(0.5) or Fractions(heads=0.5), got {config!r}."
        )
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not overwrite:
        raise SlimformerError(f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite.")
    if calibration_file is not None and not config.needs_data:
        raise SlimformerError(
            f"calibration_file gives the texts a method calibrates on, but {config.method} reads no data."
        )
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    needs_data = config.needs_data or evaluate
    data_resolved = (
        resolve_data(model, data, data_dir=data_dir, required=config.needs_data, max_eval_samples=max_eval_samples)
        if needs_data
        else None
    )
    if calibration_file is not None:
        from slimformer.tasks import with_calibration_texts

        data_resolved = with_calibration_texts(data_resolved, calibration_file)
    loaded = _loaded(model, tokenizer, data_resolved)
    net, tokenizer = loaded.model, loaded.tokenizer
    if data_resolved is not None:
        check_label_set(net, data_resolved)
    if (config.needs_data or (evaluate and data_resolved is not None)) and tokenizer is None:
        raise SlimformerError("Pass tokenizer= with a model object: this method (or evaluation) tokenizes data.")
    seconds["load"] = round(time.perf_counter() - clock, 2)

    from slimformer.evaluation import evaluate_model

    def evaluation(target: PreTrainedModel) -> dict[str, dict[str, float]] | None:
        if not evaluate or data_resolved is None or not data_resolved.dev:
            return None
        return evaluate_model(target, tokenizer, data_resolved, max_length=max_length, progress=progress)

    clock = time.perf_counter()
    before_stats = model_stats(net, seq_len=seq_len)
    eval_before = evaluation(net)
    dense = copy.deepcopy(net) if measure else None
    seconds["evaluate_before"] = round(time.perf_counter() - clock, 2)

    context = PruneContext(
        data=data_resolved,
        max_length=max_length,
        cache_dir=cache_dir,
        progress=progress,
        work_dir=out_dir.with_name(out_dir.name + ".work") if out_dir is not None else None,
    )
    outcome = handler_for(config)(net, tokenizer, config, context)
    seconds.update(outcome.seconds)

    plan_summary = outcome.plan.summary(net, seq_len=seq_len)
    clock = time.perf_counter()
    remove(net, outcome.plan)
    seconds["remove"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    eval_after = evaluation(net)
    seconds["evaluate_after"] = round(time.perf_counter() - clock, 2)
    after_stats = model_stats(net, seq_len=seq_len)
    sparse_details = outcome.details.get("sparse")
    if weight_storage is None:
        weight_storage = "sparse-bitmask" if sparse_details is not None else "dense"
    if sparse_details is not None:
        from slimformer.sparse.storage import compact_bytes

        sparse_details["storage"] = {
            "dense_bytes": sum(p.numel() * p.element_size() for p in net.state_dict().values()),
            "sparse_bitmask_bytes": compact_bytes(net),
            "sparse_bitmask_int8_bytes": compact_bytes(net, int8=True),
            "saved_as": weight_storage if out_dir is not None else None,
        }
    latency = None
    if measure:
        from slimformer.measure import model_size_on_disk

        clock = time.perf_counter()
        latency = interleaved_latency({"before": dense, "after": net}, seq_len=seq_len, threads=threads)
        latency["speedup"] = latency["speedup"]["after"]
        before_stats["disk_bytes"] = model_size_on_disk(dense).weights_bytes
        after_stats["disk_bytes"] = model_size_on_disk(net).weights_bytes
        seconds["measure"] = round(time.perf_counter() - clock, 2)
    task = _task_record(data_resolved, model)
    report = build_report(
        "prune",
        model=str(loaded.source),
        task=task,
        primary_metric=data_resolved.spec.primary_metric if data_resolved is not None else None,
        config=config.to_dict(),
        before=before_stats,
        after=after_stats,
        eval_before=eval_before,
        eval_after=eval_after,
        latency=latency,
        seconds=seconds,
        details={
            "plan": plan_summary,
            **outcome.details,
            **({"calibration_file": str(Path(calibration_file).expanduser().resolve())} if calibration_file else {}),
        },
        seq_len=seq_len,
    )
    if out_dir is not None:
        save_model_folder(
            net,
            tokenizer,
            out_dir,
            plan=outcome.plan,
            task=task,
            overwrite=overwrite,
            json_files={"plan.json": outcome.plan.to_dict(), "metrics.json": report},
            weight_storage=weight_storage,
        )
        if "sparse" in outcome.details:
            from slimformer.sparse.plots import plot_density

            plot_density(outcome.details["sparse"], out_dir / "density.png")
    return PruneResult(model=net, tokenizer=tokenizer, plan=outcome.plan, report=report, out_dir=out_dir)


# --------------------------------------------------------------------------------------------- other jobs


def finetune(
    model: str | os.PathLike[str] = "minilm-l6",
    data: DataLike = "sst2",
    out: str | os.PathLike[str] = "runs/finetuned",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    config=None,
    resume: bool = True,
    overwrite: bool = False,
    callbacks=None,
):
    """Fine-tune ``model`` on a task (a GLUE name, a :class:`~slimformer.tasks.TaskData` or a
    :class:`~slimformer.tasks.TaskRef`) and save it to ``out``; see :func:`slimformer.train.finetune`."""
    from slimformer.train import TrainConfig
    from slimformer.train import finetune as run_finetune

    config = config or TrainConfig()
    if isinstance(data, TaskRef):
        data = data.load(
            data_dir=data_dir,
            max_train_samples=config.max_train_samples,
            max_eval_samples=config.max_eval_samples,
            seed=config.seed,
        )
    return run_finetune(
        model, data, out, data_dir=data_dir, config=config, resume=resume, overwrite=overwrite, callbacks=callbacks
    )


def distill(
    teacher: str | os.PathLike[str],
    student: str | os.PathLike[str],
    out: str | os.PathLike[str],
    data: DataLike = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    config=None,
    distill_config=None,
    resume: bool = True,
    overwrite: bool = False,
    evaluate_before: bool = True,
    progress: bool = True,
    callbacks=None,
    calibration_file: str | os.PathLike[str] | None = None,
):
    """Distill the fine-tuned ``teacher`` into ``student`` (a model folder such as a pruned one, or a spec made
    from the teacher: ``drop:top:2``, ``every:3``, ``layers:0,2,4``) on ``data`` (default: the task the teacher
    was trained on); see :func:`slimformer.distill.distill`. ``calibration_file``: for a sentence-embedding task,
    a plain text file (one sentence per line) whose sentences the student learns the teacher's embeddings of,
    instead of the task's training texts (``config.max_train_samples`` of them at most)."""
    from slimformer.distill.pipeline import distill as run_distill
    from slimformer.train import TrainConfig

    config = config or TrainConfig()
    task = resolve_data(
        teacher,
        data,
        data_dir=data_dir,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        seed=config.seed,
    )
    if calibration_file is not None:
        from slimformer.tasks import with_calibration_texts

        task = with_calibration_texts(task, calibration_file, max_samples=config.max_train_samples, seed=config.seed)
    return run_distill(
        teacher,
        student,
        task,
        out,
        config=config,
        distill_config=distill_config,
        resume=resume,
        overwrite=overwrite,
        evaluate_before=evaluate_before,
        progress=progress,
        callbacks=callbacks,
    )


def evaluate(
    model: ModelLike,
    data: DataLike = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The task's official metrics on its dev split(s) (default task: the one the model folder remembers)."""
    from slimformer.evaluation import evaluate as run_evaluate

    task = resolve_data(model, data, data_dir=data_dir, max_eval_samples=max_eval_samples, seed=seed)
    loaded = _loaded(model, tokenizer, task)
    check_label_set(loaded.model, task)
    return run_evaluate(loaded, task, max_length=max_length, batch_size=batch_size)


def measure(
    model: ModelLike,
    *,
    seq_len: int = 128,
    batch_size: int = 32,
    threads: int | None = 2,
    repeats: int = 10,
    warmup: int = 3,
    latency: bool = True,
) -> dict[str, Any]:
    """Parameters, analytic FLOPs by component (one sequence of ``seq_len`` tokens), latency (median over
    ``repeats``, batch ``batch_size`` x ``seq_len``, ``threads`` threads) and size on disk. An int8 artifact
    folder is timed through its runtime; its parameters and FLOPs are those of the model it was made from."""
    from slimformer.deploy.runtime import is_runtime_model, shape_skeleton
    from slimformer.measure import measure_model
    from slimformer.measure.latency import measure_latency

    loaded = _loaded(model, None, None)
    folder = _folder_of(model)
    runtime = is_runtime_model(loaded.model)
    result = measure_model(
        shape_skeleton(loaded.model.config, embedding=is_sentence_embedder(loaded.model)) if runtime else loaded.model,
        seq_len=seq_len,
        batch_size=batch_size,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        model_dir=folder,
        latency=latency and not runtime,
    )
    if runtime:
        if latency:
            timing = measure_latency(
                loaded.model, batch_size=batch_size, seq_len=seq_len, threads=threads, warmup=warmup, repeats=repeats
            )
            result["latency"] = timing.as_dict()
        file_format = (read_manifest(folder) or {}).get("format") if folder is not None else None
        result["runtime"] = {"onnx": "onnxruntime"}.get(file_format, file_format)
    result["model"] = str(loaded.source)
    return result


def save(
    model: PreTrainedModel | LoadedModel,
    out: str | os.PathLike[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    plan: PruningPlan | None = None,
    task: TaskData | TaskRef | None = None,
    overwrite: bool = False,
    weight_storage: str = "dense",
) -> Path:
    """Save a (pruned or not) model with its tokenizer, manifest and remembered task, atomically;
    :func:`slimformer.load_model` reads it back, whatever its layout. ``weight_storage="sparse-bitmask"`` keeps
    sparse matrices as a bitmask plus their non-zero values (see :mod:`slimformer.sparse.storage`)."""
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    record = task.ref if isinstance(task, TaskData) else task
    return save_model_folder(
        model,
        tokenizer,
        out,
        plan=plan,
        task=record.to_dict() if record is not None else None,
        overwrite=overwrite,
        weight_storage=weight_storage,
    )


def quantize(model: ModelLike, config=None, data: DataLike = None, **options: Any):
    """int8 on a runtime, scored and timed through that runtime; see :func:`slimformer.deploy.quantize`."""
    from slimformer.deploy import quantize as run_quantize

    return run_quantize(model, config, data, **options)


def compress(model: ModelLike, config, data: DataLike = None, **options: Any):
    """Budget pruning, optional recovery and int8 to a measured target speedup, every stage side by side; see
    :func:`slimformer.deploy.compress`."""
    from slimformer.deploy import compress as run_compress

    return run_compress(model, config, data, **options)


def export_onnx(model: ModelLike, path: str | os.PathLike[str], *, opset: int | None = None, check: bool = True):
    """Export a (pruned) model to ONNX and, with ``check``, compare onnxruntime's logits with PyTorch's; see
    :func:`slimformer.export.export_onnx`."""
    from slimformer.export import export_onnx as run_export

    return run_export(_loaded(model, None, None).model, path, opset=opset, check=check)
