"""Weight masks over the encoder's linear layers, at three granularities, and how to choose them by score.

The matrices are the six linear layers of every encoder layer (query, key, value, attention output, FFN up and
down), found through the family's arch spec; embeddings, LayerNorms, biases, the pooler and the task head are
never masked (they are a small share of the weights, and pruning them costs the most accuracy; Kurtic et al. 2023,
"How to Prune Your Language Model"). A mask is boolean, True where a weight survives.

Granularity says which weights share one score and go together:

* ``weight``: every weight alone (unstructured);
* ``block:B``: square ``B x B`` tiles of each matrix (Lagunas et al. 2021, "Block Pruning For Faster
  Transformers"); edge tiles are smaller;
* ``head``: one score per attention head, shared by its query / key / value rows and its attention-output columns,
  and one per FFN neuron, shared by its up-projection row and down-projection column: whatever is pruned is a whole
  head or neuron, so it can be removed physically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import PreTrainedModel

from slimformer.arch import layer_views
from slimformer.errors import SlimformerError

PARTS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")
HEAD_PARTS = ("query", "key", "value")  # a head owns head_size rows of these, and head_size columns of attn_out


class SparsityError(SlimformerError):
    """Masks or sparsity settings that cannot work (wrong shapes, impossible targets, unknown granularity)."""


def encoder_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """``"<layer>.<part>"`` -> the encoder's linear modules that sparse pruning masks, in layer order."""
    return {f"{view.index}.{part}": getattr(view, part) for view in layer_views(model) for part in PARTS}


def dense_weight(module: nn.Linear) -> torch.Tensor:
    """The weight without any mask, whether a torch.nn.utils.prune mask or a parametrization is installed."""
    if hasattr(module, "weight_orig"):
        return module.weight_orig
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations["weight"].original
    return module.weight


# --------------------------------------------------------------------------------------------- granularity


@dataclass(frozen=True)
class Granularity:
    """Which weights share a score: ``weight``, ``block`` (with ``block`` = the tile side) or ``head``."""

    kind: str = "weight"
    block: int = 0

    @classmethod
    def parse(cls, text: str | Granularity) -> Granularity:
        if isinstance(text, Granularity):
            return text
        value = str(text).strip().lower()
        if value in ("weight", "unstructured"):
            return cls("weight")
        if value == "head":
            return cls("head")
        name, _, size = value.partition(":")
        if name == "block" and size.isdigit() and int(size) >= 1:
            return cls("block", int(size))
        raise SparsityError(
            f"Unknown granularity {text!r}: write weight (unstructured), block:B (square B x B tiles, e.g. "
            "block:32) or head (whole heads and FFN neurons)."
        )

    def __str__(self) -> str:
        return f"block:{self.block}" if self.kind == "block" else self.kind

    def score_shape(self, weight_shape: tuple[int, int], part: str, head_size: int) -> tuple[int, ...]:
        """Shape of the score tensor of one matrix (for ``head``, the score is shared across the layer's parts
        and this is the per-unit vector's shape)."""
        rows, cols = weight_shape
        if self.kind == "weight":
            return (rows, cols)
        if self.kind == "block":
            return (math.ceil(rows / self.block), math.ceil(cols / self.block))
        return (unit_count(weight_shape, part, head_size),)

    def expand(self, scores: torch.Tensor, weight_shape: tuple[int, int], part: str, head_size: int) -> torch.Tensor:
        """Group scores (or a group mask) spread to one value per weight (differentiable)."""
        rows, cols = weight_shape
        if self.kind == "weight":
            return scores
        if self.kind == "block":
            tiles = scores.repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
            return tiles[:rows, :cols]
        size = head_size if part in HEAD_PARTS or part == "attn_out" else 1
        units = scores.repeat_interleave(size)
        if part in (*HEAD_PARTS, "ffn_up"):  # a unit owns rows
            return units[:, None].expand(rows, cols)
        return units[None, :].expand(rows, cols)  # attn_out, ffn_down: a unit owns columns

    def reduce(self, values: torch.Tensor, part: str, head_size: int) -> torch.Tensor:
        """Per-weight values summed into the groups (the inverse of :meth:`expand` for scores)."""
        rows, cols = values.shape
        if self.kind == "weight":
            return values
        if self.kind == "block":
            b = self.block
            padded = values.new_zeros(math.ceil(rows / b) * b, math.ceil(cols / b) * b)
            padded[:rows, :cols] = values
            return padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).sum((1, 3))
        size = head_size if part in HEAD_PARTS or part == "attn_out" else 1
        per_line = values.sum(1) if part in (*HEAD_PARTS, "ffn_up") else values.sum(0)
        return per_line.reshape(-1, size).sum(1)


def unit_count(weight_shape: tuple[int, int], part: str, head_size: int) -> int:
    """Heads (attention parts) or neurons (FFN parts) a matrix holds."""
    rows, cols = weight_shape
    if part in HEAD_PARTS:
        return rows // head_size
    if part == "attn_out":
        return cols // head_size
    return rows if part == "ffn_up" else cols


HEADS_UNIT, NEURONS_UNIT = "heads", "neurons"


def layer_unit_key(layer: int | str, kind: str) -> str:
    """The key of one layer's shared score vector at ``head`` granularity (``kind``: heads or neurons)."""
    return f"{layer}.{kind}"


def unit_key(name: str) -> str:
    """The shared score a matrix reads at ``head`` granularity: ``"<layer>.heads"`` or ``"<layer>.neurons"``."""
    layer, part = name.split(".")
    return layer_unit_key(layer, HEADS_UNIT if part in (*HEAD_PARTS, "attn_out") else NEURONS_UNIT)


# --------------------------------------------------------------------------------------------- masks


@dataclass
class WeightMasks:
    """Boolean keep-masks (True = the weight survives) for the encoder's linear weights, by ``"<layer>.<part>"``."""

    masks: dict[str, torch.Tensor]

    @classmethod
    def ones(cls, model: PreTrainedModel) -> WeightMasks:
        return cls(
            {name: torch.ones_like(dense_weight(m), dtype=torch.bool) for name, m in encoder_linears(model).items()}
        )

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> WeightMasks:
        """The masks of a model whose pruned weights are exact zeros (True where a weight is not zero)."""
        return cls({name: (m.weight.detach() != 0).cpu() for name, m in encoder_linears(model).items()})

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    def check(self, model: PreTrainedModel) -> None:
        linears = encoder_linears(model)
        if set(linears) != set(self.masks):
            raise SparsityError(
                f"The weight masks cover {len(self.masks)} matrices, the model has {len(linears)}: they were made "
                "for a model of another shape."
            )
        for name, module in linears.items():
            shape = tuple(dense_weight(module).shape)
            if tuple(self.masks[name].shape) != shape:
                raise SparsityError(
                    f"Weight mask {name} has shape {tuple(self.masks[name].shape)}, the model's weight {shape}: "
                    "the masks were made for a model of another shape."
                )

    def per_matrix(self) -> dict[str, float]:
        """Fraction of each matrix's weights that survive."""
        return {name: float(m.float().mean()) for name, m in self.masks.items()}

    def survival(self, head_size: int) -> tuple[list[list[float]], list[float]]:
        """Fraction of surviving weights per head (its query/key/value rows and attention-output columns) and per
        MLP (its whole FFN up and down matrices)."""
        layers = sorted({int(name.split(".")[0]) for name in self.masks})
        heads, mlps = [], []
        for layer in layers:
            qkv = [self.masks[f"{layer}.{part}"] for part in HEAD_PARTS]
            out = self.masks[f"{layer}.attn_out"]
            n_heads = qkv[0].shape[0] // head_size
            row = []
            for head in range(n_heads):
                rows = slice(head * head_size, (head + 1) * head_size)
                kept = sum(int(m[rows].sum()) for m in qkv) + int(out[:, rows].sum())
                size = sum(m[rows].numel() for m in qkv) + out[:, rows].numel()
                row.append(kept / size if size else 0.0)
            heads.append(row)
            up, down = self.masks[f"{layer}.ffn_up"], self.masks[f"{layer}.ffn_down"]
            size = up.numel() + down.numel()
            mlps.append((int(up.sum()) + int(down.sum())) / size if size else 0.0)
        return heads, mlps

    def save(self, path: str | os.PathLike[str]) -> Path:
        """A compressed .npz of bit-packed masks (about 1/8 byte per weight), written atomically."""
        from slimformer.io import atomic_file

        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for index, mask in enumerate(self.masks.values()):
            arrays[f"bits{index}"] = np.packbits(mask.cpu().numpy().reshape(-1))
            arrays[f"shape{index}"] = np.asarray(mask.shape, dtype=np.int64)
        arrays["names"] = np.asarray(list(self.masks), dtype=str)
        with atomic_file(path, binary=True) as handle:
            np.savez_compressed(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WeightMasks:
        try:
            with np.load(path) as data:
                names = [str(n) for n in data["names"]]
                masks = {}
                for index, name in enumerate(names):
                    shape = tuple(int(s) for s in data[f"shape{index}"])
                    bits = np.unpackbits(data[f"bits{index}"])[: math.prod(shape)]
                    masks[name] = torch.from_numpy(bits.astype(bool).reshape(shape))
        except (OSError, ValueError, KeyError) as error:
            raise SparsityError(f"{path} is not a weight-mask file written by slimformer: {error}") from None
        return cls(masks)


def apply_masks(model: PreTrainedModel, masks: WeightMasks) -> None:
    """Zero the masked weights in place (for good: the values are gone)."""
    masks.check(model)
    with torch.no_grad():
        for name, module in encoder_linears(model).items():
            module.weight.mul_(masks.masks[name].to(module.weight.device, module.weight.dtype))


# --------------------------------------------------------------------------------------------- choosing by score


def group_scores(
    model: PreTrainedModel, per_weight: dict[str, torch.Tensor], granularity: Granularity
) -> dict[str, torch.Tensor]:
    """Per-weight scores summed into the granularity's groups; at ``head`` granularity the matrices of a layer's
    heads (and of its neurons) add into one shared vector, keyed by :func:`unit_key`."""
    head_size = layer_views(model)[0].head_size
    grouped: dict[str, torch.Tensor] = {}
    for name, values in per_weight.items():
        part = name.split(".")[1]
        reduced = granularity.reduce(values.float(), part, head_size)
        key = unit_key(name) if granularity.kind == "head" else name
        grouped[key] = grouped[key] + reduced if key in grouped else reduced
    return grouped


def group_sizes(model: PreTrainedModel, granularity: Granularity) -> dict[str, torch.Tensor]:
    """How many weights each group holds (to count sparsity in weights, not in groups)."""
    ones = {name: torch.ones_like(dense_weight(m), dtype=torch.float32) for name, m in encoder_linears(model).items()}
    return group_scores(model, ones, granularity)


def score_pools(keys: list[str], granularity: Granularity, scope: str) -> list[list[str]]:
    """Which groups compete for one budget: all of them (``global``), or each matrix alone (``layer``). At
    ``head`` granularity heads and FFN neurons never compete with each other (their groups differ in size and
    their scores in scale): each kind has its own budget, across layers (``global``) or per layer."""
    if scope not in ("global", "layer"):
        raise SparsityError(f"scope must be 'global' or 'layer', got {scope!r}.")
    if scope == "layer":
        return [[key] for key in keys]
    if granularity.kind == "head":
        return [
            pool
            for pool in ([k for k in keys if k.endswith(f".{kind}")] for kind in (HEADS_UNIT, NEURONS_UNIT))
            if pool
        ]
    return [list(keys)]


def keep_top(
    scores: dict[str, torch.Tensor],
    sizes: dict[str, torch.Tensor],
    sparsity: float,
    pools: list[list[str]],
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks over the groups: in each pool the highest-scoring groups survive until ``1 - sparsity``
    of the pool's weights are kept. Groups of unequal size (edge tiles) count by their weights. Ties go to the
    group that comes first, so the choice is deterministic."""
    check_sparsity(sparsity)
    keep: dict[str, torch.Tensor] = {}
    for names in pools:
        flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
        weights = torch.cat([sizes[n].reshape(-1).float().cpu() for n in names])
        order = torch.argsort(flat, descending=True, stable=True)
        budget = (1.0 - sparsity) * float(weights.sum())
        # keep groups in score order while their weights fit the budget (the last one rounds to the nearest)
        cumulative = torch.cumsum(weights[order], 0)
        n_keep = int(torch.searchsorted(cumulative, torch.tensor(budget), right=True))
        used = float(cumulative[n_keep - 1]) if n_keep else 0.0
        if n_keep < len(order) and budget - used > float(weights[order[n_keep]]) / 2:
            n_keep += 1
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order[:n_keep]] = True
        start = 0
        for name in names:
            size = scores[name].numel()
            keep[name] = chosen[start : start + size].reshape(scores[name].shape)
            start += size
    return keep


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise SparsityError(f"sparsity {sparsity!r} is impossible: it is the fraction of weights to remove, in [0, 1).")


def expand_masks(model: PreTrainedModel, groups: dict[str, torch.Tensor], granularity: Granularity) -> WeightMasks:
    """Per-weight masks from per-group ones (see :func:`keep_top`)."""
    head_size = layer_views(model)[0].head_size
    masks = {}
    for name, module in encoder_linears(model).items():
        part = name.split(".")[1]
        key = unit_key(name) if granularity.kind == "head" else name
        shape = tuple(dense_weight(module).shape)
        masks[name] = granularity.expand(groups[key], shape, part, head_size).clone().cpu()
    return WeightMasks(masks)


def magnitude_masks(
    model: PreTrainedModel, sparsity: float, *, granularity: str | Granularity = "weight", scope: str = "global"
) -> WeightMasks:
    """One-shot magnitude pruning: remove ``sparsity`` of the encoder's linear weights, the groups with the
    smallest summed absolute value first (Han et al. 2015; the m-pruning of Prasanna et al. 2020 in one step).
    Weights already zero count as pruned."""
    granularity = Granularity.parse(granularity)
    magnitudes = {name: dense_weight(m).detach().abs() for name, m in encoder_linears(model).items()}
    scores = group_scores(model, magnitudes, granularity)
    pools = score_pools(list(scores), granularity, scope)
    return expand_masks(model, keep_top(scores, group_sizes(model, granularity), sparsity, pools), granularity)


# --------------------------------------------------------------------------------------------- masks installed


class MaskedWeights:
    """Weight masks installed with :func:`torch.nn.utils.prune.custom_from_mask`; :meth:`set` swaps the masks in
    place (no re-installing), for many evaluations or a training run whose masks change (GMP)."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules

    def set(self, masks: WeightMasks) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                buffer = module.weight_mask
                buffer.copy_(masks.masks[name].to(buffer.device, buffer.dtype))


@contextmanager
def masked_weights(model: PreTrainedModel, masks: WeightMasks, *, restore: bool = True) -> Iterator[MaskedWeights]:
    """Apply ``masks`` to the encoder's weights for the ``with`` block (training included): a masked weight is
    exactly zero in every forward pass and gets no gradient.

    On exit the masks are taken off again (``prune.remove``). With ``restore=True`` (for evaluations) the weights
    get their original values back, so the model is exactly as before; with ``restore=False`` (after training)
    the trained weights stay, with the masked entries zero.
    """
    masks.check(model)
    linears = encoder_linears(model)
    originals = {n: m.weight.detach().clone() for n, m in linears.items()} if restore else {}
    installed = []
    try:
        for name, module in linears.items():
            prune.custom_from_mask(module, "weight", masks.masks[name].to(module.weight.device))
            installed.append(name)
        yield MaskedWeights(linears)
    finally:
        for name in installed:
            module = linears[name]
            prune.remove(module, "weight")
            if restore:
                with torch.no_grad():
                    module.weight.copy_(originals[name])
