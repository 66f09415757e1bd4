"""Importance scores on tiny models: gradients checked against an independent autograd path, Fisher, magnitude,
random, label-free scoring, masks, uneven layers, the cache, JSON round trips and plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import tiny_inputs, tiny_model
from slimformer import importance as importance_module
from slimformer.arch import layer_views
from slimformer.errors import SlimformerError
from slimformer.gates import Gates, gated
from slimformer.importance import (
    ImportanceScores,
    compute_importance,
    importance_sample,
    model_fingerprint,
    score_model,
)
from slimformer.models import load_model
from slimformer.plots import plot_curve, plot_head_importance
from slimformer.prune import PruningPlan, plan_gates, remove
from slimformer.tasks import load_task, tokenize_task
from test_train import write_sst2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def batches(n: int = 2, batch: int = 3, seq: int = 7, num_labels: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        inputs = tiny_inputs(batch=batch, seq=seq, seed=i)
        inputs["labels"] = torch.arange(batch) % num_labels
        out.append(inputs)
    return out


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def alpha_gradients(model, batch) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """dL/d alpha where alpha scales weight *columns* instead of gating activations: an independent path.

    Head h of layer l: alpha_h multiplies the output projection's input columns of that head. Neuron i:
    alpha_i multiplies column i of the FFN down projection. MLP of layer l: one alpha on all those columns.
    """
    views = layer_views(model)
    head_alpha = [torch.ones(v.num_heads, dtype=torch.float64, requires_grad=True) for v in views]
    neuron_alpha = [torch.ones(v.ffn_size, dtype=torch.float64, requires_grad=True) for v in views]
    mlp_alpha = torch.ones(len(views), dtype=torch.float64, requires_grad=True)
    replaced = {}
    for i, view in enumerate(views):
        out_weight = view.attn_out.weight
        replaced[module_name(model, view.attn_out) + ".weight"] = out_weight * head_alpha[i].repeat_interleave(
            view.head_size
        )
        down_weight = view.ffn_down.weight
        replaced[module_name(model, view.ffn_down) + ".weight"] = down_weight * (neuron_alpha[i] * mlp_alpha[i])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = functional_call(model, replaced, args=(), kwargs=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    grads = torch.autograd.grad(loss, [*head_alpha, *neuron_alpha, mlp_alpha])
    n = len(views)
    return (
        [g.numpy() for g in grads[:n]],
        [g.numpy() for g in grads[n : 2 * n]],
        grads[2 * n].numpy(),
    )


# ------------------------------------------------------------------------------------------------ gradient


def test_gradient_importance_matches_column_scaling(family_model):
    _, model = family_model
    model = model.double()
    batch = batches(n=1)[0]
    scores = compute_importance(model, [batch], method="gradient", normalize=False, progress=False)
    heads, neurons, mlps = alpha_gradients(model, batch)
    for got, want in zip(scores.heads, heads, strict=True):
        np.testing.assert_allclose(got, np.abs(want), rtol=1e-9, atol=1e-15)
    for got, want in zip(scores.neurons, neurons, strict=True):
        np.testing.assert_allclose(got, np.abs(want), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(scores.mlps, np.abs(mlps), rtol=1e-9, atol=1e-15)
    assert all(h.shape == (4,) for h in scores.heads) and all(n.shape == (64,) for n in scores.neurons)


def test_gradient_is_mean_of_absolute_batch_gradients():
    model = tiny_model("bert").double()
    data = batches(n=3)
    scores = compute_importance(model, data, normalize=False, progress=False)
    per_batch = [alpha_gradients(model, b) for b in data]
    for layer in range(2):
        want = np.mean([np.abs(heads[layer]) for heads, _, _ in per_batch], axis=0)
        np.testing.assert_allclose(scores.heads[layer], want, rtol=1e-9)
    np.testing.assert_allclose(scores.mlps, np.mean([np.abs(m) for _, _, m in per_batch], axis=0), rtol=1e-9)
    assert scores.meta["n_batches"] == 3 and scores.meta["n_examples"] == 9


def test_normalised_rows_have_unit_norm():
    scores = compute_importance(tiny_model("bert"), batches(), progress=False)
    for row in [*scores.heads, *scores.neurons]:
        assert np.linalg.norm(row) == pytest.approx(1.0)
    assert np.linalg.norm(scores.mlps) == pytest.approx(1.0)
    raw = compute_importance(tiny_model("bert"), batches(), normalize=False, progress=False)
    for got, plain in zip(scores.heads, raw.heads, strict=True):
        np.testing.assert_allclose(got, plain / np.linalg.norm(plain), rtol=1e-6)


def test_a_head_with_zero_values_has_zero_importance():
    model = tiny_model("bert")
    view = layer_views(model)[1]
    rows = slice(2 * view.head_size, 3 * view.head_size)  # head 2 of layer 1
    with torch.no_grad():
        view.value.weight[rows] = 0
        view.value.bias[rows] = 0
    scores = compute_importance(model, batches(), normalize=False, progress=False)
    assert scores.heads[1][2] == 0.0
    assert np.all(np.delete(scores.heads[1], 2) > 0) and np.all(scores.heads[0] > 0)
    assert compute_importance(model, method="magnitude", normalize=False).heads[1][2] > 0  # weights are not 0


def test_masking_the_most_important_head_hurts_more_than_the_least():
    model = tiny_model("bert")
    data = batches(n=1)
    scores = compute_importance(model, data, normalize=False, progress=False)

    def loss_without(layer: int, head: int) -> float:
        gates = Gates.ones(model)
        gates.heads[layer][head] = 0.0
        with torch.no_grad(), gated(model, gates):
            logits = model(**{k: v for k, v in data[0].items() if k != "labels"}).logits
        return float(torch.nn.functional.cross_entropy(logits, data[0]["labels"]))

    with torch.no_grad():
        base = float(torch.nn.functional.cross_entropy(model(**tiny_inputs()).logits, data[0]["labels"]))
    matrix = scores.head_matrix()
    top = np.unravel_index(np.argmax(matrix), matrix.shape)
    low = np.unravel_index(np.argmin(matrix), matrix.shape)
    assert abs(loss_without(*top) - base) > abs(loss_without(*low) - base)


# ------------------------------------------------------------------------------------------------ other methods


def test_fisher_is_sum_of_squared_batch_gradients():
    model = tiny_model("distilbert").double()
    data = batches(n=3)
    scores = compute_importance(model, data, method="fisher", normalize=False, progress=False)

    # manual loop with the library's own gates and .backward()
    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.float64, requires_grad=True)

    gates = Gates(heads=[ones(4), ones(4)], neurons=[ones(64), ones(64)])
    for param in model.parameters():
        param.requires_grad_(False)
    want_heads = [np.zeros(4), np.zeros(4)]
    want_neurons = [np.zeros(64), np.zeros(64)]
    for batch in data:
        gates.zero_grad()
        with gated(model, gates):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        heads, neurons, _ = gates.grads()
        for layer in range(2):
            want_heads[layer] += heads[layer].numpy() ** 2
            want_neurons[layer] += neurons[layer].numpy() ** 2
    for layer in range(2):
        np.testing.assert_allclose(scores.heads[layer], want_heads[layer], rtol=1e-9)
        np.testing.assert_allclose(scores.neurons[layer], want_neurons[layer], rtol=1e-9)


@torch.no_grad()
def test_magnitude_matches_manual_norms(family_model):
    _, model = family_model
    scores = compute_importance(model, method="magnitude", normalize=False)
    for layer, view in enumerate(layer_views(model)):
        size = view.head_size
        for head in range(view.num_heads):
            rows = slice(head * size, (head + 1) * size)
            parts = [
                view.query.weight[rows],
                view.key.weight[rows],
                view.value.weight[rows],
                view.attn_out.weight[:, rows],
            ]
            want = torch.sqrt(sum(p.double().pow(2).sum() for p in parts))
            assert scores.heads[layer][head] == pytest.approx(float(want), rel=1e-9)
        neuron = 5
        want = torch.cat([view.ffn_up.weight[neuron], view.ffn_down.weight[:, neuron]]).double().norm()
        assert scores.neurons[layer][neuron] == pytest.approx(float(want), rel=1e-9)
        ffn = torch.cat([view.ffn_up.weight.flatten(), view.ffn_down.weight.flatten()]).double().norm()
        assert scores.mlps[layer] == pytest.approx(float(ffn), rel=1e-9)


def test_random_is_seeded():
    model = tiny_model("bert")
    a = compute_importance(model, method="random", seed=1)
    b = compute_importance(model, method="random", seed=1)
    c = compute_importance(model, method="random", seed=2)
    np.testing.assert_array_equal(a.head_matrix(), b.head_matrix())
    np.testing.assert_array_equal(a.neuron_matrix(), b.neuron_matrix())
    assert not np.array_equal(a.head_matrix(), c.head_matrix())


def test_unknown_method_and_missing_data_are_errors():
    model = tiny_model("bert")
    with pytest.raises(SlimformerError, match="Unknown importance method"):
        compute_importance(model, batches(), method="taylor")
    with pytest.raises(SlimformerError, match="runs the model on data"):
        compute_importance(model, None, method="gradient")
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches()]
    with pytest.raises(SlimformerError, match="no labels"):
        compute_importance(model, unlabelled, progress=False)


# ------------------------------------------------------------------------------------------------ label-free


def test_label_free_uses_the_models_predictions():
    model = tiny_model("roberta")
    data = batches()
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in data]
    predicted = []
    for batch in unlabelled:
        with torch.no_grad():
            predicted.append({**batch, "labels": model(**batch).logits.argmax(-1)})
    free = compute_importance(model, unlabelled, label_free=True, progress=False)
    explicit = compute_importance(model, predicted, progress=False)
    np.testing.assert_array_equal(free.head_matrix(), explicit.head_matrix())
    np.testing.assert_array_equal(free.neuron_matrix(), explicit.neuron_matrix())
    assert free.meta["label_free"] is True


def test_label_free_regression_is_an_error():
    model = tiny_model("bert", num_labels=1)
    model.config.problem_type = "regression"
    with pytest.raises(SlimformerError, match="needs a classification task"):
        compute_importance(model, batches(), label_free=True)
    # with gold labels, regression scores fine (MSE loss)
    data = [{**b, "labels": torch.randn(3)} for b in batches()]
    assert np.all(np.isfinite(compute_importance(model, data, progress=False).head_matrix()))


# ------------------------------------------------------------------------------------------------ masks, uneven


def test_masked_units_score_zero_and_stay_masked(family_model):
    _, model = family_model
    plan = PruningPlan.keep_all(model)
    plan.kept_heads = [[0, 1, 3], [1]]
    plan.kept_neurons = [list(range(64)), list(range(10, 64))]
    plan.check()
    base = plan_gates(model, plan)
    before = [p.detach().clone() for p in model.parameters()]
    for method in ("gradient", "fisher", "magnitude", "random"):
        scores = compute_importance(model, batches(), method=method, base_gates=base, progress=False)
        assert scores.heads[0][2] == 0 and np.all(scores.heads[1][[0, 2, 3]] == 0), method
        assert np.all(scores.neurons[1][:10] == 0) and np.all(scores.neurons[1][10:] != 0), method
        assert np.all(scores.heads[0][[0, 1, 3]] > 0) and scores.heads[1][1] > 0, method
        assert scores.meta["base_mask"]["heads_masked"] == 4
    # scoring left the model as it was: weights, grads, flags and hooks
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_whole_masked_mlp_scores_zero():
    model = tiny_model("bert")
    plan = PruningPlan.keep_all(model)
    plan.kept_neurons = [[], list(range(64))]
    base = plan_gates(model, plan)
    for method in ("gradient", "magnitude", "random"):
        scores = compute_importance(model, batches(), method=method, base_gates=base, progress=False)
        assert scores.mlps[0] == 0 and scores.mlps[1] > 0, method


def test_uneven_model_gets_per_layer_arrays():
    model = tiny_model("bert")
    plan = PruningPlan.keep_all(model)
    plan.kept_heads = [[], [0, 2, 3]]  # layer 0 loses every head
    plan.kept_neurons = [list(range(10)), list(range(30))]
    remove(model, plan)
    for method in ("gradient", "fisher", "magnitude", "random"):
        scores = compute_importance(model, batches(), method=method, progress=False)
        assert [len(h) for h in scores.heads] == [0, 3], method
        assert [len(n) for n in scores.neurons] == [10, 30], method
        assert scores.mlps.shape == (2,)
        matrix = scores.head_matrix()
        assert matrix.shape == (2, 3) and np.all(np.isnan(matrix[0])) and np.all(np.isfinite(matrix[1]))


def test_base_gates_of_the_wrong_shape_are_an_error():
    model = tiny_model("bert")
    other = tiny_model("bert")
    plan = PruningPlan.keep_all(other)
    plan.kept_heads = [[0], [0]]
    remove(other, plan)
    with pytest.raises(SlimformerError, match="base_gates are shaped"):
        compute_importance(model, batches(), base_gates=Gates.ones(other))


# ------------------------------------------------------------------------------------------------ task data, cache


@pytest.fixture()
def sst2(tmp_path):
    return load_task("sst2", write_sst2(tmp_path / "glue", n_train=24, n_dev=8), source="local")


@pytest.fixture()
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, "sst2")


def test_sample_is_seeded_and_hashed(loaded, sst2):
    a = importance_sample(loaded.tokenizer, sst2, n_examples=10, batch_size=4, max_length=16, seed=0)
    b = importance_sample(loaded.tokenizer, sst2, n_examples=10, batch_size=4, max_length=16, seed=0)
    c = importance_sample(loaded.tokenizer, sst2, n_examples=10, batch_size=4, max_length=16, seed=1)
    assert [len(x["input_ids"]) for x in a.batches] == [4, 4, 2]
    assert a.description["split"] == "train" and a.n_examples == 10
    assert a.hash == b.hash != c.hash
    assert a.batches[0]["input_ids"].shape[1] <= 16


def test_masked_copies_follow_the_sample_and_differ_only_where_masked(loaded, sst2):
    plain = importance_sample(loaded.tokenizer, sst2, n_examples=10, batch_size=32, max_length=16, seed=0)
    both = importance_sample(
        loaded.tokenizer, sst2, n_examples=10, batch_size=32, max_length=16, seed=0, masked_copies=2, mask_rate=0.5
    )
    again = importance_sample(
        loaded.tokenizer, sst2, n_examples=10, batch_size=32, max_length=16, seed=0, masked_copies=2, mask_rate=0.5
    )
    assert both.n_examples == 30 and both.description["masked_copies"] == 2
    assert both.hash == again.hash != plain.hash
    ids, labels = both.batches[0]["input_ids"], both.batches[0]["labels"]
    originals, mask_id = ids[:10], loaded.tokenizer.mask_token_id
    special = torch.tensor(sorted(set(loaded.tokenizer.all_special_ids)))
    assert torch.equal(originals, plain.batches[0]["input_ids"])
    for start in (10, 20):
        masked = ids[start : start + 10]
        changed = masked != originals
        assert changed.any() and bool((masked[changed] == mask_id).all())  # only masks were written
        assert not torch.isin(originals[changed], special).any()  # never over [CLS], [SEP] or padding
        assert torch.equal(labels[:10], labels[start : start + 10])
    assert not torch.equal(ids[10:20], ids[20:])  # each copy drawn anew


def test_tokenized_dataset_input_matches_task_data(loaded, sst2, tmp_path):
    tokenized = tokenize_task(sst2, loaded.tokenizer, max_length=16, cache_dir=tmp_path)
    from_dataset = importance_sample(loaded.tokenizer, tokenized["train"], n_examples=8, batch_size=4, seed=3)
    from_task = importance_sample(loaded.tokenizer, sst2, n_examples=8, batch_size=4, max_length=16, seed=3)
    assert from_dataset.hash == from_task.hash  # same rows, same tokenization
    scores = compute_importance(
        loaded.model, tokenized["dev"], tokenizer=loaded.tokenizer, batch_size=4, progress=False
    )
    assert scores.meta["n_batches"] == 2 and scores.meta["n_examples"] == 8
    with pytest.raises(SlimformerError, match="needs the tokenizer"):
        compute_importance(loaded.model, tokenized["dev"])


def test_score_model_records_meta(loaded, sst2):
    scores = score_model(loaded, None, sst2, n_examples=12, batch_size=4, max_length=16, progress=False)
    meta = scores.meta
    assert meta["model_fingerprint"] == model_fingerprint(loaded.model)
    assert meta["data"]["split"] == "train" and meta["data"]["n_examples"] == 12 and len(meta["data"]["hash"]) == 64
    assert meta["batch_size"] == 4 and meta["max_length"] == 16 and meta["normalize"] is True
    assert meta["label_free"] is False and meta["seed"] == 0 and meta["wall_seconds"] >= 0
    assert meta["slimformer_version"]


def test_fingerprint_follows_weights_not_location():
    a, b = tiny_model("bert"), tiny_model("bert")
    b.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_cache_hits_and_misses(loaded, sst2, tmp_path, monkeypatch):
    calls = []
    real = importance_module.compute_importance

    def counting(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(importance_module, "compute_importance", counting)
    cache = tmp_path / "importance-cache"
    common = {"n_examples": 8, "batch_size": 4, "max_length": 16, "cache_dir": cache, "progress": False}
    first = score_model(loaded.model, loaded.tokenizer, sst2, **common)
    second = score_model(loaded.model, loaded.tokenizer, sst2, **common)
    assert len(calls) == 1
    assert first.meta["cache"]["hit"] is False and second.meta["cache"]["hit"] is True
    np.testing.assert_array_equal(first.head_matrix(), second.head_matrix())
    files = sorted(cache.glob("importance-*.json"))
    assert len(files) == 1 and len(files[0].stem) > len("importance-") + 16

    plan = PruningPlan.keep_all(loaded.model)
    plan.kept_heads[0] = [0, 1]
    changes = [
        {"method": "fisher"},
        {"seed": 1},
        {"batch_size": 2},
        {"label_free": True},
        {"normalize": False},
        {"n_examples": 6},
        {"plan": plan},
    ]
    for change in changes:
        score_model(loaded.model, loaded.tokenizer, sst2, **{**common, **change})
    assert len(calls) == 1 + len(changes)
    assert len(list(cache.glob("importance-*.json"))) == 1 + len(changes)

    changed = copy.deepcopy(loaded.model)  # other weights: another fingerprint
    with torch.no_grad():
        next(changed.parameters())[0, 0] += 1.0
    score_model(changed, loaded.tokenizer, sst2, **common)
    assert len(calls) == 2 + len(changes)
    score_model(loaded.model, loaded.tokenizer, sst2, **{**common, "plan": plan})  # the masked one again: a hit
    assert len(calls) == 2 + len(changes)


def test_damaged_cache_file_is_recomputed(loaded, sst2, tmp_path):
    common = {"n_examples": 8, "batch_size": 4, "max_length": 16, "cache_dir": tmp_path, "progress": False}
    score_model(loaded.model, loaded.tokenizer, sst2, **common)
    (path,) = tmp_path.glob("importance-*.json")
    path.write_text("{not json")
    again = score_model(loaded.model, loaded.tokenizer, sst2, **common)
    assert again.meta["cache"]["hit"] is False
    assert json.loads(path.read_text())["slimformer_importance"] == 1


def test_label_free_on_regression_task_data_is_an_error(tiny_model_dir):
    loaded = load_model(tiny_model_dir, "stsb")
    with pytest.raises(SlimformerError, match="classification"):
        score_model(loaded, None, None, label_free=True)


# ------------------------------------------------------------------------------------------------ files


def test_save_load_round_trip(tmp_path):
    model = tiny_model("bert")
    plan = PruningPlan.keep_all(model)
    plan.kept_heads = [[1, 3], [0, 1, 2, 3]]
    remove(model, plan)
    scores = compute_importance(model, batches(), progress=False)
    path = scores.save(tmp_path / "sub" / "importance.json")
    data = json.loads(path.read_text())
    assert data["method"] == "gradient" and data["layers_indexed_from"] == 0 and len(data["heads"][0]) == 2
    loaded = ImportanceScores.load(path)
    assert loaded.method == scores.method and loaded.meta == json.loads(json.dumps(scores.meta))
    np.testing.assert_array_equal(loaded.head_matrix(), scores.head_matrix())
    np.testing.assert_array_equal(loaded.neuron_matrix(), scores.neuron_matrix())
    np.testing.assert_array_equal(loaded.mlps, scores.mlps)
    assert not list(path.parent.glob("*.tmp"))
    with pytest.raises(SlimformerError, match="Not slimformer importance"):
        ImportanceScores.from_dict({"heads": []})
    with pytest.raises(SlimformerError, match="does not exist"):
        ImportanceScores.load(tmp_path / "missing.json")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    assert not list(path.parent.glob(".*.tmp"))


def test_plots_write_pngs(tmp_path):
    scores = compute_importance(tiny_model("bert"), method="random")
    assert_png(plot_head_importance(scores, tmp_path / "heads.png", title="tiny"))
    uneven = np.array([[0.1, 0.5, 0.2], [0.7, np.nan, np.nan]])
    assert_png(plot_head_importance(uneven, tmp_path / "uneven.png"))
    big = np.random.default_rng(0).random((24, 20))  # too big to annotate: still drawn
    assert_png(plot_head_importance(big, tmp_path / "big.png"))
    path = plot_curve(
        [0.0, 0.1, 0.2],
        {"gradient": [0.9, 0.88, 0.8], "random": [0.9, 0.7, 0.6]},
        tmp_path / "curves" / "curve.png",
        xlabel="fraction of heads pruned",
        ylabel="accuracy",
        title="tiny",
        hlines={"keep": 0.81},
    )
    assert_png(path)
    with pytest.raises(SlimformerError, match="values for 3"):
        plot_curve([0, 1, 2], {"short": [1, 2]}, tmp_path / "bad.png")
    with pytest.raises(SlimformerError, match="matrix"):
        plot_head_importance(np.zeros(3), tmp_path / "bad.png")
