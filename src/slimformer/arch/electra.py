"""ELECTRA discriminators: BERT's module layout (embeddings may be projected to the hidden size)."""

from dataclasses import replace

from slimformer.arch.bert import SPEC as BERT

SPEC = replace(
    BERT,
    family="electra",
    model_types=("electra",),
    stream_entry=("embeddings_project", "embeddings.LayerNorm"),
    head_inputs=("classifier.dense",),
)
