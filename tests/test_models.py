"""Loading models by alias, folder or hub id, and the errors for each bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as hf

from slimformer.errors import ModelLoadError, UnsupportedArchitectureError
from slimformer.folders import read_manifest, save_model_folder
from slimformer.models import load_model, resolve_model_source
from slimformer.prune import PruningPlan, remove


def test_local_folder_gets_a_classification_head(tiny_model_dir):
    loaded = load_model(tiny_model_dir, num_labels=3, label_names=["a", "b", "c"])
    assert isinstance(loaded.model, hf.BertForSequenceClassification)
    assert loaded.model.config.num_labels == 3
    assert loaded.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert loaded.spec.family == "bert"
    assert not loaded.model.training
    batch = loaded.tokenizer(["hello world"], return_tensors="pt")
    assert loaded.model(**batch).logits.shape == (1, 3)


def test_task_sets_regression_head(tiny_model_dir):
    loaded = load_model(tiny_model_dir, "stsb")
    assert loaded.model.config.num_labels == 1
    assert loaded.model.config.problem_type == "regression"


def test_same_seed_gives_same_head(tiny_model_dir):
    torch.manual_seed(1)
    first = load_model(tiny_model_dir, num_labels=2).model.classifier.weight
    torch.manual_seed(1)
    second = load_model(tiny_model_dir, num_labels=2).model.classifier.weight
    assert torch.equal(first, second)


def test_trained_head_with_other_label_count_is_refused(tiny_model_dir, tmp_path):
    trained = load_model(tiny_model_dir, num_labels=2)
    trained.model.save_pretrained(tmp_path)
    trained.tokenizer.save_pretrained(tmp_path)
    assert load_model(tmp_path, num_labels=2).model.config.num_labels == 2
    with pytest.raises(ModelLoadError, match="2 labels, but the task needs 3"):
        load_model(tmp_path, num_labels=3)


def test_unknown_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-org/no-such-model", num_labels=2)
    message = str(info.value)
    assert "'no-such-org/no-such-model'" in message
    assert "local model folder" in message and "minilm-l6" in message


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nope"))


def test_unsupported_architecture_lists_supported(tmp_path):
    hf.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(tmp_path, num_labels=2)
    assert "gpt2" in str(info.value) and "bert" in str(info.value) and "distilbert" in str(info.value)


def test_corrupt_config_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config"):
        load_model(tmp_path)


def _saved(tiny_model_dir, folder, *, pruned: bool, shard: str | None = None):
    """A tiny classifier saved by slimformer: plain (transformers loads it) or with uneven heads (slimformer_layout)."""
    loaded = load_model(tiny_model_dir, num_labels=2)
    if pruned:
        plan = PruningPlan.keep_all(loaded.model)
        plan.kept_heads = [[0, 2], [1, 2, 3]]
        remove(loaded.model, plan)
    if shard is None:
        save_model_folder(loaded.model, loaded.tokenizer, folder)
    else:  # several weight files: the error must name the damaged one
        loaded.model.save_pretrained(folder, max_shard_size=shard)
        loaded.tokenizer.save_pretrained(folder)
    assert read_manifest(folder) is None or read_manifest(folder)["plain_transformers_loadable"] is not pruned
    return folder


DAMAGES = {
    "cut in half": lambda data: data[: len(data) // 2],
    "cut to a few bytes": lambda data: data[:5],
    "empty": lambda data: b"",
    "random bytes": lambda data: os.urandom(len(data)),
    "last byte missing": lambda data: data[:-1],
}


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned-layout"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_weights_are_a_one_line_error_naming_the_file(tiny_model_dir, tmp_path, pruned, damage):
    folder = _saved(tiny_model_dir, tmp_path / "model", pruned=pruned)
    assert load_model(folder).model.config.num_labels == 2  # loads while intact
    weights = folder / "model.safetensors"
    weights.write_bytes(DAMAGES[damage](weights.read_bytes()))
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert message.startswith(f"{weights} is damaged") and message.endswith("Save or download it again.")
    assert "\n" not in message


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruned-layout"])
def test_a_damaged_shard_is_named(tiny_model_dir, tmp_path, pruned):
    folder = _saved(tiny_model_dir, tmp_path / "model", pruned=pruned, shard="200KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    assert load_model(folder).model.config.num_labels == 2
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=f"^{shards[-1]} is damaged"):
        load_model(folder)


@pytest.mark.integration
def test_embedded_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("minilm-l6", "sst2")
    config = loaded.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 12, 384)
    assert config.intermediate_size == 1536
    assert json.loads((resolve_model_source_dir() / "config.json").read_text())["model_type"] == "bert"
    batch = loaded.tokenizer(["a fine film"], return_tensors="pt")
    assert loaded.model(**batch).logits.shape == (1, 2)


def resolve_model_source_dir():
    from pathlib import Path

    return Path(resolve_model_source("minilm-l6")[0])
