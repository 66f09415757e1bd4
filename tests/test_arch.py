"""Every family spec resolves every module it names, on tiny models and on the meta device."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

from conftest import TINY_CONFIGS, tiny_model
from slimformer.arch import (
    classifier_modules,
    embeddings,
    get_spec,
    layer_views,
    supported_families,
    supported_model_types,
)
from slimformer.errors import UnsupportedArchitectureError


def test_every_fixture_family_is_supported_and_vice_versa():
    assert sorted(TINY_CONFIGS) == supported_model_types()
    assert supported_families() == ["bert", "distilbert", "electra", "mpnet", "roberta"]


def test_spec_resolves_every_module(family_model):
    _, model = family_model
    spec = get_spec(model)
    config = model.config
    views = layer_views(model)
    assert len(views) == spec.num_layers(config) == 2
    for view in views:
        assert view.num_heads == spec.num_heads(config) == 4
        assert view.ffn_size == spec.ffn_size(config) == 64
        hidden = spec.hidden_size(config)
        assert (view.query.in_features, view.query.out_features) == (hidden, hidden)
        assert (view.attn_out.in_features, view.attn_out.out_features) == (hidden, hidden)
        assert (view.ffn_up.in_features, view.ffn_up.out_features) == (hidden, 64)
        assert (view.ffn_down.in_features, view.ffn_down.out_features) == (64, hidden)
        # the views point at the live modules: every one is a distinct submodule of the model
        names = {id(m) for m in model.modules()}
        for part in (view.query, view.key, view.value, view.attn_out, view.ffn_up, view.ffn_down):
            assert id(part) in names
    assert embeddings(model) is not None
    heads = classifier_modules(model)
    assert heads and all(isinstance(m, torch.nn.Module) for m in heads)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_spec_resolves_on_meta_device(model_type):
    # Resolving must not need real weights: build the model on the meta device.
    config = TINY_CONFIGS[model_type]()
    with torch.device("meta"):
        model = hf.AutoModelForSequenceClassification.from_config(config)
    views = layer_views(model)
    assert all(v.query.weight.is_meta for v in views)


def test_projection_modules_carry_the_attention_computation():
    # Zeroing the value projection through the view must change the model's output: the view is not a copy.
    model = tiny_model("bert")
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    before = model(**inputs).logits
    with torch.no_grad():
        for view in layer_views(model):
            view.value.weight.zero_()
            view.value.bias.zero_()
    assert not torch.allclose(before, model(**inputs).logits)


def test_unknown_family_lists_supported_ones():
    config = hf.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10)
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_spec(config)
    message = str(info.value)
    assert "'gpt2'" in message
    for model_type in ("bert", "distilbert", "electra", "mpnet", "roberta", "xlm-roberta"):
        assert model_type in message
