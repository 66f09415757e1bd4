"""Iterative pruning on a tiny model and tiny SST-2 files: the curve, the bar, the returned plan, files, errors."""

from __future__ import annotations

import json

import pytest
import torch

from slimformer.errors import SlimformerError
from slimformer.evaluation import evaluate_model
from slimformer.models import load_model
from slimformer.prune import iterative as iterative_module
from slimformer.prune import masked
from slimformer.prune.iterative import iterative_prune, prune_until_score
from slimformer.tasks import load_task
from test_train import write_sst2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = {"n_examples": 16, "batch_size": 8, "max_length": 16, "progress": False}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def sst2(tmp_path):
    return load_task("sst2", write_sst2(tmp_path / "glue", n_train=24, n_dev=16), source="local")


@pytest.fixture()
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, "sst2")


def dev_score(model, tokenizer, data) -> float:
    return evaluate_model(model, tokenizer, data, max_length=16, progress=False)["dev"]["accuracy"]


def test_iterative_prune_end_to_end(loaded, sst2, tmp_path):
    model, tokenizer = loaded.model, loaded.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = iterative_prune(model, tokenizer, sst2, step=0.25, keep_score=0.9, **SMALL)

    # the model is exactly as it was: weights, mode, flags, no hooks
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())

    # the curve starts at the dense model and is monotone in the fraction pruned
    curve = result.curve
    assert (
        curve[0]["iteration"] == 0
        and curve[0]["heads_pruned_fraction"] == 0
        and curve[0]["score"] == result.dense_score
    )
    fractions = [p["heads_pruned_fraction"] for p in curve]
    assert fractions == sorted(fractions) and fractions[1] > 0
    assert [p["mlps_pruned"] for p in curve] == sorted(p["mlps_pruned"] for p in curve)
    threshold = 0.9 * result.dense_score
    assert all(p["score"] >= threshold for p in curve if p["accepted"])
    assert all(p["accepted"] for p in curve[:-1])
    if result.meta["stop_reason"] == "below_keep_score":
        assert curve[-1]["score"] < threshold and not curve[-1]["accepted"]

    # the plan returned is the last accepted one, and scores what the curve says under masks
    plan = result.plan
    plan.validate(model)
    last = [p for p in curve if p["accepted"]][-1]
    assert sum(len(h) for h in plan.kept_heads) == 8 - last["heads_pruned"]
    assert sum(1 for n in plan.kept_neurons if not n) == last["mlps_pruned"]
    assert all(len(n) in (0, 64) for n in plan.kept_neurons)  # whole MLPs only
    with masked(model, plan):
        assert dev_score(model, tokenizer, sst2) == pytest.approx(result.final_score)
    assert result.final_score >= threshold
    assert dev_score(model, tokenizer, sst2) == pytest.approx(result.dense_score)
    assert result.meta["importance_split"] == "train" and plan.meta["made_by"] == "iterative_prune"

    out = result.save(tmp_path / "run")
    assert json.loads((out / "plan.json").read_text())["kept_heads"] == plan.kept_heads
    saved = json.loads((out / "curve.json").read_text())
    assert saved["curve"] == json.loads(json.dumps(curve)) and saved["dense_score"] == result.dense_score
    png = (out / "curve.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 2000
    assert set(result.to_dict()) >= {"plan", "dense_score", "final_score", "curve", "meta"}


def test_steps_prune_a_fraction_of_the_remaining_heads(loaded, sst2):
    result = iterative_prune(
        loaded.model, loaded.tokenizer, sst2, step=0.5, keep_score=1e-6, method="magnitude", **SMALL
    )
    # the bar is (almost) zero, so it prunes until nothing is left: 8 -> 4 -> 2 -> 1 -> 0 heads, one MLP a step
    heads = [p["heads_pruned"] for p in result.curve]
    assert heads == [0, 4, 6, 7, 8]
    assert [p["mlps_pruned"] for p in result.curve] == [0, 1, 2, 2, 2]
    assert result.meta["stop_reason"] == "nothing_left"
    assert all(not h for h in result.plan.kept_heads) and all(not n for n in result.plan.kept_neurons)


def test_heads_only_and_max_iterations(loaded, sst2):
    result = iterative_prune(
        loaded.model, loaded.tokenizer, sst2, step=0.1, keep_score=1e-6, prune_mlps=False, max_iterations=2, **SMALL
    )
    assert len(result.curve) == 3 and result.meta["stop_reason"] == "max_iterations"
    assert [p["heads_pruned"] for p in result.curve] == [0, 1, 2]  # at least one head per step
    assert all(p["mlps_pruned"] == 0 for p in result.curve)


def test_returns_the_last_plan_that_kept_the_score(loaded, sst2, monkeypatch):
    scores = iter([0.8, 0.78, 0.73, 0.71, 0.5])  # dense, then one per iteration; the bar is 0.9 * 0.8 = 0.72

    def scripted(*args, **kwargs):
        return next(scores)

    monkeypatch.setattr(iterative_module, "_evaluate", scripted)
    result = iterative_prune(loaded.model, loaded.tokenizer, sst2, step=0.25, keep_score=0.9, method="random", **SMALL)
    assert result.dense_score == 0.8 and result.final_score == 0.73
    assert [p["accepted"] for p in result.curve] == [True, True, True, False]
    assert result.meta["stop_reason"] == "below_keep_score"
    assert sum(len(h) for h in result.plan.kept_heads) == 8 - result.curve[2]["heads_pruned"]
    assert result.curve[-1]["relative_score"] == pytest.approx(0.71 / 0.8)


def test_importance_falls_back_to_dev_without_train(loaded, tmp_path):
    glue = write_sst2(tmp_path / "glue", n_train=8, n_dev=16)
    (glue / "SST-2" / "train.tsv").unlink()
    data = load_task("sst2", glue, source="local")
    result = iterative_prune(loaded.model, loaded.tokenizer, data, keep_score=1e-6, max_iterations=1, **SMALL)
    assert result.meta["importance_split"] == "dev" and "no train split" in result.meta["note"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": 0.0}, "step"),
        ({"step": 1.0}, "step"),
        ({"step": float("nan")}, "step"),
        ({"keep_score": 0.0}, "keep_score"),
        ({"keep_score": 1.5}, "keep_score"),
        ({"method": "taylor"}, "Unknown importance method"),
        ({"max_iterations": 0}, "max_iterations"),
    ],
)
def test_bad_arguments_raise(loaded, sst2, kwargs, message):
    with pytest.raises(SlimformerError, match=message):
        iterative_prune(loaded.model, loaded.tokenizer, sst2, **{**SMALL, **kwargs})


def test_a_zero_dense_score_is_an_error(loaded, sst2, monkeypatch):
    monkeypatch.setattr(iterative_module, "_evaluate", lambda *args, **kwargs: 0.0)
    with pytest.raises(SlimformerError, match="Fine-tune the model"):
        iterative_prune(loaded.model, loaded.tokenizer, sst2, **SMALL)


def test_the_shared_loop_accepts_until_the_score_falls_below_the_bar():
    """prune_until_score on integers: each step prunes one more unit; the scores are scripted."""

    def run(scores, *, start=5, max_iterations=None):
        scripted = iter(scores)
        return prune_until_score(
            start,
            1.0,
            0.9,
            has_more=lambda left: left > 0,
            propose=lambda left, iteration: (left - 1, {"step": iteration}),
            score=lambda left: next(scripted),
            describe=lambda left: {"left": left},
            max_iterations=max_iterations,
            progress=False,
        )

    broke = run([0.95, 0.92, 0.85, 0.99])
    assert (broke.state, broke.score, broke.iterations, broke.stop_reason) == (3, 0.92, 3, "below_keep_score")
    assert [p["left"] for p in broke.curve] == [5, 4, 3, 2]
    assert [p["accepted"] for p in broke.curve] == [True, True, True, False]
    assert broke.curve[0] == {"iteration": 0, "left": 5, "score": 1.0, "relative_score": 1.0, "accepted": True}
    assert broke.curve[3] == {
        "iteration": 3,
        "left": 2,
        "score": 0.85,
        "relative_score": 0.85,
        "accepted": False,
        "step": 3,
    }
    emptied = run([0.9, 0.95], start=2)
    assert (emptied.state, emptied.score, emptied.stop_reason) == (0, 0.95, "nothing_left")
    capped = run([0.99] * 5, max_iterations=2)
    assert (capped.state, capped.iterations, capped.stop_reason, len(capped.curve)) == (3, 2, "max_iterations", 3)
