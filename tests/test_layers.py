"""Dropping whole layers (Sajjad et al. 2020 strategies) with real removal, reload and plain-transformers load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as hf

import slimformer
from conftest import tiny_inputs, tiny_model
from slimformer.errors import SlimformerError
from slimformer.models import load_model
from slimformer.prune import masked
from slimformer.prune.layers import layer_contributions, layers_to_drop, parse_drop_layers
from slimformer.tasks import load_task
from test_train import write_sst2


@pytest.mark.parametrize(
    ("strategy", "k", "expected"),
    [
        ("top", 2, [4, 5]),
        ("bottom", 2, [0, 1]),
        ("alternate", 3, [1, 3, 5]),
        ("alternate", 4, [1, 3, 4, 5]),  # then the remaining layers, again from the top
        ("symmetric", 2, [2, 3]),
        ("symmetric", 3, [1, 2, 3]),
        ("top", 0, []),
    ],
)
def test_strategies_on_six_layers(strategy, k, expected):
    assert layers_to_drop(strategy, 6, k) == expected


def test_contribution_drops_the_layers_that_change_least():
    assert layers_to_drop("contribution", 4, 2, [0.3, 0.1, 0.5, 0.05]) == [1, 3]
    with pytest.raises(SlimformerError, match="one contribution score per layer"):
        layers_to_drop("contribution", 4, 2)


def test_bad_requests_are_refused():
    with pytest.raises(SlimformerError, match="keep at least one"):
        layers_to_drop("top", 6, 6)
    with pytest.raises(SlimformerError, match="not understood"):
        parse_drop_layers("middle:2")
    with pytest.raises(SlimformerError, match="not understood"):
        parse_drop_layers("top")
    assert parse_drop_layers("symmetric:3") == ("symmetric", 3)


def test_contributions_are_one_minus_cosine():
    model = tiny_model("bert")
    batch = tiny_inputs()
    contributions = layer_contributions(model, [batch])
    states = model(**batch, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    for layer in range(2):
        cosine = torch.nn.functional.cosine_similarity(states[layer][valid], states[layer + 1][valid], dim=-1)
        assert contributions[layer] == pytest.approx(float((1 - cosine).mean()), rel=1e-5)


@pytest.mark.parametrize("strategy", ["top:1", "contribution:1"])
def test_prune_drops_layers_for_real_and_reloads_with_plain_transformers(
    strategy, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    out = tmp_path / "dropped"
    dense = load_model(tiny_model_dir, "sst2").model
    result = slimformer.prune(
        copy.deepcopy(dense),
        slimformer.DropLayers(strategy, n_examples=16),
        load_task("sst2", glue),
        tokenizer=load_model(tiny_model_dir).tokenizer,
        out=out,
        max_length=16,
        progress=False,
    )
    assert len(result.plan.dropped_layers) == 1
    with torch.no_grad(), masked(dense, result.plan):  # layer gates == removal
        torch.testing.assert_close(
            result.model(**tiny_inputs()).logits, dense(**tiny_inputs()).logits, atol=1e-5, rtol=0
        )
    assert json.loads((out / "slimformer.json").read_text())["plain_transformers_loadable"] is True
    ours = load_model(out).model
    plain = hf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.num_hidden_layers == 1
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, ours(**inputs).logits, atol=0, rtol=0)
