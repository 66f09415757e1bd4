"""Latency lookup table (Kwon et al. 2022): structure, interpolation, prediction, caching, every family.

Timings on a shared CPU are noise, so nothing here asserts how long anything takes, only shapes and consistency.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from conftest import TINY_CONFIGS, tiny_model
from slimformer.budget import latency_table as lt
from slimformer.budget.latency_table import (
    LatencyTable,
    default_neuron_step,
    latency_table,
    measure_latency_table,
    neuron_grid,
    table_key,
)
from slimformer.measure import MeasureError
from slimformer.prune.apply import remove
from slimformer.prune.plan import Layout, PruningPlan

# tiny inputs and a single timed run: these tests check structure, not speed
FAST = {"batch_size": 2, "seq_len": 8, "threads": 1}
FAST_RUNS = {"repeats": 1, "warmup": 0, "progress": False}


def _measure(model, **overrides) -> LatencyTable:
    return measure_latency_table(model, **{**FAST, **FAST_RUNS, **overrides})


def _hand_table(**overrides) -> LatencyTable:
    values = {
        "head_counts": [0, 1, 2, 4],
        "attn_ms": [1.0, 2.0, 4.0, 5.0],
        "neuron_counts": [0, 8, 16],
        "ffn_ms": [1.0, 3.0, 7.0],
        "fixed_ms": 1.0,
        "rest_ms": 10.0,
        "key": {"model": {"hidden": 32, "head_size": 8}},
    }
    return LatencyTable(**{**values, **overrides})


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


# measuring --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_measured_table_covers_every_head_count_and_the_neuron_grid(family):
    model = tiny_model(family)
    layout, state, threads = Layout.of(model), _state(model), torch.get_num_threads()
    table = _measure(model)

    assert table.head_counts == [0, 1, 2, 3, 4]
    assert table.neuron_counts == list(range(0, 65, 8))  # F=64: the step rounds up to 8
    for value in [*table.attn_ms, *table.ffn_ms, table.fixed_ms, table.rest_ms, table.dense_ms]:
        assert math.isfinite(value) and value >= 0
    # one measurement of the empty layer serves all three
    assert table.attn_ms[0] == table.ffn_ms[0] == table.fixed_ms == table.layer_ms(0, 0)
    assert table.key == table_key(model, **FAST)
    assert table.measured_at
    # rest is what the dense model costs beyond its predicted layers
    layers = layout.num_layers * table.layer_ms(4, 64)
    assert table.rest_ms == pytest.approx(max(table.dense_ms - layers, 0.0))
    assert table.model_ms(layout) == pytest.approx(table.rest_ms + layers)
    # the model itself is untouched, and so is the thread setting
    assert Layout.of(model) == layout and model.training is False
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_pruned_model_is_measured_from_its_widest_layers(family):
    # layer 0 has no heads (EmptyAttention) but every neuron; layer 1 has 2 heads and 16 neurons
    model = tiny_model(family)
    plan = PruningPlan.keep_all(model)
    plan.kept_heads = [[], [1, 3]]
    plan.kept_neurons = [list(range(64)), list(range(16))]
    remove(model, plan)
    table = _measure(model, neuron_step=16)

    assert table.head_counts == [0, 1, 2]
    assert table.neuron_counts == [0, 16, 32, 48, 64]
    assert table.key["model"]["max_heads"] == 2 and table.key["model"]["max_ffn"] == 64
    assert table.key["neuron_step"] == 16
    assert table.model_ms(Layout.of(model)) >= table.rest_ms
    with pytest.raises(ValueError, match="outside"):
        table.layer_ms(4, 64)


def test_every_shape_is_timed_in_each_round_and_the_empty_layer_three_times(monkeypatch):
    calls: dict[tuple[int, int], int] = {}
    real = lt._pruned_layer_copy

    def counted_copy(view, spec, head_ids, heads, neurons):
        layer = real(view, spec, head_ids, heads, neurons)
        calls[(heads, neurons)] = 0

        def count(*_):
            calls[(heads, neurons)] += 1

        layer.register_forward_hook(count)
        return layer

    monkeypatch.setattr(lt, "_pruned_layer_copy", counted_copy)
    _measure(tiny_model("bert"), repeats=2, warmup=1)
    assert calls.pop((0, 0)) == 3 * 3
    assert len(calls) == 4 + 8 and set(calls.values()) == {3}


def test_bad_settings_are_refused():
    model = tiny_model("bert")
    with pytest.raises(MeasureError, match="batch_size"):
        _measure(model, batch_size=0)
    with pytest.raises(MeasureError, match="warmup"):
        _measure(model, warmup=-1)
    with pytest.raises(MeasureError, match="neuron_step"):
        _measure(model, neuron_step=0)


def test_neuron_grid_steps_are_multiples_of_8_and_end_at_the_width():
    assert default_neuron_step(1536) == 64 and default_neuron_step(3072) == 128 and default_neuron_step(64) == 8
    assert default_neuron_step(4) == 1
    assert neuron_grid(1536, 64) == list(range(0, 1537, 64))
    assert neuron_grid(100, default_neuron_step(100)) == [*range(0, 100, 8), 100]
    assert neuron_grid(4, 1) == [0, 1, 2, 3, 4]
    assert neuron_grid(0, 8) == [0]


# predicting ---------------------------------------------------------------------------------------------------
def test_layer_ms_is_exact_at_measured_counts_and_linear_in_between():
    table = _hand_table()
    assert table.layer_ms(2, 8) == pytest.approx(4.0 + 3.0 - 1.0)
    assert table.layer_ms(4, 16) == pytest.approx(5.0 + 7.0 - 1.0)
    assert table.layer_ms(0, 0) == pytest.approx(1.0)
    assert table.layer_ms(3, 12) == pytest.approx(4.5 + 5.0 - 1.0)  # halfway between 2 and 4 heads, 8 and 16
    assert table.layer_ms(1, 4) == pytest.approx(2.0 + 2.0 - 1.0)
    for heads, neurons in ((5, 0), (-1, 0), (0, 17)):
        with pytest.raises(ValueError, match="outside"):
            table.layer_ms(heads, neurons)


def test_model_ms_sums_kept_layers_and_skips_dropped_ones():
    table = _hand_table()
    dense = Layout(heads=(4, 4, 4), ffn=(16, 16, 16), head_size=8, hidden=32)
    assert table.model_ms(dense) == pytest.approx(10.0 + 3 * 11.0)
    # a layer with nothing left still runs (norms, residuals): it costs the fixed part
    assert table.model_ms(Layout((4, 0, 2), (16, 0, 8), 8, 32)) == pytest.approx(10.0 + 11.0 + 1.0 + 6.0)

    plan = PruningPlan(
        layout=dense,
        kept_heads=[[0, 1], [0, 1, 2, 3], [3]],
        kept_neurons=[list(range(8)), list(range(16)), []],
        dropped_layers=[1],
    )
    assert table.model_ms(plan) == pytest.approx(10.0 + (4.0 + 3.0 - 1.0) + (2.0 + 1.0 - 1.0))
    assert table.model_ms(plan) == pytest.approx(table.model_ms(plan.result_layout()))

    with pytest.raises(ValueError, match="hidden 32"):
        table.model_ms(Layout((4,), (16,), head_size=8, hidden=64))


def test_to_dict_round_trips_through_json_and_bad_tables_are_refused():
    table = _hand_table(measured_at="2024-01-01T00:00:00+00:00", dense_ms=43.0)
    again = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table

    with pytest.raises(ValueError, match="Not a slimformer latency table"):
        LatencyTable.from_dict({"head_counts": [0]})
    broken = table.to_dict()
    del broken["ffn_ms"]
    with pytest.raises(ValueError, match="Malformed"):
        LatencyTable.from_dict(broken)
    with pytest.raises(ValueError, match="start at 0"):
        _hand_table(head_counts=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="as many"):
        _hand_table(attn_ms=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        _hand_table(ffn_ms=[1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="rest_ms"):
        _hand_table(rest_ms=-1.0)


# caching ------------------------------------------------------------------------------------------------------
@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Cache under tmp_path; count (and really run, quickly) every measurement."""
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path))
    calls = []
    real = lt.measure_latency_table

    def counting(model, **kw):
        calls.append(kw)
        return real(model, **{**kw, **FAST_RUNS})

    monkeypatch.setattr(lt, "measure_latency_table", counting)
    return calls


def test_second_call_loads_the_cached_table(counted, tmp_path):
    model = tiny_model("bert")
    first = latency_table(model, **FAST)
    files = list((tmp_path / "latency").iterdir())
    assert len(files) == 1 and re.fullmatch(r"latency-[0-9a-f]{16,32}\.json", files[0].name)
    second = latency_table(model, **FAST)
    assert len(counted) == 1
    assert second == first
    assert latency_table(tiny_model("bert", seed=1), **FAST) == first  # other weights, same shape: same table
    assert len(counted) == 1


def test_other_inputs_threads_or_shape_miss_the_cache(counted):
    model = tiny_model("bert")
    latency_table(model, **FAST)
    latency_table(model, **{**FAST, "batch_size": 3})
    latency_table(model, **{**FAST, "seq_len": 4})
    latency_table(model, **{**FAST, "threads": 2})
    latency_table(model, **FAST, neuron_step=16)
    assert len(counted) == 5
    latency_table(tiny_model("distilbert"), **FAST)  # another family
    narrower = tiny_model("bert")
    plan = PruningPlan.keep_all(narrower)
    plan.kept_neurons = [list(range(32))] * 2
    latency_table(remove(narrower, plan), **FAST)  # another FFN width
    assert len(counted) == 7
    latency_table(model, **FAST)
    assert len(counted) == 7


def test_refresh_measures_again_and_overwrites(counted, tmp_path):
    model = tiny_model("bert")
    latency_table(model, **FAST)
    path = next((tmp_path / "latency").iterdir())
    again = latency_table(model, **FAST, refresh=True)
    assert len(counted) == 2
    assert json.loads(path.read_text()) == again.to_dict()
    assert latency_table(model, **FAST) == again
    assert len(counted) == 2


def test_explicit_cache_dir(counted, tmp_path):
    latency_table(tiny_model("bert"), cache_dir=tmp_path / "elsewhere", **FAST)
    assert len(list((tmp_path / "elsewhere").glob("latency-*.json"))) == 1
    assert not (tmp_path / "latency").exists()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"slimformer_latency_table": 1, "head_counts": []})])
def test_corrupted_cache_file_is_measured_again_with_a_warning(counted, tmp_path, content):
    model = tiny_model("bert")
    latency_table(model, **FAST)
    path = next((tmp_path / "latency").iterdir())
    path.write_text(content)
    with pytest.warns(UserWarning, match="unreadable"):
        table = latency_table(model, **FAST)
    assert len(counted) == 2
    assert LatencyTable.from_dict(json.loads(path.read_text())) == table


def test_cache_file_for_another_key_is_measured_again(counted, tmp_path):
    model = tiny_model("bert")
    table = latency_table(model, **FAST)
    path = next((tmp_path / "latency").iterdir())
    stale = copy.deepcopy(table.to_dict())
    stale["key"]["machine"]["cpu"] = "some other CPU"
    path.write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match="another setup"):
        latency_table(model, **FAST)
    assert len(counted) == 2
    assert LatencyTable.from_dict(json.loads(path.read_text())).key == table.key


def test_key_names_the_machine_and_the_model_shape():
    key = table_key(tiny_model("distilbert"), batch_size=32, seq_len=128, threads=2)
    assert key["machine"]["cpu"] and key["machine"]["cores"] >= 1
    assert key["machine"]["torch"] == torch.__version__ and key["machine"]["threads"] == 2
    assert key["model"] == {
        "model_type": "distilbert",
        "hidden": 32,
        "head_size": 8,
        "max_heads": 4,
        "max_ffn": 64,
        "dtype": "float32",
        "attn_implementation": key["model"]["attn_implementation"],
    }
    assert (key["batch_size"], key["seq_len"], key["neuron_step"]) == (32, 128, 8)
