"""Learned structured pruning: hard-concrete gates, the expected-size constraint, the final structure, and the
handler's result (removed == masked under the learned structure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slimformer
from conftest import tiny_inputs, tiny_model
from slimformer.configs import ConfigError, PruneContext
from slimformer.gates import gated
from slimformer.learned import HardConcrete, StructureGates
from slimformer.learned.method import LearnedPruningModel, prune_learned
from slimformer.measure import count_parameters
from slimformer.prune import PruningPlan, remove
from slimformer.prune.apply import masked
from slimformer.tasks import load_task
from test_train import write_sst2


def test_hard_concrete_open_probability_matches_samples():
    torch.manual_seed(0)
    gates = HardConcrete(4)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-3.0, -0.5, 0.5, 3.0]))
    samples = torch.stack([gates() for _ in range(20000)])
    assert samples.min() == 0 and samples.max() == 1  # exact zeros and ones occur
    assert ((samples > 0) & (samples < 1)).any()
    torch.testing.assert_close((samples > 0).float().mean(0), gates.open_probability().detach(), atol=0.015, rtol=0)
    gates.eval()
    deterministic = gates()
    assert deterministic[0] == 0 and deterministic[3] == 1
    assert gates.keep_top(2) == [2, 3]


def test_expected_sparsity_is_differentiable_and_spans_zero_to_one():
    model = tiny_model("bert")
    gates = StructureGates(model, ("heads", "ffn", "blocks", "hidden"), init=10.0)
    assert gates.expected_sparsity().item() == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        gates.hidden.log_alpha.fill_(-10.0)
    assert gates.expected_sparsity().item() == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():
        gates.hidden.log_alpha.fill_(0.0)
    gates.expected_sparsity().backward()
    for parameter in gates.parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_final_structure_keeps_the_expected_counts_and_its_sparsity_is_the_real_one():
    model = tiny_model("bert")
    gates = StructureGates(model, ("heads", "ffn", "blocks", "hidden"), init=10.0)
    with torch.no_grad():
        gates.heads[0].log_alpha[:2] = -10.0  # layer 0 loses two heads
        gates.ffn_blocks.log_alpha[1] = -10.0  # layer 1 loses its whole FFN
        gates.hidden.log_alpha[::4] = -10.0  # a quarter of the hidden dimensions
    structure = gates.final_structure()
    kept_heads, kept_neurons, kept_hidden = structure
    assert kept_heads == [[2, 3], [0, 1, 2, 3]] and kept_neurons[1] == [] and len(kept_neurons[0]) == 64
    assert kept_hidden == [i for i in range(32) if i % 4]
    # the structure's sparsity counts the encoder's linear weights the removal really leaves
    dense = sum(v.numel() for n, v in model.named_parameters() if "encoder" in n and n.endswith(".weight"))
    dense -= sum(v.numel() for n, v in model.named_parameters() if "LayerNorm.weight" in n and "encoder" in n)
    plan = PruningPlan.keep_all(model)
    plan = PruningPlan(
        layout=plan.layout,
        kept_heads=kept_heads,
        kept_neurons=kept_neurons,
        kept_hidden=kept_hidden,
        model_type="bert",
    )
    remove(model, plan)
    kept = sum(v.numel() for n, v in model.named_parameters() if "encoder" in n and n.endswith(".weight"))
    kept -= sum(v.numel() for n, v in model.named_parameters() if "LayerNorm.weight" in n and "encoder" in n)
    assert gates.structure_sparsity(structure) == pytest.approx(1 - kept / dense, abs=1e-9)


def test_the_multipliers_ascend_while_the_constraint_is_violated():
    model = tiny_model("bert")
    from slimformer.distill.pipeline import DistillationModel, DistillConfig

    wrapper = LearnedPruningModel(
        DistillationModel(model, None, DistillConfig(alpha=0.0), []), StructureGates(model, ("heads", "ffn"), init=3.0)
    )
    wrapper.target.fill_(0.5)  # the dense-ish model is far below the target sparsity: gap < 0
    optimizer = torch.optim.SGD([wrapper.lambdas, *wrapper.gates.parameters()], lr=0.1)
    inputs = {**tiny_inputs(), "labels": torch.tensor([0, 1, 2])}
    before = wrapper.gates.expected_sparsity().item()
    for _ in range(3):
        optimizer.zero_grad()
        wrapper(**inputs).loss.backward()
        optimizer.step()
    # ascent on l1 * (s - t) with s - t < 0 drives l1 negative, which then pushes s up toward t
    assert wrapper.lambdas[0].item() < 0
    for _ in range(20):
        optimizer.zero_grad()
        wrapper(**inputs).loss.backward()
        optimizer.step()
    assert wrapper.gates.expected_sparsity().item() > before


def test_the_target_ramp_starts_where_the_gates_start():
    """Open gates still leave some expected sparsity; a ramp from 0 would first push them open (the multipliers
    then wind up the wrong way). The target starts at the gates' own expected sparsity and ends at the goal."""
    from slimformer.distill.pipeline import DistillationModel, DistillConfig
    from slimformer.learned.method import PhaseCallback

    model = tiny_model("bert")
    gates = StructureGates(model, ("heads", "ffn"), init=0.5)
    start = gates.expected_sparsity().item()
    assert 0.05 < start < 0.5
    wrapper = LearnedPruningModel(DistillationModel(model, None, DistillConfig(alpha=0.0), []), gates)
    callback = PhaseCallback(wrapper, 0.8, warmup_steps=10, gate_steps=20)

    class State:
        global_step = 0

    targets = []
    for step in (0, 5, 10, 15):
        State.global_step = step
        callback.on_step_begin(None, State, None)
        targets.append(float(wrapper.target))
    assert targets == pytest.approx([start, start + (0.8 - start) / 2, 0.8, 0.8])
    # the starting point is a buffer: a resumed run ramps from the same place
    assert float(dict(wrapper.named_buffers())["target_start"]) == pytest.approx(start)


def test_fixed_structure_stops_the_gates_and_uses_zero_one_masks():
    model = tiny_model("distilbert")
    from slimformer.distill.pipeline import DistillationModel, DistillConfig

    gates = StructureGates(model, ("heads", "hidden"), init=3.0)
    with torch.no_grad():
        gates.heads[1].log_alpha[0] = -10.0
    wrapper = LearnedPruningModel(DistillationModel(model, None, DistillConfig(alpha=0.0), []), gates)
    wrapper.fix()
    fixed = wrapper.current_gates()
    assert all(set(g.unique().tolist()) <= {0.0, 1.0} for g in [*fixed.heads, *fixed.neurons])
    assert fixed.heads[1][0] == 0 and not any(p.requires_grad for p in gates.parameters())
    with gated(model, fixed), torch.no_grad():
        gated_logits = model(**tiny_inputs()).logits
    assert torch.isfinite(gated_logits).all()


def test_learned_configs_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match=r"target_sparsity 1\.0 is impossible"):
        slimformer.Learned(target_sparsity=1.0)
    with pytest.raises(ConfigError, match="subset"):
        slimformer.Learned(units="heads,layers")
    with pytest.raises(ConfigError, match="blocks alone"):
        slimformer.Learned(units="blocks")
    assert slimformer.Learned(units="heads, ffn").unit_set == {"heads", "ffn"}


def _synthetic_table(gates: StructureGates, key=None):
    """A latency table with uneven, non-linear curves, so that following it differs from counting weights."""
    from slimformer.budget.latency_table import LatencyTable

    heads, neurons = gates.head_counts[0], gates.ffn_sizes[0]
    return LatencyTable(
        head_counts=[0, heads // 2, heads], attn_ms=[1.0, 1.5, 4.0],
        neuron_counts=[0, neurons // 2, neurons], ffn_ms=[1.0, 3.0, 3.5],
        fixed_ms=1.0, rest_ms=0.5, key=key or {},
    )  # fmt: skip


def test_latency_target_reads_the_latency_table_differentiably():
    model = tiny_model("bert")
    gates = StructureGates(model, ("heads", "ffn", "blocks"), init=10.0)
    table = gates.latency = _synthetic_table(gates)
    layers, heads, neurons = len(gates.head_counts), gates.head_counts[0], gates.ffn_sizes[0]
    assert gates.expected_reduction().item() == pytest.approx(0.0, abs=1e-3)  # every gate open: the dense model
    fractional = gates.predicted_ms([torch.tensor(1.5)] * layers, [torch.tensor(neurons * 0.75)] * layers)
    assert fractional.item() == pytest.approx(table.rest_ms + layers * table.layer_ms(1.5, neurons * 0.75))
    with torch.no_grad():
        gates.heads[0].log_alpha[:2] = -10.0
        gates.ffn_blocks.log_alpha[1] = -10.0
    kept_heads, kept_neurons, _ = structure = gates.final_structure()
    dense = table.rest_ms + layers * table.layer_ms(heads, neurons)
    pruned = table.rest_ms + sum(table.layer_ms(len(h), len(n)) for h, n in zip(kept_heads, kept_neurons, strict=True))
    assert gates.structure_speedup(structure) == pytest.approx(dense / pruned)  # reported from the table itself

    # trained against the curves' least-squares lines: one price per head, one per neuron
    head_price, head_base = np.polyfit(table.head_counts, table.attn_ms, 1)
    neuron_price, neuron_base = np.polyfit(table.neuron_counts, table.ffn_ms, 1)

    def priced(h, f):
        return head_base + head_price * h + neuron_base + neuron_price * f - table.fixed_ms

    priced_dense = table.rest_ms + layers * priced(heads, neurons)
    priced_pruned = table.rest_ms + sum(priced(len(h), len(n)) for h, n in zip(kept_heads, kept_neurons, strict=True))
    assert gates.expected_reduction().item() == pytest.approx(1 - priced_pruned / priced_dense, abs=1e-3)
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.fill_(0.0)
    gates.expected_reduction().backward()
    assert gates.heads[1].log_alpha.grad.abs().sum() > 0 and gates.neurons[0].log_alpha.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="above 1"):
        slimformer.Learned(target_speedup=1.0)
    with pytest.raises(ConfigError, match="hidden"):
        slimformer.Learned(target_speedup=2.0, units="heads,ffn,hidden")
    assert slimformer.Learned(target_speedup=4.0).target_reduction == pytest.approx(0.75)


def test_a_noisy_latency_table_never_rewards_keeping_a_unit():
    """Measured curves fall here and there (timing noise); the gates are priced by lines, so every gate's pull
    toward the latency target is one-signed and the heads are not priced out of proportion at the dense end."""
    from slimformer.budget.latency_table import LatencyTable

    model = tiny_model("bert")
    gates = StructureGates(model, ("heads", "ffn", "blocks"), init=2.0)
    heads, neurons = gates.head_counts[0], gates.ffn_sizes[0]
    gates.latency = LatencyTable(
        head_counts=list(range(heads + 1)), attn_ms=[1.0 + 0.5 * h for h in range(heads + 1)],
        neuron_counts=[0, neurons // 4, neurons // 2, 3 * neurons // 4, neurons],
        ffn_ms=[1.0, 3.0, 2.5, 4.8, 4.9],  # falls in its second step, nearly flat in its last
        fixed_ms=1.0, rest_ms=0.0, key={},
    )  # fmt: skip
    gates.expected_reduction().backward()
    for group in [*gates.heads, *gates.neurons, gates.attn_blocks, gates.ffn_blocks]:
        assert (group.log_alpha.grad < 0).all()  # opening any gate only ever adds latency
    # the same init everywhere, so a neuron's pull over a head's is the ratio of their prices: the slopes of the
    # lines, not of the step the expected counts sit in (near the dense end, 0.1 ms for a quarter of the neurons)
    neuron_price = np.polyfit(gates.latency.neuron_counts, gates.latency.ffn_ms, 1)[0]
    head_price = np.polyfit(gates.latency.head_counts, gates.latency.attn_ms, 1)[0]
    ratio = (gates.neurons[0].log_alpha.grad[0] / gates.heads[0].log_alpha.grad[0]).item()
    assert ratio == pytest.approx(neuron_price / head_price, rel=1e-3)


def test_learned_pruning_to_a_target_speedup_lands_on_it(tiny_model_dir, tmp_path):
    from slimformer.budget.latency_table import cache_path, table_key
    from slimformer.io import write_json_atomic

    loaded = slimformer.load_model(tiny_model_dir, "sst2")
    data = load_task("sst2", write_sst2(tmp_path / "glue"))
    config = slimformer.Learned(
        target_speedup=2.0, epochs=4, final_epochs=0, batch_size=8, max_length=16, gate_learning_rate=0.2
    )
    # the machine's table, cached where the handler looks: a synthetic one, so the test does not time anything
    gates = StructureGates(loaded.model, ("heads", "ffn", "blocks"))
    key = table_key(loaded.model, batch_size=32, seq_len=config.seq_len, threads=config.threads, neuron_step=None)
    write_json_atomic(cache_path(key, tmp_path / "cache"), _synthetic_table(gates, key).to_dict())
    context = PruneContext(data=data, progress=False, cache_dir=tmp_path / "cache")
    learned = prune_learned(loaded.model, loaded.tokenizer, config, context).details["learned"]
    assert learned["target_speedup"] == 2.0 and learned["target_sparsity"] is None
    assert learned["predicted_speedup"] == pytest.approx(2.0, rel=0.2)
    assert "expected_latency_reduction" in learned["curve"][0]


def test_learned_pruning_removes_exactly_what_it_masked(tiny_model_dir, tmp_path):
    """The handler's plan, masked, equals the model it removes; and the gates moved toward the target."""
    loaded = slimformer.load_model(tiny_model_dir, "sst2")
    data = load_task("sst2", write_sst2(tmp_path / "glue"))
    config = slimformer.Learned(
        target_sparsity=0.5,
        units="heads,ffn,blocks,hidden",
        epochs=4,
        final_epochs=1,
        batch_size=8,
        max_length=16,
        gate_learning_rate=0.2,
        target_warmup=0.25,
    )
    outcome = prune_learned(loaded.model, loaded.tokenizer, config, PruneContext(data=data, progress=False))
    model = loaded.model.eval()
    inputs = {k: v for k, v in loaded.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt").items()}
    with masked(model, outcome.plan), torch.no_grad():
        expected = model(**inputs).logits
    params_before = count_parameters(model).total
    remove(model, outcome.plan)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
    learned = outcome.details["learned"]
    assert count_parameters(model).total < params_before
    assert learned["reached_sparsity"] > 0.2 and learned["curve"][-1]["target"] == pytest.approx(0.5)


def test_analyze_gates_reports_the_closing_order_against_michel_importance(tiny_model_dir, tmp_path):
    from slimformer.analyze import gates
    from slimformer.analyze.gates import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    data = load_task("sst2", write_sst2(tmp_path / "glue"))
    loaded = slimformer.load_model(tiny_model_dir, "sst2")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = gates(loaded, data, heads=0.75, epochs=6, batch_size=8, max_length=16, n_examples=16, progress=False)
    # the model given is left alone
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())
    closing = result.closing_step
    assert [len(row) for row in closing] == [4, 4] and any(s is not None for row in closing for s in row)
    order = result.order()
    steps = [closing[layer][head] for layer, head in order]
    assert steps == sorted(steps)
    out = result.save(tmp_path / "gates")
    saved = __import__("json").loads((out / "results.json").read_text())
    assert saved["closing_order"] == [list(p) for p in order] and (out / "gates.png").is_file()
    assert (
        -1.0 <= saved["spearman_survival_vs_michel"] <= 1.0
        or saved["spearman_survival_vs_michel"] != saved["spearman_survival_vs_michel"]
    )


def test_cli_learned_prune_saves_a_smaller_model_that_reloads(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from slimformer.cli import app

    glue = write_sst2(tmp_path / "glue")
    runner = CliRunner()
    args = ["prune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", str(glue), "--no-measure"]
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--learned"])
    assert bad.exit_code != 0 and "--target-sparsity" in str(bad.exception)
    both = runner.invoke(
        app, [*args, "--out", str(tmp_path / "x"), "--learned", "--target-sparsity", "0.5", "--target-speedup", "2"]
    )
    assert both.exit_code != 0 and "one of" in str(both.exception) and not (tmp_path / "x").exists()
    out = tmp_path / "learned"
    result = runner.invoke(
        app,
        [*args, "--out", str(out), "--learned", "--target-sparsity", "0.5", "--units", "heads,ffn,hidden",
         "--epochs", "2", "--final-epochs", "1", "--max-length", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((out / "metrics.json").read_text())
    assert report["config"]["method"] == "learned" and report["config"]["units"] == "heads,ffn,hidden"
    reloaded = slimformer.load_model(out).model
    assert count_parameters(reloaded).total == report["models"]["after"]["params"]["total"]
    assert report["models"]["after"]["encoder_flops"] < report["models"]["before"]["encoder_flops"]


def test_a_structure_without_attention_is_announced():
    from slimformer.learned.method import structure_warnings

    assert structure_warnings([[0, 1], [], [2]], [[5], [], []]) == []
    (warning,) = structure_warnings([[], [], []], [[5], [], [1]])
    assert "every attention head closed" in warning
    assert len(structure_warnings([[], []], [[], []])) == 2


def test_gates_start_spread_by_importance_rank_across_layers():
    """gate_init_spread: the least important unit of a kind (over every layer) starts spread / 2 below gate_init,
    the most important spread / 2 above, the others in rank order between; blocks are not spread."""
    model = tiny_model("bert")
    gates = StructureGates(model, ("heads", "ffn", "blocks"), init=2.0)
    generator = torch.Generator().manual_seed(0)
    heads = [torch.rand(n, generator=generator) for n in gates.head_counts]
    neurons = [torch.rand(n, generator=generator) for n in gates.ffn_sizes]
    gates.spread_by_importance(heads, neurons, spread=4.0)
    for groups, scores in ((gates.heads, heads), (gates.neurons, neurons)):
        alphas = torch.cat([g.log_alpha.detach() for g in groups])
        flat = torch.cat(scores)
        assert alphas.min().item() == pytest.approx(0.0) and alphas.max().item() == pytest.approx(4.0)
        assert alphas[flat.argmin()].item() == pytest.approx(0.0) and alphas[flat.argmax()].item() == pytest.approx(4.0)
        assert torch.equal(alphas.argsort(), flat.argsort())  # the same order as the importance
    assert torch.equal(gates.attn_blocks.log_alpha.detach(), torch.full_like(gates.attn_blocks.log_alpha, 2.0))
    with pytest.raises(ValueError, match="one importance score per gate"):
        gates.spread_by_importance(heads[:1], neurons, spread=1.0)


def test_learned_pruning_with_spread_gates_keeps_the_most_important_units_when_the_gates_stand_still(
    tiny_model_dir, tmp_path
):
    """With gate_init_spread and gates that barely learn, what is kept in each layer is the top of the Fisher
    ranking (the handler computes it on the task before training and reports its time)."""
    from slimformer.budget.fisher import ranking_mask_gradients

    loaded = slimformer.load_model(tiny_model_dir, "sst2")
    data = load_task("sst2", write_sst2(tmp_path / "glue"))
    config = slimformer.Learned(
        target_sparsity=0.5, units="heads,ffn", epochs=1, final_epochs=0, batch_size=8, max_length=16,
        gate_learning_rate=1e-9, multiplier_learning_rate=1e-9, gate_init_spread=4.0,
    )  # fmt: skip
    fisher = ranking_mask_gradients(
        loaded.model, loaded.tokenizer, data, batch_size=8, max_length=16, seed=config.seed, progress=False
    )
    outcome = prune_learned(loaded.model, loaded.tokenizer, config, PruneContext(data=data, progress=False))
    assert outcome.seconds["fisher"] >= 0 and outcome.details["learned"]["gate_init_spread"] == 4.0
    for kept, scores in (
        (outcome.plan.kept_heads, fisher.head_fisher()),
        (outcome.plan.kept_neurons, fisher.neuron_fisher()),
    ):
        assert sum(map(len, kept)) < sum(len(s) for s in scores)  # the target removed something
        for layer_kept, layer_scores in zip(kept, scores, strict=True):
            top = np.argsort(-layer_scores, kind="stable")[: len(layer_kept)]
            assert sorted(top.tolist()) == sorted(layer_kept)
