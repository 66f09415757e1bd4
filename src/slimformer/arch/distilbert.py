"""DistilBERT: its own module names and config keys (n_heads, hidden_dim, n_layers, dim)."""

from slimformer.arch import ArchSpec

SPEC = ArchSpec(
    family="distilbert",
    model_types=("distilbert",),
    layers="transformer.layer",
    attention="attention",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attn_out="attention.out_lin",
    ffn_up="ffn.lin1",
    ffn_down="ffn.lin2",
    classifier=("pre_classifier", "classifier"),
    attn_norm="sa_layer_norm",
    ffn_norm="output_layer_norm",
    ffn_act="ffn.activation",
    head_inputs=("pre_classifier",),
    heads_key="n_heads",
    ffn_key="hidden_dim",
    layers_key="n_layers",
    hidden_key="dim",
)
