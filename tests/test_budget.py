"""Retraining-free budget pruning (Kwon et al. 2022): Fisher, search, rearrangement, least-squares refits, pipeline."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import transformers

import slimformer
from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from reference_refit import reconstruct_weights as reference_reconstruct_weights
from reference_refit import tune_masks as reference_tune_masks
from slimformer.arch import get_spec, layer_views
from slimformer.budget.fisher import collect_mask_gradients, native_bfloat16
from slimformer.budget.latency_table import LatencyTable
from slimformer.budget.method import plan_for_budget
from slimformer.budget.search import UnitCosts, pruned_fisher, rearrange, rearrange_layer, search_masks
from slimformer.budget.stream import _LayerCalls, _run_layer, head_io, output_layer, walk_sublayers
from slimformer.budget.tune import (
    _normal_equations,
    fold_scales,
    least_error_units,
    reconstruct_weights,
    ridge_solution,
    row_scales,
    tune_masks,
)
from slimformer.configs import ConfigError, parse_memory
from slimformer.errors import SlimformerError
from slimformer.gates import gated
from slimformer.measure import flops
from slimformer.models import load_model
from slimformer.prune import Layout, PruningPlan, plan_gates, remove
from test_train import write_sst2


def batches(n: int = 3, size: int = 4, seq: int = 9, classes: int = 3):
    return [{**tiny_inputs(batch=size, seq=seq, seed=s), "labels": torch.arange(size) % classes} for s in range(n)]


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_per_example_gradients_match_one_example_at_a_time(family):
    model = tiny_model(family)
    data = batches(n=1, size=3)
    grads = collect_mask_gradients(model, data, progress=False)
    assert grads.n_examples == 3 and grads.heads[0].shape == (3, 4) and grads.neurons[1].shape == (3, 64)
    for row in range(3):
        single = [{k: v[row : row + 1] for k, v in data[0].items()}]
        one = collect_mask_gradients(model, single, progress=False)
        for layer in range(2):
            torch.testing.assert_close(one.heads[layer][0], grads.heads[layer][row], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(one.neurons[layer][0], grads.neurons[layer][row], rtol=1e-4, atol=1e-6)
    fisher = grads.head_fisher()[0]
    np.testing.assert_allclose(fisher, (grads.heads[0].double() ** 2).sum(0).numpy())
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_label_free_needs_classification():
    model = tiny_model("bert", num_labels=1)
    model.config.problem_type = "regression"
    with pytest.raises(SlimformerError, match="classification"):
        collect_mask_gradients(model, batches(1), label_free=True, progress=False)


def brute_force_search(layout, heads_imp, neurons_imp, allowed, costs):
    """Best retained importance over every subset (tiny sizes only)."""
    units = [("h", layer, i, v) for layer, row in enumerate(heads_imp) for i, v in enumerate(row)]
    units += [("n", layer, i, v) for layer, row in enumerate(neurons_imp) for i, v in enumerate(row)]
    best = -1.0
    for r in range(len(units) + 1):
        for subset in itertools.combinations(units, r):
            cost = sum(costs.head if u[0] == "h" else costs.neuron for u in subset)
            if cost <= allowed:
                best = max(best, sum(u[3] for u in subset))
    return best


def test_search_respects_budget_and_is_optimal_on_a_small_case():
    layout = Layout(heads=(2, 2), ffn=(3, 3), head_size=4, hidden=8)
    costs = UnitCosts(head=5.0, neuron=2.0, seq_len=1)
    rng = np.random.default_rng(0)
    heads_imp = [rng.random(2) for _ in range(2)]
    neurons_imp = [rng.random(3) for _ in range(2)]
    dense = costs.total(4, 6)
    for budget in (0.2, 0.35, 0.5, 0.8, 1.0):
        plan = search_masks(layout, heads_imp, neurons_imp, budget, costs)
        kept_h = sum(len(k) for k in plan.kept_heads)
        kept_n = sum(len(k) for k in plan.kept_neurons)
        assert costs.total(kept_h, kept_n) <= budget * dense + 1e-9
        retained = sum(
            heads_imp[i][plan.kept_heads[i]].sum() + neurons_imp[i][plan.kept_neurons[i]].sum() for i in range(2)
        )
        # Kwon et al.'s search keeps the top heads and top neurons: optimal when each kind is taken greedily
        assert retained == pytest.approx(brute_force_search(layout, heads_imp, neurons_imp, budget * dense, costs))
    with pytest.raises(SlimformerError, match="impossible"):
        search_masks(layout, heads_imp, neurons_imp, 1.2, costs)
    with pytest.raises(SlimformerError, match="impossible"):
        search_masks(layout, heads_imp, neurons_imp, 0.0, costs)


def test_unit_costs_match_measured_flops():
    model = tiny_model("bert")
    layout = Layout.of(model)
    costs = UnitCosts.flops(layout, seq_len=16)
    assert costs.total(sum(layout.heads), sum(layout.ffn)) == flops(model, seq_len=16).encoder


def test_rearrangement_lowers_the_joint_fisher_to_a_local_optimum():
    rng = np.random.default_rng(1)
    grads = torch.tensor(rng.normal(size=(50, 8)) * rng.random(8) * 3)
    block = grads.T @ grads
    start = [0, 1, 2, 3]
    kept, swaps = rearrange_layer(block, start)
    assert len(kept) == 4 and swaps >= 0
    assert pruned_fisher(block, kept) <= pruned_fisher(block, start)
    for out_unit, in_unit in itertools.product(kept, [i for i in range(8) if i not in kept]):
        swapped = sorted([*(k for k in kept if k != out_unit), in_unit])
        assert pruned_fisher(block, swapped) >= pruned_fisher(block, kept) - 1e-9
    assert rearrange_layer(block, [])[0] == [] and rearrange_layer(block, list(range(8)))[0] == list(range(8))


def test_pruned_loss_from_gradients_equals_the_fisher_block_form():
    from slimformer.budget.fisher import MaskGradients

    grads = torch.tensor(np.random.default_rng(2).normal(size=(40, 9)), dtype=torch.float32)
    for kept in ([], [0, 4, 8], list(range(9)), [1, 2, 3, 5, 6]):
        expected = pruned_fisher(MaskGradients.block(grads), kept)
        assert MaskGradients.pruned_loss(grads, kept) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_rearrange_keeps_counts_per_layer():
    model = tiny_model("bert")
    grads = collect_mask_gradients(model, batches(2), progress=False)
    layout = Layout.of(model)
    plan = search_masks(layout, grads.head_fisher(), grads.neuron_fisher(), 0.5, UnitCosts.flops(layout, 9))
    again = rearrange(plan, grads.heads, grads.neurons)
    assert [len(k) for k in again.kept_heads] == [len(k) for k in plan.kept_heads]
    assert [len(k) for k in again.kept_neurons] == [len(k) for k in plan.kept_neurons]


def assert_folding_is_exact(model, plan, gates, inputs) -> None:
    """Scales folded into the weights, then physical removal, must equal the gated model."""
    with torch.no_grad(), gated(model, gates):
        expected = model(**inputs).logits
    pruned = copy.deepcopy(model)
    fold_scales(pruned, gates)
    remove(pruned, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_tuned_masks_fold_into_an_ordinary_pruned_model(family):
    model = tiny_model(family)
    data = batches(3)
    grads = collect_mask_gradients(model, data, progress=False)
    layout = Layout.of(model)
    plan = search_masks(
        layout,
        grads.head_fisher(),
        grads.neuron_fisher(),
        0.5,
        UnitCosts.flops(layout, 9),
        model_type=model.config.model_type,
    )
    gates, report = tune_masks(model, plan, data, progress=False)
    for entry in report.layers:
        assert entry["relative_error_tuned"] <= entry["relative_error_ones"] + 1e-12
    inputs = tiny_inputs(seed=5)
    assert_folding_is_exact(model, plan, gates, inputs)


def test_normal_equations_equal_the_measured_reconstruction_error():
    # The error predicted from A^T A, A^T r and r^T r must equal ||sub-layer output - dense output||^2 measured
    # directly with the gates in place, for the masks being tuned.
    model = tiny_model("bert")
    data = batches(2)
    layout = Layout.of(model)
    plan = PruningPlan(
        layout=layout,
        kept_heads=[[0, 2], [1, 2, 3]],
        kept_neurons=[list(range(0, 64, 3)), list(range(40))],
        model_type="bert",
    )
    gates = plan_gates(model, plan)
    kept = plan.kept_heads[0]
    steps = walk_sublayers(model, gates, data, torch.device("cpu"))
    view, part, source = next(steps)
    assert (view.index, part) == (0, "attention")
    gram, rhs, residual_sq, _ = _normal_equations(view, part, kept, source())
    steps.close()
    scales = torch.tensor([0.7, 1.3], dtype=torch.float64)
    predicted = float(scales @ gram @ scales - 2 * scales @ rhs + residual_sq)
    gates.heads[0][kept] = scales.float()
    measured = 0.0
    seen: dict = {}
    hook = view.layer.attention.output.LayerNorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("s", a[0]))
    for batch in data:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), gated(model, gates):
            model(**inputs)
        student = seen["s"]
        with torch.no_grad():
            model(**inputs)
        dense = seen["s"]
        valid = batch["attention_mask"].bool()
        measured += float(((student - dense)[valid].double() ** 2).sum())
    hook.remove()
    assert predicted == pytest.approx(measured, rel=1e-4)


def fake_table(layout: Layout) -> LatencyTable:
    heads, ffn = max(layout.heads), max(layout.ffn)
    return LatencyTable(
        head_counts=list(range(heads + 1)),
        attn_ms=[10.0 + 3.0 * h + (2.0 if h else 0.0) for h in range(heads + 1)],
        neuron_counts=[0, ffn // 2, ffn],
        ffn_ms=[10.0, 20.0, 30.0],
        fixed_ms=10.0,
        rest_ms=5.0,
        key={"hidden": layout.hidden, "head_size": layout.head_size},
    )


def test_latency_budget_search_meets_the_predicted_budget():
    model = tiny_model("bert")
    grads = collect_mask_gradients(model, batches(2), progress=False)
    table = fake_table(Layout.of(model))
    plan, info = plan_for_budget(model, grads, budget_latency=0.6, seq_len=9, latency_table=table)
    assert info["predicted_pruned_ms"] <= 0.6 * info["predicted_dense_ms"] + 1e-9
    assert table.model_ms(plan.result_layout()) == pytest.approx(info["predicted_pruned_ms"])
    with pytest.raises(SlimformerError, match="cannot be met"):
        plan_for_budget(model, grads, budget_latency=0.01, seq_len=9, latency_table=table)


def test_budget_prune_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    out = tmp_path / "pruned"
    result = slimformer.prune(
        tiny_model_dir,
        slimformer.FlopsBudget(0.5, calibration_examples=32, seq_len=16),
        "sst2",
        data_dir=glue,
        out=out,
        max_length=16,
        seq_len=16,
        measure=True,
        progress=False,
    )
    report = json.loads((out / "metrics.json").read_text())
    models = report["models"]
    assert models["after"]["encoder_flops"] <= 0.5 * models["before"]["encoder_flops"]
    assert set(report["seconds"]) >= {"fisher", "search", "rearrange", "tune", "remove", "evaluate_after"}
    details = report["details"]
    assert details["fisher_loss_estimate"]["rearranged"] <= details["fisher_loss_estimate"]["searched"] + 1e-9
    assert report["latency"]["speedup"] > 0 and report["primary_metric"] == "accuracy"
    assert result.plan == PruningPlan.load(out / "plan.json")
    reloaded = load_model(out)
    assert flops(reloaded.model, seq_len=16).encoder == models["after"]["encoder_flops"]
    assert "ZipLM" in details["description"] and len(details["tuning"]) == 4  # refit weights by default
    # a binary task model: the labels' Fisher and its rearranged choice of units
    assert details["fisher"] == "empirical" and details["unit_choice"] == "fisher"
    # the default Fisher precision follows the processor: bfloat16 only where it multiplies it natively
    assert details["fisher_precision"] == ("bfloat16" if native_bfloat16(torch.device("cpu")) else "float32")
    inputs = tiny_inputs(seed=2)
    inputs["input_ids"] = inputs["input_ids"] + 1000  # real word-piece ids of the MiniLM vocabulary
    with torch.no_grad():  # what was saved is the refit, pruned model
        torch.testing.assert_close(reloaded.model(**inputs).logits, result.model(**inputs).logits, atol=1e-5, rtol=0)


def test_local_target_tuning_also_folds_exactly():
    model = tiny_model("roberta")
    data = batches(3)
    layout = Layout.of(model)
    plan = PruningPlan(
        layout=layout,
        kept_heads=[[0, 3], [1]],
        kept_neurons=[list(range(0, 64, 2)), list(range(9))],
        model_type="roberta",
    )
    gates, report = tune_masks(model, plan, data, target="local", progress=False)
    assert all(e["relative_error_tuned"] <= e["relative_error_ones"] + 1e-12 for e in report.layers)
    inputs = tiny_inputs(seed=3)
    assert_folding_is_exact(model, plan, gates, inputs)


def final_hidden_error(model, reference, data, gates=None) -> float:
    """Squared distance of ``model``'s last hidden states (optionally gated) to ``reference``'s, real tokens."""
    total = 0.0
    for batch in data:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            expected = reference(**inputs, output_hidden_states=True).hidden_states[-1]
            if gates is None:
                got = model(**inputs, output_hidden_states=True).hidden_states[-1]
            else:
                with gated(model, gates):
                    got = model(**inputs, output_hidden_states=True).hidden_states[-1]
        total += float(((got - expected)[batch["attention_mask"].bool()] ** 2).sum())
    return total


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_weight_reconstruction_brings_the_pruned_model_back_towards_the_dense_one(family):
    dense = tiny_model(family)
    data = batches(6)
    layout = Layout.of(dense)
    plan = PruningPlan(
        layout=layout,
        kept_heads=[[0, 2], [1, 2, 3]],
        kept_neurons=[list(range(0, 64, 3)), list(range(40))],
        model_type=dense.config.model_type,
    )
    untuned = final_hidden_error(dense, dense, data, plan_gates(dense, plan))
    model = copy.deepcopy(dense)
    report = reconstruct_weights(model, plan, data, progress=False)
    assert len(report.layers) == 4
    assert all(e["relative_error_tuned"] <= e["relative_error_ones"] for e in report.layers)
    # the refit weights, with the pruned units still present but gated off, equal the physically pruned model
    inputs = tiny_inputs(seed=5)
    with torch.no_grad(), gated(model, plan_gates(model, plan)):
        expected = model(**inputs).logits
    tuned_error = final_hidden_error(model, dense, data, plan_gates(model, plan))
    remove(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
    assert final_hidden_error(model, dense, data) == pytest.approx(tuned_error, rel=1e-4)
    assert tuned_error < 0.5 * untuned  # on the calibration data the refit must do much better than 0/1 masks


def test_weight_reconstruction_solves_the_first_sublayers_least_squares_problem():
    # Layer 0's attention sees the same input in the dense and the pruned model, so its refit output projection
    # must be the ordinary least-squares fit of (dense sub-layer output - input) on the kept heads' contexts.
    dense = tiny_model("bert")
    data = batches(8)
    layout = Layout.of(dense)
    plan = PruningPlan(
        layout=layout, kept_heads=[[1, 3], [0, 1, 2, 3]], kept_neurons=[list(range(64))] * 2, model_type="bert"
    )
    view = layer_views(dense)[0]
    seen: dict = {}
    handles = [
        view.attn_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("context", a[0])),
        view.attn_out.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out)),
    ]
    contexts, outputs = [], []
    for batch in data:
        with torch.no_grad():
            dense(**{k: v for k, v in batch.items() if k != "labels"})
        valid = batch["attention_mask"].bool()
        contexts.append(seen["context"][valid])
        outputs.append(seen["out"][valid])
    for handle in handles:
        handle.remove()
    columns = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in (1, 3)])
    features = torch.cat(contexts)[:, columns].double()
    features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    expected = torch.linalg.lstsq(features, torch.cat(outputs).double()).solution.T  # [hidden, 16 + bias]
    model = copy.deepcopy(dense)
    reconstruct_weights(model, plan, data, damping=1e-10, progress=False)
    got = layer_views(model)[0].attn_out
    torch.testing.assert_close(got.weight[:, columns].double(), expected[:, :-1].to(torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.bias.double(), expected[:, -1], atol=1e-4, rtol=0)


def ridge_problem(rows: int = 6, units: int = 5, tokens: int = 200, seed: int = 0):
    """A small least-squares problem whose last two input columns are nearly collinear: the direction a
    weak ridge lets grow."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, units, generator=generator, dtype=torch.float64)
    x[:, -1] = x[:, -2] + 1e-3 * torch.randn(tokens, generator=generator, dtype=torch.float64)
    w0 = torch.randn(units, rows, generator=generator, dtype=torch.float64)
    r = x @ w0 + 0.3 * torch.randn(tokens, rows, generator=generator, dtype=torch.float64)
    return x, w0, r


def test_row_scaled_ridge_solves_each_rows_own_system():
    x, w0, r = ridge_problem()
    gram, cross = x.T @ x, x.T @ r
    penalty = torch.linspace(0.5, 2.0, gram.shape[0], dtype=torch.float64)  # uneven, like the nearly free bias
    scales = torch.tensor([1.0, 3.0, 1.0, 50.0, 7.5, 1.0], dtype=torch.float64)
    got = ridge_solution(gram, cross, w0, penalty, scales)
    for j, s in enumerate(scales):
        expected = torch.linalg.solve(gram + s * torch.diag(penalty), cross[:, j] + s * penalty * w0[:, j])
        torch.testing.assert_close(got[:, j], expected, atol=1e-10, rtol=1e-10)
    # every scale 1: the one shared solve
    torch.testing.assert_close(
        ridge_solution(gram, cross, w0, penalty, torch.ones(len(scales), dtype=torch.float64)),
        ridge_solution(gram, cross, w0, penalty),
        atol=1e-10,
        rtol=1e-10,
    )


def test_row_scaled_ridge_keeps_a_massive_rows_weights_from_growing_with_its_scale():
    # one output row (a "massive activation" dimension) has a 1,000 times larger target and start than the
    # others: with one ridge for all rows its weights move 1,000 times further along the ill-conditioned
    # direction; with the ridge scaled by the row's energy the move stays that of an ordinary row
    x, w0, r = ridge_problem()
    massive = 2
    w_start = w0.clone() * 0.8  # the fit has somewhere to go from its start
    big_r, big_start = r.clone(), w_start.clone()
    big_r[:, massive] *= 1000.0
    big_start[:, massive] *= 1000.0
    gram = x.T @ x
    ridge = 1e-2 * float(gram.diagonal().mean())
    penalty = torch.full((gram.shape[0],), ridge, dtype=torch.float64)
    rows = lambda target, start: ((target - x @ start) ** 2).sum(0)  # noqa: E731  residual energy per row

    def move(scaled: bool) -> float:
        solution = ridge_solution(
            gram, x.T @ big_r, big_start, penalty, row_scales(rows(big_r, big_start)) if scaled else None
        )
        return float((solution[:, massive] - big_start[:, massive]).norm())

    ordinary = ridge_solution(gram, x.T @ r, w_start, penalty)
    ordinary_move = float((ordinary[:, massive] - w_start[:, massive]).norm())
    assert move(scaled=False) > 500 * ordinary_move
    assert move(scaled=True) < 50 * ordinary_move
    # rows at or below the median energy keep the plain ridge; the others are scaled by their energy over it
    assert row_scales(torch.tensor([1.0, 2.0, 2.0, 3.0, 200.0], dtype=torch.float64)).tolist() == [1, 1, 1, 1.5, 100]


def uneven_plan(model) -> PruningPlan:
    return PruningPlan(
        layout=Layout.of(model),
        kept_heads=[[0, 2], [1, 2, 3]],
        kept_neurons=[list(range(0, 64, 3)), list(range(40))],
        model_type=model.config.model_type,
    )


def projection_weights(model) -> list[torch.Tensor]:
    return [
        t.detach().clone() for v in layer_views(model) for m in (v.attn_out, v.ffn_down) for t in (m.weight, m.bias)
    ]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_streamed_refit_equals_the_refit_that_reruns_the_model_for_every_sublayer(family):
    # float64 throughout, so that the comparison is about the algorithm, not rounding
    dense = tiny_model(family).double()
    data = batches(4)
    plan = uneven_plan(dense)
    streamed, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    report = reconstruct_weights(streamed, plan, data, progress=False)
    reference_reconstruct_weights(reference, plan, data, progress=False)
    for got, expected in zip(projection_weights(streamed), projection_weights(reference), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert report.memory["bytes_spilled"] == 0 and report.memory["peak_bytes_in_ram"] > 0
    assert projection_weights(streamed)[0].ne(projection_weights(dense)[0]).any()  # something was refit


def test_streamed_refit_runs_the_layer_when_the_ffn_step_was_skipped():
    # a layer with no neuron kept has no FFN fit, so the pruned stream cannot be advanced from what that step saw
    dense = tiny_model("bert").double()
    data = batches(3)
    plan = uneven_plan(dense)
    plan.kept_neurons[0] = []
    streamed, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    reconstruct_weights(streamed, plan, data, progress=False)
    reference_reconstruct_weights(reference, plan, data, progress=False)
    for got, expected in zip(projection_weights(streamed), projection_weights(reference), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_pruned_stream_advanced_from_the_ffn_step_equals_running_the_layer(family):
    # the walk's shortcut (layer output = FFN LayerNorm(x + down(gate * units)), from what the FFN step saw)
    # against running the gated layer, fractional gates included
    model = tiny_model(family).double()
    gates = plan_gates(model, uneven_plan(model))
    gates.neurons = [g * 0.5 for g in gates.neurons]
    data = batches(2)
    calls = _LayerCalls(model, data, torch.device("cpu"))
    expected, seen = {}, {}
    for view, part, source in walk_sublayers(model, gates, data, torch.device("cpu"), dense_targets=False):
        if view.index == 0:
            list(source())
            if part == "ffn":  # layer 0 as it will be left: run it on the first layer's input
                with gated(model, gates):
                    for index in range(len(data)):
                        hidden, args, kwargs, valid = calls(index)
                        expected[index] = _run_layer(view.layer, hidden, args, kwargs)[valid]
        else:  # layer 1's attention step reads the pruned stream the shortcut made
            seen = {index: batch.x for index, batch in enumerate(source())}
            break
    assert len(seen) == len(expected) == len(data)
    for index in expected:
        torch.testing.assert_close(seen[index], expected[index], atol=1e-10, rtol=0)


@pytest.mark.parametrize("target", ["global", "local"])
def test_streamed_mask_tuning_equals_the_rerunning_one(target):
    dense = tiny_model("mpnet").double()
    data = batches(3)
    plan = uneven_plan(dense)
    gates, _ = tune_masks(dense, plan, data, target=target, progress=False)
    expected, _ = reference_tune_masks(dense, plan, data, target=target, progress=False)
    for got, want in zip(gates.heads + gates.neurons, expected.heads + expected.neurons, strict=True):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=0)


def test_activations_beyond_the_memory_budget_are_spilled_to_disk_with_the_same_result(tmp_path):
    dense = tiny_model("bert")
    data = batches(3)
    plan = uneven_plan(dense)
    in_ram, spilled = copy.deepcopy(dense), copy.deepcopy(dense)
    reconstruct_weights(in_ram, plan, data, progress=False)
    report = reconstruct_weights(spilled, plan, data, max_memory=0, progress=False)
    assert report.memory["peak_bytes_in_ram"] == 0 and report.memory["bytes_spilled"] > 0
    for got, expected in zip(projection_weights(spilled), projection_weights(in_ram), strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_spill_folder_is_removed_afterwards(tmp_path):
    dense = tiny_model("bert")
    plan = uneven_plan(dense)
    gates = plan_gates(dense, plan)
    seen = []
    for _view, _part, source in walk_sublayers(
        dense, gates, batches(2), torch.device("cpu"), max_memory=0, spill_dir=tmp_path
    ):
        list(source())
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
    assert seen[0] and all(len(names) == 1 and names[0].startswith("refit-") for names in seen)
    assert not list(tmp_path.iterdir())


def test_refit_runs_every_layer_the_same_number_of_times():
    # O(L) layer passes: the first layer is not re-run for every later sub-layer
    config = TINY_CONFIGS["bert"]()
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    layout = Layout.of(model)
    plan = PruningPlan(layout=layout, kept_heads=[[0, 1]] * 5, kept_neurons=[list(range(32))] * 5, model_type="bert")
    dense_calls, pruned_calls = [0] * 5, [0] * 5  # per layer: how often its attention ran
    for view in layer_views(model):
        view.attention.slimformer_test_layer = view.index  # copies of the layer (the pruned stream's) keep the tag

    def count(module, args):
        index = getattr(module, "slimformer_test_layer", None)
        if index is not None:  # the dense layer keeps all 4 heads; the pruned stream's copy has 2
            (dense_calls if module.query.out_features == 4 * 8 else pruned_calls)[index] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        reconstruct_weights(model, plan, batches(2), progress=False)
    finally:
        handle.remove()
    # per batch: the dense layer once and the pruned layer's attention (its pruned heads removed) once: the FFN step
    # computes the FFN from the contexts the attention step saw, and the layer's output comes from what the FFN step
    # saw, not from further passes
    assert dense_calls == [2] * 5 and pruned_calls == [2] * 5


def test_max_memory_is_a_human_size_or_a_clear_error():
    assert parse_memory("6GB") == 6 * 10**9 and parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("2e9") == 2 * 10**9 and parse_memory(None) is None
    assert slimformer.FlopsBudget(0.5, max_memory="1.5GiB").max_memory == "1.5GiB"
    for bad in ("lots", "-3GB", "6TB"):
        with pytest.raises(ConfigError, match="not a size"):
            slimformer.FlopsBudget(0.5, max_memory=bad)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_the_task_head_alone_on_the_final_hidden_states_gives_the_models_logits(family):
    model = tiny_model(family)
    data = batches(2)
    calls = _LayerCalls(model, data, torch.device("cpu"))
    for index, batch in enumerate(data):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            full = model(**inputs, output_hidden_states=True)
        _, logits = head_io(model, calls, index, full.hidden_states[-1])
        torch.testing.assert_close(logits, full.logits, atol=1e-6, rtol=0)
    assert len(layer_views(model)) == 2  # the layers are back


def logit_error(model, reference, data) -> float:
    total = 0.0
    for batch in data:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            total += float(((model(**inputs).logits - reference(**inputs).logits) ** 2).sum())
    return total


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_the_classification_head_reads_only_the_first_token_as_the_spec_says(family):
    # what lets the refit fit the last layer on first tokens only: the other positions reach no logit
    model = tiny_model(family)
    assert get_spec(model).head_reads_first_token
    inputs = tiny_inputs()
    last = layer_views(model)[-1].layer

    def scramble(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        changed = torch.cat([hidden[:, :1], torch.randn_like(hidden[:, 1:]) * 10], dim=1)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    with torch.no_grad():
        expected = model(**inputs).logits
        handle = last.register_forward_hook(scramble)
        try:
            got = model(**inputs).logits
        finally:
            handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_fitting_the_last_layer_on_first_tokens_brings_the_first_tokens_closer():
    dense = tiny_model("bert").double()
    data = batches(4)
    plan = uneven_plan(dense)
    errors = {}
    for rows in ("all", "first"):
        model = copy.deepcopy(dense)
        reconstruct_weights(model, plan, data, last_layer_rows=rows, progress=False)
        remove(model, plan)
        errors[rows] = sum(
            float((final_states(model, b)[:, 0] - final_states(dense, b)[:, 0]).pow(2).sum()) for b in data
        )
    assert errors["first"] < errors["all"]


def final_states(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_refitting_the_head_brings_the_logits_closer_to_the_dense_ones(family):
    dense = tiny_model(family)
    data = batches(8)
    plan = uneven_plan(dense)
    without, with_head = copy.deepcopy(dense), copy.deepcopy(dense)
    reconstruct_weights(without, plan, data, progress=False)
    report = reconstruct_weights(with_head, plan, data, fit_head=True, progress=False)
    assert report.layers[-1]["layer"] == "head" and report.layers[-1]["units"] == output_layer(dense).in_features
    # everything but the output layer is refit identically
    for got, expected in zip(projection_weights(with_head), projection_weights(without), strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    remove(without, plan)
    remove(with_head, plan)
    assert logit_error(with_head, dense, data) < logit_error(without, dense, data)


def test_fisher_micro_batches_give_the_same_per_example_gradients():
    model = tiny_model("bert")
    data = batches(n=2, size=6, seq=9)
    whole = collect_mask_gradients(model, data, max_tokens_per_pass=10**6, progress=False)
    split = collect_mask_gradients(model, data, max_tokens_per_pass=20, progress=False)  # 2 rows of 9 per pass
    assert split.n_examples == whole.n_examples == 12
    for got, expected in zip(split.heads + split.neurons, whole.heads + whole.neurons, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    from slimformer.budget.fisher import micro_batches

    pieces = micro_batches(data, 20)
    assert [len(p["input_ids"]) for p in pieces] == [2, 2, 2] * 2 and torch.equal(
        pieces[1]["labels"], data[0]["labels"][2:4]
    )


def test_layer_scaled_fisher_spreads_the_budget_more_evenly_across_layers():
    from slimformer.budget.fisher import MaskGradients

    model = tiny_model("bert")
    generator = torch.Generator().manual_seed(0)
    # layer 0's units look 1000x more important than layer 1's (as early vs late layers of an embedding model)
    scale = [30.0, 1.0]
    gradients = MaskGradients(
        heads=[s * torch.rand(16, 4, generator=generator) for s in scale],
        neurons=[s * torch.rand(16, 64, generator=generator) for s in scale],
    )
    kept = {}
    for fisher_scale in ("global", "layer"):
        plan, _ = plan_for_budget(model, gradients, budget_flops=0.5, seq_len=16, fisher_scale=fisher_scale)
        layout = plan.result_layout()
        assert flops(remove(copy.deepcopy(model), plan), seq_len=16).encoder <= 0.5 * flops(model, seq_len=16).encoder
        kept[fisher_scale] = [h * 16 + f for h, f in zip(layout.heads, layout.ffn, strict=True)]  # rough unit mass
    assert kept["global"][1] < kept["layer"][1] and kept["layer"][0] < kept["global"][0]
    with pytest.raises(ConfigError, match="fisher_scale"):
        slimformer.FlopsBudget(0.5, fisher_scale="per-head")


def test_neuron_weight_trades_neurons_for_heads_within_the_same_flops():
    from slimformer.budget.fisher import MaskGradients
    from slimformer.budget.method import EMBEDDING_TOKEN_WEIGHTING, default_neuron_weight, default_token_weighting
    from slimformer.embedding import SentenceEmbedder

    model = tiny_model("bert")
    generator = torch.Generator().manual_seed(1)
    gradients = MaskGradients(
        heads=[torch.rand(16, 4, generator=generator) for _ in range(2)],
        neurons=[0.2 * torch.rand(16, 64, generator=generator) for _ in range(2)],
    )
    heads_kept, neurons_kept = {}, {}
    for weight in (4.0, 1.0, 0.25):
        plan, _ = plan_for_budget(model, gradients, budget_flops=0.5, seq_len=16, neuron_weight=weight)
        assert flops(remove(copy.deepcopy(model), plan), seq_len=16).encoder <= 0.5 * flops(model, seq_len=16).encoder
        heads_kept[weight], neurons_kept[weight] = sum(plan.result_layout().heads), sum(plan.result_layout().ffn)
    assert heads_kept[4.0] < heads_kept[1.0] < heads_kept[0.25]
    assert neurons_kept[4.0] > neurons_kept[1.0] > neurons_kept[0.25]
    # the default: half for a sentence-embedding model refit by least squares, 1 for task models and other tunings
    embedder = SentenceEmbedder(transformers.BertModel(model.config))
    assert default_neuron_weight(embedder, slimformer.FlopsBudget(0.5)) == 0.5
    assert default_neuron_weight(embedder, slimformer.FlopsBudget(0.5, tune="scales")) == 1.0
    assert default_neuron_weight(model, slimformer.FlopsBudget(0.5)) == 1.0
    # tokens weighted by sensitivity in the refit of a sentence-embedding model only
    assert default_token_weighting(embedder, slimformer.FlopsBudget(0.5)) == EMBEDDING_TOKEN_WEIGHTING > 0
    assert default_token_weighting(embedder, slimformer.FlopsBudget(0.5, tune="scales")) == 0.0
    assert default_token_weighting(model, slimformer.FlopsBudget(0.5)) == 0.0
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="neuron_weight"):
            slimformer.FlopsBudget(0.5, neuron_weight=bad)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_silenced_units_give_the_outputs_of_the_model_they_are_removed_from(family):
    from slimformer.prune.apply import silence

    model = tiny_model(family)
    plan = uneven_plan(model)
    silenced, removed = copy.deepcopy(model), remove(copy.deepcopy(model), plan)
    silence(silenced, plan)
    assert [view.num_heads for view in layer_views(silenced)] == list(plan.layout.heads)  # same shape
    inputs = tiny_inputs(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(silenced(**inputs).logits, removed(**inputs).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(silenced(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    with pytest.raises(SlimformerError, match="heads and neurons only"):
        silence(model, PruningPlan(**{**vars(plan), "dropped_layers": [1]}))


def only_units_of(plan: PruningPlan, earlier: PruningPlan) -> bool:
    pairs = [*zip(plan.kept_heads, earlier.kept_heads, strict=True)]
    pairs += zip(plan.kept_neurons, earlier.kept_neurons, strict=True)
    return all(set(kept) <= set(left) for kept, left in pairs)


def test_a_later_round_never_brings_back_units_an_earlier_round_removed():
    layout = Layout(heads=(4, 4), ffn=(6, 6), head_size=4, hidden=16)
    costs = UnitCosts(head=5.0, neuron=2.0, seq_len=1)
    alive = PruningPlan(layout=layout, kept_heads=[[0, 1, 2], [1, 3]], kept_neurons=[[0, 2, 4, 5], [1, 2, 3]])
    # the units the earlier round removed look the most important now: they must stay out all the same
    heads_imp = [np.array([0.1, 0.2, 0.3, 9.0]), np.array([9.0, 0.4, 9.0, 0.5])]
    neurons_imp = [np.array([0.1, 9.0, 0.2, 9.0, 0.3, 0.4]), np.array([9.0, 0.5, 0.6, 0.7, 9.0, 9.0])]
    free = search_masks(layout, heads_imp, neurons_imp, 0.4, costs)
    assert 3 in free.kept_heads[0]  # without `alive` the search takes them: the check below can fail
    plan = search_masks(layout, heads_imp, neurons_imp, 0.4, costs, alive=alive)
    assert only_units_of(plan, alive)
    assert costs.total(sum(map(len, plan.kept_heads)), sum(map(len, plan.kept_neurons))) <= 0.4 * costs.total(8, 12)
    # the rearrangement swaps only among the units still there; the counts stay
    rng = np.random.default_rng(4)
    head_grads = [torch.tensor(rng.normal(size=(30, 4)) * [1, 1, 1, 50]) for _ in range(2)]
    neuron_grads = [torch.tensor(rng.normal(size=(30, 6)) * [1, 50, 1, 50, 1, 1]) for _ in range(2)]
    free = rearrange(plan, head_grads, neuron_grads)
    assert any(3 in kept for kept in free.kept_heads) or any(1 in kept for kept in free.kept_neurons[:1])
    again = rearrange(plan, head_grads, neuron_grads, alive=alive)
    assert only_units_of(again, alive)
    assert [len(k) for k in again.kept_heads] == [len(k) for k in plan.kept_heads]
    assert [len(k) for k in again.kept_neurons] == [len(k) for k in plan.kept_neurons]


def test_stepwise_budget_pruning_measures_the_fisher_again_on_the_pruned_model(tiny_model_dir, tmp_path, monkeypatch):
    import slimformer.budget.method as method
    from test_cli import invoke

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    silent_columns = []  # per later Fisher: were the units pruned so far silent in the model it measured?
    collect = method.collect_mask_gradients

    def spy(model, batches, **kwargs):
        views = layer_views(model)
        silent_columns.append([float(view.attn_out.weight.abs().sum(0).eq(0).float().sum()) for view in views])
        return collect(model, batches, **kwargs)

    monkeypatch.setattr(method, "collect_mask_gradients", spy)
    out = tmp_path / "two-steps"
    common = ["--task", "sst2", "--data-dir", glue, "--max-length", "16", "--seq-len", "16"]
    invoke("prune", "--model", tiny_model_dir, *common, "--out", out, "--budget-flops", "0.5", "--budget-steps", "2",
           "--calibration-examples", "32")  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["steps"] == 2 and "in 2 steps" in report["details"]["description"]
    rounds = report["details"]["steps"]
    assert [r["fraction"] for r in rounds] == pytest.approx([0.5**0.5, 0.5])
    assert len(silent_columns) == 1 and sum(silent_columns[0]) > 0  # one more Fisher, on the silenced model
    models = report["models"]
    assert models["after"]["encoder_flops"] <= 0.5 * models["before"]["encoder_flops"]
    with pytest.raises(ConfigError, match="steps"):
        slimformer.FlopsBudget(0.5, steps=0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("rows", ["all", "first"])
def test_refit_from_targets_recorded_during_the_fisher_equals_the_refit_with_a_dense_stream(family, rows):
    # the Fisher's forward passes (every mask at 1, batches cut into pieces of rows) are the dense model's: what
    # they record must give the weights of the refit that runs the dense model beside the pruned one
    from slimformer.budget.stream import DenseTargets

    dense = tiny_model(family).double()
    data = batches(3, size=5)
    plan = uneven_plan(dense)
    streamed, recorded_refit = copy.deepcopy(dense), copy.deepcopy(dense)
    reconstruct_weights(streamed, plan, data, last_layer_rows=rows, fit_head=True, progress=False)
    with DenseTargets(recorded_refit, last_layer_rows=rows, head=True) as recorded:
        collect_mask_gradients(recorded_refit, data, max_tokens_per_pass=20, record=recorded, progress=False)
        assert recorded.piece_rows == [2, 2, 1] * 3  # 20 tokens per pass: pieces of 2 rows of 9
        report = reconstruct_weights(
            recorded_refit, plan, data, last_layer_rows=rows, fit_head=True, dense=recorded, progress=False
        )
    assert report.layers[-1]["part"] == "classifier"
    for got, expected in zip(projection_weights(recorded_refit), projection_weights(streamed), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    head_got, head_expected = output_layer(recorded_refit).weight, output_layer(streamed).weight
    torch.testing.assert_close(head_got, head_expected, atol=1e-10, rtol=0)
    assert projection_weights(recorded_refit)[0].ne(projection_weights(dense)[0]).any()  # something was refit


def test_recorded_targets_beyond_their_memory_share_are_spilled_and_removed_afterwards(tmp_path):
    from slimformer.budget.stream import DenseTargets

    dense = tiny_model("bert")
    data = batches(3)
    plan = uneven_plan(dense)
    in_ram, spilled = copy.deepcopy(dense), copy.deepcopy(dense)
    reconstruct_weights(in_ram, plan, data, progress=False)
    with DenseTargets(spilled, max_memory=0, spill_dir=tmp_path) as recorded:
        collect_mask_gradients(spilled, data, record=recorded, progress=False)
        assert recorded.budget.spilled > 0 and recorded.budget.peak == 0
        (folder,) = tmp_path.iterdir()
        assert folder.name.startswith("dense-targets-")
        reconstruct_weights(spilled, plan, data, dense=recorded, progress=False)
    assert not list(tmp_path.iterdir())
    for got, expected in zip(projection_weights(spilled), projection_weights(in_ram), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_recorded_targets_refuse_batches_the_recorded_pass_did_not_see():
    from slimformer.budget.stream import DenseTargets

    model = tiny_model("bert")
    data = batches(3)
    with DenseTargets(model) as recorded:
        collect_mask_gradients(model, data[:2], record=recorded, progress=False)
        with pytest.raises(ValueError, match="did not see these 3 calibration batches"):
            reconstruct_weights(model, uneven_plan(model), data, dense=recorded, progress=False)
        with pytest.raises(ValueError, match="other last-layer rows"):
            reconstruct_weights(
                model, uneven_plan(model), data[:2], last_layer_rows="first", dense=recorded, progress=False
            )


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_kept_layer_arguments_spare_the_embeddings_and_change_no_weight(family, monkeypatch):
    # the layers' other arguments (masks, MPNet's position bias) are kept per batch instead of recomputed by an
    # embedding pass for every sub-layer; the refit must not notice, and with no room it recomputes them
    from slimformer.budget import stream

    dense = tiny_model(family).double()
    data = batches(3)
    plan = uneven_plan(dense)
    weights, passes = {}, {}
    for room in (0, stream.LAYER_CALLS_CACHE_BYTES):
        monkeypatch.setattr(stream, "LAYER_CALLS_CACHE_BYTES", room)
        model = copy.deepcopy(dense)
        calls = []
        handle = model.base_model.embeddings.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        reconstruct_weights(model, plan, data, progress=False)
        handle.remove()
        weights[room], passes[room] = projection_weights(model), len(calls)
    n_layers = len(layer_views(dense))
    # kept: one embedding pass per batch (the streams' start); recomputed: also one per batch for each layer's dense
    # pass and its attention step (the FFN step runs no layer: it starts from the contexts the attention step saw)
    assert passes[stream.LAYER_CALLS_CACHE_BYTES] == len(data)
    assert passes[0] == len(data) * (1 + 2 * n_layers)
    for got, expected in zip(weights[stream.LAYER_CALLS_CACHE_BYTES], weights[0], strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_fisher_precision_resolves_to_bfloat16_only_for_float32_models(monkeypatch):
    from slimformer.budget import fisher

    model = tiny_model("bert")
    assert fisher.fisher_autocast(model, "float32") is None
    assert fisher.fisher_autocast(model, "bfloat16") == torch.bfloat16
    assert fisher.fisher_autocast(copy.deepcopy(model).double(), "bfloat16") is None  # keeps its own precision
    for native in (True, False):
        monkeypatch.setattr(fisher, "native_bfloat16", lambda device, native=native: native)
        assert fisher.fisher_autocast(model, "auto") == (torch.bfloat16 if native else None)
    assert fisher.native_bfloat16(torch.device("meta")) is False  # only CPUs and CUDA GPUs are asked
    with pytest.raises(ConfigError, match="fisher_precision"):
        slimformer.FlopsBudget(0.5, fisher_precision="float16")


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_bfloat16_fisher_runs_eager_attention_and_gives_the_implementation_back(family):
    model = tiny_model(family)
    before = model.config._attn_implementation
    seen: list[str] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    collect_mask_gradients(model, batches(2), progress=False)
    assert set(seen) == {before}  # float32 passes keep the model's own attention
    seen.clear()
    collect_mask_gradients(model, batches(2), autocast=torch.bfloat16, progress=False)
    assert set(seen) == {"eager"} and model.config._attn_implementation == before


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_bfloat16_fisher_stays_close_and_records_float32_targets(family):
    from slimformer.budget.stream import DenseTargets

    model = tiny_model(family)
    data = batches(3)
    exact = collect_mask_gradients(model, data, progress=False)
    with DenseTargets(model, head=True) as recorded:
        rounded = collect_mask_gradients(model, data, record=recorded, autocast=torch.bfloat16, progress=False)
        stored = [store[0] for store in recorded.stores.values()] + [recorded.logits[0]]
    assert all(t.dtype == torch.float32 for t in stored)
    for got, expected in zip(rounded.heads + rounded.neurons, exact.heads + exact.neurons, strict=True):
        assert got.dtype == torch.float32
        # bfloat16 keeps 8 bits of mantissa: per-example gradients within a few per cent of the float32 ones
        error = (got - expected).norm() / expected.norm()
        assert 0 < error < 0.05


def refit_problem(width: int, units: int = 8, tokens: int = 200, rows: int = 5, seed: int = 0):
    """A ridge refit problem of ``units`` groups of ``width`` columns plus a column of ones (the bias), in which
    unit 3 repeats unit 2's columns: one of the pair costs nothing to remove."""
    generator = torch.Generator().manual_seed(seed)
    n = units * width + 1
    x = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    x[:, 3 * width : 4 * width] = x[:, 2 * width : 3 * width]
    x[:, -1] = 1.0
    r = x[:, :4] @ torch.randn(4, rows, generator=generator, dtype=torch.float64)
    r = r + torch.randn(tokens, rows, generator=generator, dtype=torch.float64)
    w0 = 0.3 * torch.randn(n, rows, generator=generator, dtype=torch.float64)
    w0[-1] = 0.0
    penalty = torch.full((n,), 5.0, dtype=torch.float64)
    penalty[-1] = 1e-2
    weights = 0.5 + torch.rand(rows, generator=generator, dtype=torch.float64)
    groups = [torch.arange(u * width, (u + 1) * width) for u in range(units)]
    return x, r, w0, penalty, weights, groups


def refit_error(x, r, w0, penalty, weights, columns) -> float:
    """The weighted ridge objective of the refit on these columns, solved directly."""
    xk, pk, wk = x[:, columns], penalty[columns], w0[columns]
    solution = torch.linalg.solve(xk.T @ xk + torch.diag(pk), xk.T @ r + pk[:, None] * wk)
    per_row = (xk @ solution - r).pow(2).sum(0) + (pk[:, None] * (solution - wk).pow(2)).sum(0)
    return float((per_row * weights).sum())


@pytest.mark.parametrize("width", [1, 3])
def test_least_error_units_tracks_the_refit_error_of_what_it_keeps(width):
    x, r, w0, penalty, weights, groups = refit_problem(width)
    bias = torch.tensor([x.shape[1] - 1])
    kept, rises = least_error_units(x.T @ x, x.T @ r, w0, penalty, groups, 3, weights)
    assert len(kept) == 3 and len(rises) == 5
    full = refit_error(x, r, w0, penalty, weights, torch.arange(x.shape[1]))
    columns = torch.cat([groups[u] for u in kept] + [bias])
    # the closed-form updates give exactly the error of refitting the kept units from scratch
    assert refit_error(x, r, w0, penalty, weights, columns) == pytest.approx(full + sum(rises), rel=1e-9)
    # the duplicated unit goes first, at no cost beyond the ridge it no longer pays
    assert rises[0] == min(rises) and not {2, 3} <= set(kept)
    # no other choice of 3 units refits better on this small case
    best = min(
        refit_error(x, r, w0, penalty, weights, torch.cat([groups[u] for u in choice] + [bias]))
        for choice in itertools.combinations(range(len(groups)), 3)
    )
    assert refit_error(x, r, w0, penalty, weights, columns) == pytest.approx(best, rel=1e-9)
    # with more units to remove, several go per step (jointly accounted): still exactly the refit's error
    x, r, w0, penalty, weights, groups = refit_problem(width, units=40, tokens=400)
    bias = torch.tensor([x.shape[1] - 1])
    kept, rises = least_error_units(x.T @ x, x.T @ r, w0, penalty, groups, 5, weights)
    assert len(kept) == 5 and len(rises) < 35
    full = refit_error(x, r, w0, penalty, weights, torch.arange(x.shape[1]))
    columns = torch.cat([groups[u] for u in kept] + [bias])
    assert refit_error(x, r, w0, penalty, weights, columns) == pytest.approx(full + sum(rises), rel=1e-9)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_units_chosen_by_the_refit_keep_the_counts_and_refit_as_that_plan_would(family):
    dense = tiny_model(family).double()
    data = batches(4)
    plan = uneven_plan(dense)
    choosing, again = copy.deepcopy(dense), copy.deepcopy(dense)
    report = reconstruct_weights(choosing, plan, data, choose_units=True, progress=False)
    chosen = report.plan
    assert [len(k) for k in chosen.kept_heads] == [len(k) for k in plan.kept_heads]
    assert [len(k) for k in chosen.kept_neurons] == [len(k) for k in plan.kept_neurons]
    assert chosen.kept_neurons != plan.kept_neurons  # a choice was made (the plan's neurons are arbitrary)
    # refitting the chosen plan from the dense model gives the same weights: the choice and the refit saw the
    # same pruned stream, contexts of the heads not chosen included
    reconstruct_weights(again, chosen, data, progress=False)
    for got, expected in zip(projection_weights(choosing), projection_weights(again), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)
    # and the chosen units refit closer to the dense model than the plan's own
    fisher_choice = copy.deepcopy(dense)
    reconstruct_weights(fisher_choice, plan, data, progress=False)
    error = final_hidden_error(choosing, dense, data, plan_gates(choosing, chosen))
    assert error < final_hidden_error(fisher_choice, dense, data, plan_gates(fisher_choice, plan))


def test_units_chosen_by_the_refit_stay_among_the_candidates():
    dense = tiny_model("bert").double()
    plan = uneven_plan(dense)
    candidates = PruningPlan(
        layout=plan.layout,
        kept_heads=[[0, 1, 2], [1, 2, 3]],
        kept_neurons=[list(range(0, 64, 2)), list(range(50))],
        model_type="bert",
    )
    plan.kept_heads[0] = [0, 2]
    report = reconstruct_weights(
        copy.deepcopy(dense), plan, batches(3), choose_units=True, candidates=candidates, progress=False
    )
    chosen = report.plan.kept_neurons + report.plan.kept_heads
    for kept, pool in zip(chosen, candidates.kept_neurons + candidates.kept_heads, strict=True):
        assert set(kept) <= set(pool)
    assert report.plan.kept_heads[1] == [1, 2, 3]  # as many as the candidates: nothing to choose


def test_the_model_fisher_is_the_default_for_many_classes_only():
    from slimformer.budget.method import MANY_CLASSES, default_fisher

    assert default_fisher(tiny_model("bert", num_labels=MANY_CLASSES)) == "model"
    assert default_fisher(tiny_model("bert", num_labels=MANY_CLASSES - 1)) == "empirical"
    assert default_fisher(tiny_model("bert", num_labels=1)) == "empirical"  # regression
    with pytest.raises(ConfigError, match="Unknown fisher"):
        slimformer.FlopsBudget(0.5, fisher="true")
    with pytest.raises(ConfigError, match="unit_choice"):
        slimformer.FlopsBudget(0.5, unit_choice="magnitude")
    with pytest.raises(ConfigError, match="needs tune='weights'"):
        slimformer.FlopsBudget(0.5, unit_choice="refit", tune="scales")


def test_budget_prune_with_the_model_fisher_and_units_chosen_by_the_refit(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    out = tmp_path / "pruned"
    # a classifier saved with its head, so that both runs below start from the same model
    torch.manual_seed(0)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    classifier.save_pretrained(tmp_path / "classifier")
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "classifier")
    settings = {"calibration_examples": 32, "seq_len": 16, "fisher_precision": "float32"}
    common = {"data_dir": glue, "max_length": 16, "seq_len": 16, "progress": False}
    result = slimformer.prune(
        str(tmp_path / "classifier"),
        slimformer.FlopsBudget(0.5, fisher="model", unit_choice="refit", **settings),
        "sst2",
        out=out,
        **common,
    )
    fisher_only = slimformer.prune(
        str(tmp_path / "classifier"), slimformer.FlopsBudget(0.5, fisher="model", **settings), "sst2", **common
    )
    details = json.loads((out / "metrics.json").read_text())["details"]
    assert details["fisher"] == "model" and details["unit_choice"] == "refit"
    assert "structured OBS" in details["description"] and "rearrangement" not in details["description"]
    # the search's counts per layer, the refit's choice of units
    assert [len(k) for k in result.plan.kept_heads] == [len(k) for k in fisher_only.plan.kept_heads]
    assert [len(k) for k in result.plan.kept_neurons] == [len(k) for k in fisher_only.plan.kept_neurons]
    assert result.plan.kept_neurons != fisher_only.plan.kept_neurons
    assert result.plan == PruningPlan.load(out / "plan.json")
    reloaded = load_model(out)
    inputs = tiny_inputs(seed=2)
    inputs["input_ids"] = inputs["input_ids"] + 1000
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**inputs).logits, result.model(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_token_sensitivities_are_the_squared_gradients_at_each_sublayer_norm(family):
    # recorded from the Fisher's backward (batches cut into pieces of rows), they must be each real token's squared
    # gradient norm at the sub-layer's LayerNorm input under the Fisher's loss, computed here directly
    from slimformer.arch import resolve
    from slimformer.budget.stream import DenseTargets
    from slimformer.gradients import task_loss

    model = tiny_model(family).double()
    data = batches(2, size=5)
    spec = get_spec(model)
    with DenseTargets(model, token_weighting=1.0) as recorded:
        collect_mask_gradients(model, data, max_tokens_per_pass=20, record=recorded, progress=False)
        recorded.match(data)
        for index, batch in enumerate(data):
            seen: dict = {}
            handles = [
                resolve(view.layer, path).register_forward_pre_hook(
                    lambda mod, args, key=(view.index, part), seen=seen: seen.__setitem__(key, args[0])
                )
                for view in layer_views(model)
                for part, path in (("attention", spec.attn_norm), ("ffn", spec.ffn_norm))
            ]
            with torch.enable_grad():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = task_loss(model(**inputs).logits, batch["labels"], False, reduction="sum")
                grads = torch.autograd.grad(loss, list(seen.values()))
            for handle in handles:
                handle.remove()
            valid = batch["attention_mask"].bool()
            mean = {key: total / count for key, (total, count) in recorded._sensitivity_sums.items()}
            for key, grad in zip(seen, grads, strict=True):
                expected = grad.pow(2).sum(-1)[valid]
                got = recorded.weights(*key, index) * mean[key]  # weights are sensitivities over their mean
                torch.testing.assert_close(got.double(), expected, atol=1e-12, rtol=1e-6)


def test_weighted_regression_statistics_equal_repeating_the_rows():
    # a row of weight 2 counts as that row twice: the weighting is the least squares of repeated rows
    from slimformer.budget.stream import SublayerBatch
    from slimformer.budget.tune import _regression_statistics

    generator = torch.Generator().manual_seed(0)
    proj = torch.nn.Linear(6, 4).double()
    x, units, target = (torch.randn(5, n, generator=generator, dtype=torch.float64) for n in (4, 6, 4))
    weights = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    repeat = torch.repeat_interleave(torch.arange(5), weights.long())
    columns = torch.tensor([0, 2, 5])
    weighted = _regression_statistics(proj, columns, [SublayerBatch(x, units, target, weights=weights)], True)
    repeated = _regression_statistics(proj, columns, [SublayerBatch(x[repeat], units[repeat], target[repeat])], True)
    for got, expected in zip(weighted, repeated, strict=True):
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), atol=1e-12, rtol=1e-12)


def test_token_weighting_changes_the_refit_and_is_reported(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    torch.manual_seed(0)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    classifier.save_pretrained(tmp_path / "classifier")
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "classifier")
    settings = {"calibration_examples": 32, "seq_len": 16, "fisher_precision": "float32"}
    common = {"data_dir": glue, "max_length": 16, "seq_len": 16, "progress": False, "evaluate": False}
    results = {}
    for weighting in (0.0, 1.0):
        config = slimformer.FlopsBudget(0.5, token_weighting=weighting, **settings)
        results[weighting] = slimformer.prune(str(tmp_path / "classifier"), config, "sst2", **common)
        assert results[weighting].report["details"]["token_weighting"] == weighting
    # the same plan (the Fisher is not weighted), other refit weights
    assert results[0.0].plan == results[1.0].plan
    pairs = zip(projection_weights(results[0.0].model), projection_weights(results[1.0].model), strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs)
    with pytest.raises(ConfigError, match="token_weighting"):
        slimformer.FlopsBudget(0.5, token_weighting=1.5)
