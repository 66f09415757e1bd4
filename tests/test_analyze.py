"""`slimformer analyze`: ablations, m-pruning masks, subnetworks, stability, constant attention, lottery and the CLI,
on tiny random models and tiny GLUE-format files."""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.analyze import (
    AnalyzeError,
    RetrainConfig,
    ablate,
    collect_patterns,
    constant_attention,
    jaccard,
    lottery,
    magnitude_prune,
    magnitude_step,
    masked_weights,
    papa,
    stability,
    structured_subnetworks,
    weight_subnetworks,
)
from slimformer.analyze.common import parse_heads, parse_layers
from slimformer.analyze.magnitude import WeightMasks, encoder_linears
from slimformer.analyze.papa import selection
from slimformer.analyze.stability import jaccard_matrix
from slimformer.analyze.training import train
from slimformer.arch import layer_views
from slimformer.cli import app
from slimformer.evaluation import Evaluator, evaluate_model
from slimformer.models import load_model
from slimformer.prune import PruningPlan, masked
from slimformer.tasks import load_task, tokenize_task
from test_train import write_sst2

lottery_module = importlib.import_module("slimformer.analyze.lottery")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


def write_stsb(root: Path, n_train: int = 24, n_dev: int = 24) -> Path:
    """A tiny STS-B folder: a regression task, so every mask moves the (Pearson) score."""
    rng = random.Random(1)
    words = ["a", "man", "dog", "plays", "runs", "the", "guitar", "fast", "cat", "sleeps", "red", "car"]
    folder = root / "STS-B"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence1\tsentence2\tscore"]
        for _ in range(n):
            one = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            two = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            lines.append(f"{one}\t{two}\t{rng.uniform(0, 5):.2f}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def glue(tmp_path) -> Path:
    root = write_sst2(tmp_path / "glue", n_train=24, n_dev=16)
    write_stsb(root)
    return root


@pytest.fixture(scope="session")
def tuned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny SST-2 'fine-tuned' folder: a classification head saved with the model (what ablate requires)."""
    loaded = load_model(tiny_model_dir, "sst2")
    path = tmp_path_factory.mktemp("tiny-tuned")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def no_hooks(model) -> bool:
    return not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------ ablate


def test_ablate_matches_directly_masked_scores(tiny_model_dir, glue, tmp_path):
    loaded = load_model(tiny_model_dir, "stsb")
    data = load_task("stsb", glue, source="local")
    model, tokenizer = loaded.model, loaded.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ablate(loaded, data, max_length=16, progress=False)

    def direct(plan: PruningPlan) -> float:
        with masked(model, plan):
            return evaluate_model(model, tokenizer, data, max_length=16, progress=False)["dev"]["combined_score"]

    full = PruningPlan.keep_all(model)
    base = evaluate_model(model, tokenizer, data, max_length=16, progress=False)["dev"]["combined_score"]
    assert result.base["mean"] == pytest.approx(base, abs=1e-9)
    deltas = result.single_head_delta
    assert deltas.shape == (2, 4) and len(set(np.round(deltas.reshape(-1), 9))) > 1  # masks do move the score
    for layer in range(2):
        for head in range(4):
            plan = PruningPlan.keep_all(model)
            plan.kept_heads[layer].remove(head)
            assert deltas[layer, head] == pytest.approx(direct(plan) - base, abs=1e-9)
            only = PruningPlan.keep_all(model)
            only.kept_heads[layer] = [head]
            assert result.keep_one_score[layer, head] == pytest.approx(direct(only), abs=1e-9)
        best = result.best_head_per_layer[layer]
        assert best["head"] == int(np.argmax(result.keep_one_score[layer]))
        assert best["score"]["mean"] == pytest.approx(result.keep_one_score[layer].max())
        no_attention = PruningPlan.keep_all(model)
        no_attention.kept_heads[layer] = []
        no_ffn = PruningPlan.keep_all(model)
        no_ffn.kept_neurons[layer] = []
        no_layer = PruningPlan(full.layout, full.kept_heads, full.kept_neurons, dropped_layers=[layer])
        for name, plan in (("attention", no_attention), ("ffn", no_ffn), ("layer", no_layer)):
            assert result.components[name][layer]["mean"] == pytest.approx(direct(plan) - base, abs=1e-9)
    # the model is exactly as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and no_hooks(model)
    assert result.meta["evaluations"] == 1 + 2 * (2 * 4 + 3)

    out = result.save(tmp_path / "ablate")
    saved = json.loads((out / "results.json").read_text())
    assert np.allclose(saved["single_head_delta"]["mean"], deltas)
    assert saved["base"]["n"] == 1 and saved["task"] == "stsb"
    for png in ("single_head_delta.png", "keep_one_score.png", "components_delta.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "Michel" in report and "single_head_delta.png" in report and "±" not in report


def test_ablate_seeds_and_layers(tiny_model_dir, glue):
    loaded = load_model(tiny_model_dir, "stsb")
    data = load_task("stsb", glue, source="local")
    result = ablate(loaded, data, layers="1", max_length=16, max_eval_samples=12, seeds=2, seed=5, progress=False)
    assert result.seeds == [5, 6] and result.layers == [1]
    assert np.isnan(result.single_head_delta[0]).all() and np.isfinite(result.single_head_delta[1]).all()
    assert result.components["attention"][0] is None and result.components["attention"][1]["n"] == 2
    values = result.base["values"]
    assert len(values) == 2 and result.base["std"] == pytest.approx(np.std(values, ddof=1))
    assert "±" in result.report()
    with pytest.raises(AnalyzeError, match="needs --max-eval-samples"):
        ablate(loaded, data, seeds=2, progress=False)
    with pytest.raises(AnalyzeError, match="--seeds must be"):
        ablate(loaded, data, seeds=0, progress=False)
    with pytest.raises(AnalyzeError, match="no layer"):
        ablate(loaded, data, layers="0,2", progress=False)


def test_parsing_layers_and_heads():
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5] and parse_layers(None, 3) == [0, 1, 2]
    assert parse_layers("all", 2) == [0, 1] and parse_layers("none", 2) == []
    for bad in ("x", "3-1", "6", "-1"):
        with pytest.raises(AnalyzeError):
            parse_layers(bad, 6)
    assert parse_heads("0:1,1:*", [4, 2]) == [(0, 1), (1, 0), (1, 1)]
    for bad in ("0:4", "2:0", "0-1", "a:b"):
        with pytest.raises(AnalyzeError):
            parse_heads(bad, [4, 2])


def test_evaluator_matches_evaluate_model(tiny_model_dir, glue):
    loaded = load_model(tiny_model_dir, "sst2")
    data = load_task("sst2", glue, source="local")
    evaluator = Evaluator(loaded.tokenizer, data, max_length=16, batch_size=5)
    reference = evaluate_model(loaded.model, loaded.tokenizer, data, max_length=16, batch_size=5, progress=False)
    assert evaluator.evaluate(loaded.model) == reference


def test_a_model_without_a_task_head_is_refused(tiny_model_dir, glue):
    with pytest.raises(AnalyzeError, match="no fine-tuned classification head"):
        ablate(tiny_model_dir, "sst2", data_dir=glue, progress=False)


# ------------------------------------------------------------------------------------------------ m-pruning


def test_magnitude_steps_prune_ten_percent_of_the_remaining_encoder_weights():
    model = tiny_model("bert", num_labels=2)
    linears = encoder_linears(model)
    assert len(linears) == 2 * 6 and all("embeddings" not in n for n in linears)
    masks = WeightMasks.ones(model)
    total = masks.total
    assert total == sum(m.weight.numel() for m in linears.values())
    kept = [total]
    for _ in range(3):
        new = magnitude_step(model, masks, 0.1)
        assert new.kept == kept[-1] - round(0.1 * kept[-1])
        assert all(torch.all(new.masks[n] <= masks.masks[n]) for n in masks.masks)  # only ever removes
        masks = new
        kept.append(new.kept)
    # the removed weights are the smallest in magnitude, globally
    weights = torch.cat([linears[n].weight.detach().abs().reshape(-1) for n in masks.masks])
    keep = torch.cat([masks.masks[n].reshape(-1) for n in masks.masks])
    assert weights[~keep].max() <= weights[keep].min()
    assert masks.sparsity == pytest.approx(1 - 0.9**3, abs=1e-3)


def test_masked_weights_zero_the_weights_and_restore_them():
    model = tiny_model("bert", num_labels=2)
    masks = magnitude_step(model, WeightMasks.ones(model), 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tiny_inputs()
    with torch.no_grad():
        dense = model(**inputs).logits
    with masked_weights(model, masks):
        for name, module in encoder_linears(model).items():
            assert torch.all(module.weight[~masks.masks[name]] == 0)
            assert torch.equal(module.weight[masks.masks[name]], before[_key(model, module)][masks.masks[name]])
        with torch.no_grad():
            assert not torch.allclose(model(**inputs).logits, dense)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks(model)


def _key(model, module) -> str:
    return next(f"{name}.weight" for name, m in model.named_modules() if m is module)


def test_masks_persist_while_training(tiny_model_dir, glue):
    loaded = load_model(tiny_model_dir, "sst2")
    model = loaded.model
    masks = magnitude_step(model, WeightMasks.ones(model), 0.5)
    embedding = model.bert.embeddings.word_embeddings.weight.detach().clone()
    before = {n: m.weight.detach().clone() for n, m in encoder_linears(model).items()}
    data = load_task("sst2", glue, source="local")
    tokenized = tokenize_task(data, loaded.tokenizer, max_length=16)
    config = RetrainConfig(max_steps=3, batch_size=8, learning_rate=1e-2)
    with masked_weights(model, masks, restore=False):
        stats = train(model, loaded.tokenizer, tokenized["train"], config, seed=0)
    assert stats["steps"] == 3
    assert no_hooks(model) and not any("weight_orig" in n for n, _ in model.named_parameters())
    for name, module in encoder_linears(model).items():
        keep = masks.masks[name]
        assert torch.all(module.weight[~keep] == 0)  # exactly zero after optimizer steps
        assert not torch.equal(module.weight[keep], before[name][keep])  # the rest trained
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, embedding)  # embeddings train, unmasked


def test_gated_heads_get_no_update_while_training(tiny_model_dir, glue):
    loaded = load_model(tiny_model_dir, "sst2")
    model = loaded.model
    plan = PruningPlan.keep_all(model)
    plan.kept_heads[0] = [0, 1]
    query = model.bert.encoder.layer[0].attention.self.query.weight
    before = query.detach().clone()
    data = load_task("sst2", glue, source="local")
    tokenized = tokenize_task(data, loaded.tokenizer, max_length=16)
    with masked(model, plan):
        train(model, loaded.tokenizer, tokenized["train"], RetrainConfig(max_steps=2, batch_size=8), seed=0)
    # heads 2 and 3 of layer 0 got no gradient (weight decay of AdamW still shrinks them slightly)
    masked_rows, kept_rows = slice(16, 32), slice(0, 16)
    assert not torch.allclose(query[kept_rows], before[kept_rows], atol=1e-6)
    assert torch.allclose(query[masked_rows], before[masked_rows], atol=1e-5)


class ScriptedEvaluator:
    def __init__(self, scores):
        self.scores = iter(scores)

    def score(self, model):
        return next(self.scores)


def test_magnitude_prune_returns_the_last_masks_that_kept_the_score():
    model = tiny_model("bert", num_labels=2)
    result = magnitude_prune(model, ScriptedEvaluator([0.8, 0.79, 0.75, 0.7]), keep_score=0.9, progress=False)
    # bar 0.72: steps 1 and 2 are kept, step 3 breaks it
    assert [p["accepted"] for p in result.curve] == [True, True, True, False]
    assert result.final_score == 0.75 and result.meta["stop_reason"] == "below_keep_score"
    assert result.masks.kept == round(0.9 * round(0.9 * result.masks.total))
    assert no_hooks(model)


# ------------------------------------------------------------------------------------------------ subnetworks


def _plan(model, kept_heads, kept_mlps) -> PruningPlan:
    full = PruningPlan.keep_all(model)
    return PruningPlan(
        layout=full.layout,
        kept_heads=kept_heads,
        kept_neurons=[full.kept_neurons[i] if i in kept_mlps else [] for i in range(2)],
        model_type="bert",
    )


def heads_of(plan: PruningPlan) -> set[tuple[int, int]]:
    return {(layer, h) for layer, heads in enumerate(plan.kept_heads) for h in heads}


def test_structured_subnetworks_have_the_same_size():
    model = tiny_model("bert", num_labels=2)
    good = _plan(model, [[0, 1, 2], [3, 0]], kept_mlps=[1])  # 5 of 8 heads kept, 3 pruned; 1 of 2 MLPs
    pruned = {(0, 3), (1, 1), (1, 2)}
    nets = structured_subnetworks(good, seed=0)
    assert nets["good"] is good
    for name in ("random", "bad"):
        assert len(heads_of(nets[name])) == 5
        assert sum(1 for n in nets[name].kept_neurons if n) == 1
        assert all(len(n) in (0, 64) for n in nets[name].kept_neurons)
    assert pruned <= heads_of(nets["bad"])  # every pruned head is in the bad subnetwork
    assert nets["bad"].kept_neurons[0] and not nets["bad"].kept_neurons[1]  # the pruned MLP, not the kept one
    # seeded: the same seed gives the same draw, seeds differ
    again = structured_subnetworks(good, seed=0)
    assert heads_of(again["random"]) == heads_of(nets["random"]) and heads_of(again["bad"]) == heads_of(nets["bad"])
    draws = {frozenset(heads_of(structured_subnetworks(good, seed=s)["random"])) for s in range(6)}
    assert len(draws) > 1
    # more pruned than kept: bad is drawn from the pruned heads only
    small = _plan(model, [[0], [1]], kept_mlps=[0])
    bad = structured_subnetworks(small, seed=3)["bad"]
    assert len(heads_of(bad)) == 2 and not heads_of(bad) & {(0, 0), (1, 1)}


def test_weight_subnetworks_keep_the_count_of_every_matrix():
    model = tiny_model("bert", num_labels=2)
    good = magnitude_step(model, WeightMasks.ones(model), 0.3)
    nets = weight_subnetworks(good, seed=1)
    for name, mask in good.masks.items():
        for kind in ("random", "bad"):
            assert int(nets[kind].masks[name].sum()) == int(mask.sum())
        if int((~mask).sum()) <= int(mask.sum()):
            assert torch.all(nets["bad"].masks[name][~mask])  # contains every pruned weight
    same, other = weight_subnetworks(good, seed=1)["random"], weight_subnetworks(good, seed=2)["random"]
    assert all(torch.equal(same.masks[n], nets["random"].masks[n]) for n in good.masks)  # seeded
    assert not all(torch.equal(other.masks[n], nets["random"].masks[n]) for n in good.masks)
    sparse = magnitude_step(model, WeightMasks.ones(model), 0.8)
    bad = weight_subnetworks(sparse, seed=0)["bad"]
    for name, mask in sparse.masks.items():
        assert not torch.any(bad.masks[name] & mask)  # more pruned than kept: only pruned weights


# ------------------------------------------------------------------------------------------------ stability


def survivors(task: str, runs: list[tuple[int, list[list[int]], list[int]]], heads=(4, 4)) -> dict:
    return {
        "slimformer_survivors": 1,
        "task": task,
        "layout": {"heads": list(heads), "ffn": [64] * len(heads)},
        "runs": [{"seed": seed, "kind": "s", "heads": h, "mlps": m} for seed, h, m in runs]
        + [{"seed": 0, "kind": "m", "head_weight_fraction": [[0.5] * n for n in heads]}],
    }


def test_jaccard():
    assert jaccard([1, 0, 1], [1, 0, 1]) == 1.0
    assert jaccard([1, 1, 0, 0], [0, 0, 1, 1]) == 0.0
    assert jaccard([1, 1, 0], [0, 1, 1]) == pytest.approx(1 / 3)
    assert jaccard([0, 0], [0, 0]) == 1.0
    sets = [np.array(v, dtype=bool) for v in ([1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1])]
    matrix = jaccard_matrix(sets)
    assert np.array_equal(matrix, matrix.T) and np.all(np.diag(matrix) == 1)
    assert matrix[0, 2] == 0 and matrix[0, 1] == pytest.approx(1 / 3)


def test_stability_across_seeds_and_tasks(tmp_path):
    a0 = [[1, 1, 0, 0], [1, 0, 0, 0]]
    a1 = [[1, 1, 0, 0], [1, 0, 0, 0]]  # identical to a0
    b0 = [[0, 0, 1, 1], [0, 1, 0, 0]]  # disjoint from a0
    b1 = [[1, 0, 1, 1], [0, 1, 0, 0]]
    result = stability(
        [survivors("sst2", [(0, a0, [1, 0]), (1, a1, [1, 0])]), survivors("mrpc", [(0, b0, [0, 1]), (1, b1, [1, 1])])]
    )
    assert result.labels == ["sst2/seed0", "sst2/seed1", "mrpc/seed0", "mrpc/seed1"]
    heads = result.runs["heads"]
    assert np.array_equal(heads, heads.T) and heads[0, 1] == 1.0 and heads[0, 2] == 0.0
    assert heads[0, 3] == pytest.approx(1 / 6) and heads[2, 3] == pytest.approx(3 / 4)
    assert result.across_seeds["heads"]["sst2"]["mean"] == 1.0
    assert result.across_seeds["heads"]["mrpc"]["mean"] == pytest.approx(0.75)
    cross = [heads[0, 2], heads[0, 3], heads[1, 2], heads[1, 3]]
    assert result.by_task["heads"][0, 1] == pytest.approx(np.mean(cross)) == result.by_task["heads"][1, 0]
    assert result.across_tasks["heads"]["mean"] == pytest.approx(np.mean(cross))
    assert result.runs["mlps"][2, 3] == pytest.approx(0.5)
    out = result.save(tmp_path / "stability")
    for png in ("jaccard_runs_heads.png", "jaccard_runs_mlps.png", "jaccard_tasks_heads.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "results.json").read_text())
    assert np.allclose(saved["jaccard_runs"]["heads"], heads)


def test_stability_refuses_mismatched_or_too_few_inputs(tmp_path):
    one = survivors("sst2", [(0, [[1, 0, 0, 0], [1, 0, 0, 0]], [1, 1])])
    other = survivors("mrpc", [(0, [[1, 0, 0], [1, 0, 0]], [1, 1])], heads=(3, 3))
    with pytest.raises(AnalyzeError, match="layout"):
        stability([one, other])
    with pytest.raises(AnalyzeError, match="at least two"):
        stability([one])
    (tmp_path / "survivors.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(AnalyzeError, match=r"not a survivors\.json"):
        stability([tmp_path, tmp_path])
    with pytest.raises(AnalyzeError, match="does not exist"):
        stability([tmp_path / "missing"])


# ------------------------------------------------------------------------------------------------ papa


def test_half_selections():
    assert selection("first-half", [4, 4]) == [(0, h) for h in range(4)]
    assert selection("last-half", [4, 4]) == [(1, h) for h in range(4)]
    assert {layer for layer, _ in selection("first-half", [2] * 5)} == {0, 1}
    assert {layer for layer, _ in selection("last-half", [2] * 5)} == {3, 4}
    assert selection("none", [4, 4]) == [] and len(selection("all", [4, 3])) == 7


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_constant_attention_from_one_example_reproduces_it(family):
    model = tiny_model(family)
    with torch.no_grad():  # sharpen the (near-uniform) attention of the random init, so that patterns matter
        for view in layer_views(model):
            view.query.weight.mul_(20)
            view.key.weight.mul_(20)
    implementation = model.config._attn_implementation
    inputs = tiny_inputs(batch=2, seq=9, seed=3)
    one = {k: v[:1] for k, v in inputs.items()}  # the first example: no padding
    patterns = collect_patterns(model, [one], max_length=16)
    assert model.config._attn_implementation == implementation and no_hooks(model)
    assert patterns.counts[:9, :9].eq(1).all() and patterns.counts[9:].eq(0).all()
    every_head = [(layer, h) for layer in range(2) for h in range(4)]
    with torch.no_grad():
        dense = model(**inputs).logits
        with constant_attention(model, patterns, []):
            assert torch.allclose(model(**inputs).logits, dense, atol=1e-6, rtol=0)  # nothing replaced
        with constant_attention(model, patterns, every_head):
            alone = model(**one).logits
            # the same example padded to a longer batch: padded keys are masked out and rows renormalised
            padded = {k: torch.cat([v[:1], torch.zeros_like(v[:1, :3])], dim=1) for k, v in one.items()}
            longer = model(**padded).logits
            other = model(**{k: v[1:] for k, v in inputs.items()}).logits
    assert torch.allclose(alone, dense[:1], atol=1e-5, rtol=0)
    assert torch.allclose(longer, dense[:1], atol=1e-5, rtol=0)
    # another example's attention is not its own: far off, compared with the reproduction error
    error = (alone - dense[:1]).abs().max()
    assert (other - dense[1:]).abs().max() > max(1e-5, 100 * error)
    assert no_hooks(model)


def test_papa_end_to_end(tuned_dir, glue, tmp_path):
    result = papa(
        str(tuned_dir), "sst2", data_dir=glue, heads="0:1", n_examples=8, max_length=16, seeds=2, progress=False
    )
    names = [c["name"] for c in result.configs]
    assert names == ["none", "first-half", "last-half", "all", "heads 0:1"]
    by_name = {c["name"]: c for c in result.configs}
    assert by_name["none"]["delta"]["mean"] == 0.0 and by_name["all"]["heads_replaced"] == 8
    assert by_name["first-half"]["layers"] == [0] and by_name["last-half"]["layers"] == [1]
    assert by_name["none"]["score"]["n"] == 2
    out = result.save(tmp_path / "papa")
    assert (out / "papa.png").read_bytes()[:8] == PNG_MAGIC and (out / "patterns.png").is_file()
    assert "Hassid" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["configs"][0]["name"] == "none"


def test_papa_fine_tuning_mode(tiny_model_dir, glue):
    result = papa(
        tiny_model_dir,
        "sst2",
        data_dir=glue,
        configs="all",
        n_examples=8,
        max_length=16,
        finetune=True,
        train_config=RetrainConfig(max_steps=2, batch_size=8),
        progress=False,
    )
    assert [c["name"] for c in result.configs] == ["none", "all"]
    assert all(s["scores"]["all"]["train"]["steps"] == 2 for s in result.per_seed)


# ------------------------------------------------------------------------------------------------ lottery


def test_lottery_end_to_end_and_resume(tiny_model_dir, glue, tmp_path, monkeypatch):
    settings = {
        "model": tiny_model_dir,
        "data_dir": glue,
        "seeds": 2,
        "keep_score": 0.5,
        "n_examples": 8,
        "max_length": 16,
        "max_prune_iterations": 2,
        "train_config": RetrainConfig(max_steps=2, batch_size=8),
        "work_dir": tmp_path / "work",
        "progress": False,
    }
    result = lottery("sst2", **settings)
    assert result.seeds == [0, 1] and result.kinds == ["s", "m"]
    assert set(result.summary) == {"finetuned", "s-good", "s-random", "s-bad", "m-good", "m-random", "m-bad"}
    for entry in result.per_seed:
        s_sizes = {name: entry["retrain"][f"s-{name}"]["size"] for name in ("good", "random", "bad")}
        assert s_sizes["good"] == s_sizes["random"] == s_sizes["bad"]
        assert s_sizes["good"]["heads"] == entry["s"]["heads_kept"]
        m_sizes = {entry["retrain"][f"m-{name}"]["size"]["weights_kept"] for name in ("good", "random", "bad")}
        assert m_sizes == {result.masks[entry["seed"]].kept}
        assert entry["retrain"]["s-good"]["train"]["steps"] == 2
    assert result.survivors["layout"]["heads"] == [4, 4]
    assert [r["kind"] for r in result.survivors["runs"]] == ["s", "s", "m", "m"]
    out = result.save(tmp_path / "lottery")
    for name in ("results.json", "survivors.json", "report.md", "m_masks_seed0.npz", "survival_s.png"):
        assert (out / name).is_file()
    for png in ("survival_m.png", "subnetworks.png", "pruning_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    loaded_masks = WeightMasks.load(out / "m_masks_seed1.npz")
    assert all(torch.equal(loaded_masks.masks[n], result.masks[1].masks[n]) for n in loaded_masks.masks)
    assert "Prasanna" in (out / "report.md").read_text()

    # a rerun reads every completed step back: no training, no pruning
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a completed step")

    monkeypatch.setattr(lottery_module, "train", refuse)
    monkeypatch.setattr(lottery_module, "iterative_prune", refuse)
    monkeypatch.setattr(lottery_module, "magnitude_prune", refuse)
    again = lottery("sst2", **settings)
    assert again.summary == result.summary
    with pytest.raises(AnalyzeError, match="other settings"):
        lottery("sst2", **{**settings, "keep_score": 0.6})

    # the survivors feed the stability analysis
    assert stability([out]).labels == ["sst2/seed0", "sst2/seed1"]


def test_lottery_checks_its_arguments(tiny_model_dir, tuned_dir, glue):
    with pytest.raises(AnalyzeError, match="--prune-kinds"):
        lottery("sst2", model=tiny_model_dir, data_dir=glue, prune_kinds="s,x", progress=False)
    with pytest.raises(AnalyzeError, match="--subnetworks"):
        lottery("sst2", model=tiny_model_dir, data_dir=glue, subnetworks="good,best", progress=False)
    with pytest.raises(AnalyzeError, match="no fine-tuned classification head"):
        lottery("sst2", model=tiny_model_dir, finetuned=tiny_model_dir, data_dir=glue, progress=False)
    with pytest.raises(AnalyzeError, match="layout"):
        lottery("sst2", model="minilm-l6", finetuned=str(tuned_dir), data_dir=glue, progress=False)


# ------------------------------------------------------------------------------------------------ CLI


def test_analyze_through_the_cli(tuned_dir, glue, tmp_path):
    out = tmp_path / "ablate"
    common = ["--task", "sst2", "--data-dir", str(glue), "--max-length", "16"]
    result = runner.invoke(app, ["analyze", "ablate", "--model", str(tuned_dir), *common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "best head alone" in result.output
    assert json.loads((out / "results.json").read_text())["analysis"] == "ablate"
    assert (out / "single_head_delta.png").read_bytes()[:8] == PNG_MAGIC and (out / "report.md").is_file()

    result = runner.invoke(app, ["analyze", "ablate", "--model", str(tuned_dir), *common, "--out", str(out)])
    assert result.exit_code != 0 and "already exists" in str(result.exception)

    papa_out = tmp_path / "papa"
    args = ["analyze", "papa", "--model", str(tuned_dir), *common, "--out", str(papa_out), "--n-examples", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (papa_out / "results.json").is_file()

    bad = tmp_path / "bad"
    bad_args = ["--out", str(bad), "--layers", "0,7"]
    process = subprocess.run(
        [sys.executable, "-m", "slimformer.cli", "analyze", "ablate", "--model", str(tuned_dir), *common, *bad_args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2 and "the model has no layer [7]" in process.stderr
    assert "Traceback" not in process.stderr and not bad.exists()


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.integration
def test_constant_attention_on_minilm():
    loaded = load_model("minilm-l6", "sst2")
    model, tokenizer = loaded.model, loaded.tokenizer
    batch = tokenizer(["a gripping , beautifully acted film .", "dull ."], padding=True, return_tensors="pt")
    first = {k: v[:1] for k, v in batch.items()}
    patterns = collect_patterns(model, [first], max_length=32)
    every_head = [(layer, h) for layer in range(6) for h in range(12)]
    with torch.no_grad():
        dense = model(**batch).logits
        with constant_attention(model, patterns, every_head):
            replaced = model(**batch).logits
    assert torch.allclose(replaced[0], dense[0], atol=1e-5, rtol=0)
    assert no_hooks(model)
