"""The handler of :class:`~slimformer.configs.Learned`: train hard-concrete gates with the weights toward a target
size under a Lagrangian (CoFi, Xia et al. 2022), fix the structure, train on, and return the plan that removes
everything closed; :func:`slimformer.prune` removes it, evaluates, measures and saves."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, set_seed

from slimformer.arch import layer_views
from slimformer.configs import Learned, PruneContext, PruneOutcome, register_handler
from slimformer.errors import SlimformerError
from slimformer.gates import gated
from slimformer.learned.structure import StructureGates
from slimformer.prune.plan import PruningPlan

logger = logging.getLogger(__name__)


class LearnedPruningModel(nn.Module):
    """What the Trainer trains: the distillation model (student = the model being pruned) under sampled gates,
    plus the Lagrangian ``l1 * (s - t) + l2 * (s - t)^2`` of the expected reduction ``s`` (sparsity, or predicted
    latency reduction: :meth:`StructureGates.expected_reduction`) and the current target ``t``. The multipliers
    are maximised (their gradients are negated), so the constraint tightens while it is violated. After
    :meth:`fix`, the model trains under the fixed 0/1 structure and the gates stop learning."""

    def __init__(self, distillation: nn.Module, gates: StructureGates) -> None:
        super().__init__()
        self.distillation = distillation
        self.gates = gates
        self.lambdas = nn.Parameter(torch.zeros(2))
        self.lambdas.register_hook(lambda grad: -grad)  # gradient ascent on the multipliers
        # checkpointed, so a resumed run continues in the right phase with the right target
        self.register_buffer("target", torch.zeros(()))
        self.register_buffer("fixed", torch.zeros(()))
        # where the gates start (open gates still leave a few percent expected sparsity): the target ramp starts
        # here, so the Lagrangian never first pushes the gates open and winds its multipliers up the wrong way
        with torch.no_grad():
            self.register_buffer("target_start", gates.expected_reduction().detach().clone().reshape(()))
        self._fixed_gates = None
        self.shift = 0.0

    def structure(self):
        return self.gates.final_structure()

    def fix(self, target: float | None = None) -> None:
        """Freeze the gates (after shifting every log_alpha alike so the expected sparsity meets ``target``,
        where training left it more than a point away) and train on under the 0/1 structure they imply."""
        if target is not None and not bool(self.fixed):
            self.shift = self.gates.meet_target(target)
        self.fixed.fill_(1.0)
        self._fixed_gates = None
        for parameter in [*self.gates.parameters(), self.lambdas]:
            parameter.requires_grad_(False)

    def current_gates(self):
        if bool(self.fixed):
            if self._fixed_gates is None:
                self._fixed_gates = self.gates.fixed_gates(self.structure())
            return self._fixed_gates
        self.gates.train(self.training)
        return self.gates.sample()

    def lagrangian(self) -> torch.Tensor:
        gap = self.gates.expected_reduction() - self.target
        return self.lambdas[0] * gap + self.lambdas[1] * gap.square()

    def forward(self, **inputs: Any):
        student = self.distillation.student
        with gated(student, self.current_gates()):
            outputs = self.distillation(**inputs)
        if outputs.loss is not None and not bool(self.fixed):
            outputs.loss = outputs.loss + self.lagrangian()
        return outputs


class PhaseCallback(TrainerCallback):
    """Raises the target linearly over the warm-up (from the gates' starting point), fixes the structure when the
    gate phase ends, and records the expected sparsity (and latency reduction) as training goes."""

    def __init__(self, wrapper: LearnedPruningModel, target: float, warmup_steps: int, gate_steps: int) -> None:
        self.wrapper, self.final_target = wrapper, target
        self.warmup_steps, self.gate_steps = warmup_steps, gate_steps
        self.every = max(1, gate_steps // 50)  # about 50 records of the gate phase
        self.curve: list[dict[str, float]] = []
        # per record: every head's open probability (what `analyze gates` reads the closing order from)
        self.head_history: list[tuple[int, list[list[float]]]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        wrapper = self.wrapper
        if step >= self.gate_steps:
            if not bool(wrapper.fixed):
                self.record(step)
                wrapper.fix(self.final_target)
                self.record(step)  # after any shift to the target: the structure that is kept
            return
        ramp = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        start = min(float(wrapper.target_start), self.final_target)
        wrapper.target.fill_(start + (self.final_target - start) * ramp)
        if step % self.every == 0:
            self.record(step)

    def record(self, step: int) -> None:
        wrapper = self.wrapper
        with torch.no_grad():
            expected = float(wrapper.gates.expected_sparsity())
            reduction = float(wrapper.gates.expected_reduction())
            lambdas = wrapper.lambdas.detach().tolist()
            heads = wrapper.gates.head_open_probabilities()
        if heads is not None:
            self.head_history.append((step, heads))
        self.curve.append(
            {
                "step": step,
                "target": round(float(wrapper.target), 4),
                "expected_sparsity": round(expected, 4),
                **({"expected_latency_reduction": round(reduction, 4)} if wrapper.gates.latency is not None else {}),
                "lambda1": round(lambdas[0], 4),
                "lambda2": round(lambdas[1], 4),
            }
        )


def closing_steps(history: list[tuple[int, list[list[float]]]], threshold: float = 0.5) -> list[list[int | None]]:
    """For every head, the first recorded step at which its open probability fell below ``threshold`` (None:
    it stayed open): the order in which training closes heads (Voita et al. 2019 read their L0 sweeps so)."""
    if not history:
        return []
    closing: list[list[int | None]] = [[None] * len(layer) for layer in history[0][1]]
    for step, layers in history:
        for layer, probabilities in enumerate(layers):
            for head, probability in enumerate(probabilities):
                if closing[layer][head] is None and probability < threshold:
                    closing[layer][head] = step
    return closing


def learned_optimizer(wrapper: LearnedPruningModel, config: Learned) -> torch.optim.Optimizer:
    """AdamW: the model's weights at ``learning_rate`` (no decay on biases and LayerNorms); the gates' log_alpha
    at ``gate_learning_rate`` and the Lagrange multipliers at ``multiplier_learning_rate``, without decay."""
    gate_ids = {id(p) for p in wrapper.gates.parameters()} | {id(wrapper.lambdas)}
    decay, no_decay = [], []
    for name, parameter in wrapper.named_parameters():
        if not parameter.requires_grad or id(parameter) in gate_ids:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.01, "lr": config.learning_rate},
            {"params": no_decay, "weight_decay": 0.0, "lr": config.learning_rate},
            {"params": list(wrapper.gates.parameters()), "weight_decay": 0.0, "lr": config.gate_learning_rate},
            {"params": [wrapper.lambdas], "weight_decay": 0.0, "lr": config.multiplier_learning_rate},
        ],
        lr=config.learning_rate,
    )


def structure_warnings(kept_heads: list[list[int]], kept_neurons: list[list[int]]) -> list[str]:
    """What a user must hear about a learned structure before trusting its score."""
    warnings = []
    if not any(kept_heads):
        warnings.append(
            "every attention head closed: no token sees another, so a model that reads one token (BERT's [CLS]) "
            "predicts from that token alone; ask for a smaller target, or train longer (epochs)"
        )
    if not any(kept_heads) and not any(kept_neurons):
        warnings.append("every head and every FFN neuron closed: what is left is the embeddings and the head")
    return warnings


@register_handler(Learned)
def prune_learned(model: PreTrainedModel, tokenizer, config: Learned, ctx: PruneContext) -> PruneOutcome:
    from slimformer.distill.pipeline import TEACHER_LOGITS, DistillationModel, DistillConfig, teacher_logits
    from slimformer.sparse.method import _train_set
    from slimformer.train import TrainConfig, train_resumably

    if ctx.data is None:
        raise SlimformerError("learned pruning trains on the task: pass one (--task, or data= in Python).")
    embedding = ctx.data.spec.is_embedding
    if embedding and "hidden" in config.unit_set:
        raise SlimformerError(
            "hidden-dimension gates would change an embedding model's output size: use units heads,ffn,blocks."
        )
    seconds: dict[str, float] = {}
    set_seed(config.seed)
    started = time.perf_counter()
    train = _train_set(model, tokenizer, ctx.data, config)
    logits = teacher_logits(model.eval(), tokenizer, train, cache=False, progress=ctx.progress)
    train = train.add_column(TEACHER_LOGITS, [row.tolist() for row in logits])
    seconds["teacher_logits"] = round(time.perf_counter() - started, 2)

    layer_kd = config.layer_distill_weight > 0
    teacher = copy.deepcopy(model).eval() if layer_kd else None
    settings = DistillConfig(
        alpha=1.0 if embedding else config.distill_alpha,
        temperature=config.temperature,
        hidden_weight=config.layer_distill_weight,
    )
    pairs = [(i, i) for i in range(len(layer_views(model)))] if layer_kd else []
    distillation = DistillationModel(model, teacher, settings, pairs, project_hidden="hidden" in config.unit_set)
    gates = StructureGates(model, config.unit_set, init=config.gate_init)
    if config.gate_init_spread and {"heads", "ffn"} & config.unit_set:
        started = time.perf_counter()
        from slimformer.budget.fisher import ranking_mask_gradients

        fisher = ranking_mask_gradients(
            model, tokenizer, ctx.data, batch_size=config.batch_size, max_length=config.max_length,
            seed=config.seed, progress=ctx.progress,
        )  # fmt: skip
        gates.spread_by_importance(fisher.head_fisher(), fisher.neuron_fisher(), config.gate_init_spread)
        seconds["fisher"] = round(time.perf_counter() - started, 2)
    if config.target_speedup is not None:
        from slimformer.budget.latency_table import table_for_config

        started = time.perf_counter()
        gates.latency = table_for_config(model, config, ctx)
        seconds["latency_table"] = round(time.perf_counter() - started, 2)
    wrapper = LearnedPruningModel(distillation, gates)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = math.ceil(len(train) / (config.batch_size * world))
    gate_steps = max(1, math.ceil(config.epochs * per_epoch))
    target = config.target_reduction
    callback = PhaseCallback(wrapper, target, round(config.target_warmup * gate_steps), gate_steps)
    train_config = TrainConfig(
        max_length=config.max_length,
        batch_size=config.batch_size,
        epochs=config.epochs + config.final_epochs,
        learning_rate=config.learning_rate,
        seed=config.seed,
        save_steps=config.save_steps,
        logging_steps=50,
        group_by_length=True,
    )
    output, train_seconds, checkpoint = train_resumably(
        wrapper,
        tokenizer,
        train,
        ctx.work_dir,
        train_config,
        {"config": config.to_dict(), "examples": len(train)},
        callbacks=[callback],
        optimizers=(learned_optimizer(wrapper, config), None),
    )
    seconds["train"] = round(train_seconds, 2)
    if not bool(wrapper.fixed):  # no final phase: the gates are final as training left them
        callback.record(output.global_step)
        wrapper.fix(target)
        callback.record(output.global_step)
    structure = wrapper.structure()
    model.eval()
    kept_heads, kept_neurons, kept_hidden = structure
    plan = PruningPlan.keep_all(model)
    plan = PruningPlan(
        layout=plan.layout,
        kept_heads=kept_heads,
        kept_neurons=kept_neurons,
        kept_hidden=kept_hidden if kept_hidden is not None and len(kept_hidden) < plan.layout.hidden else None,
        model_type=model.config.model_type,
        meta={"method": "learned", "target": config.target_speedup or config.target_sparsity},
    )
    warnings = structure_warnings(kept_heads, kept_neurons)
    for warning in warnings:
        logger.warning("Learned pruning: %s.", warning)
    details = {
        "learned": {
            "warnings": warnings,
            "units": sorted(config.unit_set),
            "target_sparsity": None if config.target_speedup is not None else config.target_sparsity,
            "reached_sparsity": round(gates.structure_sparsity(structure), 4),
            **(
                {
                    "target_speedup": config.target_speedup,
                    "predicted_speedup": round(gates.structure_speedup(structure), 3),
                }
                if gates.latency is not None
                else {}
            ),
            "gate_init_spread": config.gate_init_spread,
            "expected_sparsity_at_fix": callback.curve[-1]["expected_sparsity"] if callback.curve else None,
            # where the Lagrangian had not met the target, every log_alpha was shifted by this much to meet it
            "log_alpha_shift": round(wrapper.shift, 4),
            "gate_steps": gate_steps,
            "steps": output.global_step,
            "loss": float(output.training_loss),
            "resumed_from": str(checkpoint) if checkpoint else None,
            "distill": asdict(settings),
            "curve": callback.curve,
            "gates": gates.describe(),
            "head_closing_step": closing_steps(callback.head_history),
        }
    }
    return PruneOutcome(plan=plan, details=details, seconds=seconds)
