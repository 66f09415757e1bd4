"""MPNet: attention projections under ``attention.attn`` named q, k, v, o."""

from slimformer.arch import ArchSpec

SPEC = ArchSpec(
    family="mpnet",
    model_types=("mpnet",),
    layers="encoder.layer",
    query="attention.attn.q",
    key="attention.attn.k",
    value="attention.attn.v",
    attn_out="attention.attn.o",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
)
