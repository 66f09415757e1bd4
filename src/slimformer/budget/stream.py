"""Calibration activations advanced one transformer layer at a time, for the layer-wise least-squares refit.

The refit (:mod:`slimformer.budget.tune`) needs, for every sub-layer in order, the pruned model's input to that
sub-layer and the dense model's output of it, over the whole calibration set. Running both models from the
embeddings up to each sub-layer costs O(L^2) layer passes, and keeping every dense sub-layer output costs
calibration tokens x 2L x hidden floats (about 19 GB for all-mpnet-base-v2 at 2,048 x 128 tokens). Instead,
:func:`walk_sublayers` keeps only the current layer's input of both models (the *dense* and the *pruned*
stream) and calls that one layer directly, so memory is one layer's activations and time is O(L) layer passes.
The pruned layer's attention runs once per batch: all supported families are post-LN, so the FFN step computes
the FFN block's input as the attention LayerNorm of the layer's input plus the (refitted) output projection of
the contexts the attention step saw, and the layer's output as the FFN LayerNorm of that input plus the (refitted)
down projection of the activations the FFN step computed.

Calling one layer needs the arguments the encoder gives every layer besides the hidden states (the prepared
attention mask, MPNet's relative-position bias, ...). They are the same for every layer in all supported families,
so they are read off the first layer's call with a forward pre-hook, per batch, when needed (recomputing them is
an embedding lookup, cheaper than keeping MPNet's [batch, heads, seq, seq] position bias for every batch).

Activations live in RAM while they fit ``max_memory`` bytes, and are spilled to memory-mapped files in a
temporary folder beyond it (:class:`ActivationStore`).

The dense stream itself can be skipped: the budget pruner's Fisher already runs the dense model (every gate at 1)
over the same calibration set, and :class:`DenseTargets` records the sub-layer outputs the refit needs during that
pass, so the refit makes no dense pass of its own.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import PreTrainedModel

from slimformer.arch import LayerView, classifier_modules, get_spec, layer_list, layer_view, layer_views, resolve
from slimformer.gates import Gates, gated
from slimformer.gradients import model_inputs
from slimformer.measure.memory import HeapTrimmer

# of the memory available when the refit starts, the share its stored activations may take by default
DEFAULT_MEMORY_SHARE = 0.5
# of that budget, the share the dense targets recorded during the Fisher may hold in RAM; the rest is memory-mapped
# from disk, which costs them little (written once in order, read back once, a layer at a time). At a quarter,
# all-mpnet-base-v2 on 2,048 MRPC pairs peaked at 6.05 GiB (2.3 GiB of the 6.8 recorded in RAM)
RECORDED_MEMORY_SHARE = 0.125
PARTS = ("attention", "ffn")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what is needed has been seen."""


def default_max_memory() -> int:
    """Bytes the refit's stored activations may take when the user names no budget: a share of available RAM."""
    return int(DEFAULT_MEMORY_SHARE * psutil.virtual_memory().available)


class MemoryBudget:
    """Bytes the activation stores of one refit hold in RAM, against a limit shared by all of them."""

    def __init__(self, limit_bytes: int | None):
        self.limit = default_max_memory() if limit_bytes is None else int(limit_bytes)
        self.used = 0
        self.peak = 0
        self.spilled = 0  # bytes written to disk instead

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes


class ActivationStore:
    """One tensor per calibration batch, in RAM while the shared :class:`MemoryBudget` allows, else in a
    memory-mapped file of ``spill_dir`` (read back lazily by the operating system, never all at once)."""

    def __init__(self, budget: MemoryBudget, spill_dir: Callable[[], Path], name: str):
        self._budget = budget
        self._spill_dir = spill_dir
        self._name = name
        self._items: dict[int, torch.Tensor] = {}
        self._devices: dict[int, torch.device] = {}  # where a spilled tensor came from (and goes back to)
        self._in_ram: dict[int, int] = {}  # index -> bytes counted against the budget
        self.columns: torch.Tensor | None = None  # for stores of units: which input columns they hold

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        self._drop(index)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if self._budget.take(nbytes):
            self._items[index] = tensor
            self._in_ram[index] = nbytes
            return
        path = self._spill_dir() / f"{self._name}-{index}.pt"
        torch.save(tensor.cpu().contiguous(), path)
        self._items[index] = torch.load(path, mmap=True, weights_only=True)
        self._devices[index] = tensor.device
        self._budget.spilled += nbytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, index: int) -> bool:
        return index in self._items

    def __getitem__(self, index: int) -> torch.Tensor:
        tensor = self._items[index]
        return tensor.to(self._devices[index]) if index in self._devices else tensor

    def discard(self, index: int) -> None:
        """Forget one batch's tensor (its RAM goes back to the budget)."""
        self._drop(index)

    def _drop(self, index: int) -> None:
        self._items.pop(index, None)
        self._devices.pop(index, None)
        if index in self._in_ram:
            self._budget.give_back(self._in_ram.pop(index))

    def clear(self) -> None:
        for index in list(self._items):
            self._drop(index)


@dataclass
class SublayerBatch:
    """For the real tokens of one calibration batch: the sub-layer's residual input ``x`` and its projection's
    un-gated input ``units`` in the pruned model, and the dense model's sub-layer output before its LayerNorm
    (``target``; None when no dense stream is kept). For the task head's output layer, one row per example: its
    input in the pruned model, the dense model's logits, and no residual (``x`` None)."""

    x: torch.Tensor | None
    units: torch.Tensor
    target: torch.Tensor | None
    # the columns of the projection's input that ``units`` holds, in order (None: all of them); a pruned layer
    # run with its pruned units removed gives only the kept ones
    columns: torch.Tensor | None = None
    # how much each row counts in the least-squares fit ([rows]; None: every row alike): see DenseTargets
    weights: torch.Tensor | None = None

    def kept_units(self, columns: torch.Tensor) -> torch.Tensor:
        """``units`` at these columns of the projection's input."""
        if self.columns is None:
            return self.units[:, columns.to(self.units.device)]
        positions = torch.searchsorted(self.columns, columns.to(self.columns.device))
        if not torch.equal(self.columns[positions.clamp_max(len(self.columns) - 1)], columns.to(self.columns.device)):
            raise ValueError("asked for units the pruned layer does not keep")
        return self.units[:, positions.to(self.units.device)]


def _capture(module: nn.Module, store: dict, key: str, *, output: bool = False, stop: bool = False):
    """A hook that stores the module's first input (or its output) in ``store[key]``, optionally ending the pass."""
    if output:

        def hook(mod, args, result):
            store[key] = result[0] if isinstance(result, tuple) else result
            if stop:
                raise _Stop

        return module.register_forward_hook(hook)

    def pre_hook(mod, args, kwargs):
        store[key] = args[0] if args else kwargs["hidden_states"]
        if stop:
            raise _Stop

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _real_tokens(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The real (unpadded) tokens only, as [tokens, width]. Length-grouped batches are often unpadded: a view
    then, not a masked copy."""
    if valid is None or bool(valid.all()):
        return t.reshape(-1, t.shape[-1])
    return t[valid]


def _rows(t: torch.Tensor, valid: torch.Tensor | None, first_token: bool) -> torch.Tensor:
    """The rows a sub-layer is fitted on: every real token, or only each example's first one."""
    return t[:, 0] if first_token else _real_tokens(t, valid)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def projection(view: LayerView, part: str) -> nn.Linear:
    """The sub-layer's output projection: attention output (o) or FFN down."""
    return view.attn_out if part == "attention" else view.ffn_down


# bytes of the per-batch layer arguments (attention masks, MPNet's position bias) :class:`_LayerCalls` keeps
# instead of recomputing them for every batch and sub-layer, which costs an embedding pass each time (about 2 s of
# MiniLM-L6's 21 s refit on 2,048 STS-B pairs; on all-mpnet-base-v2 with its position bias about 30 ms a call, 24
# calls per batch). MPNet's [batch, heads, seq, seq] bias for 2,048 MRPC pairs grouped by length takes about
# 0.3 GiB; beyond the cap the rest is computed again, so the refit's peak memory stays bounded
LAYER_CALLS_CACHE_BYTES = 512 * 2**20


def _tensor_bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


class _LayerCalls:
    """What the encoder passes each layer for one batch: the embeddings' output and the other arguments. The other
    arguments are kept per batch while they fit ``cache_bytes``, else computed again (an embedding pass)."""

    def __init__(
        self,
        model: PreTrainedModel,
        batches: Sequence[dict[str, torch.Tensor]],
        device: torch.device,
        cache_bytes: int | None = None,
    ):
        self.model = model
        self.batches = batches
        self.device = device
        self.first_layer = layer_list(model)[0]
        self.cache_bytes = LAYER_CALLS_CACHE_BYTES if cache_bytes is None else cache_bytes
        self._cached: dict[int, tuple[tuple, dict, torch.Tensor | None]] = {}
        self._cached_bytes = 0

    def __call__(self, index: int) -> tuple[torch.Tensor, tuple, dict, torch.Tensor | None]:
        inputs = model_inputs(self.batches[index], self.device)
        seen: dict = {}

        def pre_hook(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            raise _Stop

        handle = self.first_layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(**inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        args, kwargs = seen["args"], dict(seen["kwargs"])
        hidden = args[0] if args else kwargs.pop("hidden_states")
        valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        self._keep(index, tuple(args[1:]), kwargs, valid)
        return hidden, tuple(args[1:]), kwargs, valid

    def valid(self, index: int) -> torch.Tensor | None:
        """The real-token mask of batch ``index``, without running anything."""
        mask = self.batches[index].get("attention_mask")
        return mask.to(self.device).bool() if mask is not None else None

    def arguments(self, index: int) -> tuple[tuple, dict, torch.Tensor | None]:
        """The layer arguments besides the hidden states, and the real-token mask, for batch ``index``."""
        if index in self._cached:
            return self._cached[index]
        return self(index)[1:]

    def _keep(self, index: int, args: tuple, kwargs: dict, valid: torch.Tensor | None) -> None:
        if index in self._cached:
            return
        nbytes = _tensor_bytes([*args, *kwargs.values(), valid])
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cached[index] = (args, kwargs, valid)
            self._cached_bytes += nbytes


def _run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """One layer's output (None when a hook stopped it early)."""
    try:
        with torch.no_grad():
            return _first(layer(hidden, *args, **kwargs))
    except _Stop:
        return None


class DenseTargets:
    """The dense model's sub-layer outputs before their LayerNorm (the refit's targets) over the calibration set,
    recorded while another full pass runs the dense model: the budget pruner's Fisher, whose gates are all 1, so
    the model computes exactly the dense outputs. The refit given these makes no dense pass of its own (one forward
    pass over the calibration set fewer). The recorded pass may cut the calibration batches into smaller pieces
    by rows (the Fisher's micro-batches); the pieces are joined back into the refit's batches when read.

    What is recorded takes RAM up to ``RECORDED_MEMORY_SHARE`` of ``max_memory`` (default: half the memory
    available) and is memory-mapped from files in ``spill_dir`` beyond it. Use as a context manager (or call
    :meth:`close`): the files go when it ends.

    ``token_weighting`` > 0 also records, from the recorded pass's backward (the Fisher's), how sensitive the loss is
    to each token's sub-layer output: the squared norm of its gradient at the sub-layer's LayerNorm input, the
    quantity the refit reconstructs. :meth:`weights` gives each token ``1 - b + b * s / mean(s)`` for b =
    ``token_weighting``: with b = 1 the refit minimises sum_t ||g_t||^2 ||e_t||^2, a diagonal (per token, isotropic)
    stand-in for the second-order loss increase E[(sum_t g_t . e_t)^2] of leaving errors e_t; with b = 0 every token
    counts alike (the plain reconstruction).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        last_layer_rows: str = "all",
        head: bool = False,
        max_memory: int | None = None,
        spill_dir: str | os.PathLike | None = None,
        token_weighting: float = 0.0,
    ):
        if not 0.0 <= token_weighting <= 1.0:
            raise ValueError(f"token_weighting must be in [0, 1], got {token_weighting!r}")
        self.token_weighting = float(token_weighting)
        limit = default_max_memory() if max_memory is None else int(max_memory)
        self.budget = MemoryBudget(int(RECORDED_MEMORY_SHARE * limit))
        self.max_memory = limit
        self.n_layers = len(layer_views(model))
        # what is recorded is kept in the model's dtype, also when the recorded pass ran under autocast
        self.dtype = next(model.parameters()).dtype
        self.first_token_last = last_layer_rows == "first"
        self.head = head
        self._stack = ExitStack()
        self._folder: Path | None = None

        def spill() -> Path:
            if self._folder is None:
                made = tempfile.TemporaryDirectory(dir=spill_dir, prefix="dense-targets-")
                self._folder = Path(self._stack.enter_context(made))
            return self._folder

        self.stores = {
            (layer, part): ActivationStore(self.budget, spill, f"dense-{layer}-{part}")
            for layer in range(self.n_layers)
            for part in PARTS
        }
        self.logits = ActivationStore(self.budget, spill, "dense-logits")
        # the squared gradient norms per token (token_weighting), and their sums and counts per sub-layer
        self.sensitivity = {
            key: ActivationStore(self.budget, spill, f"sensitivity-{key[0]}-{key[1]}") for key in self.stores
        }
        self._sensitivity_sums = {key: [0.0, 0] for key in self.stores}
        self.piece_rows: list[int] = []  # rows of every recorded forward pass, in order
        self._pieces: list[list[int]] | None = None  # the pieces of each calibration batch, once matched

    def __enter__(self) -> DenseTargets:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._clear()
        self._stack.close()
        self._folder = None

    def _clear(self) -> None:
        for store in (*self.stores.values(), *self.sensitivity.values(), self.logits):
            store.clear()
        self._sensitivity_sums = {key: [0.0, 0] for key in self.stores}
        self.piece_rows.clear()
        self._pieces = None

    @contextmanager
    def recording(self, model: PreTrainedModel) -> Iterator[DenseTargets]:
        """Record every forward pass of ``model`` inside the block (what an earlier recording held is dropped).
        The model must run as the dense model: no gate below 1, weights as the refit will start from them."""
        self._clear()
        views = layer_views(model)
        if len(views) != self.n_layers:
            raise ValueError(f"recorded for {self.n_layers} layers, the model has {len(views)}")
        piece: dict = {}
        seen: dict[int, dict] = {}

        def on_model(module, args, kwargs):
            inputs = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            rows = inputs if isinstance(inputs, torch.Tensor) else mask
            piece["index"] = len(self.piece_rows)
            piece["valid"] = mask.bool() if mask is not None else None
            self.piece_rows.append(int(rows.shape[0]))

        def keep(layer: int, part: str, value: torch.Tensor) -> None:
            first = self.first_token_last and layer == self.n_layers - 1
            self.stores[layer, part][piece["index"]] = _rows(value.detach(), piece["valid"], first).to(self.dtype)

        def watch(layer: int, part: str):
            """A pre-hook on the sub-layer's LayerNorm: its input's gradient, when the backward reaches it, gives
            each token's sensitivity."""
            first = self.first_token_last and layer == self.n_layers - 1

            def on_norm_input(mod, args):
                value = args[0]
                if not value.requires_grad:
                    return
                index, valid = piece["index"], piece["valid"]

                def on_gradient(grad):
                    squares = _rows(grad.detach().float().pow(2).sum(-1, keepdim=True), valid, first).squeeze(-1)
                    self.sensitivity[layer, part][index] = squares
                    sums = self._sensitivity_sums[layer, part]
                    sums[0] += float(squares.sum(dtype=torch.float64))
                    sums[1] += int(squares.numel())

                value.register_hook(on_gradient)

            return on_norm_input

        def layer_hooks(view: LayerView) -> list:
            i = view.index

            def on_input(mod, args, kwargs):
                seen[i] = {"x": args[0] if args else kwargs["hidden_states"]}

            def on_attention(mod, args, output):
                seen[i]["attention"] = _first(output)

            def on_ffn_input(mod, args):
                seen[i]["ffn x"] = args[0]

            def on_ffn(mod, args, output):
                got = seen.pop(i)
                with torch.no_grad():
                    keep(i, "attention", got["x"].detach() + got["attention"].detach())
                    keep(i, "ffn", got["ffn x"].detach() + _first(output).detach())

            return [
                view.layer.register_forward_pre_hook(on_input, with_kwargs=True),
                view.attn_out.register_forward_hook(on_attention),
                view.ffn_up.register_forward_pre_hook(on_ffn_input),
                view.ffn_down.register_forward_hook(on_ffn),
            ]

        def on_logits(mod, args, output):
            self.logits[piece["index"]] = _first(output).detach().to(self.dtype)

        handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
        for view in views:
            handles.extend(layer_hooks(view))
        if self.token_weighting > 0:
            spec = get_spec(model)
            for view in views:
                for part, path in (("attention", spec.attn_norm), ("ffn", spec.ffn_norm)):
                    handles.append(resolve(view.layer, path).register_forward_pre_hook(watch(view.index, part)))
        if self.head:
            handles.append(output_layer(model).register_forward_hook(on_logits))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def match(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        """Find the recorded pieces of each of ``batches`` (the refit's calibration batches): they must be the
        same rows in the same order, each batch cut into whole pieces."""
        pieces: list[list[int]] = []
        position = 0
        for batch in batches:
            rows, taken = int(batch["input_ids"].shape[0]), []
            while rows > 0 and position < len(self.piece_rows):
                rows -= self.piece_rows[position]
                taken.append(position)
                position += 1
            if rows != 0:
                break
            pieces.append(taken)
        if len(pieces) != len(batches) or position != len(self.piece_rows):
            raise ValueError(
                f"the recorded pass ({len(self.piece_rows)} pieces, {sum(self.piece_rows)} rows) did not see these "
                f"{len(batches)} calibration batches ({sum(int(b['input_ids'].shape[0]) for b in batches)} rows)"
            )
        self._pieces = pieces

    def _joined(self, store: ActivationStore, index: int) -> torch.Tensor:
        parts = [store[piece] for piece in self._pieces[index]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def targets(self, layer: int) -> dict[str, _RecordedTargets]:
        """The layer's two sub-layer targets, indexed by calibration batch; ``clear()`` frees them."""
        return {part: _RecordedTargets(self, self.stores[layer, part]) for part in PARTS}

    def head_logits(self, index: int) -> torch.Tensor:
        return self._joined(self.logits, index)

    def weights(self, layer: int, part: str, index: int) -> torch.Tensor | None:
        """The refit's row weights of one sub-layer for calibration batch ``index`` (see the class docstring);
        None without ``token_weighting`` or when the recorded pass ran no backward."""
        total, count = self._sensitivity_sums[layer, part]
        if self.token_weighting == 0 or count == 0 or total <= 0:
            return None
        store = self.sensitivity[layer, part]
        if any(piece not in store for piece in self._pieces[index]):
            raise ValueError(
                f"no token sensitivities were recorded for layer {layer}'s {part} (calibration batch {index})"
            )
        relative = self._joined(store, index) / (total / count)
        return (1.0 - self.token_weighting) + self.token_weighting * relative


class _RecordedTargets:
    """One sub-layer's recorded targets, read per calibration batch (the walk's ``targets[part]``)."""

    def __init__(self, recorded: DenseTargets, store: ActivationStore):
        self._recorded, self._store = recorded, store

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._recorded._joined(self._store, index)

    def clear(self) -> None:
        self._store.clear()


def walk_sublayers(
    model: PreTrainedModel,
    gates: Gates,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    dense_targets: bool | DenseTargets = True,
    max_memory: int | None = None,
    spill_dir: str | os.PathLike | None = None,
    on_budget: Callable[[MemoryBudget], None] | None = None,
    head: bool = False,
    last_layer_rows: str = "all",
) -> Iterator[tuple[LayerView | None, str, Callable[[], Iterator[SublayerBatch]]]]:
    """Yield every sub-layer in order, ``(view, "attention" | "ffn", batches)``, where ``batches()`` iterates
    the calibration set as :class:`SublayerBatch` es with the pruned model (``gates`` in place) up to that
    sub-layer, until the next sub-layer is asked for. The caller may change the sub-layer's projection before
    asking for the next one: later sub-layers see the change. The dense targets of a layer are taken before any
    of its weights change. With ``head``, a last step ``(None, "classifier", batches)`` gives the task head's
    output layer: its input in the pruned model and the dense model's logits, one row per example.

    ``dense_targets``: ``True`` runs the dense stream beside the pruned one; ``False`` gives no targets; a
    :class:`DenseTargets` that recorded a dense pass over ``batches`` gives its targets, and no dense layer runs.

    Memory: the dense and pruned inputs of the current layer, the dense targets of its two sub-layers and the
    pruned FFN block's input and kept activations (see :func:`_advance_pruned`), at most
    ``max_memory`` bytes of them in RAM (default: half the memory available; less what recorded targets hold), the
    rest memory-mapped from ``spill_dir`` (default: a temporary folder, removed at the end).
    """
    recorded = dense_targets if isinstance(dense_targets, DenseTargets) else None
    if recorded is not None:
        if recorded.first_token_last != (last_layer_rows == "first") or (head and not recorded.head):
            raise ValueError("the dense targets were recorded for other last-layer rows or without the head's logits")
        recorded.match(batches)
        max_memory = max(0, recorded.max_memory - recorded.budget.used)
    stream_dense = dense_targets is True
    budget = MemoryBudget(max_memory)
    calls = _LayerCalls(model, batches, device)
    trim = HeapTrimmer()
    with ExitStack() as stack:
        folder: list[Path] = []

        def spill() -> Path:
            if not folder:
                folder.append(Path(stack.enter_context(tempfile.TemporaryDirectory(dir=spill_dir, prefix="refit-"))))
                # registered after the folder, so it runs first: mapped files are released before the folder goes
                # (Windows cannot delete a mapped file)
                stack.callback(lambda: [store.clear() for store in stores])
            return folder[0]

        dense, pruned = ActivationStore(budget, spill, "dense"), ActivationStore(budget, spill, "pruned")
        targets = {part: ActivationStore(budget, spill, f"target-{part}") for part in ("attention", "ffn")}
        ffn_seen = _FfnInputs(budget, spill)
        contexts = ActivationStore(budget, spill, "contexts")
        stores = [dense, pruned, *targets.values(), ffn_seen.x, ffn_seen.units, contexts]
        stack.callback(lambda: [store.clear() for store in stores])  # RAM back to the budget in every case
        for index in range(len(batches)):
            hidden = calls(index)[0]
            pruned[index] = hidden
            if stream_dense:
                dense[index] = hidden.clone()  # its own copy: the budget counts both streams
        views = layer_views(model)
        with_targets = dense_targets is not False
        for view in views:
            first_token = last_layer_rows == "first" and view.index == len(views) - 1
            if stream_dense:
                _advance_dense(view, calls, dense, targets, first_token, trim)
            elif recorded is not None:
                targets = recorded.targets(view.index)
            common = (gates, calls, pruned, targets, with_targets)
            steps = {"first_token": first_token, "trim": trim, "contexts": contexts}
            if recorded is not None and recorded.token_weighting > 0:
                steps["weights"] = functools.partial(recorded.weights, view.index)
            yield view, "attention", _pruned_source(model, view, "attention", *common, **steps)
            targets["attention"].clear()  # the attention step is done: room for what the FFN step sees
            yield view, "ffn", _pruned_source(model, view, "ffn", *common, ffn_seen, **steps)
            targets["ffn"].clear()
            contexts.clear()
            _advance_pruned(model, view, gates, calls, pruned, ffn_seen)
            ffn_seen.clear()
            trim()  # this layer's stores and passes, handed back before the next layer's
        if head and with_targets:
            if recorded is not None:
                logits = [recorded.head_logits(index) for index in range(len(batches))]
            else:
                logits = [head_io(model, calls, index, dense[index])[1] for index in range(len(batches))]

            def head_source() -> Iterator[SublayerBatch]:
                for index in range(len(batches)):
                    features = head_io(model, calls, index, pruned[index])[0]
                    yield SublayerBatch(x=None, units=features, target=logits[index])

            yield None, "classifier", head_source
        if on_budget is not None:
            on_budget(budget)


def output_layer(model: PreTrainedModel) -> nn.Linear:
    """The task head's last linear layer: the one that computes the logits."""
    linears = [m for head in classifier_modules(model) for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}'s task head has no linear layer")
    return linears[-1]


@contextmanager
def _head_only(model: PreTrainedModel, final_hidden: torch.Tensor):
    """Inside the block the model runs its embeddings and task head only, on ``final_hidden`` as the encoder's
    output: the encoder's layers are taken out and its output replaced."""
    spec = get_spec(model)
    parent_path, _, name = spec.layers.rpartition(".")
    encoder = resolve(model.base_model, parent_path) if parent_path else model.base_model
    layers = getattr(encoder, name)

    def replace_output(module, args, output):
        if isinstance(output, tuple):
            return (final_hidden, *output[1:])
        output.last_hidden_state = final_hidden
        return output

    handle = encoder.register_forward_hook(replace_output)
    setattr(encoder, name, nn.ModuleList())
    try:
        yield
    finally:
        setattr(encoder, name, layers)
        handle.remove()


def head_io(model: PreTrainedModel, calls: _LayerCalls, index: int, final_hidden: torch.Tensor):
    """The output layer's input and output (logits) for one batch, from the encoder's final hidden states."""
    seen: dict = {}
    out_layer = output_layer(model)
    handles = [_capture(out_layer, seen, "input"), _capture(out_layer, seen, "output", output=True)]
    try:
        with torch.no_grad(), _head_only(model, final_hidden):
            model(**model_inputs(calls.batches[index], calls.device))
    finally:
        for handle in handles:
            handle.remove()
    return seen["input"], seen["output"]


def _advance_dense(
    view: LayerView,
    calls: _LayerCalls,
    dense: ActivationStore,
    targets: dict,
    first_token: bool = False,
    trim: Callable[[], None] = lambda: None,
) -> None:
    """Run the dense layer on every batch: keep its two sub-layer outputs (before LayerNorm) as the targets and
    move the dense stream to the layer's output."""
    for index in range(len(calls.batches)):
        args, kwargs, valid = calls.arguments(index)
        seen: dict = {}
        handles = [
            _capture(view.attn_out, seen, "attention", output=True),
            _capture(view.ffn_up, seen, "ffn x"),
            _capture(view.ffn_down, seen, "ffn", output=True),
        ]
        hidden = dense[index]
        try:
            out = _run_layer(view.layer, hidden, args, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        targets["attention"][index] = _rows(hidden + seen["attention"], valid, first_token)
        targets["ffn"][index] = _rows(seen["ffn x"] + seen["ffn"], valid, first_token)
        dense[index] = out
        trim()


class _FfnInputs:
    """What the FFN step of the current layer saw, per batch, in the pruned model: the FFN block's input ``x`` and
    the activations its down projection reads (``units``) of the neurons the gates keep (``columns``), with
    padding, as the layer has them. Pruned neurons are not stored: they add nothing to the layer's output."""

    def __init__(self, budget: MemoryBudget, spill: Callable[[], Path]):
        self.x = ActivationStore(budget, spill, "ffn-x")
        self.units = ActivationStore(budget, spill, "ffn-units")
        self.columns: torch.Tensor | None = None
        self.seen: set[int] = set()

    def add(self, index: int, x: torch.Tensor, units: torch.Tensor, gate: torch.Tensor, kept_only: bool) -> None:
        """``kept_only``: ``units`` holds the kept neurons already (the layer ran with the others removed)."""
        if self.columns is None:
            self.columns = gate.ne(0).nonzero().squeeze(1).to(units.device)
        self.x[index] = x
        self.units[index] = units if kept_only else units.index_select(-1, self.columns)
        self.seen.add(index)

    def complete(self, n_batches: int) -> bool:
        return len(self.seen) == n_batches

    def clear(self) -> None:
        self.x.clear()
        self.units.clear()
        self.columns = None
        self.seen.clear()


def _advance_pruned(
    model: PreTrainedModel,
    view: LayerView,
    gates: Gates,
    calls: _LayerCalls,
    pruned: ActivationStore,
    ffn_seen: _FfnInputs,
) -> None:
    """Move the pruned stream to the layer's output, with the layer's weights as the caller left them.

    When the FFN step saw every batch, the output is FFN-LayerNorm(x + down(gate * units)) from what it saw (post-LN
    families; dropout is off in eval): one layer pass saved per layer. Otherwise (the caller skipped the FFN step,
    e.g. for a layer without neurons, or the gates also gate layers or the residual stream) the layer is run.
    """
    n_batches = len(calls.batches)
    one_gate_set = gates.layers is None and gates.hidden is None and gates.neurons[view.index].dim() == 1
    if ffn_seen.complete(n_batches) and one_gate_set:
        norm = resolve(view.layer, get_spec(model).ffn_norm)
        down, columns = view.ffn_down, ffn_seen.columns
        with torch.no_grad():
            weight = down.weight.index_select(1, columns.to(down.weight.device))
            gate = gates.neurons[view.index].to(weight.device).index_select(0, columns.to(weight.device))
            for index in range(n_batches):
                units = ffn_seen.units[index]
                out = nn.functional.linear(units * gate.to(units.dtype), weight, down.bias)
                pruned[index] = norm(ffn_seen.x[index] + out)
        return
    with gated(model, gates):
        for index in range(n_batches):
            args, kwargs, _ = calls.arguments(index)
            pruned[index] = _run_layer(view.layer, pruned[index], args, kwargs)


def _pruned_twin(model: PreTrainedModel, view: LayerView, gates: Gates) -> tuple[nn.Module, LayerView] | None:
    """A copy of the layer with the heads and neurons that ``gates`` close physically removed and the kept heads'
    gates folded into the attention output columns: run without gates, it gives the gated layer's contexts,
    FFN input and activations of the kept units, at the pruned layer's cost instead of the dense one's. None
    where the gates do more than close heads and neurons, or the layer keeps no head or no neuron (the gated layer
    is run then)."""
    from slimformer.layout import current_head_ids, prune_layer_heads, prune_layer_neurons

    if gates.layers is not None or gates.hidden is not None:
        return None
    head_gate, neuron_gate = gates.heads[view.index], gates.neurons[view.index]
    if head_gate.dim() != 1 or neuron_gate.dim() != 1:
        return None
    heads = head_gate.ne(0).nonzero().flatten().tolist()
    neurons = neuron_gate.ne(0).nonzero().flatten().tolist()
    if not heads or not neurons:
        return None
    spec = get_spec(model)
    layer = copy.deepcopy(view.layer)
    twin = layer_view(layer, view.index, spec, view.head_size)
    with torch.no_grad():
        scale = head_gate.to(twin.attn_out.weight).repeat_interleave(view.head_size)
        twin.attn_out.weight.mul_(scale[None, :])
    if len(heads) < view.num_heads:
        prune_layer_heads(twin, spec, heads, current_head_ids(model)[view.index])
    if len(neurons) < view.ffn_size:
        prune_layer_neurons(twin, spec, neurons)
    return layer, layer_view(layer, view.index, spec, view.head_size)


def _unit_columns(view: LayerView, part: str, gates: Gates) -> torch.Tensor:
    """The columns of the sub-layer projection's input that the gates keep."""
    if part == "ffn":
        return gates.neurons[view.index].ne(0).nonzero().flatten().cpu()
    return head_columns(gates.heads[view.index].ne(0).nonzero().flatten().cpu(), view.head_size)


def head_columns(heads: torch.Tensor | list[int], head_size: int) -> torch.Tensor:
    """The attention output projection's input columns of ``heads`` (each head a contiguous slice), in order."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_size + torch.arange(head_size)).flatten()


def _pruned_source(
    model: PreTrainedModel,
    view: LayerView,
    part: str,
    gates: Gates,
    calls: _LayerCalls,
    pruned: ActivationStore,
    targets: dict,
    with_targets: bool,
    ffn_seen: _FfnInputs | None = None,
    first_token: bool = False,
    trim: Callable[[], None] = lambda: None,
    contexts: ActivationStore | None = None,
    weights: Callable[[str, int], torch.Tensor | None] | None = None,
) -> Callable[[], Iterator[SublayerBatch]]:
    """The calibration batches of one sub-layer step. The attention step keeps the kept heads' contexts in
    ``contexts``; the FFN step, where it has them all, computes the layer's FFN from them instead of running the
    attention again (MiniLM-L6 on 2,048 STS-B pairs: refit 16 s instead of 21, bench/results/budget_scaling.md),
    and keeps what it saw in ``ffn_seen``."""
    n_batches = len(calls.batches)

    def source() -> Iterator[SublayerBatch]:
        # built when asked for: the FFN step's copy carries the attention output the attention step refit
        # (the pruned stream with every unit's columns, as the local target needs, runs the gated layer)
        twin = _pruned_twin(model, view, gates) if with_targets else None
        layer, runs = (view.layer, view) if twin is None else twin
        columns = None if twin is None else _unit_columns(view, part, gates)
        keep_contexts = part == "attention" and twin is not None and contexts is not None
        replay = part == "ffn" and twin is not None and contexts is not None and len(contexts) == n_batches
        context_positions = None
        if replay:
            spec = get_spec(model)
            attn_norm, act = resolve(layer, spec.attn_norm), resolve(layer, spec.ffn_act)
            kept_columns = _unit_columns(view, "attention", gates)
            if not torch.equal(contexts.columns, kept_columns):
                context_positions = torch.searchsorted(contexts.columns, kept_columns)
        for index in range(n_batches):
            seen: dict = {}
            if replay:  # post-LN: FFN input = LayerNorm(x + o(contexts)); units = act(up(FFN input))
                valid = calls.valid(index)
                context = contexts[index]
                if context_positions is not None:  # the attention step chose among more heads than it kept
                    context = context.index_select(-1, context_positions.to(context.device))
                with torch.no_grad():
                    seen["x"] = attn_norm(pruned[index] + runs.attn_out(context))
                    seen["units"] = act(runs.ffn_up(seen["x"]))
                contexts.discard(index)
            else:
                args, kwargs, valid = calls.arguments(index)
                # capture hooks go in before the gates' hooks, so they see the un-gated contexts / activations
                handles = [_capture(projection(runs, part), seen, "units", stop=True)]
                if part == "ffn":
                    handles.append(_capture(runs.ffn_up, seen, "x"))
                try:
                    with gated(model, gates) if twin is None else nullcontext():
                        _run_layer(layer, pruned[index], args, kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
            x = pruned[index] if part == "attention" else seen["x"]
            if ffn_seen is not None:
                ffn_seen.add(index, x, seen["units"], gates.neurons[view.index], kept_only=twin is not None)
            elif keep_contexts:
                contexts[index] = seen["units"]
                contexts.columns = columns
            trim()
            yield SublayerBatch(
                x=_rows(x, valid, first_token),
                units=_rows(seen["units"], valid, first_token),
                target=targets[part][index] if with_targets else None,
                columns=columns,
                weights=weights(part, index) if weights is not None else None,
            )

    return source
