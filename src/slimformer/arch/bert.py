"""BERT (and MiniLM, which is a BERT checkpoint)."""

from slimformer.arch import ArchSpec

SPEC = ArchSpec(
    family="bert",
    model_types=("bert",),
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
    head_inputs=("base_model.pooler.dense",),
)
