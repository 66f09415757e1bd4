"""RoBERTa and XLM-RoBERTa: BERT's module layout; the classifier head is a two-layer block."""

from slimformer.arch import ArchSpec

SPEC = ArchSpec(
    family="roberta",
    model_types=("roberta", "xlm-roberta"),
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
)
