"""Model folders: how slimformer writes a model to disk and reads its weights back.

Every command that writes a model (``finetune``, ``prune``, ``budget``, ``distill``) writes the same kind of folder
through :func:`save_model_folder`: an ordinary Hugging Face folder (safetensors weights, config, tokenizer) plus
``slimformer.json``, the manifest (slimformer version, per-layer shapes, the pruning plan if any, the task if
known), plus any JSON files the command adds (``metrics.json``, ``plan.json``), plus a model card (``README.md``,
:mod:`slimformer.card`). The folder appears complete or not at all.

transformers builds every layer from one config, so a model whose layers differ, or whose heads were pruned
(BERT-family configs derive the head size from hidden size / head count), records its shapes in the config as
``slimformer_layout`` and is rebuilt by :func:`load_pruned` (called by :func:`slimformer.load_model`); such a folder
also carries ``modeling_slimformer.py`` (:mod:`slimformer.remote_code`), so plain transformers loads it with
``trust_remote_code=True``. A model whose layers all keep every head and share one FFN width (FFN pruning, layer
dropping) needs neither: plain ``AutoModelForSequenceClassification.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from slimformer._version import __version__
from slimformer.aliases import base_model_id
from slimformer.arch import layer_views
from slimformer.embedding import is_sentence_embedder
from slimformer.errors import ModelLoadError
from slimformer.io import atomic_directory, write_json_atomic
from slimformer.layout import LAYOUT_KEY, rebuild_layout
from slimformer.remote_code import MODELING_FILE, auto_map_for_saving, needs_remote_code, write_remote_code

if TYPE_CHECKING:  # prune writes folders, so folders only names its plans
    from slimformer.prune.plan import PruningPlan

MANIFEST = "slimformer.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' warnings and its per-call progress bars (loading / writing weights); our own
    progress bars say what is happening."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ writing


def model_record(model: PreTrainedModel) -> dict[str, Any]:
    """What every manifest says about the model itself: slimformer version, family, per-layer shapes, base model."""
    return {
        "slimformer_version": __version__,
        "model_type": model.config.model_type,
        "layers": [{"heads": v.num_heads, "ffn": v.ffn_size} for v in layer_views(model)],
        "base_model": base_model_id(getattr(model.config, "name_or_path", None)),
    }


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    plan: PruningPlan | None = None,
    task: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    json_files: dict[str, Any] | None = None,
    overwrite: bool = False,
    weight_storage: str = "dense",
) -> Path:
    """Write ``model`` (pruned or not), its tokenizer, the manifest and any ``json_files`` (name -> data) to
    ``out_dir`` atomically: the folder appears complete or not at all.

    ``weight_storage``: ``dense`` (an ordinary ``model.safetensors``), ``sparse-bitmask`` (sparse matrices as a
    bitmask plus their non-zero values, :mod:`slimformer.sparse.storage`: smaller for a sparse model, read by
    :func:`slimformer.load_model`, not by plain transformers) or ``sparse-bitmask-int8`` (the same after rounding
    every matrix to int8 per row: lossy, smallest).

    The manifest records the per-layer shapes, ``plan`` (the pruning plan the model was made with, if any),
    ``task`` (a JSON-able description of the task the model was trained or pruned for, if known) and ``extra``.
    """
    from slimformer.sparse.storage import BITMASK_INT8, STORAGE_KEY, STORAGES, compress_folder

    if weight_storage not in STORAGES:
        raise ModelLoadError(f"Unknown weight storage {weight_storage!r}: choose one of {', '.join(STORAGES)}.")
    needs_code = needs_remote_code(model.config)
    embedder = is_sentence_embedder(model)
    manifest = {
        **model_record(model),
        "model_kind": "sentence-embedding" if embedder else "task-model",
        "pooling": model.pooling.to_dict() if embedder else None,
        "plain_transformers_loadable": not needs_code and weight_storage == "dense",
        STORAGE_KEY: weight_storage,
        # otherwise transformers loads it with trust_remote_code=True through this generated file
        "remote_code": MODELING_FILE if needs_code else None,
        "plan": plan.to_dict() if plan is not None else None,
        "task": task,
        **(extra or {}),
    }
    out_dir = Path(out_dir)
    try:
        with (
            atomic_directory(out_dir, overwrite=overwrite) as staging,
            quiet_transformers(),
            # a sentence-embedding model's loading code is its encoder's (sentence-transformers loads AutoModel)
            auto_map_for_saving(model.encoder if embedder else model) as needs_code,
        ):
            model.save_pretrained(staging)
            if weight_storage != "dense":
                compress_folder(staging, int8=weight_storage == BITMASK_INT8)
            if needs_code:
                write_remote_code(model.encoder if embedder else model, staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            write_json_atomic(staging / MANIFEST, manifest)
            for name, data in (json_files or {}).items():
                write_json_atomic(staging / name, data)
            from slimformer.card import write_card  # the card reads this folder's files (and names them)

            write_card(staging, location=str(out_dir))
    except FileExistsError:
        raise ModelLoadError(f"{out_dir} already exists; choose another output folder or overwrite it.") from None
    return out_dir


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's ``slimformer.json``, or None for a folder slimformer did not write."""
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ reading


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The folder's safetensors files: ``model.safetensors``, or the shards its index lists (none if neither)."""
    model_dir = Path(model_dir)
    single = model_dir / WEIGHTS
    if single.is_file():
        return [single]
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        return [model_dir / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def _damaged(path: str | os.PathLike[str], error: Exception) -> ModelLoadError:
    # safetensors' messages carry a fixed prefix and may span lines; keep the reason and one line
    reason = " ".join(str(error).removeprefix("Error while deserializing header:").split()) or type(error).__name__
    return ModelLoadError(
        f"{path} is damaged (cut short, or not a safetensors file): {reason}. Save or download it again."
    )


def damaged_weights_error(source: str | os.PathLike[str], error: Exception) -> ModelLoadError:
    """The error to raise when loading ``source`` failed on unreadable weights: it names the file that cannot be
    read (each file's header is checked), or ``source`` itself when that is not a local folder."""
    if Path(source).is_dir():
        for path in weight_files(source):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except SafetensorError as damaged:
                return _damaged(path, damaged)
    return _damaged(source, error)


def load_weights(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor of the folder's safetensors file(s), by name; a damaged file is a :class:`ModelLoadError`."""
    files = weight_files(model_dir)
    if not files:
        raise ModelLoadError(f"{model_dir} has no model.safetensors weights to load a pruned model from.")
    state: dict[str, Any] = {}
    for path in files:
        try:
            state.update(load_file(path))
        except SafetensorError as error:
            raise _damaged(path, error) from error
    return state


def load_pruned(
    model_dir: str | os.PathLike[str], config: PretrainedConfig, auto_class: Any = AutoModelForSequenceClassification
) -> PreTrainedModel:
    """Build the model described by ``config`` (with its ``slimformer_layout``) as ``auto_class`` builds it (the
    task model; ``AutoModel`` for the encoder of a sentence-embedding model) and load its weights strictly."""
    model_dir = Path(model_dir)
    layout = getattr(config, LAYOUT_KEY)
    with quiet_transformers():
        model = auto_class.from_config(config)
    rebuild_layout(model, layout)
    state = load_weights(model_dir)
    if getattr(model, "pooler", None) is not None and not any(key.startswith("pooler.") for key in state):
        model.pooler = None  # a sentence-embedding encoder is saved without the pooler it does not use
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"The weights in {model_dir} do not match its recorded layout: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. The folder may be damaged; save it again."
        )
    return model.eval()


__all__ = [
    "MANIFEST",
    "damaged_weights_error",
    "load_pruned",
    "load_weights",
    "model_record",
    "quiet_transformers",
    "read_manifest",
    "save_model_folder",
    "weight_files",
]
