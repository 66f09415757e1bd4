"""Storage that shows the sparsity: a weight file whose sparse matrices are kept as a bitmask plus their non-zero
values, so that a model with 90% of its linear weights pruned takes about a fifth of the space on disk.

Why not an existing format: compressed-tensors' ``sparse-bitmask`` compressor was removed in its 0.15 release,
and transformers 5 requires compressed-tensors >= 0.15; a folder written with the old format loads in plain
transformers without an error but with *random* weights in place of the compressed ones. So slimformer writes
its own file, ``model.sparse.safetensors`` (safetensors, so it is safe to load and memory-mappable): every
tensor that is smaller this way becomes ``<name>::values`` (the non-zero entries in row-major order) and
``<name>::bitmask`` (one bit per entry, numpy's ``packbits`` order), with the shape in the file's metadata; all
other tensors are stored as they are. ``sparse-bitmask-int8`` also rounds every matrix (embeddings included) to
int8 with one scale per row (``<name>::scale``) before that: weight-only int8 storage, loaded back as floats (the
scores of such a folder are those of the rounded weights; the benchmark measures them).
:func:`slimformer.load_model` reads such folders (the manifest says ``"weight_storage": "sparse-bitmask"``);
:func:`expand_folder` turns one back into an ordinary folder for plain transformers.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slimformer.errors import SlimformerError

SPARSE_FILE = "model.sparse.safetensors"
DENSE_FILE = "model.safetensors"
STORAGE_KEY = "weight_storage"
BITMASK = "sparse-bitmask"
BITMASK_INT8 = "sparse-bitmask-int8"
STORAGES = ("dense", BITMASK, BITMASK_INT8)
_VALUES, _BITS, _SCALE = "::values", "::bitmask", "::scale"


def _bitmask_pays(tensor: torch.Tensor, value_bytes: int) -> bool:
    nonzero = int(torch.count_nonzero(tensor))
    return nonzero * value_bytes + (tensor.numel() + 7) // 8 < tensor.numel() * value_bytes


def _quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (zeros stay exactly zero): values and one fp32 scale per row."""
    scale = tensor.abs().amax(1).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(tensor.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def compress_state(
    state: dict[str, torch.Tensor], *, int8: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write and the metadata (shapes and dtypes of the encoded ones). Matrices whose zeros pay for
    a bitmask are stored as bitmask + non-zero values; with ``int8`` every floating-point matrix (embeddings
    included) is first rounded to int8 with one scale per row (weight-only: it loads back as floats)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.ndim != 2 or not tensor.is_floating_point() or tensor.numel() == 0:  # zero-width layers too
            tensors[name] = tensor
            continue
        if int8:
            values, scale = _quantize_rows(tensor)
            tensors[name + _SCALE] = scale
        elif _bitmask_pays(tensor, tensor.element_size()):
            values = tensor
        else:
            tensors[name] = tensor
            continue
        record = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "int8": int8}
        if _bitmask_pays(values, values.element_size()):
            flat = values.reshape(-1)
            keep = flat != 0
            tensors[name + _VALUES] = flat[keep].clone()
            tensors[name + _BITS] = torch.from_numpy(np.packbits(keep.numpy()))
            record["bitmask"] = True
        else:
            tensors[name + _VALUES] = values
            record["bitmask"] = False
        encoded[name] = record
    return tensors, {"format": BITMASK_INT8 if int8 else BITMASK, "encoded": json.dumps(encoded)}


def decompress_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    if not metadata or metadata.get("format") not in (BITMASK, BITMASK_INT8):
        raise SlimformerError("Not a sparse-bitmask weight file (its metadata does not say format=sparse-bitmask).")
    encoded = json.loads(metadata["encoded"])
    state = {name: tensor for name, tensor in tensors.items() if not name.endswith((_VALUES, _BITS, _SCALE))}
    for name, record in encoded.items():
        shape, values = record["shape"], tensors[name + _VALUES]
        if record["bitmask"]:
            numel = int(np.prod(shape))
            keep = torch.from_numpy(np.unpackbits(tensors[name + _BITS].numpy())[:numel].astype(bool))
            if int(keep.sum()) != values.numel():
                raise SlimformerError(
                    f"The sparse weight file is damaged: {name} has {values.numel()} values for {int(keep.sum())} "
                    "set bits."
                )
            dense = torch.zeros(numel, dtype=values.dtype)
            dense[keep] = values
            values = dense.reshape(shape)
        dtype = getattr(torch, record["dtype"])
        if record["int8"]:
            values = values.float() * tensors[name + _SCALE][:, None]
        state[name] = values.to(dtype)
    return state


def compact_bytes(model: torch.nn.Module, *, int8: bool = False) -> int:
    """The size the model's weights take in the sparse-bitmask file (tensor bytes, no header)."""
    tensors, _ = compress_state(model.state_dict(), int8=int8)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def compress_folder(folder: str | os.PathLike[str], *, int8: bool = False) -> Path:
    """Replace ``model.safetensors`` in ``folder`` by ``model.sparse.safetensors`` (same tensors, compressed;
    with ``int8``, matrices rounded to int8 per row first)."""
    from safetensors import safe_open

    folder = Path(folder)
    dense = folder / DENSE_FILE
    if not dense.is_file():
        raise SlimformerError(f"{folder} has no {DENSE_FILE} to compress (sharded or .bin weights are not supported).")
    with safe_open(dense, "pt") as handle:
        extra = handle.metadata() or {}
    tensors, metadata = compress_state(load_file(dense), int8=int8)
    target = folder / SPARSE_FILE
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, partial, metadata={**extra, **metadata})
    os.replace(partial, target)
    dense.unlink()
    return target


def is_compact(folder: str | os.PathLike[str]) -> bool:
    folder = Path(folder)
    return (folder / SPARSE_FILE).is_file() and not (folder / DENSE_FILE).is_file()


def expand_folder(folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """An ordinary model folder (dense ``model.safetensors``) from a sparse-bitmask one: written to ``out``, or to
    a temporary folder (removed when the process ends) whose other files link to the originals."""
    from safetensors import safe_open

    folder = Path(folder)
    if out is None:
        target = Path(tempfile.mkdtemp(prefix="slimformer-dense-"))
        atexit.register(shutil.rmtree, target, ignore_errors=True)
    else:
        target = Path(out)
        target.mkdir(parents=True, exist_ok=False)
    for item in folder.iterdir():
        if item.name == SPARSE_FILE:
            continue
        if out is None:
            (target / item.name).symlink_to(item.resolve())
        elif item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)
    path = folder / SPARSE_FILE
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        state = decompress_state(load_file(path), metadata)
    except (OSError, ValueError, KeyError) as error:
        raise SlimformerError(f"Cannot read the sparse weights {path}: {error}") from None
    keep = {k: v for k, v in (metadata or {}).items() if k not in ("format", "encoded")}
    save_file(state, target / DENSE_FILE, metadata=keep or {"format": "pt"})
    if out is not None:
        _mark_dense(target)
    return target


def _mark_dense(folder: Path) -> None:
    from slimformer.folders import MANIFEST

    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        manifest[STORAGE_KEY] = "dense"
        manifest["plain_transformers_loadable"] = manifest.get("remote_code") is None
        manifest_path.write_text(json.dumps(manifest, indent=2))
