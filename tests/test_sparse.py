"""Sparse pruning: masks at every granularity, magnitude / GMP / movement, exact removal of emptied units."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers as hf

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.arch import layer_views
from slimformer.configs import ConfigError, GradualMagnitude, Magnitude, Movement, config_from_dict
from slimformer.prune import PruningPlan, remove
from slimformer.sparse import (
    CubicSchedule,
    Granularity,
    SparsityError,
    WeightMasks,
    apply_masks,
    encoder_linears,
    magnitude_masks,
    removable_units,
)
from slimformer.sparse.masks import group_sizes, keep_top, score_pools
from slimformer.sparse.training import SparseController, sawtooth_lambda
from test_train import StopAt, write_sst2


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------------------------- masks


def test_granularity_parsing_and_refusals():
    assert Granularity.parse("weight") == Granularity("weight")
    assert Granularity.parse("block:32") == Granularity("block", 32)
    assert str(Granularity.parse("head")) == "head"
    for bad in ("block", "block:0", "tile:4", "heads:2"):
        with pytest.raises(SparsityError, match="granularity"):
            Granularity.parse(bad)


@pytest.mark.parametrize("granularity", ["weight", "block:8", "block:5", "head"])
def test_magnitude_masks_hit_the_target_and_respect_the_groups(granularity):
    model = tiny_model("bert")
    masks = magnitude_masks(model, 0.6, granularity=granularity)
    masks.check(model)
    parsed = Granularity.parse(granularity)
    # the kept share is the target, up to one group
    largest = max(float(size.max()) for size in group_sizes(model, parsed).values())
    assert abs(masks.kept - 0.4 * masks.total) <= largest
    head_size = layer_views(model)[0].head_size
    for name, mask in masks.masks.items():
        part = name.split(".")[1]
        if parsed.kind == "block":
            b = parsed.block
            for r in range(0, mask.shape[0], b):
                for c in range(0, mask.shape[1], b):
                    tile = mask[r : r + b, c : c + b]
                    assert bool(tile.all()) or not bool(tile.any()), "a tile is pruned whole or not at all"
        if parsed.kind == "head":
            lines = mask.all(1) | ~mask.any(1) if part in ("query", "key", "value", "ffn_up") else None
            if lines is not None:
                assert bool(lines.all())
    if parsed.kind == "head":  # a head's q/k/v rows and output columns go together
        for view in layer_views(model):
            q = masks.masks[f"{view.index}.query"].reshape(view.num_heads, head_size, -1)[:, 0, 0]
            o = masks.masks[f"{view.index}.attn_out"].reshape(-1, view.num_heads, head_size)[0, :, 0]
            assert torch.equal(q, o)


def test_global_magnitude_removes_the_smallest_weights_and_layer_scope_balances():
    model = tiny_model("bert")
    masks = magnitude_masks(model, 0.5)
    weights = {n: m.weight.detach().abs() for n, m in encoder_linears(model).items()}
    removed = torch.cat([weights[n][~masks.masks[n]] for n in weights])
    kept = torch.cat([weights[n][masks.masks[n]] for n in weights])
    assert float(removed.max()) <= float(kept.min())
    local = magnitude_masks(model, 0.5, scope="layer")
    for mask in local.masks.values():
        assert abs(float(mask.float().mean()) - 0.5) <= 1.0 / mask.numel() + 1e-9


def test_keep_top_is_deterministic_on_ties_and_counts_unequal_groups_by_weight():
    scores = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    keep = keep_top(scores, {"a": torch.ones(4)}, 0.5, [["a"]])
    assert keep["a"].tolist() == [True, True, False, False]
    sizes = {"a": torch.tensor([8.0, 1.0, 1.0])}
    keep = keep_top({"a": torch.tensor([0.0, 2.0, 1.0])}, sizes, 0.5, [["a"]])
    assert keep["a"].tolist() == [False, True, True]  # the big group alone would be 80% of the weights
    with pytest.raises(SparsityError, match="impossible"):
        keep_top(scores, {"a": torch.ones(4)}, 1.0, [["a"]])
    assert score_pools(["0.heads", "0.neurons"], Granularity("head"), "global") == [["0.heads"], ["0.neurons"]]


def test_masks_save_load_roundtrip_and_refuse_junk(tmp_path):
    model = tiny_model("roberta")
    masks = magnitude_masks(model, 0.7, granularity="block:4")
    path = masks.save(tmp_path / "masks.npz")
    again = WeightMasks.load(path)
    assert all(torch.equal(masks.masks[n], again.masks[n]) for n in masks.masks)
    (tmp_path / "junk.npz").write_bytes(b"not a mask file")
    with pytest.raises(SparsityError, match="not a weight-mask file"):
        WeightMasks.load(tmp_path / "junk.npz")
    other = hf.BertForSequenceClassification(
        hf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    )
    with pytest.raises(SparsityError, match="another shape"):
        again.check(other)


# --------------------------------------------------------------------------------------------- removal


@pytest.mark.parametrize("granularity", ["block:8", "head"])
def test_emptied_units_are_removed_exactly_on_every_family(family_model, granularity):
    family, model = family_model
    inputs = tiny_inputs()
    apply_masks(model, magnitude_masks(model, 0.7, granularity=granularity))
    masked = _logits(model, inputs)
    plan, counts = removable_units(model)
    assert counts["heads_removed"] + counts["heads_folded"] + counts["neurons_removed"] + counts["neurons_folded"] > 0
    remove(model, plan)
    assert torch.allclose(_logits(model, inputs), masked, atol=1e-5), family
    sizes = [(v.num_heads, v.ffn_size) for v in layer_views(model)]
    assert sum(h for h, _ in sizes) < 8 or sum(f for _, f in sizes) < 128


def test_heads_without_values_and_neurons_without_inputs_fold_into_biases(family_model):
    """The two removals that are exact only because a constant is folded into the next bias."""
    family, model = family_model
    inputs = tiny_inputs()
    view = layer_views(model)[0]
    size = view.head_size
    with torch.no_grad():
        view.value.weight[size : 2 * size] = 0  # head 1 outputs its value bias everywhere
        view.ffn_up.weight[3] = 0  # neuron 3 outputs activation(bias) everywhere
        view.ffn_up.bias[3] = 0.7
    masked = _logits(model, inputs)
    plan, counts = removable_units(model)
    assert counts == {"heads_removed": 0, "heads_folded": 1, "neurons_removed": 0, "neurons_folded": 1}
    assert 1 not in plan.kept_heads[0] and 3 not in plan.kept_neurons[0]
    remove(model, plan)
    assert torch.allclose(_logits(model, inputs), masked, atol=1e-5), family


def test_query_only_heads_stay():
    model = tiny_model("bert")
    view = layer_views(model)[0]
    with torch.no_grad():
        view.query.weight[: view.head_size] = 0
    plan, counts = removable_units(model)
    assert plan.kept_heads[0] == [0, 1, 2, 3] and sum(counts.values()) == 0


# --------------------------------------------------------------------------------------------- schedules


def test_cubic_schedule_and_gmp_learning_rate():
    schedule = CubicSchedule(final=0.9, total=100, initial=0.7, start=0.1, end=0.7, steps=4)
    assert schedule(0) == 0.0 and schedule(9) == 0.0
    assert schedule(10) == pytest.approx(0.7) and schedule(70) == pytest.approx(0.9) and schedule(99) == 0.9
    values = [schedule(t) for t in range(10, 100)]
    assert values == sorted(values)
    assert schedule.events() == [10, 30, 50, 70] and len({schedule(t) for t in range(10, 100)}) == 4
    movement = CubicSchedule(final=0.5, total=100)
    assert movement(10) == 0.0 and 0 < movement(11) < movement(40) < 0.5 == movement(70)
    factor = sawtooth_lambda(schedule)
    assert factor(10) == 1.0 and factor(29) < 0.1 and factor(30) == 1.0 and factor(99) == pytest.approx(1 / 30)


def test_movement_scores_get_minus_weight_times_gradient():
    """Sanh et al.'s straight-through estimator: at full density dL/dS = dL/dW * W, summed over a group."""
    for granularity in ("weight", "block:4", "head"):
        model = tiny_model("bert").train()
        controller = SparseController(model, mode="topk", granularity=granularity)
        controller.install()
        controller.refresh()
        loss = model(**tiny_inputs()).logits.square().sum()
        loss.backward()
        parsed = Granularity.parse(granularity)
        expected = {}
        for name, module in encoder_linears(model).items():
            original = module.parametrizations["weight"].original
            part = name.split(".")[1]
            reduced = parsed.reduce(original.grad * original.detach(), part, controller.head_size)
            key = f"{name.split('.')[0]}.{'heads' if part in ('query', 'key', 'value', 'attn_out') else 'neurons'}"
            key = key if parsed.kind == "head" else name
            expected[key] = expected.get(key, 0) + reduced
        for key, value in expected.items():
            assert torch.allclose(controller.score(key).grad, value, atol=1e-6), (granularity, key)


def test_magnitude_started_movement_scores_rank_as_magnitude_pruning():
    """score_init="magnitude": before any step, top-k on the scores keeps what one-shot magnitude pruning keeps;
    started at zero it would keep the first weights in matrix order instead."""
    for granularity in ("weight", "block:4", "head"):
        model = tiny_model("bert")
        controller = SparseController(model, mode="topk", granularity=granularity, score_init="magnitude")
        controller.target = 0.6
        expected = magnitude_masks(model, 0.6, granularity=granularity)
        got = controller.weight_masks()
        for name in expected.masks:
            assert torch.equal(got.masks[name], expected.masks[name]), (granularity, name)
        zero_started = SparseController(model, mode="topk", granularity=granularity)
        zero_started.target = 0.6
        assert any(not torch.equal(zero_started.weight_masks().masks[n], expected.masks[n]) for n in expected.masks), (
            granularity
        )
    with pytest.raises(ConfigError, match="score_init"):
        Movement(sparsity=0.5, score_init="random").check()
    # "auto" resolves by granularity: magnitude for single weights, zero for blocks and heads
    assert [Movement(sparsity=0.5, granularity=g).score_start for g in ("weight", "block:32", "head")] == [
        "magnitude",
        "zero",
        "zero",
    ]
    assert Movement(sparsity=0.5, score_init="zero").score_start == "zero"


def test_fisher_started_head_scores_keep_the_most_important_units_first():
    """score_init="fisher": scores spread by rank over (0, 2) within each pool (heads apart from neurons), so top-k
    before any step keeps the units with the largest Fisher diagonal, across layers; only whole heads take it."""
    from slimformer.sparse.training import fisher_importance, rank_scores

    model = tiny_model("bert")
    generator = torch.Generator().manual_seed(0)
    views = layer_views(model)
    # heavy-tailed, like a real Fisher diagonal: the ranks must not depend on the scale
    heads = [torch.rand(v.num_heads, generator=generator).pow(8).numpy() for v in views]
    neurons = [torch.rand(v.ffn_size, generator=generator).pow(8).numpy() for v in views]
    granularity = Granularity.parse("head")
    pools = score_pools(list(group_sizes(model, granularity)), granularity, "global")
    start = rank_scores(fisher_importance(model, heads, neurons), pools)
    for pool in pools:
        flat = torch.cat([start[key].reshape(-1) for key in pool])
        assert flat.min() > 0 and flat.max() < 2 and flat.mean().item() == pytest.approx(1.0, abs=1e-6)
        assert len(set(flat.tolist())) == len(flat)  # evenly spread: no ties
    controller = SparseController(model, mode="topk", granularity="head", score_init=start)
    controller.target = 0.5
    keep = controller.hard_group_masks()
    all_heads = np.concatenate(heads)
    kept_heads = torch.cat([keep[f"{v.index}.heads"] for v in views]).numpy()
    assert kept_heads.sum() == len(all_heads) // 2
    assert all_heads[kept_heads].min() > all_heads[~kept_heads].max()
    all_neurons = np.concatenate(neurons)
    kept_neurons = torch.cat([keep[f"{v.index}.neurons"] for v in views]).numpy()
    assert all_neurons[kept_neurons].min() > all_neurons[~kept_neurons].max()
    with pytest.raises(SparsityError, match="every group"):
        SparseController(model, mode="topk", granularity="head", score_init={"0.heads": start["0.heads"]})
    with pytest.raises(ConfigError, match="granularity='head'"):
        Movement(sparsity=0.5, score_init="fisher").check()
    assert Movement(sparsity=0.5, granularity="head", score_init="fisher").score_start == "fisher"


def test_sparse_configs_check_settings_and_round_trip():
    config = Movement(sparsity=0.9, granularity="block:32", soft=True)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (
        lambda: Magnitude(sparsity=1.0),
        lambda: Magnitude(sparsity=0.0),
        lambda: Magnitude(granularity="rows"),
        lambda: Magnitude(scope="model"),
        lambda: GradualMagnitude(prune_start=0.8, prune_end=0.5),
        lambda: Movement(epochs=0),
        lambda: Movement(score_learning_rate=0),
    ):
        with pytest.raises(ConfigError):
            bad()


# --------------------------------------------------------------------------------------------- through prune


@pytest.fixture()
def toy(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny BERT classifier (random weights) with the MiniLM tokenizer, and the toy SST-2 folder."""
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    tokenizer = hf.AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = hf.BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    return model.eval(), tokenizer, glue


QUICK = {"epochs": 2, "batch_size": 8, "max_length": 16}


@pytest.mark.parametrize(
    "config",
    [
        Magnitude(sparsity=0.6),
        GradualMagnitude(sparsity=0.8, **QUICK),
        Movement(sparsity=0.7, granularity="block:8", **QUICK),
        Movement(sparsity=0.5, granularity="head", **QUICK),
        Movement(sparsity=0.5, granularity="head", score_init="fisher", **QUICK),
        Movement(sparsity=0.8, **QUICK),
    ],
    ids=["magnitude", "gmp", "block-movement", "head-movement", "head-movement-fisher", "movement"],
)
def test_prune_reaches_the_sparsity_removes_empty_units_and_reloads(toy, tmp_path, config):
    import slimformer

    model, tokenizer, glue = toy
    result = slimformer.prune(
        copy.deepcopy(model), config, "sst2", tokenizer=tokenizer, data_dir=glue, out=tmp_path / "out", progress=False
    )
    sparse = result.report["details"]["sparse"]
    assert sparse["sparsity"] == pytest.approx(config.sparsity, abs=0.02)
    if isinstance(config, Movement):  # "auto": magnitude-started scores for single weights, zero for groups
        expected = "magnitude" if config.granularity == "weight" else "zero"
        assert sparse["score_init"] == (expected if config.score_init == "auto" else config.score_init)
    if isinstance(config, Movement) and config.score_init == "fisher":
        assert result.report["seconds"]["fisher"] > 0
    counts = result.report["models"]["after"]["linear_weights"]
    # removal takes the weights of folded units too (a neuron with no inputs loses its output column)
    assert counts["nonzero"] <= sparse["linear_weights_kept"]
    if sparse["heads_folded"] == sparse["neurons_folded"] == 0:
        assert counts["nonzero"] == sparse["linear_weights_kept"]
    if config.granularity == "head":
        assert counts["nonzero"] == counts["total"]  # what is left is dense: whole units went
        assert result.report["models"]["after"]["heads"] < 8
    loaded = slimformer.load_model(tmp_path / "out")
    inputs = tokenizer(["a good film", "dull plot , bad acting"], padding=True, return_tensors="pt")
    assert torch.equal(_logits(loaded.model, inputs), _logits(result.model, inputs))
    assert (tmp_path / "out" / "density.png").is_file()
    head_density = np.asarray(sparse["head_density"])
    assert head_density.shape == (2, 4) and 0 <= head_density.min() <= head_density.max() <= 1


def test_soft_movement_follows_its_schedule(toy):
    import slimformer

    model, tokenizer, glue = toy
    config = Movement(sparsity=0.5, soft=True, epochs=8, batch_size=8, max_length=16, score_learning_rate=0.1)
    result = slimformer.prune(copy.deepcopy(model), config, "sst2", tokenizer=tokenizer, data_dir=glue, progress=False)
    sparse = result.report["details"]["sparse"]
    # the scores start at +1: any pruned weight means the steered penalty drove its score below zero (on 48 steps
    # it does not reach the target; the run then keeps the top scores at the target and says so)
    assert sparse["soft"]["sparsity_reached"] > 0.05, "the steered penalty must drive scores below zero"
    assert sparse["sparsity"] == pytest.approx(0.5, abs=0.011)
    weights = torch.cat([m.weight.reshape(-1) for m in encoder_linears(result.model).values()])
    assert float((weights == 0).float().mean()) == pytest.approx(sparse["sparsity"], abs=1e-6)


def test_interrupted_sparse_training_resumes(toy, tmp_path, monkeypatch):
    import slimformer
    from slimformer.sparse import training

    model, tokenizer, glue = toy
    config = GradualMagnitude(sparsity=0.8, epochs=2, batch_size=8, max_length=16, save_steps=2)
    monkeypatch.setattr(training.SparsityCallback, "on_step_end", StopAt(4).on_step_end, raising=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        slimformer.prune(copy.deepcopy(model), config, "sst2", tokenizer=tokenizer, data_dir=glue, out=out)
    assert not out.exists() and (tmp_path / "out.work" / "checkpoint-4").is_dir()
    monkeypatch.undo()
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    result = slimformer.prune(copy.deepcopy(model), config, "sst2", tokenizer=tokenizer, data_dir=glue, out=out)
    train = result.report["details"]["sparse"]["train"]
    assert train["resumed_from"].endswith("checkpoint-4") and train["steps"] == 12
    assert result.report["details"]["sparse"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert not (tmp_path / "out.work").exists()


def test_training_methods_need_a_training_split(toy):
    import slimformer

    model, tokenizer, _ = toy
    with pytest.raises(Exception, match="task"):
        slimformer.prune(model, Movement(sparsity=0.5), tokenizer=tokenizer, progress=False)


def test_every_family_trains_with_movement_masks(family_model):
    family, model = family_model
    controller = SparseController(model, mode="topk", granularity="block:8")
    controller.install()
    controller.target = 0.5
    controller.refresh()
    model.train()
    model(**tiny_inputs()).logits.sum().backward()
    assert all(p.grad is not None for p in controller.parameters())
    masks = controller.bake()
    assert masks.sparsity == pytest.approx(0.5, abs=0.05)
    for name, module in encoder_linears(model).items():
        assert not hasattr(module, "parametrizations")
        assert torch.equal(module.weight != 0, masks.masks[name] & (module.weight != 0)), family
    assert set(TINY_CONFIGS)


# --------------------------------------------------------------------------------------------- storage


def test_bitmask_storage_is_exact_and_smaller(tmp_path):
    from safetensors.torch import load_file

    from slimformer.sparse.storage import SPARSE_FILE, compress_folder, compress_state, decompress_state, expand_folder

    model = tiny_model("bert")
    apply_masks(model, magnitude_masks(model, 0.8))
    state = model.state_dict()
    tensors, metadata = compress_state(state)
    again = decompress_state(tensors, metadata)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    model.save_pretrained(tmp_path / "dense")
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    compress_folder(tmp_path / "dense")
    compact = tmp_path / "dense" / SPARSE_FILE
    assert not (tmp_path / "dense" / "model.safetensors").exists()
    linear = sum(m.weight.numel() * 4 for m in encoder_linears(model).values())
    # 20% of the linear weights' values plus one bit each: the file shrinks by most of the linear weights' bytes
    assert compact.stat().st_size < dense_size - 0.6 * linear
    expanded = expand_folder(tmp_path / "dense", tmp_path / "plain")
    reloaded = hf.AutoModelForSequenceClassification.from_pretrained(expanded).eval()
    inputs = tiny_inputs()
    assert torch.equal(_logits(reloaded, inputs), _logits(model, inputs))
    damaged = load_file(compact)
    name = next(k for k in damaged if k.endswith("::values"))
    damaged[name] = damaged[name][:-1]
    with pytest.raises(Exception, match="damaged"):
        decompress_state(damaged, metadata)


def test_cli_sparse_prune_saves_compact_weights_that_load(toy, tmp_path):
    from typer.testing import CliRunner

    from slimformer.cli import app
    from slimformer.folders import read_manifest
    from slimformer.models import load_model
    from slimformer.sparse.storage import SPARSE_FILE

    model, tokenizer, glue = toy
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "sparse"
    runner = CliRunner()
    args = ["prune", "--model", str(tmp_path / "model"), "--task", "sst2", "--data-dir", str(glue), "--out", str(out)]
    result = runner.invoke(app, [*args, "--sparse", "magnitude", "--sparsity", "0.75", "--no-measure"])
    assert result.exit_code == 0, result.output
    assert "non-zero" in result.output
    assert (out / SPARSE_FILE).is_file() and read_manifest(out)["weight_storage"] == "sparse-bitmask"
    assert not read_manifest(out)["plain_transformers_loadable"]
    assert "expand_folder" in (out / "README.md").read_text()  # the card says how to load it
    report = json.loads((out / "metrics.json").read_text())
    storage = report["details"]["sparse"]["storage"]
    assert storage["sparse_bitmask_bytes"] < storage["dense_bytes"]
    loaded = load_model(out)
    weights = torch.cat([m.weight.reshape(-1) for m in encoder_linears(loaded.model).values()])
    assert float((weights == 0).float().mean()) == pytest.approx(0.75, abs=1e-3)
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "x"), "--sparse", "magnitude"])
    assert bad.exit_code != 0 and "--sparsity" in str(bad.exception)
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "y"), "--sparse", "pruney", "--sparsity", "0.5"])
    assert bad.exit_code != 0 and "Unknown sparse method" in str(bad.exception)
    # --score-init reaches the config: the Fisher start is for whole heads only, refused before any training
    bad = runner.invoke(
        app, [*args[:-1], str(tmp_path / "z"), "--sparse", "movement", "--sparsity", "0.5", "--score-init", "fisher"]
    )
    assert bad.exit_code != 0 and "granularity='head'" in str(bad.exception)


def test_sentence_embedding_models_prune_sparse_without_labels(tiny_model_dir, tmp_path, monkeypatch):
    """Movement pruning of an embedding model: the student imitates the dense model's embeddings (no labels)."""
    import slimformer
    from slimformer.embedding import SentenceEmbedder
    from slimformer.models import load_model
    from test_embedding import embed, write_stsb

    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_stsb(tmp_path / "glue")
    config = Movement(sparsity=0.5, granularity="head", epochs=2, batch_size=8, max_length=16)
    result = slimformer.prune(tiny_model_dir, config, "stsb-embed", data_dir=glue, out=tmp_path / "out", progress=False)
    report = result.report
    assert report["primary_metric"] == "spearman_cosine"
    assert report["details"]["sparse"]["train"]["distill"]["alpha"] == 1.0
    assert report["models"]["after"]["heads"] < report["models"]["before"]["heads"]
    reloaded = load_model(tmp_path / "out")
    assert isinstance(reloaded.model, SentenceEmbedder)
    inputs = tiny_inputs(seed=2)
    inputs["input_ids"] = inputs["input_ids"] + 1000
    torch.testing.assert_close(embed(reloaded.model, inputs), embed(result.model, inputs), atol=1e-6, rtol=0)


def test_int8_bitmask_storage_rounds_per_row_keeps_zeros_and_is_several_times_smaller(tmp_path):
    from slimformer.folders import save_model_folder
    from slimformer.models import load_model
    from slimformer.sparse.storage import compress_state, decompress_state

    model = tiny_model("bert")
    apply_masks(model, magnitude_masks(model, 0.8))
    plan = PruningPlan.keep_all(model)
    plan.kept_neurons[1] = []  # a layer with no FFN left: zero-width matrices are stored as they are
    remove(model, plan)
    state = model.state_dict()
    again = decompress_state(*compress_state(state, int8=True))
    for name, tensor in state.items():
        if tensor.ndim == 2 and tensor.is_floating_point() and tensor.numel():
            step = tensor.abs().amax(1, keepdim=True) / 127
            assert bool(((again[name] - tensor).abs() <= step / 2 + 1e-7).all()), name
            assert bool((again[name][tensor == 0] == 0).all())
        else:
            assert torch.equal(again[name], tensor)
    sizes = {}
    for storage in ("dense", "sparse-bitmask-int8"):
        folder = save_model_folder(model, None, tmp_path / storage, weight_storage=storage)
        sizes[storage] = sum(p.stat().st_size for p in folder.glob("model*.safetensors"))
    assert sizes["sparse-bitmask-int8"] * 3 < sizes["dense"]
    reloaded = load_model(tmp_path / "sparse-bitmask-int8").model
    inputs = tiny_inputs()
    assert torch.allclose(_logits(reloaded, inputs), _logits(model, inputs), atol=0.05)


def test_soft_movement_scores_start_at_a_quarter_of_the_magnitude_ratio():
    """Soft movement keeps a weight while its score is positive: its magnitude-started scores are scaled down
    (SOFT_MAGNITUDE_SCALE) so the penalty can pull them across zero, in magnitude's order; all start kept."""
    from slimformer.sparse.training import SOFT_MAGNITUDE_SCALE, magnitude_scores

    assert SOFT_MAGNITUDE_SCALE == 0.25
    model = tiny_model("bert")
    full = SparseController(model, mode="soft", score_init="magnitude", start_scale=1.0)
    scaled = SparseController(model, mode="soft", score_init="magnitude")  # soft mode's own default
    topk = SparseController(model, mode="topk", score_init="magnitude")  # top-k keeps the full ratio
    reference = magnitude_scores(model, full.granularity, full.pools)
    for key in full.keys:
        assert torch.equal(full.score(key).detach(), reference[key])
        torch.testing.assert_close(scaled.score(key).detach(), reference[key] * SOFT_MAGNITUDE_SCALE)
        assert torch.equal(topk.score(key).detach(), reference[key])
    assert scaled.sparsity() == 0.0  # every score positive: nothing pruned before training
