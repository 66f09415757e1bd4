"""ELECTRA discriminators: BERT's module layout (embeddings may be projected to the hidden size)."""

from slimformer.arch import ArchSpec

SPEC = ArchSpec(
    family="electra",
    model_types=("electra",),
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
)
