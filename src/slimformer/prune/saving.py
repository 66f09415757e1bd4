"""Save pruned models as ordinary Hugging Face folders, and rebuild unevenly pruned ones on load.

A folder holds safetensors weights, the config, the tokenizer and ``slimformer.json`` (the plan and per-layer
shapes). transformers builds every layer from one config, so a model whose layers differ, or whose heads were
pruned (BERT-family configs derive the head size from hidden size / head count), records its shapes in the
config as ``slimformer_layout`` and is rebuilt by :func:`slimformer.load_model`. A model whose layers all keep
every head and share one FFN width (FFN pruning, layer dropping) needs nothing: plain
``AutoModelForSequenceClassification.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

import slimformer
from slimformer.arch import layer_views
from slimformer.errors import ModelLoadError
from slimformer.io import atomic_directory, write_json_atomic
from slimformer.layout import LAYOUT_KEY, rebuild_layout
from slimformer.models import quiet_transformers
from slimformer.prune.plan import PruningPlan

MANIFEST = "slimformer.json"


def save_pruned(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    plan: PruningPlan | None = None,
    extra: dict[str, Any] | None = None,
    json_files: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (pruned or not), its tokenizer, a manifest and any ``json_files`` (name -> data) to
    ``out_dir`` atomically: the folder appears complete or not at all."""
    views = layer_views(model)
    manifest = {
        "slimformer_version": slimformer.__version__,
        "model_type": model.config.model_type,
        "layers": [{"heads": v.num_heads, "ffn": v.ffn_size} for v in views],
        "plain_transformers_loadable": not hasattr(model.config, LAYOUT_KEY),
        "plan": plan.to_dict() if plan is not None else None,
        **(extra or {}),
    }
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as staging, quiet_transformers():
            model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            write_json_atomic(staging / MANIFEST, manifest)
            for name, data in (json_files or {}).items():
                write_json_atomic(staging / name, data)
    except FileExistsError:
        raise ModelLoadError(f"{out_dir} already exists; choose another output folder or overwrite it.") from None
    return out_dir


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(model_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _load_weights(model_dir: Path) -> dict:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        state: dict = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(model_dir / shard))
        return state
    raise ModelLoadError(f"{model_dir} has no model.safetensors weights to load a pruned model from.")


def load_pruned(model_dir: str | os.PathLike[str], config: PretrainedConfig) -> PreTrainedModel:
    """Build the model described by ``config`` (with its ``slimformer_layout``) and load its weights strictly."""
    model_dir = Path(model_dir)
    layout = getattr(config, LAYOUT_KEY)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_config(config)
    rebuild_layout(model, layout)
    state = _load_weights(model_dir)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"The weights in {model_dir} do not match its recorded layout: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. The folder may be damaged; save it again."
        )
    return model.eval()
