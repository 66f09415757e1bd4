"""Constant attention, after Hassid et al. 2022, "How Much Does Attention Actually Attend? Questioning the Importance
of Attention in Pretrained Transformers" (PAPA).

The input-dependent attention of chosen heads is replaced by a constant pattern: the mean attention probability
of that head for query position i and key position j, averaged over a data sample (the training split, else the
dev split). Sequences in the sample have different lengths, so each (i, j) is averaged over the examples in which
both positions are real tokens (padding never counts). On a sequence of length n, a replaced head uses the
top-left n x n block of its pattern, sets the columns of padded keys to zero and renormalises every row to sum
to 1 (a row with no mass left, i.e. positions never seen in the sample, attends uniformly), and outputs
``pattern @ V``: its values are still computed from the input, only *where it looks* is fixed. Heads not
replaced are unchanged. Everything is done with hooks on the value and attention-output projections found by
:func:`slimformer.arch.layer_views`, removed when the ``with`` block ends.

Configurations: ``none`` (the model as it is), ``first-half`` (all heads of layers 0 .. L//2 - 1),
``last-half`` (all heads of the last L//2 layers), ``all`` (every head), plus custom ``--layers`` and ``--heads``.
By default the patterns are computed on, and applied to, the given fine-tuned model with no retraining; with
``finetune=True`` (the paper's protocol) they are computed on the pre-trained ``model`` and each configuration
is fine-tuned from the pre-trained weights with its constant patterns in place. With ``seeds > 1`` each seed
draws its own data sample for the patterns (and, when set, its own dev / training subsets and fine-tuning seed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, set_seed

from slimformer.analyze.common import (
    REPORT_FILE,
    AnalyzeError,
    fmt_stat,
    load_analysis_model,
    load_task_data,
    markdown_table,
    model_name,
    nan_to_none,
    parse_choices,
    parse_heads,
    parse_layers,
    results_folder,
    seed_list,
    stat,
    task_spec_of,
)
from slimformer.analyze.plots import bar_chart, pattern_grid
from slimformer.analyze.training import RetrainConfig, train, training_device
from slimformer.arch import layer_views
from slimformer.evaluation import Evaluator
from slimformer.gradients import model_inputs
from slimformer.importance import importance_sample
from slimformer.models import LoadedModel, eager_attention, load_model
from slimformer.tasks import TaskData, tokenize_task

PRESETS = ("none", "first-half", "last-half", "all")
PAPA_PNG = "papa.png"
PATTERNS_PNG = "patterns.png"


# ------------------------------------------------------------------------------------------------ patterns


@dataclass
class AttentionPatterns:
    """Mean attention probabilities: ``patterns[l]`` is [heads of layer l, N, N] (query i, key j), ``counts[i, j]``
    the number of sample examples in which both positions were real tokens (N: the longest sequence allowed)."""

    patterns: list[torch.Tensor]
    counts: torch.Tensor
    n_examples: int

    @property
    def max_length(self) -> int:
        return int(self.counts.shape[0])


@contextmanager
def _no_lasting_hooks(model: PreTrainedModel) -> Iterator[None]:
    """Remove the forward hooks (and their 'installed' flags) that transformers adds to record ``output_attentions``
    the first time they are asked for, so that the model is left exactly as it was."""
    before = {
        id(m): (set(m._forward_hooks), set(m._forward_pre_hooks), {k for k in vars(m) if "hook" in k})
        for m in model.modules()
    }
    try:
        yield
    finally:
        for module in model.modules():
            hooks, pre_hooks, flags = before.get(id(module), (set(), set(), set()))
            for key in [k for k in module._forward_hooks if k not in hooks]:
                module._forward_hooks.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
            for key in [k for k in module._forward_pre_hooks if k not in pre_hooks]:
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            for name in [k for k in vars(module) if "hook" in k and k not in flags]:
                delattr(module, name)


def collect_patterns(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    max_length: int,
    progress: bool = False,
) -> AttentionPatterns:
    """Average each head's attention probabilities over ``batches`` position by position (valid pairs only)."""
    device = next(model.parameters()).device
    views = layer_views(model)
    sums = [torch.zeros(v.num_heads, max_length, max_length, dtype=torch.float64) for v in views]
    counts = torch.zeros(max_length, max_length, dtype=torch.float64)
    n_examples = 0
    was_training = model.training
    model.eval()
    try:
        with _no_lasting_hooks(model), eager_attention(model), torch.inference_mode():
            for batch in tqdm(batches, desc="attention patterns", disable=not progress, leave=False):
                inputs = model_inputs(batch, device)
                length = inputs["input_ids"].shape[1]
                if length > max_length:
                    raise AnalyzeError(f"A batch has sequences of {length} tokens, more than max_length {max_length}.")
                mask = inputs.get("attention_mask")
                mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
                valid = (mask[:, :, None] * mask[:, None, :]).to(torch.float64).cpu()  # [b, n, n]
                outputs = model(**inputs, output_attentions=True)
                attentions = outputs.attentions
                if attentions is None or len(attentions) != len(views):
                    raise AnalyzeError(
                        f"{type(model).__name__} did not return attention probabilities for every layer."
                    )
                counts[:length, :length] += valid.sum(0)
                for layer, probs in enumerate(attentions):
                    if probs is None or probs.shape[1] == 0:
                        continue
                    sums[layer][:, :length, :length] += (probs.detach().to(torch.float64).cpu() * valid[:, None]).sum(0)
                n_examples += int(mask.shape[0])
    finally:
        model.train(was_training)
    denominator = counts.clamp(min=1.0)
    patterns = [(s / denominator).to(torch.float32) for s in sums]
    return AttentionPatterns(patterns=patterns, counts=counts, n_examples=n_examples)


@contextmanager
def constant_attention(
    model: PreTrainedModel, patterns: AttentionPatterns, heads: Sequence[tuple[int, int]]
) -> Iterator[None]:
    """Replace the attention of ``heads`` ((layer, head) pairs) by their constant patterns inside the block.

    The padding mask is read from the ``attention_mask`` passed to ``model``'s forward (a forward call of a
    submodule alone is treated as unpadded). Works in training too: gradients flow into the values.
    """
    views = layer_views(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not 0 <= layer < len(views) or not 0 <= head < views[layer].num_heads:
            raise AnalyzeError(f"The model has no head {layer}:{head}.")
        by_layer.setdefault(layer, []).append(head)
    for layer in by_layer:
        if patterns.patterns[layer].shape[0] != views[layer].num_heads:
            raise AnalyzeError(f"The patterns of layer {layer} were collected on a model with other heads.")
    state: dict[str, Any] = {"mask": None, "active": False}
    handles = []

    def before_model(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        state["mask"], state["active"] = mask, True

    def after_model(module, args, kwargs, output):
        state["mask"], state["active"] = None, False

    def make_hooks(layer: int, head_list: list[int], head_size: int, num_heads: int):
        captured: dict[str, torch.Tensor] = {}
        index = torch.tensor(sorted(head_list), dtype=torch.long)

        def capture_values(module, args, output):
            captured["values"] = output

        def replace(module, args):
            context = args[0]
            values = captured.pop("values")
            batch, length, _ = context.shape
            if length > patterns.max_length:
                raise AnalyzeError(
                    f"A sequence of {length} tokens is longer than the constant patterns ({patterns.max_length}); "
                    "collect them with a larger max_length."
                )
            mask = state["mask"] if state["active"] else None
            if mask is None:
                mask = torch.ones(batch, length, device=context.device)
            mask = mask.to(context.dtype)
            if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
                raise AnalyzeError(
                    f"Constant attention needs a [batch, length] attention_mask, got {tuple(mask.shape)}."
                )
            pattern = patterns.patterns[layer].to(context.device, context.dtype)[index][:, :length, :length]
            probs = pattern[None] * mask[:, None, None, :]  # [b, k, n, n]: padded keys get nothing
            rows = probs.sum(-1, keepdim=True)
            uniform = (mask / mask.sum(-1, keepdim=True).clamp(min=1.0))[:, None, None, :].expand_as(probs)
            probs = torch.where(rows > 0, probs / rows.clamp(min=torch.finfo(probs.dtype).tiny), uniform)
            v = values.view(batch, length, num_heads, head_size)[:, :, index.to(values.device)].transpose(1, 2)
            out = (probs @ v).transpose(1, 2)  # [b, n, k, head_size]
            new = context.view(batch, length, num_heads, head_size).clone()
            new[:, :, index.to(new.device)] = out.to(new.dtype)
            return (new.view(batch, length, num_heads * head_size), *args[1:])

        return capture_values, replace

    try:
        if by_layer:
            handles.append(model.register_forward_pre_hook(before_model, with_kwargs=True))
            handles.append(model.register_forward_hook(after_model, with_kwargs=True, always_call=True))
        for layer, head_list in by_layer.items():
            view = views[layer]
            capture_values, replace = make_hooks(layer, head_list, view.head_size, view.num_heads)
            handles.append(view.value.register_forward_hook(capture_values))
            handles.append(view.attn_out.register_forward_pre_hook(replace))
        yield
    finally:
        for handle in handles:
            handle.remove()


def selection(name: str, heads_per_layer: Sequence[int]) -> list[tuple[int, int]]:
    """The heads a preset replaces: none, first-half, last-half (L // 2 layers each) or all."""
    layers = len(heads_per_layer)
    half = layers // 2
    chosen = {
        "none": [],
        "first-half": list(range(half)),
        "last-half": list(range(layers - half, layers)),
        "all": list(range(layers)),
    }[name]
    return [(layer, head) for layer in chosen for head in range(heads_per_layer[layer])]


# ------------------------------------------------------------------------------------------------ result


@dataclass
class PapaResult:
    """The score of the model with each configuration's heads replaced by constant attention (mean ± std)."""

    task: str
    metric: str
    model: str
    mode: str
    seeds: list[int]
    configs: list[dict[str, Any]]
    per_seed: list[dict[str, Any]]
    patterns: AttentionPatterns | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return nan_to_none(
            {
                "analysis": "papa",
                "paper": 'Hassid et al. 2022, "How Much Does Attention Actually Attend? Questioning the Importance '
                'of Attention in Pretrained Transformers"',
                "task": self.task,
                "metric": self.metric,
                "model": self.model,
                "mode": self.mode,
                "seeds": self.seeds,
                "configs": self.configs,
                "per_seed": self.per_seed,
                "meta": self.meta,
            }
        )

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        out_dir = results_folder(out_dir, self.to_dict())
        groups = {c["name"]: {"score": (c["score"]["mean"], c["score"]["std"])} for c in self.configs}
        suffix = f", {len(self.seeds)} seeds" if len(self.seeds) > 1 else ""
        bar_chart(
            groups,
            out_dir / PAPA_PNG,
            ylabel=f"dev {self.metric} (points)",
            title=f"{self.task}: constant attention ({self.mode}){suffix}",
        )
        if self.patterns is not None:
            pattern_grid(
                [p.numpy() for p in self.patterns.patterns],
                out_dir / PATTERNS_PNG,
                title=f"Constant patterns (first 24 positions; rows: layers, columns: heads), seed {self.seeds[0]}",
            )
        (out_dir / REPORT_FILE).write_text(self.report())
        return out_dir

    def report(self) -> str:
        seeds = len(self.seeds)
        mode = (
            "patterns computed on the fine-tuned model and applied without retraining"
            if self.mode == "post-hoc"
            else "patterns computed on the pre-trained model; each configuration fine-tuned with them in place"
        )
        lines = [
            f"# Constant attention (PAPA) in {self.model} on {self.task}",
            "",
            'After Hassid et al. 2022, "How Much Does Attention Actually Attend?": the attention of the replaced '
            "heads is a constant pattern, their mean attention over "
            f"{self.meta.get('pattern_examples')} {self.meta.get('pattern_split')} examples ({mode}). Metric: dev "
            f"{self.metric} ({self.meta.get('eval_rows')} rows), in points"
            + (f"; {seeds} seeds: mean ± std." if seeds > 1 else ".")
            + " first-half: layers 0 .. L/2-1; last-half: the last L/2 layers.",
            "",
        ]
        rows = [
            [
                c["name"],
                ",".join(map(str, c["layers"])) or "-",
                f"{c['heads_replaced']} / {self.meta.get('total_heads')}",
                fmt_stat(c["score"]),
                fmt_stat(c["delta"], signed=True),
            ]
            for c in self.configs
        ]
        lines.append(markdown_table(["configuration", "layers", "heads replaced", "score", "Δ vs none"], rows))
        lines += [f"![scores]({PAPA_PNG})"]
        if self.patterns is not None:
            lines.append(f"![patterns]({PATTERNS_PNG})")
        lines += ["", f"Total time {self.meta.get('seconds')} s.", ""]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def papa(
    model: str | os.PathLike[str] | LoadedModel,
    task: str | TaskData = "sst2",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    configs: Sequence[str] | str = PRESETS,
    layers: str | list[int] | None = None,
    heads: str | list[tuple[int, int]] | None = None,
    n_examples: int = 256,
    max_length: int = 128,
    max_eval_samples: int | None = None,
    eval_batch_size: int = 64,
    seeds: int = 1,
    seed: int = 0,
    finetune: bool = False,
    train_config: RetrainConfig | None = None,
    max_train_samples: int | None = None,
    progress: bool = True,
) -> PapaResult:
    """Hassid et al. 2022's constant-attention probe (see the module doc) for the preset ``configs`` and, if given,
    one configuration replacing every head of ``layers`` and one replacing ``heads`` (``"0:3,2:*"``).

    Without ``finetune`` ``model`` must be fine-tuned on the task; with it, ``model`` is the pre-trained model and
    every configuration is fine-tuned (``train_config``) from it. The model passed in is not changed.
    """
    started = time.perf_counter()
    spec = task_spec_of(task)
    seed_values = seed_list(seed, seeds)
    presets = parse_choices(configs, PRESETS, "--configs")
    if finetune:
        if isinstance(model, LoadedModel):
            raise AnalyzeError("finetune=True re-loads the pre-trained model per run: pass its name or folder.")
        config = train_config or RetrainConfig()
        config.check()
    loaded = load_analysis_model(model, spec, require_head=not finetune)
    views = layer_views(loaded.model)
    heads_per_layer = [v.num_heads for v in views]
    chosen: dict[str, list[tuple[int, int]]] = {"none": []}
    for name in presets:
        chosen[name] = selection(name, heads_per_layer)
    if layers is not None:
        picked = parse_layers(layers, len(views))
        chosen[f"layers {','.join(map(str, picked))}"] = [
            (layer, head) for layer in picked for head in range(heads_per_layer[layer])
        ]
    if heads is not None:
        pairs = parse_heads(heads, heads_per_layer)
        if pairs:
            chosen[f"heads {','.join(f'{layer}:{head}' for layer, head in pairs)}"] = pairs
    total_heads = sum(heads_per_layer)
    n_runs = len(seed_values) * len(chosen)
    per_seed: list[dict[str, Any]] = []
    first_patterns: AttentionPatterns | None = None
    bar = tqdm(total=n_runs, desc="papa", unit="config", disable=not progress)
    eval_rows = pattern_split = None
    try:
        for current in seed_values:
            data = load_task_data(
                task,
                data_dir,
                max_train_samples=max_train_samples,
                max_eval_samples=max_eval_samples,
                seed=current,
                need_train=finetune,
            )
            sample = importance_sample(
                loaded.tokenizer, data, n_examples=n_examples, batch_size=32, max_length=max_length, seed=current
            )
            pattern_split = sample.description["split"]
            if finetune:
                set_seed(current)
            patterns = collect_patterns(loaded.model, sample.batches, max_length=max_length)
            if first_patterns is None:
                first_patterns = patterns
            evaluator = Evaluator(loaded.tokenizer, data, max_length=max_length, batch_size=eval_batch_size)
            eval_rows = sum(evaluator.sizes.values())
            scores: dict[str, Any] = {}
            for name, selected in chosen.items():
                bar.set_postfix_str(f"seed {current}: {name}")
                if finetune:
                    set_seed(current)
                    fresh = load_model(model_name(model), spec)
                    net = fresh.model.to(training_device())
                    tokenized = tokenize_task(data, fresh.tokenizer, max_length=max_length)
                    with constant_attention(net, patterns, selected):
                        stats = train(net, fresh.tokenizer, tokenized["train"], config, seed=current)
                        score = evaluator.score(net)
                    scores[name] = {"score": score, "train": stats}
                else:
                    with constant_attention(loaded.model, patterns, selected):
                        scores[name] = {"score": evaluator.score(loaded.model)}
                bar.update(1)
            per_seed.append({"seed": current, "scores": scores, "pattern_sample": sample.description})
    finally:
        bar.close()

    results = []
    for name, selected in chosen.items():
        values = [s["scores"][name]["score"] for s in per_seed]
        base = [s["scores"]["none"]["score"] for s in per_seed]
        results.append(
            {
                "name": name,
                "layers": sorted({layer for layer, _ in selected}),
                "heads": [list(p) for p in selected] if name.startswith("heads") else None,
                "heads_replaced": len(selected),
                "fraction_replaced": len(selected) / total_heads if total_heads else 0.0,
                "score": stat(values),
                "delta": stat(np.asarray(values) - np.asarray(base)),
            }
        )
    meta = {
        "max_length": max_length,
        "pattern_examples": n_examples,
        "pattern_split": pattern_split,
        "max_eval_samples": max_eval_samples,
        "max_train_samples": max_train_samples,
        "eval_rows": eval_rows,
        "total_heads": total_heads,
        "train": (train_config or RetrainConfig()).to_dict() if finetune else None,
        "seconds": round(time.perf_counter() - started, 2),
        "half": "first-half = layers 0..L//2-1, last-half = layers L-L//2..L-1 (all their heads)",
    }
    return PapaResult(
        task=spec.name,
        metric=spec.primary_metric,
        model=model_name(model),
        mode="fine-tuned with constant patterns" if finetune else "post-hoc",
        seeds=seed_values,
        configs=results,
        per_seed=per_seed,
        patterns=first_patterns,
        meta=meta,
    )
