"""Parameter counts, analytic FLOPs (cross-checked against torch's FlopCounterMode), latency and disk size."""

from __future__ import annotations

import io
import json

import pytest
import torch
import transformers as hf
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.arch import embeddings, get_spec, layer_list, layer_views, resolve
from slimformer.budget.search import UnitCosts
from slimformer.measure import (
    MeasureError,
    count_parameters,
    encoder_flops,
    flops,
    format_measurements,
    linear_flops,
    measure_latency,
    measure_model,
    measurements_table,
    model_size_on_disk,
    shape_flops,
    size_on_disk,
)
from slimformer.prune import PruningPlan, remove

# Parameters outside the embeddings module that still come before the layers, so count as embeddings.
EMBEDDING_EXTRAS = {
    "electra": ["electra.embeddings_project"],
    "mpnet": ["mpnet.encoder.relative_attention_bias"],
}

COMPONENTS = ("qkv", "attn_scores", "attn_out", "ffn", "encoder", "embeddings", "head", "total")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def counted_flops(model: hf.PreTrainedModel, batch: int, seq: int) -> dict[str, dict[str, int]]:
    """FlopCounterMode's counts of one eager forward pass: module name -> {op name: FLOPs}."""
    # Eager attention runs QK^T and weights·V as plain matmuls (aten.bmm), which the counter sees one by one.
    model.set_attn_implementation("eager")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(**tiny_inputs(batch, seq))
    return {name: {str(op): n for op, n in ops.items()} for name, ops in counter.get_flop_counts().items()}


def module_names(model: hf.PreTrainedModel) -> dict[int, str]:
    """id(module) -> the name FlopCounterMode files its counts under (root class name, then the path)."""
    root = type(model).__name__
    return {id(m): f"{root}.{name}" if name else root for name, m in model.named_modules()}


LINEAR_OPS = {"aten.addmm", "aten.mm"}  # nn.Linear with and without bias
MATMUL_OPS = {"aten.bmm"}  # the attention matmuls, batched over (batch × heads)


def assert_matches_flop_counter(model: hf.PreTrainedModel, batch: int, seq: int) -> None:
    ours = flops(model, seq_len=seq, batch_size=batch)
    counts = counted_flops(model, batch, seq)
    names = module_names(model)
    # The counter counts matmul-like ops only (no softmax, LayerNorm, GELU, additions, embedding lookups),
    # which is exactly what the analytic count keeps, so nothing has to be excluded: the totals agree.
    assert set(counts["Global"]) <= LINEAR_OPS | MATMUL_OPS
    assert sum(counts["Global"].values()) == ours.total
    for view, layer in zip(layer_views(model), ours.per_layer, strict=True):
        in_layer = counts[names[id(view.layer)]]
        parts = (view.query, view.key, view.value, view.attn_out, view.ffn_up, view.ffn_down)
        on_linears = sum(sum(counts[names[id(m)]].values()) for m in parts)
        assert on_linears == layer["qkv"] + layer["attn_out"] + layer["ffn"]
        assert sum(n for op, n in in_layer.items() if op in LINEAR_OPS) == on_linears
        assert sum(n for op, n in in_layer.items() if op in MATMUL_OPS) == layer["attn_scores"]
        for module in parts:
            assert sum(counts[names[id(module)]].values()) == linear_flops(module, batch * seq)
    # The ModuleList of layers is never called itself, so the encoder's count is the sum over its layers.
    assert sum(sum(counts[names[id(layer)]].values()) for layer in layer_list(model)) == ours.encoder


# --- parameters -------------------------------------------------------------------------------------------


def test_parameter_split_sums_to_total(family_model):
    family, model = family_model
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.embeddings + counts.encoder + counts.head == counts.total
    assert counts.encoder == n_params(layer_list(model))
    extras = sum(n_params(resolve(model, path)) for path in EMBEDDING_EXTRAS.get(family, []))
    assert counts.embeddings == n_params(embeddings(model)) + extras
    assert counts.head > 0
    assert counts.as_dict() == {"total": counts.total, "embeddings": counts.embeddings,
                                "encoder": counts.encoder, "head": counts.head}  # fmt: skip


def test_parameter_counts_of_tiny_bert_by_hand():
    # hidden 32, vocab 128, 512 positions, 2 token types, 2 layers, FFN 64, 3 labels:
    # embeddings = 128·32 + 512·32 + 2·32 + LayerNorm 2·32                            = 20608
    # one layer  = q,k,v,o 4·(32·32+32) + LN 64 + up 32·64+64 + down 64·32+32 + LN 64 = 8544, two = 17088
    # head       = pooler 32·32+32 + classifier 32·3+3                                 = 1155
    counts = count_parameters(tiny_model("bert"))
    assert counts.as_dict() == {"total": 38851, "embeddings": 20608, "encoder": 17088, "head": 1155}


# --- FLOPs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "seq"), [(1, 5), (1, 16), (2, 5), (2, 16)])
def test_analytic_flops_equal_flop_counter(family_model, batch, seq):
    _, model = family_model
    assert_matches_flop_counter(model, batch, seq)


def test_flops_of_tiny_bert_by_hand():
    # hidden 32, 4 heads of 8, FFN 64, seq 8, batch 1, per layer:
    # qkv         = 3 · 2·8·32·32       = 49152
    # attn_scores = 2 · 2·8·8·8·4       =  8192   (QK^T and weights·V, 4 heads of size 8)
    # attn_out    = 2·8·32·32           = 16384
    # ffn         = 2·8·32·64 + 2·8·64·32 = 65536
    # one layer = 139264, two = 278528; head = pooler 2·32·32 + classifier 2·32·3 on one token = 2240
    result = flops(tiny_model("bert"), seq_len=8, batch_size=1)
    assert (result.qkv, result.attn_scores, result.attn_out, result.ffn) == (98304, 16384, 32768, 131072)
    assert result.per_layer[0] == {
        "layer": 0, "heads": 4, "ffn_size": 64,
        "qkv": 49152, "attn_scores": 8192, "attn_out": 16384, "ffn": 65536, "total": 139264,
    }  # fmt: skip
    assert result.encoder == 278528
    assert result.head == result.classifier == 2240
    assert result.embeddings == 0
    assert result.total == 280768


def test_flops_scale_linearly_with_batch(family_model):
    _, model = family_model
    one, three = flops(model, seq_len=12, batch_size=1), flops(model, seq_len=12, batch_size=3)
    for key in COMPONENTS:
        assert getattr(three, key) == 3 * getattr(one, key)
    # and attention, unlike the projections, grows with the square of the sequence length
    double = flops(model, seq_len=24, batch_size=1)
    assert double.attn_scores == 4 * one.attn_scores
    assert double.qkv == 2 * one.qkv and double.ffn == 2 * one.ffn


def test_flops_as_dict_is_json_and_consistent(family_model):
    _, model = family_model
    result = flops(model, seq_len=16)
    data = json.loads(json.dumps(result.as_dict()))
    assert data["encoder"] == data["qkv"] + data["attn_scores"] + data["attn_out"] + data["ffn"]
    assert data["total"] == data["embeddings"] + data["encoder"] + data["head"]
    assert sum(layer["total"] for layer in data["per_layer"]) == data["encoder"]


def test_flops_and_params_need_only_shapes():
    # Counting works on the meta device (no weights), which lets budgets be planned without loading a model.
    config = TINY_CONFIGS["bert"]()
    with torch.device("meta"):
        meta = hf.AutoModelForSequenceClassification.from_config(config)
    config.num_labels = meta.config.num_labels
    real = hf.AutoModelForSequenceClassification.from_config(config)
    assert flops(meta, seq_len=32) == flops(real, seq_len=32)
    assert count_parameters(meta) == count_parameters(real)


def test_flops_reject_bad_sizes():
    model = tiny_model("bert")
    with pytest.raises(MeasureError, match="seq_len"):
        flops(model, seq_len=0)
    with pytest.raises(MeasureError, match="batch_size"):
        flops(model, batch_size=-1)


def _replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(resolve(layer, parent_path) if parent_path else layer, name, module)


def _slice_layer(model: hf.PreTrainedModel, index: int, heads: int, ffn: int) -> None:
    """Shrink one layer as structured pruning would: keep ``heads`` heads and ``ffn`` FFN neurons."""
    spec = get_spec(model)
    view = layer_views(model, spec)[index]
    hidden, width = view.query.in_features, heads * view.head_size
    for name in ("query", "key", "value"):
        _replace(view.layer, getattr(spec, name), nn.Linear(hidden, width))
    _replace(view.layer, spec.attn_out, nn.Linear(width, hidden))
    _replace(view.layer, spec.ffn_up, nn.Linear(hidden, ffn))
    _replace(view.layer, spec.ffn_down, nn.Linear(ffn, hidden))


# MPNet is left out: its attention reshapes to the config's all_head_size and adds a relative-position bias
# with one slice per configured head, so it cannot run with fewer heads by swapping Linear modules alone.
@pytest.mark.parametrize("family", ["bert", "distilbert", "electra", "roberta"])
def test_flops_follow_sliced_layers(family):
    model = tiny_model(family)
    full = flops(model, seq_len=8)
    _slice_layer(model, 0, heads=2, ffn=40)
    _slice_layer(model, 1, heads=3, ffn=64)
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        logits = model(**tiny_inputs(2, 8)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    sliced = flops(model, seq_len=8)
    assert [(layer["heads"], layer["ffn_size"]) for layer in sliced.per_layer] == [(2, 40), (3, 64)]
    assert sliced.per_layer[0]["attn_scores"] == full.per_layer[0]["attn_scores"] // 2
    assert sliced.encoder < full.encoder
    for batch, seq in [(1, 8), (2, 13)]:
        assert_matches_flop_counter(model, batch, seq)


# the three views of encoder FLOPs: the measured model, a plan's summary and the budget search's cost model


def _plans(model) -> list[PruningPlan]:
    full = PruningPlan.keep_all(model)

    def plan(heads, neurons, dropped=()):
        return PruningPlan(full.layout, heads, neurons, list(dropped), model_type=full.model_type)

    return [
        full,
        plan([[0, 2], [1, 2, 3]], [list(range(0, 64, 3)), list(range(50))]),
        plan([[], [0, 1, 2, 3]], [list(range(64)), []]),  # a layer with no heads, one with no FFN
        plan([[3], [0, 1]], [list(range(7)), list(range(64))], dropped=[1]),
    ]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("seq_len", [1, 16, 128])
def test_measured_planned_and_searched_flops_agree(family, seq_len):
    for index, plan in enumerate(_plans(tiny_model(family))):
        model = tiny_model(family)
        summary = plan.summary(model, seq_len=seq_len)["encoder_flops"]
        costs = UnitCosts.flops(plan.layout, seq_len=seq_len)
        dense = flops(model, seq_len=seq_len).encoder
        measured = flops(remove(model, plan), seq_len=seq_len).encoder
        kept_heads = sum(len(plan.kept_heads[i]) for i in plan.kept_layers)
        kept_neurons = sum(len(plan.kept_neurons[i]) for i in plan.kept_layers)
        assert summary["before"] == dense == costs.total(sum(plan.layout.heads), sum(plan.layout.ffn)), index
        assert summary["after"] == measured == costs.total(kept_heads, kept_neurons), index
        if index:
            assert measured < dense


def test_the_formula_has_no_fixed_part_and_reads_layouts():
    zero = shape_flops(hidden=32, qk_width=0, v_width=0, ffn_size=0, seq_len=16)
    assert zero["total"] == 0
    one_head = shape_flops(hidden=32, qk_width=8, v_width=8, ffn_size=0, seq_len=16)["total"]
    assert shape_flops(hidden=32, qk_width=24, v_width=24, ffn_size=0, seq_len=16)["total"] == 3 * one_head
    model = tiny_model("bert")
    assert encoder_flops([4, 4], [64, 64], head_size=8, hidden=32, seq_len=16) == flops(model, seq_len=16).encoder
    assert encoder_flops([0, 0], [0, 0], head_size=8, hidden=32, seq_len=16) == 0
    with pytest.raises(MeasureError):
        encoder_flops([4], [64], head_size=8, hidden=32, seq_len=0)


# --- latency ----------------------------------------------------------------------------------------------


def test_latency_statistics_and_restored_state():
    model = tiny_model("bert").train()  # measure_latency must time in eval mode and give training mode back
    threads_before = torch.get_num_threads()
    stats = measure_latency(model, batch_size=2, seq_len=8, threads=1, warmup=1, repeats=5)
    assert torch.get_num_threads() == threads_before
    assert model.training
    assert stats.repeats == len(stats.samples_ms) == 5
    assert all(sample > 0 for sample in stats.samples_ms)
    assert stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms
    assert stats.min_ms == min(stats.samples_ms) and stats.max_ms == max(stats.samples_ms)
    assert stats.std_ms >= 0 and stats.sequences_per_s > 0
    data = json.loads(json.dumps(stats.as_dict()))
    assert (data["batch_size"], data["seq_len"], data["threads"], data["device"]) == (2, 8, 1, "cpu")


def test_latency_keeps_thread_setting_when_threads_is_none():
    threads_before = torch.get_num_threads()
    stats = measure_latency(tiny_model("distilbert"), batch_size=1, seq_len=4, threads=None, warmup=0, repeats=1)
    assert stats.threads is None and stats.std_ms == 0.0
    assert torch.get_num_threads() == threads_before


def test_latency_rejects_impossible_settings():
    model = tiny_model("bert")
    with pytest.raises(MeasureError, match="repeats"):
        measure_latency(model, repeats=0)
    with pytest.raises(MeasureError, match="512 positions"):
        measure_latency(model, seq_len=513, repeats=1)
    if not torch.cuda.is_available():
        with pytest.raises(MeasureError, match="CUDA"):
            measure_latency(model, seq_len=4, repeats=1, device="cuda")


# --- size on disk -----------------------------------------------------------------------------------------


def test_size_on_disk_is_four_bytes_per_parameter(family_model, tmp_path):
    _, model = family_model
    model.save_pretrained(tmp_path)
    size = size_on_disk(tmp_path)
    params = count_parameters(model).total
    tensors = len(model.state_dict())
    # float32 weights plus the safetensors JSON header (about 100 bytes per tensor name, shape and offsets)
    assert 0 <= size.weights_bytes - 4 * params <= 200 * tensors
    assert size.total_bytes > size.weights_bytes  # config.json is there too
    assert model_size_on_disk(model) == size
    assert size_on_disk(tmp_path / "model.safetensors") == type(size)(size.weights_bytes, size.weights_bytes)


def test_size_on_disk_of_missing_folder(tmp_path):
    with pytest.raises(MeasureError, match="does not exist"):
        size_on_disk(tmp_path / "nowhere")


# --- everything at once -----------------------------------------------------------------------------------


def test_measure_model_is_json_and_renders(tmp_path):
    model = tiny_model("bert")
    result = measure_model(model, seq_len=8, batch_size=2, threads=1, repeats=2, warmup=0)
    data = json.loads(json.dumps(result))
    assert data["params"] == count_parameters(model).as_dict()
    assert data["flops"] == flops(model, seq_len=8, batch_size=1).as_dict()
    assert data["latency"]["repeats"] == 2 and data["latency"]["batch_size"] == 2
    assert data["disk"] == model_size_on_disk(model).as_dict()
    assert data["config"] == {
        "family": "bert", "model_type": "bert", "layers": 2, "hidden": 32, "head_size": 8,
        "heads": [4, 4], "ffn": [64, 64],
    }  # fmt: skip

    text = format_measurements(result)
    for fragment in ("Parameters", "0.04M", "GFLOPs", "ms median", "MB", "2 × 4"):
        assert fragment in text
    console = Console(file=io.StringIO(), width=200)
    console.print(measurements_table(result))
    assert "Encoder FLOPs" in console.file.getvalue()


def test_measure_model_without_latency_reads_given_folder(tmp_path):
    model = tiny_model("distilbert")
    model.save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("x" * 1000)
    result = measure_model(model, seq_len=8, latency=False, model_dir=str(tmp_path))
    assert result["latency"] is None
    assert result["disk"] == size_on_disk(tmp_path).as_dict()
    assert result["disk"]["total_bytes"] >= result["disk"]["weights_bytes"] + 1000
    assert "Latency" not in format_measurements(result)


def test_peak_resident_memory_rises_with_what_the_process_touches():
    from slimformer.measure.memory import peak_resident_mib, release_freed_memory

    before = peak_resident_mib()
    if before is None:
        pytest.skip("this platform does not report a high-water mark")
    # alone more than the process has ever held, so the peak must pass the old one by at least the 64 MiB extra
    # (the process may hold far less now than at its peak: only that much is sure)
    block = torch.ones((int(before) + 64) * 2**18)
    after = peak_resident_mib()
    assert after >= before + 64 * 0.9
    del block
    assert isinstance(release_freed_memory(), bool) and peak_resident_mib() >= after  # a high-water mark never falls
