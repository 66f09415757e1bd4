"""Size of a model on disk: its weight files and the whole folder."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from slimformer.measure.base import MeasureError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class DiskSize:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) and of all files of a model folder."""

    weights_bytes: int
    total_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def size_on_disk(path: str | os.PathLike[str]) -> DiskSize:
    """Sizes of a model folder (searched recursively) or of a single file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise MeasureError(f"Cannot measure the size of {root}: it does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    # stat() follows symlinks, so a Hugging Face cache folder (links into blobs/) reports the real sizes.
    sizes = {p: p.stat().st_size for p in files}
    weights = sum(size for p, size in sizes.items() if p.name.endswith(WEIGHT_SUFFIXES))
    return DiskSize(weights_bytes=weights, total_bytes=sum(sizes.values()))


def model_size_on_disk(model: PreTrainedModel) -> DiskSize:
    """Save ``model`` with ``save_pretrained`` (safetensors) to a temporary folder and measure it."""
    # A throwaway save is an implementation detail: hide transformers' "Writing model shards" bar.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="slimformer-size-") as folder:
            model.save_pretrained(folder)
            return size_on_disk(folder)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
