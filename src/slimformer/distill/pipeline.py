"""Knowledge distillation from a fine-tuned teacher into a smaller student.

The loss mixes (weights in :class:`DistillConfig`):

- logit distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): KL divergence between
  temperature-softened teacher and student distributions, mixed with the task loss by ``alpha``; for regression,
  the mean squared error to the teacher's predictions;
- hidden-state distillation (Jiao et al. 2020, "TinyBERT"): MSE between mapped layers' hidden states (and the
  embeddings), through a learned projection when the widths differ;
- attention distillation: KL between the attention distributions of mapped layers' heads (TinyBERT matches
  attention, MiniLM, Wang et al. 2020, showed KL on distributions works well). A student head pruned from the
  teacher is paired with the teacher head it came from;
- fair distillation (Delobelle & Berendt 2022, "FairDistillation"), ``counterfactual``: every training sentence
  with a gendered word gets a copy with those words swapped (he <-> she, ...), and the student is asked to give
  both the teacher's prediction averaged over the pair, so that it learns no difference the teacher made between
  them;
- embedding distillation, for sentence-embedding models (an embedding task such as ``stsb-embed``): the squared
  distance between the student's and the teacher's sentence embeddings of every text of the task's training split,
  no labels involved (sentence-transformers' model distillation, Reimers & Gurevych 2020); ``alpha`` does not
  apply, the layer terms do.

Training runs on the Hugging Face Trainer like :func:`slimformer.train.finetune`: the same command runs under
``accelerate launch`` on several GPUs, checkpoints to ``<out>.work/`` and resumes after an interruption. For
logit-only distillation the teacher's logits on the training set can be computed once and cached on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, set_seed
from transformers.modeling_outputs import SequenceClassifierOutput

from slimformer.arch import LayerView, layer_views
from slimformer.distill.losses import attention_log_probs, attention_loss, embedding_loss, hidden_loss, logit_loss
from slimformer.distill.students import Student, make_student
from slimformer.embedding import is_sentence_embedder
from slimformer.errors import SlimformerError
from slimformer.evaluation import Evaluator, headline_score, predict
from slimformer.folders import save_model_folder
from slimformer.gradients import is_regression, task_loss
from slimformer.importance import model_fingerprint
from slimformer.io import atomic_file
from slimformer.layout import LAYOUT_KEY, current_head_ids, model_width
from slimformer.models import load_model
from slimformer.report import model_stats
from slimformer.tasks import TaskData, load_task, tokenize_task
from slimformer.tasks.data import split_texts
from slimformer.tasks.tokenize import cache_root, masked_token_rows
from slimformer.train import (
    METRICS_FILE,
    FinetuneResult,
    TrainConfig,
    prepare_work_dir,
    require_train_split,
    run_trainer,
    trained_report,
)

TEACHER_LOGITS = "teacher_logits"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


@dataclass
class DistillConfig:
    """How the student learns from the teacher. With only ``alpha`` and ``temperature`` set this is plain logit
    distillation; ``hidden_weight`` / ``attention_weight`` > 0 add TinyBERT-style layer distillation."""

    alpha: float = 0.5
    """Weight of the distillation loss on the logits; the task loss gets 1 - alpha."""
    temperature: float = 2.0
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    layer_map: str = "auto"
    """'auto' (each student layer to the teacher layer it was copied from, else the uniform mapping of TinyBERT,
    student layer m of M to teacher layer m*N/M), or explicit pairs 'S:T,S:T' of 0-based layer indices."""
    cache_teacher: bool = True
    """Compute the teacher's logits on the training set once and cache them on disk (logit-only distillation)."""
    counterfactual: bool = False
    """Fair distillation: add gender-swapped copies of the training sentences that have gendered words, each pair
    with the teacher's prediction averaged over both as its target."""
    counterfactual_names: bool = False
    """The counterfactual copies also exchange common first names (john <-> mary, ...; Maudslay et al. 2019), not
    only gendered words (off by default: in debiasing pruning it did not shrink the EEC gap,
    bench/results/fairness.md)."""
    masked_copies: int = 0
    """Data augmentation (TinyBERT, Jiao et al. 2020, §3.3, with the tokenizer's mask token in place of their word
    replacement): every training text is also seen this many times with ``mask_rate`` of its tokens masked, and the
    student learns the teacher's predictions on those copies too. A teacher fine-tuned to convergence is nearly
    certain on its own training texts, so they show little of how it behaves on new ones; masked copies do."""
    mask_rate: float = 0.15

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SlimformerError(f"alpha must be in [0, 1] (weight of the distillation loss), not {self.alpha}.")
        if self.temperature <= 0:
            raise SlimformerError(f"temperature must be > 0, not {self.temperature}.")
        if self.hidden_weight < 0 or self.attention_weight < 0:
            raise SlimformerError("hidden_weight and attention_weight must be >= 0.")
        if self.masked_copies < 0:
            raise SlimformerError(f"masked_copies must be >= 0, not {self.masked_copies}.")
        if not 0.0 < self.mask_rate < 1.0:
            raise SlimformerError(f"mask_rate is the share of tokens masked, in (0, 1); got {self.mask_rate}.")

    @property
    def needs_layers(self) -> bool:
        return self.hidden_weight > 0 or self.attention_weight > 0


class DistillResult(FinetuneResult):
    """Where the student went and what it scored (also in ``metrics.json`` there)."""


def layer_mapping(
    num_student: int, num_teacher: int, origin: list[int] | None = None, text: str = "auto"
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 0-based. See :attr:`DistillConfig.layer_map`."""
    if text == "auto":
        if origin is not None and len(origin) == num_student and all(0 <= t < num_teacher for t in origin):
            return list(enumerate(origin))
        return [(m, (m + 1) * num_teacher // num_student - 1) for m in range(num_student)]
    pairs = []
    for part in text.split(","):
        s, sep, t = part.strip().partition(":")
        if not sep or not s.strip().isdigit() or not t.strip().isdigit():
            raise SlimformerError(
                f"--layer-map {text!r} is not understood: write 'auto' or pairs STUDENT:TEACHER, e.g. 0:1,1:3,2:5."
            )
        pairs.append((int(s), int(t)))
    bad = [(s, t) for s, t in pairs if not (0 <= s < num_student and 0 <= t < num_teacher)]
    if bad:
        raise SlimformerError(
            f"--layer-map pairs {bad} are out of range: the student has layers 0..{num_student - 1}, the teacher "
            f"0..{num_teacher - 1}."
        )
    return pairs


def head_pairing(student: PreTrainedModel, teacher: PreTrainedModel, pairs: list[tuple[int, int]]):
    """For each layer pair, the teacher head index of each student head, or None to compare head-averaged
    attention (when the heads cannot be matched one to one)."""
    student_ids, teacher_ids = current_head_ids(student), current_head_ids(teacher)
    # head ids mean "the same head" only in a student pruned from the teacher (it records them) or when the
    # layers have as many heads; an unrelated smaller student is compared on head-averaged attention
    recorded = hasattr(student.config, LAYOUT_KEY)
    result: list[list[int] | None] = []
    for s, t in pairs:
        ids = student_ids[s]
        position = {head: k for k, head in enumerate(teacher_ids[t])}
        matchable = recorded or len(ids) == len(teacher_ids[t])
        result.append([position[h] for h in ids] if matchable and all(h in position for h in ids) else None)
    return result


@contextmanager
def capture_queries_keys(
    model: PreTrainedModel, layers: set[int], views: list[LayerView] | None = None
) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Record the query and key projection outputs of ``layers`` during the forward passes in this block
    (``views``: the model's :func:`layer_views`, when the caller already has them)."""
    store: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def recorder(index: int, name: str):
        def record(module, args, output):
            store.setdefault(index, {})[name] = output

        return record

    for view in views if views is not None else layer_views(model):
        if view.index in layers and view.num_heads > 0:
            handles.append(view.query.register_forward_hook(recorder(view.index, "query")))
            handles.append(view.key.register_forward_hook(recorder(view.index, "key")))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _identity_linear(width: int) -> nn.Linear:
    linear = nn.Linear(width, width)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(width))
        linear.bias.zero_()
    return linear


class DistillationModel(nn.Module):
    """What the Trainer trains: the student (and any hidden-state projections) with the loss of
    :class:`DistillConfig`. The teacher is held outside the module tree, so it is neither trained nor written
    into checkpoints."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None,
        config: DistillConfig,
        pairs: list[tuple[int, int]],
        *,
        project_hidden: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.settings = config
        self.pairs = pairs
        self.regression = is_regression(student)
        self.embedding = is_sentence_embedder(student)
        object.__setattr__(self, "teacher", teacher)
        self.projections: nn.ModuleList | None = None
        self.heads: list[list[int] | None] = []
        # resolved once: forward runs every training step
        self.student_views = layer_views(student)
        self.teacher_views = layer_views(teacher) if teacher is not None else []
        if teacher is not None and config.needs_layers:
            widths = model_width(student), model_width(teacher)
            if widths[0] != widths[1]:
                # one projection for the embeddings and one per mapped layer (TinyBERT's W_h)
                self.projections = nn.ModuleList(nn.Linear(*widths) for _ in range(len(pairs) + 1))
            elif project_hidden:  # a student whose hidden dimensions are gated (CoFi's learned W), from identity
                self.projections = nn.ModuleList(_identity_linear(widths[0]) for _ in range(len(pairs) + 1))
            self.heads = head_pairing(student, teacher, pairs)

    def _teacher_outputs(self, inputs: dict[str, torch.Tensor], layers: set[int]):
        teacher = self.teacher
        device = inputs["input_ids"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        with torch.no_grad(), capture_queries_keys(teacher, layers, self.teacher_views) as qk:
            outputs = teacher(**inputs, output_hidden_states=self.settings.hidden_weight > 0)
        return outputs, qk

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        settings = self.settings
        want_hidden = settings.hidden_weight > 0
        student_layers = {s for s, _ in self.pairs} if settings.attention_weight > 0 else set()
        teacher_layers = {t for _, t in self.pairs} if settings.attention_weight > 0 else set()
        with capture_queries_keys(self.student, student_layers, self.student_views) as student_qk:
            outputs = self.student(**inputs, output_hidden_states=want_hidden)
        logits = outputs.logits
        if labels is None:
            return SequenceClassifierOutput(logits=logits)

        teacher_outputs, teacher_qk = None, {}
        if (teacher_logits is None and settings.alpha > 0) or settings.needs_layers:
            if self.teacher is None:
                raise SlimformerError("No teacher and no cached teacher logits: cannot compute the distillation loss.")
            teacher_outputs, teacher_qk = self._teacher_outputs(inputs, teacher_layers)
            if teacher_logits is None:  # given targets (fair distillation's averages) stay the logit targets
                teacher_logits = teacher_outputs.logits
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.embedding:  # no labels: the whole output loss is imitating the teacher's embeddings
            loss = loss + embedding_loss(logits, teacher_logits)
        elif settings.alpha > 0:
            loss = loss + settings.alpha * logit_loss(
                logits, teacher_logits.to(logits.dtype), temperature=settings.temperature, regression=self.regression
            )
        if settings.alpha < 1 and not self.embedding:
            loss = loss + (1 - settings.alpha) * task_loss(logits, labels, self.regression)
        if want_hidden:
            hidden_pairs = [(0, 0)] + [(s + 1, t + 1) for s, t in self.pairs]
            loss = loss + settings.hidden_weight * hidden_loss(
                outputs.hidden_states, teacher_outputs.hidden_states, hidden_pairs, attention_mask, self.projections
            )
        if settings.attention_weight > 0:
            loss = loss + settings.attention_weight * self._attention_loss(student_qk, teacher_qk, attention_mask)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _attention_loss(self, student_qk, teacher_qk, attention_mask: torch.Tensor) -> torch.Tensor:
        total = attention_mask.new_zeros((), dtype=torch.float32)
        for (s, t), heads in zip(self.pairs, self.heads, strict=True):
            if s not in student_qk or t not in teacher_qk:
                continue  # a layer with no heads left has no attention to match
            student = attention_log_probs(
                student_qk[s]["query"], student_qk[s]["key"], self.student_views[s].num_heads, attention_mask
            )
            teacher = attention_log_probs(
                teacher_qk[t]["query"], teacher_qk[t]["key"], self.teacher_views[t].num_heads, attention_mask
            )
            if heads is not None:
                teacher = teacher[:, heads]
            else:
                student = student.exp().mean(1, keepdim=True).clamp_min(1e-12).log()
                teacher = teacher.exp().mean(1, keepdim=True).clamp_min(1e-12).log()
            total = total + attention_loss(student, teacher, attention_mask)
        return total


# ------------------------------------------------------------------------------------------------ teacher cache


def _dataset_digest(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for column in ("input_ids", "token_type_ids"):
        if column in dataset.column_names:
            for row in dataset[column]:
                digest.update(np.asarray(row, dtype=np.int32).tobytes())
                digest.update(b"|")
    return digest.hexdigest()


def teacher_logits(
    teacher: PreTrainedModel,
    tokenizer: Any,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    cache: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """The teacher's logits for every row of ``dataset``, read from / written to
    ``<cache root>/teacher_logits/<sha256 of teacher weights and token ids>.npy`` when ``cache``."""
    path = None
    if cache:
        key = hashlib.sha256((model_fingerprint(teacher) + _dataset_digest(dataset)).encode()).hexdigest()[:32]
        path = cache_root() / "teacher_logits" / f"{key}.npy"
        if path.is_file():
            try:
                cached = np.load(path)
                if cached.shape[0] == len(dataset):
                    return cached
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed below
    logits = predict(teacher, tokenizer, dataset, batch_size=batch_size, progress=progress, description="teacher")
    if path is not None:
        with atomic_file(path, binary=True) as handle:
            np.save(handle, logits)
    return logits


# ------------------------------------------------------------------------------------------- fair distillation


def averaged_targets(original: np.ndarray, swapped: np.ndarray, *, regression: bool) -> np.ndarray:
    """FairDistillation's target for a sentence and its counterfactual: the mean of the teacher's two predicted
    distributions, returned as log-probabilities (which are logits of that mean); for regression the mean score."""
    if regression:
        return (original + swapped) / 2
    original_probs = torch.from_numpy(original).double().softmax(-1)
    swapped_probs = torch.from_numpy(swapped).double().softmax(-1)
    return ((original_probs + swapped_probs) / 2).log().float().numpy()


def with_counterfactuals(
    train_set: Dataset,
    teacher: PreTrainedModel,
    tokenizer: Any,
    *,
    regression: bool,
    names: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> tuple[Dataset, int]:
    """The training set with a gender-swapped copy of every row that has a swappable word, and a
    :data:`TEACHER_LOGITS` column: the teacher's own logits for rows without such words, the pair's averaged
    target (:func:`averaged_targets`) for both rows of a pair. Returns the set and the number of copies. ``names``:
    first names are swapped too."""
    from slimformer.adversarial import counterfactual_pairs, gender_swap_map, swap_table, swap_tokens

    table = swap_table(gender_swap_map(tokenizer, counterfactual_pairs(names)), int(teacher.config.vocab_size))
    originals = teacher_logits(teacher, tokenizer, train_set, cache=cache, progress=progress)
    changed, copies = [], []
    for index, ids in enumerate(train_set["input_ids"]):
        ids = torch.as_tensor(ids)
        swapped = swap_tokens(ids, table)
        if bool((swapped != ids).any()):
            changed.append(index)
            copies.append(swapped.tolist())
    targets = originals.copy()
    if not changed:
        return train_set.add_column(TEACHER_LOGITS, [row.tolist() for row in targets]), 0
    counterparts = train_set.select(changed).remove_columns("input_ids").add_column("input_ids", copies)
    swapped_logits = teacher_logits(teacher, tokenizer, counterparts, cache=cache, progress=progress)
    pair_targets = averaged_targets(originals[changed], swapped_logits, regression=regression)
    targets[changed] = pair_targets
    counterparts = counterparts.select_columns(train_set.column_names).cast(train_set.features)
    both = concatenate_datasets([train_set, counterparts])
    all_targets = np.concatenate([targets, pair_targets])
    return both.add_column(TEACHER_LOGITS, [row.tolist() for row in all_targets]), len(changed)


# ------------------------------------------------------------------------------------------ data augmentation


def with_masked_copies(train_set: Dataset, tokenizer: Any, copies: int, rate: float, seed: int) -> Dataset:
    """``train_set`` followed by ``copies`` copies of every row in which each ordinary token (not [CLS], [SEP] or
    padding) is replaced by the mask token with probability ``rate`` (seeded: the same copies on every run, so the
    teacher's cached logits apply). Labels are kept: masking a few tokens rarely changes the answer, and the
    distillation targets come from the teacher on the masked text itself."""
    if copies == 0:
        return train_set
    parts = [train_set]
    for rows in masked_token_rows(train_set["input_ids"], tokenizer, rate, seed, copies):
        copy = train_set.remove_columns("input_ids").add_column("input_ids", rows)
        parts.append(copy.select_columns(train_set.column_names).cast(train_set.features))
    return concatenate_datasets(parts)


# ------------------------------------------------------------------------------------------------ the whole run


def sentence_train_set(data: TaskData, tokenizer: Any, max_length: int) -> Dataset:
    """Every text of the training split as its own example (an embedding model reads one text at a time), with a
    placeholder label: the trainer's loss is the distance to the teacher's embedding, not a label."""
    texts = split_texts(data.train)
    encoded = dict(tokenizer(texts, truncation=True, max_length=max_length))
    return Dataset.from_dict({**encoded, "labels": [0.0] * len(texts)})


def _check_compatible(student: Student, teacher: PreTrainedModel, teacher_tokenizer: Any) -> None:
    if is_sentence_embedder(student.model) != is_sentence_embedder(teacher):
        raise SlimformerError("Teacher and student must both be sentence-embedding models, or both task models.")
    if not is_sentence_embedder(teacher) and student.model.config.num_labels != teacher.config.num_labels:
        raise SlimformerError(
            f"The student predicts {student.model.config.num_labels} labels, the teacher "
            f"{teacher.config.num_labels}: they must be made for the same task."
        )
    probe = "Distillation needs teacher and student to read the same tokens."
    if student.tokenizer(probe)["input_ids"] != teacher_tokenizer(probe)["input_ids"]:
        raise SlimformerError(
            "The student's tokenizer differs from the teacher's; distillation here feeds both the same tokens. "
            "Use a student of the same model family and vocabulary."
        )


def distill(
    teacher: str | os.PathLike[str],
    student: str | os.PathLike[str],
    task: str | TaskData,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    config: TrainConfig | None = None,
    distill_config: DistillConfig | None = None,
    resume: bool = True,
    overwrite: bool = False,
    evaluate_before: bool = True,
    progress: bool = True,
    callbacks: list[TrainerCallback] | None = None,
) -> DistillResult:
    """Train ``student`` (a folder, or a spec such as ``drop:top:4`` / ``every:2``, see
    :func:`slimformer.distill.make_student`) to imitate the fine-tuned ``teacher`` on ``task``; save it to
    ``out_dir`` with ``metrics.json`` (student score before and after, teacher score, losses, timings).

    Like :func:`slimformer.train.finetune`, the output folder appears only when the run has finished and an
    interrupted run resumes from its last complete checkpoint in ``<out_dir>.work/``.
    """
    config = config or TrainConfig()
    settings = distill_config or DistillConfig()
    settings.check()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise SlimformerError(f"Output folder {out_dir} already exists. Choose another --out or pass --overwrite.")

    data = (
        task.limited(config.max_train_samples, config.max_eval_samples, config.seed)
        if isinstance(task, TaskData)
        else load_task(
            task,
            data_dir,
            max_train_samples=config.max_train_samples,
            max_eval_samples=config.max_eval_samples,
            seed=config.seed,
        )
    )
    require_train_split(data)
    work_dir = out_dir.with_name(out_dir.name + ".work")
    signature = {
        "teacher": str(teacher),
        "student": str(student),
        "task": data.spec.name,
        "config": asdict(config),
        "distill": asdict(settings),
    }
    checkpoint = prepare_work_dir(work_dir, signature, resume)

    set_seed(config.seed)
    teacher_loaded = load_model(teacher, data.spec)
    student_made = make_student(student, teacher, data, max_length=config.max_length, seed=config.seed)
    _check_compatible(student_made, teacher_loaded.model, teacher_loaded.tokenizer)
    tokenizer = student_made.tokenizer
    if settings.counterfactual and data.spec.is_embedding:
        raise SlimformerError(
            "--counterfactual (fair distillation) averages a classifier's or regressor's predictions over gender-"
            "swapped sentence pairs; it does not apply to sentence-embedding tasks."
        )
    if data.spec.is_embedding:
        # no labels to learn: the student imitates the teacher's embeddings, of every sentence of the task
        settings = replace(settings, alpha=1.0)
        tokenized = {"train": sentence_train_set(data, tokenizer, config.max_length)}
    else:
        tokenized = tokenize_task(data, tokenizer, max_length=config.max_length)
    metric = data.spec.primary_metric
    seconds: dict[str, float] = {}
    before_stats = model_stats(student_made.model)
    student_eval, extra_scores = None, {}
    if evaluate_before:
        phase = time.perf_counter()
        evaluator = Evaluator(tokenizer, data, tokenized=tokenized)  # one batching for both models
        teacher_eval = evaluator.evaluate(teacher_loaded.model, progress=progress)
        student_eval = evaluator.evaluate(student_made.model, progress=progress)
        extra_scores["teacher"] = headline_score(teacher_eval, metric)
        seconds["evaluate_before"] = round(time.perf_counter() - phase, 2)

    train_set = tokenized["train"].select_columns([c for c in MODEL_INPUTS if c in tokenized["train"].column_names])
    train_set = with_masked_copies(train_set, tokenizer, settings.masked_copies, settings.mask_rate, config.seed)
    use_cache = settings.cache_teacher and not settings.needs_layers and settings.alpha > 0
    phase = time.perf_counter()
    counterfactual_copies = None
    if settings.counterfactual:
        # the averaged targets come as a column whatever the caching (layer terms still run the teacher live)
        train_set, counterfactual_copies = with_counterfactuals(
            train_set,
            teacher_loaded.model,
            tokenizer,
            regression=is_regression(teacher_loaded.model),
            names=settings.counterfactual_names,
            cache=settings.cache_teacher,
            progress=progress,
        )
        use_cache = settings.alpha > 0
    elif use_cache:
        logits = teacher_logits(teacher_loaded.model, tokenizer, train_set, cache=True, progress=progress)
        train_set = train_set.add_column(TEACHER_LOGITS, [row.tolist() for row in logits])
    seconds["teacher_logits"] = round(time.perf_counter() - phase, 2)

    views_student = len(layer_views(student_made.model))
    views_teacher = len(layer_views(teacher_loaded.model))
    pairs = layer_mapping(views_student, views_teacher, student_made.origin_layers, settings.layer_map)
    needs_teacher = settings.needs_layers or (settings.alpha > 0 and not use_cache)
    wrapper = DistillationModel(student_made.model, teacher_loaded.model if needs_teacher else None, settings, pairs)
    if not needs_teacher:
        del teacher_loaded  # free its memory for training
    trainer, train_output, train_seconds = run_trainer(
        wrapper, tokenizer, train_set, work_dir, config, checkpoint, callbacks=callbacks, remove_unused_columns=False
    )
    if not trainer.is_world_process_zero():
        return DistillResult(out_dir=out_dir)

    model = student_made.model
    metrics = trained_report(
        "distill",
        model,
        tokenizer,
        data,
        tokenized,
        config,
        train_output,
        train_seconds,
        checkpoint,
        source=str(student),
        run_config={
            "method": "distill",
            "version": 1,
            "teacher": str(teacher),
            "student": str(student),
            "train": asdict(config),
            "distill": asdict(settings),
        },
        before=before_stats,
        eval_before=student_eval,
        extra_scores=extra_scores,
        seconds=seconds,
        details={
            "teacher": str(teacher),
            "student": student_made.description,
            "distill": {
                **asdict(settings),
                "layer_pairs": pairs,
                "teacher_logits_cached": use_cache,
                "training_rows": len(train_set),  # with masked and counterfactual copies
                **({"counterfactual_copies": counterfactual_copies} if settings.counterfactual else {}),
            },
        },
    )
    save_model_folder(
        model,
        tokenizer,
        out_dir,
        plan=student_made.plan,
        task=data.record(),
        overwrite=True,
        json_files={METRICS_FILE: metrics, **({"plan.json": student_made.plan.to_dict()} if student_made.plan else {})},
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    return DistillResult(out_dir=out_dir, metrics=metrics)


__all__ = [
    "DistillConfig",
    "DistillResult",
    "DistillationModel",
    "averaged_targets",
    "distill",
    "head_pairing",
    "layer_mapping",
    "teacher_logits",
    "with_counterfactuals",
    "with_masked_copies",
]
