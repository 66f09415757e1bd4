"""Tokenize a task's splits once and keep the result in a cache file that later runs reuse."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from slimformer.errors import TaskError
from slimformer.tasks.data import TaskData

CACHE_ENV = "SLIMFORMER_CACHE"
# Bump when the tokenized layout changes, so that old cache files are not reused.
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """slimformer's cache folder: ``$SLIMFORMER_CACHE``, else ``~/.cache/slimformer``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "slimformer"


def tokenized_cache_dir() -> Path:
    """Where tokenized splits are cached: ``<cache root>/tokenized``."""
    return cache_root() / "tokenized"


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)  # counts added tokens too, unlike .vocab_size
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", 0))


def cache_key(dataset: Dataset, tokenizer: Any, max_length: int, regression: bool, pair: bool) -> str:
    """A hash of everything the tokenized split depends on (the split's content through its fingerprint)."""
    parts = [
        _CACHE_FORMAT,
        dataset._fingerprint,
        str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        _vocab_size(tokenizer),
        max_length,
        regression,
        pair,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "task"


def tokenize_task(
    task_data: TaskData,
    tokenizer: Any,
    max_length: int = 128,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Dataset]:
    """Every split tokenized (truncated to ``max_length``, not padded) with a ``labels`` column.

    The text columns are dropped; ``labels`` is int64 for classes and float32 for regression. Results are
    cached in ``cache_dir`` (default :func:`tokenized_cache_dir`) under a hash of the split's content, the
    tokenizer and ``max_length``, so a second call reads the cache file instead of tokenizing again.
    """
    if max_length < 1:
        raise TaskError(f"max_length must be at least 1, got {max_length}.")
    spec = task_data.spec
    pair = spec.is_pair
    label_dtype = np.float32 if spec.is_regression else np.int64
    directory = Path(cache_dir).expanduser() if cache_dir is not None else tokenized_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(batch["text_a"], batch["text_b"] if pair else None, truncation=True, max_length=max_length)
        result = dict(encoded)
        # A numpy array fixes the Arrow type (float32 / int64) instead of letting it be inferred.
        result["labels"] = np.asarray(batch["label"], dtype=label_dtype)
        return result

    tokenized = {}
    for split, dataset in task_data.splits.items():
        needed = ["text_a", "label"] + (["text_b"] if pair else [])
        missing = [column for column in needed if column not in dataset.column_names]
        if missing:
            raise TaskError(
                f"Split {split!r} of {spec.name} lacks the column(s) {missing}; it has {dataset.column_names}."
            )
        key = cache_key(dataset, tokenizer, max_length, spec.is_regression, pair)
        path = directory / f"{_file_part(spec.name)}-{_file_part(split)}-{key}.arrow"
        # datasets writes the file under a temporary name and renames it, so a crash leaves no partial cache;
        # the explicit fingerprint spares hashing the tokenizer (slow, and not always stable).
        tokenized[split] = dataset.map(
            encode,
            batched=True,
            remove_columns=dataset.column_names,
            cache_file_name=str(path),
            load_from_cache_file=True,
            new_fingerprint=key,
            desc=f"Tokenizing {spec.name} {split}",
        )
    return tokenized


def masked_token_rows(
    rows: list[list[int]], tokenizer: Any, rate: float, seed: int, copies: int = 1
) -> list[list[list[int]]]:
    """``copies`` masked copies of the rows of token ids, one list of rows per copy: each ordinary token (not [CLS],
    [SEP] or padding) replaced by the mask token with probability ``rate``, seeded, so every run draws the same
    copies. Distillation trains on them (TinyBERT's augmentation, Jiao et al. 2020): the teacher is less sure of a
    masked copy than of the training text it has fitted, as it is of unseen text."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise TaskError(
            "Masked copies need a tokenizer with a mask token; this one has none. Leave masked copies at 0."
        )
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    copied = []
    for _ in range(copies):
        masked = []
        for row in rows:
            ids = torch.as_tensor(row, dtype=torch.long)
            chosen = (torch.rand(ids.shape, generator=generator) < rate) & ~torch.isin(ids, special)
            masked.append(torch.where(chosen, torch.tensor(mask_id), ids).tolist())
        copied.append(masked)
    return copied
