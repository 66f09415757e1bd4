"""Importance scores of attention heads, FFN neurons and whole MLP blocks: which parts of a model matter.

Four methods, all computed through the gates of :mod:`slimformer.gates` (no model code changed); the two that use
gradients get them from :func:`slimformer.gradients.gate_gradients`:

``"gradient"``
    Michel et al. 2019, "Are Sixteen Heads Really Better than One?": a gate multiplies each head's output; the
    importance of a head is the expected absolute gradient of the loss with respect to its gate, E_x |dL(x)/dg_h|,
    taken at g = 1 and accumulated per batch as the absolute gradient of the batch loss (as their code does).
    FFN neurons get one gate each. Whole MLP blocks are scored the same way (Prasanna et al. 2020, "When BERT Plays
    the Lottery, All Tickets Are Winning") with one scalar gate per layer that multiplies all its neuron gates.
``"fisher"``
    The diagonal of the empirical Fisher information of the gates (Kwon et al. 2022, "A Fast Post-Training
    Pruning Framework for Transformers"): the sum over batches of the squared gate gradients. With
    ``batch_size=1`` this is the per-example empirical Fisher; larger batches square the gradient of the
    batch-mean loss instead (cheaper, and only the scale and some noise differ).
``"magnitude"``
    Weight magnitude: a head scores the L2 norm of its query/key/value rows and output-projection columns, a
    neuron the L2 norm of its up-projection row and down-projection column, an MLP the norm of its whole FFN
    (weights only; biases are not counted).
``"random"``
    Seeded uniform random scores, the baseline every method should beat.

With ``normalize=True`` each layer's head scores and each layer's neuron scores are divided by their L2 norm
(Michel et al. §4.2), so that layers compete fairly when units are ranked globally; the MLP scores (one per
layer) are divided by the L2 norm of the whole vector, which changes no ranking.

Scoring under existing masks: pass fixed ``base_gates`` (e.g. ``plan_gates(model, plan)``); the learnable gates
are multiplied by them, so already-masked units stay masked while the others are scored. **A masked unit scores
exactly 0** with every method (its gradient is 0 through the product with the fixed 0; magnitude and random
scores are set to 0). Zero rather than -inf keeps the JSON standard and the per-layer norms unaffected; use the
mask (``meta["base_mask"]``, or the plan) to tell "masked" from "unimportant".

Layer indices in the arrays and in the JSON start at 0, as in pruning plans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

from slimformer._version import __version__
from slimformer.arch import layer_views
from slimformer.errors import SlimformerError
from slimformer.gates import Gates
from slimformer.gradients import gate_gradients, is_regression
from slimformer.io import write_json_atomic
from slimformer.models import LoadedModel
from slimformer.tasks import TaskData
from slimformer.tasks.data import split_texts
from slimformer.tasks.tokenize import masked_token_rows

if TYPE_CHECKING:  # prune builds on importance, so importance only names its plans
    from slimformer.prune.plan import PruningPlan

logger = logging.getLogger(__name__)

Method = Literal["gradient", "fisher", "magnitude", "random"]
METHODS: tuple[str, ...] = ("gradient", "fisher", "magnitude", "random")
DATA_METHODS = ("gradient", "fisher")  # the methods that run the model on data
IMPORTANCE_VERSION = 1
# Bump when the scores computed for the same inputs change, so that old cache files are not reused.
_CACHE_FORMAT = 1


class ImportanceError(SlimformerError):
    """Importance scores that cannot be computed or read as asked."""


# ------------------------------------------------------------------------------------------------ results


@dataclass
class ImportanceScores:
    """Per-layer importance of heads and FFN neurons, and one score per MLP block.

    ``heads[l]`` has one score per head present in layer ``l`` (layers may have been pruned unevenly),
    ``neurons[l]`` one per FFN neuron, ``mlps`` one per layer. Higher means more important; masked units score 0.
    ``meta`` records how the scores were made (model fingerprint, data sample and its hash, settings, time).
    """

    heads: list[np.ndarray]
    neurons: list[np.ndarray]
    mlps: np.ndarray
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = [np.asarray(h, dtype=np.float64).reshape(-1) for h in self.heads]
        self.neurons = [np.asarray(n, dtype=np.float64).reshape(-1) for n in self.neurons]
        self.mlps = np.asarray(self.mlps, dtype=np.float64).reshape(-1)
        if not len(self.heads) == len(self.neurons) == len(self.mlps):
            raise ImportanceError(
                f"Importance scores cover {len(self.heads)} layers of heads, {len(self.neurons)} of neurons and "
                f"{len(self.mlps)} MLPs; they must agree."
            )

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def head_matrix(self) -> np.ndarray:
        """[layers, max heads] array; NaN where a layer has fewer heads than the widest (uneven pruning)."""
        return _pad(self.heads)

    def neuron_matrix(self) -> np.ndarray:
        """[layers, max neurons] array, NaN-padded like :meth:`head_matrix`."""
        return _pad(self.neurons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slimformer_importance": IMPORTANCE_VERSION,
            "method": self.method,
            "layers_indexed_from": 0,
            "heads": [h.tolist() for h in self.heads],
            "neurons": [n.tolist() for n in self.neurons],
            "mlps": self.mlps.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ImportanceScores:
        if not isinstance(data, dict) or data.get("slimformer_importance") != IMPORTANCE_VERSION:
            raise ImportanceError(
                f"Not slimformer importance scores (version {IMPORTANCE_VERSION}): expected a JSON object with "
                f'"slimformer_importance": {IMPORTANCE_VERSION}.'
            )
        try:
            return cls(
                heads=[np.asarray(h, dtype=np.float64) for h in data["heads"]],
                neurons=[np.asarray(n, dtype=np.float64) for n in data["neurons"]],
                mlps=np.asarray(data["mlps"], dtype=np.float64),
                method=str(data["method"]),
                meta=dict(data.get("meta") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ImportanceError(f"Malformed importance scores: {error!r}") from error

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the scores as JSON (atomically: a crash never leaves half a file)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImportanceScores:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ImportanceError(f"Importance file {path} does not exist.") from None
        except ValueError as error:
            raise ImportanceError(f"Importance file {path} is not valid JSON: {error}") from error
        return cls.from_dict(data)


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


# ------------------------------------------------------------------------------------------------ fingerprints


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the model's config and every parameter (name, dtype, shape and bytes).

    Config keys that name where the model came from (``_name_or_path``) or the library version are left out, so
    the same weights loaded from two folders have the same fingerprint.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, parameter in model.named_parameters():
        tensor = parameter.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            # a flat uint8 view hashes any dtype (bf16 too) without a copy when the tensor is on the CPU
            digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _mask_description(base: Gates | None) -> dict[str, Any] | None:
    """The fixed gates as plain lists (part of the cache key and of the meta)."""
    if base is None:
        return None
    return {
        "heads": [g.detach().cpu().tolist() for g in base.heads],
        "neurons": [g.detach().cpu().tolist() for g in base.neurons],
        "layers": None if base.layers is None else base.layers.detach().cpu().tolist(),
    }


def _mask_summary(base: Gates | None) -> dict[str, Any] | None:
    if base is None:
        return None
    return {
        "heads_masked": int(sum(int((g == 0).sum()) for g in base.heads)),
        "neurons_masked": int(sum(int((g == 0).sum()) for g in base.neurons)),
        "layers_dropped": [] if base.layers is None else [int(i) for i in torch.nonzero(base.layers == 0).flatten()],
        "masked_units_score": 0.0,
    }


# ------------------------------------------------------------------------------------------------ data sample


@dataclass
class ImportanceSample:
    """Padded batches (with ``labels``) of a data sample, and a description of it that includes its hash."""

    batches: list[dict[str, torch.Tensor]]
    description: dict[str, Any]

    @property
    def hash(self) -> str:
        return str(self.description["hash"])

    @property
    def n_examples(self) -> int:
        return int(self.description["n_examples"])


def _sample_hash(features: list[dict[str, Any]]) -> str:
    """sha256 over the token ids (and segment ids) and labels of every example, in order."""
    digest = hashlib.sha256()
    for row in features:
        label = row.get("labels")
        label = label.item() if hasattr(label, "item") else label
        digest.update(json.dumps([row["input_ids"], row.get("token_type_ids"), label]).encode())
    return digest.hexdigest()


def importance_sample(
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData | Dataset,
    *,
    n_examples: int | None = 256,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    split: str | None = None,
    length_grouped: bool = False,
    masked_copies: int = 0,
    mask_rate: float = 0.15,
) -> ImportanceSample:
    """A seeded random sample of ``n_examples`` rows (all rows if None or more than there are), tokenized and
    padded into batches of ``batch_size``; with ``masked_copies``, followed by that many copies of it with
    ``mask_rate`` of their tokens masked (:func:`slimformer.tasks.tokenize.masked_token_rows`; tried as budget
    calibration on a 48-class task, it lost points: bench/results/many_class_diagnosis.md).

    ``data`` is a :class:`~slimformer.tasks.TaskData` (the ``split`` named, else its train split, else its first
    dev split) or an already tokenized dataset (``input_ids`` and, for labelled scoring, ``labels``). Only the
    sampled rows are tokenized, so scoring a large training set costs no more than scoring the sample.
    """
    if batch_size < 1:
        raise ImportanceError(f"batch_size must be at least 1, got {batch_size}.")
    if n_examples is not None and n_examples < 1:
        raise ImportanceError(f"n_examples must be at least 1, got {n_examples}.")
    if isinstance(data, TaskData):
        split_name, dataset = _pick_split(data, split)
        description: dict[str, Any] = {"task": data.spec.name, "source": data.source, "split": split_name}
    elif isinstance(data, Dataset):
        dataset, description = data, {"task": None, "source": "dataset", "split": split}
    else:
        raise ImportanceError(f"Expected TaskData or a tokenized datasets.Dataset, got {type(data).__name__}.")
    if len(dataset) == 0:
        raise ImportanceError(f"The {description['split'] or 'given'} split is empty: nothing to score on.")

    # a random order as well as a random subset: consecutive rows of a data file are often alike
    order = np.random.default_rng(seed).permutation(len(dataset))
    if n_examples is not None:
        order = order[:n_examples]
    rows = dataset.select(order.tolist())
    if isinstance(data, TaskData) and data.spec.is_embedding:
        # an embedding model reads one text at a time: every text of a pair is a calibration sentence of its own
        features = _tokenize_sentences(rows, tokenizer, max_length, limit=n_examples)
    elif isinstance(data, TaskData):
        features = _tokenize_rows(rows, tokenizer, max_length, pair=data.spec.is_pair)
    else:
        if "input_ids" not in rows.column_names:
            raise ImportanceError(
                f"The dataset is not tokenized: it has columns {rows.column_names}, expected input_ids (and labels)."
            )
        keep = [
            c for c in ("input_ids", "attention_mask", "token_type_ids", "labels", "label") if c in rows.column_names
        ]
        features = [{("labels" if k == "label" else k): v for k, v in row.items()} for row in rows.select_columns(keep)]
        description["max_length"] = None
    if masked_copies:
        copies = masked_token_rows([row["input_ids"] for row in features], tokenizer, mask_rate, seed, masked_copies)
        features = features + [
            {**row, "input_ids": ids} for rows in copies for row, ids in zip(features, rows, strict=True)
        ]
        description.update(masked_copies=masked_copies, mask_rate=mask_rate)
    if length_grouped:
        # similar lengths share a batch: far less padding; only for per-example quantities, where it changes nothing
        features = sorted(features, key=lambda row: len(row["input_ids"]))
    collator = DataCollatorWithPadding(tokenizer)
    batches = [collator(features[start : start + batch_size]) for start in range(0, len(features), batch_size)]
    batches = [dict(batch) for batch in batches]
    description.update(
        n_examples=len(features),
        tokens=sum(len(row["input_ids"]) for row in features),  # real tokens: what a least-squares refit fits on
        batch_size=batch_size,
        max_length=description.get("max_length", max_length),
        seed=seed,
        length_grouped=length_grouped,
        hash=_sample_hash(features),
    )
    return ImportanceSample(batches=batches, description=description)


def _pick_split(data: TaskData, split: str | None) -> tuple[str, Dataset]:
    if split is not None:
        if split not in data.splits:
            raise ImportanceError(
                f"Task {data.spec.name!r} from {data.source} has no split {split!r}; it has {list(data.splits)}."
            )
        return split, data.splits[split]
    if data.train is not None:
        return "train", data.train
    if data.dev:
        name = next(iter(data.dev))
        logger.warning("%s has no train split; computing importance on its %s split", data.spec.name, name)
        return name, data.dev[name]
    raise ImportanceError(f"Task {data.spec.name!r} from {data.source} has no split to compute importance on.")


def _tokenize_rows(rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, pair: bool) -> list[dict]:
    """Tokenized like :func:`slimformer.tasks.tokenize_task` (truncated, unpadded), one dict per row."""
    if max_length < 1:
        raise ImportanceError(f"max_length must be at least 1, got {max_length}.")
    columns = rows.to_dict()
    encoded = tokenizer(columns["text_a"], columns["text_b"] if pair else None, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return [{**{k: encoded[k][i] for k in keys}, "labels": columns["label"][i]} for i in range(len(columns["label"]))]


def _tokenize_sentences(
    rows: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, limit: int | None
) -> list[dict]:
    """Every text of every row as its own unlabelled example (``limit`` of them at most), truncated, unpadded."""
    if max_length < 1:
        raise ImportanceError(f"max_length must be at least 1, got {max_length}.")
    texts = split_texts(rows)[:limit]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]


# ------------------------------------------------------------------------------------------------ computing


def _check_label_free(model: PreTrainedModel, label_free: bool) -> None:
    if label_free and is_regression(model):
        raise ImportanceError(
            "Label-free importance needs a classification task: it uses the model's own predicted class as the "
            "label, and this model has a single regression output. Score with the gold labels instead "
            "(drop label_free / --label-free)."
        )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ImportanceError(f"Unknown importance method {method!r}; use one of: {', '.join(METHODS)}.")


def _check_base(model: PreTrainedModel, base: Gates | None) -> None:
    if base is None:
        return
    views = layer_views(model)
    heads, ffn = [v.num_heads for v in views], [v.ffn_size for v in views]
    if [g.numel() for g in base.heads] != heads or [g.numel() for g in base.neurons] != ffn:
        raise ImportanceError(
            f"base_gates are shaped for heads {[g.numel() for g in base.heads]} and neurons "
            f"{[g.numel() for g in base.neurons]} per layer; the model has {heads} and {ffn}. "
            "Make them from this model (plan_gates(model, plan))."
        )


def _magnitudes(model: PreTrainedModel) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    heads, neurons, mlps = [], [], []
    with torch.no_grad():
        for view in layer_views(model):
            size = view.head_size
            # squared norms per output row of q/k/v and per input column of o, summed within each head
            rows = sum(getattr(view, n).weight.double().pow(2).sum(dim=1) for n in ("query", "key", "value"))
            rows = rows + view.attn_out.weight.double().pow(2).sum(dim=0)
            heads.append(rows.reshape(view.num_heads, size).sum(dim=1).sqrt().cpu().numpy())
            squared = view.ffn_up.weight.double().pow(2).sum(dim=1) + view.ffn_down.weight.double().pow(2).sum(dim=0)
            neurons.append(squared.sqrt().cpu().numpy())
            mlps.append(float(squared.sum().sqrt()))
    return heads, neurons, np.asarray(mlps)


def _random_scores(model: PreTrainedModel, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    views = layer_views(model)
    heads = [rng.random(v.num_heads) for v in views]
    neurons = [rng.random(v.ffn_size) for v in views]
    return heads, neurons, rng.random(len(views))


def _apply_mask(
    heads: list[np.ndarray], neurons: list[np.ndarray], mlps: np.ndarray, base: Gates
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Zero the scores of masked units (for the methods that do not see the mask through gradients)."""
    layer_on = np.ones(len(heads), dtype=bool) if base.layers is None else base.layers.detach().cpu().numpy() != 0
    head_on = [(g.detach().cpu().numpy() != 0) & layer_on[i] for i, g in enumerate(base.heads)]
    neuron_on = [(g.detach().cpu().numpy() != 0) & layer_on[i] for i, g in enumerate(base.neurons)]
    heads = [np.where(on, h, 0.0) for h, on in zip(heads, head_on, strict=True)]
    neurons = [np.where(on, n, 0.0) for n, on in zip(neurons, neuron_on, strict=True)]
    # an MLP is masked when its layer is dropped or all its neurons are
    mlps = np.asarray([m if on.any() else 0.0 for m, on in zip(mlps, neuron_on, strict=True)])
    return heads, neurons, mlps


def _normalise(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Each row divided by its L2 norm (Michel et al. §4.2); an all-zero row (all masked) stays zero."""
    out = []
    for row in rows:
        norm = float(np.linalg.norm(row))
        out.append(row / norm if norm > 0 else row.copy())
    return out


def compute_importance(
    model: PreTrainedModel,
    data: Iterable[Mapping[str, torch.Tensor]] | Dataset | None = None,
    *,
    method: Method | str = "gradient",
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
    label_free: bool = False,
    normalize: bool = True,
    base_gates: Gates | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ImportanceScores:
    """Importance of every head, FFN neuron and MLP block of ``model`` (see the module docstring for methods).

    ``data`` is an iterable of batches (dicts of tensors: ``input_ids``, ``attention_mask``, optional
    ``token_type_ids``, and ``labels`` unless ``label_free``) or a tokenized dataset (then ``tokenizer`` pads it
    into batches of ``batch_size``, in its order). Only ``"gradient"`` and ``"fisher"`` need data.
    ``label_free=True`` uses the model's own predicted class as the label (classification only).
    ``base_gates`` are fixed 0/1 gates (e.g. ``plan_gates(model, plan)``) kept in place while scoring; masked
    units score 0. The model is left as it was: same weights, mode and ``requires_grad`` flags, no hooks.
    """
    _check_method(method)
    _check_label_free(model, label_free)
    _check_base(model, base_gates)
    started = time.perf_counter()
    meta: dict[str, Any] = {"method": method, "normalize": normalize, "seed": seed}
    if method in DATA_METHODS:
        if data is None:
            raise ImportanceError(f"The {method!r} method runs the model on data; pass batches or a dataset.")
        if isinstance(data, Dataset):
            if tokenizer is None:
                raise ImportanceError("Scoring a tokenized dataset needs the tokenizer to pad its batches.")
            collator = DataCollatorWithPadding(tokenizer)
            columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in data.column_names]
            rows = [dict(r) for r in data.select_columns(columns)]
            data = [dict(collator(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
        torch.manual_seed(seed)  # nothing here is random in eval mode; this only pins down exotic models
        gradients = gate_gradients(
            model,
            data,
            square=method == "fisher",
            label_free=label_free,
            base=base_gates,
            progress=progress,
            description=f"importance ({method})",
        )
        heads, neurons, mlps = gradients.heads, gradients.neurons, gradients.mlps
        n_batches, n_examples = gradients.n_batches, gradients.n_examples
        if n_batches == 0:
            raise ImportanceError("No batches to compute importance on: the data is empty.")
        if method == "gradient":  # E_x |dL/dg|: the mean over batches; Fisher stays a sum (Kwon et al.)
            heads = [h / n_batches for h in heads]
            neurons = [n / n_batches for n in neurons]
            mlps = mlps / n_batches
        meta.update(n_batches=n_batches, n_examples=n_examples, label_free=label_free)
    else:
        heads, neurons, mlps = _magnitudes(model) if method == "magnitude" else _random_scores(model, seed)
        if base_gates is not None:
            heads, neurons, mlps = _apply_mask(heads, neurons, mlps, base_gates)
            if method == "magnitude":  # a partly masked FFN is measured on the neurons it keeps
                mlps = np.asarray([float(np.sqrt(np.sum(n**2))) for n in neurons])
        meta.update(n_batches=0, n_examples=0, label_free=False)
    if normalize:
        heads, neurons = _normalise(heads), _normalise(neurons)
        mlps = _normalise([np.asarray(mlps)])[0]
    meta.update(
        base_mask=_mask_summary(base_gates),
        layers_indexed_from=0,
        wall_seconds=round(time.perf_counter() - started, 4),
        slimformer_version=__version__,
    )
    return ImportanceScores(heads=heads, neurons=neurons, mlps=np.asarray(mlps), method=method, meta=meta)


# ------------------------------------------------------------------------------------------------ front door


def cache_key(
    fingerprint: str,
    sample_hash: str | None,
    *,
    method: str,
    label_free: bool,
    normalize: bool,
    batch_size: int,
    seed: int,
    base_gates: Gates | None,
    n_examples: int | None = None,
    max_length: int | None = None,
) -> str:
    """A hash of everything importance scores depend on."""
    parts = {
        "format": _CACHE_FORMAT,
        "model": fingerprint,
        "data": sample_hash,
        "method": method,
        "label_free": label_free,
        "normalize": normalize,
        "batch_size": batch_size,
        "seed": seed,
        "n_examples": n_examples,
        "max_length": max_length,
        "base_mask": _mask_description(base_gates),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def score_model(
    model: PreTrainedModel | LoadedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    data: TaskData | Dataset | None,
    *,
    method: Method | str = "gradient",
    n_examples: int | None = 256,
    batch_size: int = 32,
    max_length: int = 128,
    split: str | None = None,
    label_free: bool = False,
    normalize: bool = True,
    seed: int = 0,
    plan: PruningPlan | None = None,
    base_gates: Gates | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ImportanceScores:
    """Importance scores of ``model`` on a seeded sample of ``n_examples`` rows of a task (its train split unless
    ``split`` says otherwise), computed in batches of ``batch_size`` truncated to ``max_length`` tokens.

    ``plan`` (or ``base_gates``) keeps what a plan prunes masked while scoring. With ``cache_dir``, results are
    stored as ``cache_dir/importance-<hash>.json``, the hash covering the model fingerprint, the data sample's
    hash, the method, ``label_free``, ``normalize``, ``batch_size``, ``seed`` and the mask; an identical later call
    reads that file instead of computing again.
    """
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    _check_method(method)
    _check_label_free(model, label_free)
    if plan is not None:
        if base_gates is not None:
            raise ImportanceError("Pass plan or base_gates, not both.")
        from slimformer.prune.apply import plan_gates

        base_gates = plan_gates(model, plan)
    _check_base(model, base_gates)

    sample = None
    if method in DATA_METHODS:
        if data is None or tokenizer is None:
            raise ImportanceError(f"The {method!r} method needs data and the tokenizer.")
        sample = importance_sample(
            tokenizer, data, n_examples=n_examples, batch_size=batch_size, max_length=max_length, seed=seed, split=split
        )
    started = time.perf_counter()
    fingerprint = model_fingerprint(model)
    fingerprint_seconds = time.perf_counter() - started

    path = None
    if cache_dir is not None:
        key = cache_key(
            fingerprint,
            sample.hash if sample else None,
            method=method,
            label_free=label_free,
            normalize=normalize,
            batch_size=batch_size if sample else 0,
            seed=seed,
            base_gates=base_gates,
            n_examples=sample.n_examples if sample else None,
            max_length=max_length if sample else None,
        )
        path = Path(cache_dir).expanduser() / f"importance-{key}.json"
        if path.is_file():
            try:
                cached = ImportanceScores.load(path)
            except ImportanceError as error:  # a damaged cache file is recomputed, not fatal
                logger.warning("Ignoring unreadable importance cache %s: %s", path, error)
            else:
                cached.meta["cache"] = {"hit": True, "path": str(path)}
                return cached

    scores = compute_importance(
        model,
        sample.batches if sample else None,
        method=method,
        label_free=label_free,
        normalize=normalize,
        base_gates=base_gates,
        seed=seed,
        progress=progress,
    )
    scores.meta.update(
        model_fingerprint=fingerprint,
        fingerprint_seconds=round(fingerprint_seconds, 4),
        data=sample.description if sample else None,
        batch_size=batch_size if sample else None,
        max_length=max_length if sample else None,
    )
    if path is not None:
        scores.meta["cache"] = {"hit": False, "path": str(path)}
        scores.save(path)
    return scores


__all__ = [
    "DATA_METHODS",
    "METHODS",
    "ImportanceError",
    "ImportanceSample",
    "ImportanceScores",
    "cache_key",
    "compute_importance",
    "importance_sample",
    "model_fingerprint",
    "score_model",
]
