"""The demo pipeline end to end on a tiny model: fine-tune -> prune -> distill -> measure, all three side by side."""

from __future__ import annotations

import json

from rich.console import Console

from slimformer.demo import run_demo
from slimformer.models import load_model
from test_train import write_sst2


def test_demo_runs_the_whole_path_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    glue = write_sst2(tmp_path / "glue")
    console = Console(record=True, width=160)
    summary = run_demo(tmp_path / "demo", model=tiny_model_dir, data_dir=glue, max_train_samples=48, console=console)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["score"] == summary["score"] and set(saved["score"]) == {"finetuned", "pruned", "distilled"}
    # the distilled student has the pruned model's shape: distillation changes weights, not structure
    measured = saved["measure"]
    assert measured["distilled"]["params"]["total"] == measured["pruned"]["params"]["total"]
    assert measured["pruned"]["params"]["total"] < measured["finetuned"]["params"]["total"]
    assert load_model(tmp_path / "demo" / "distilled", "sst2").model.config.num_labels == 2
    assert "pruned + KD" in console.export_text()
