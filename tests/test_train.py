"""Fine-tuning and evaluation on a tiny model and tiny GLUE-format files: outputs, metrics, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import TrainerCallback

from slimformer.errors import SlimformerError
from slimformer.evaluation import evaluate
from slimformer.folders import read_manifest
from slimformer.models import load_model
from slimformer.tasks import load_task
from slimformer.train import TrainConfig, finetune

WORDS_POS = ["good", "great", "fine", "lovely", "superb"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "boring"]


def write_sst2(root: Path, n_train: int = 48, n_dev: int = 16) -> Path:
    rng = random.Random(0)
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = WORDS_POS if label else WORDS_NEG
            lines.append(f"a {rng.choice(words)} film , {rng.choice(words)} acting \t{label}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def glue_dir(tmp_path) -> Path:
    return write_sst2(tmp_path / "glue")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


CONFIG = TrainConfig(max_length=16, batch_size=8, max_steps=4, save_steps=2, learning_rate=1e-3, logging_steps=1)


class StopAt(TrainerCallback):
    """Simulates Ctrl-C in the first step after ``step`` (whose checkpoint is then on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.step:
            raise KeyboardInterrupt
        return control


def test_finetune_writes_a_model_folder_with_metrics(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    result = finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=CONFIG)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["command"] == "finetune" and saved["task"]["name"] == "sst2" and saved["primary_metric"] == "accuracy"
    assert saved["details"]["train"]["steps"] == 4 and saved["details"]["train"]["samples"] == 48
    assert 0.0 <= saved["eval"]["after"]["dev"]["accuracy"] <= 1.0
    assert result.score == saved["score"]["after"] == saved["eval"]["after"]["dev"]["accuracy"]
    assert saved["config"]["method"] == "finetune" and saved["config"]["max_steps"] == 4
    assert saved["models"]["after"]["heads"] == 8 and saved["models"]["before"] is None
    assert not (tmp_path / "out.work").exists()  # checkpoints are cleaned once the model is saved
    # the folder has the manifest every slimformer model folder has, here with the task it was trained for
    manifest = read_manifest(out)
    assert manifest["plan"] is None and manifest["plain_transformers_loadable"] is True
    assert manifest["task"]["name"] == "sst2" and manifest["task"]["labels"] == ["negative", "positive"]
    assert manifest["layers"] == [{"heads": 4, "ffn": 64}] * 2
    # evaluating the saved folder reproduces the metrics computed at the end of training
    again = evaluate(out, "sst2", data_dir=glue_dir, max_length=16)
    assert again["eval"]["dev"] == pytest.approx(saved["eval"]["after"]["dev"])


def test_existing_output_is_not_overwritten(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SlimformerError, match="already exists"):
        finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=CONFIG)
    assert (out / "keep.txt").read_text() == "precious"


def test_interrupted_run_resumes_from_last_complete_checkpoint(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=CONFIG, callbacks=[StopAt(2)])
    work = tmp_path / "out.work"
    assert not out.exists()  # nothing half-finished where the result is expected
    assert (work / "checkpoint-2" / "trainer_state.json").is_file()
    # a save cut short leaves a checkpoint without trainer_state.json: it must be ignored and removed
    (work / "checkpoint-3").mkdir()
    (work / "checkpoint-3" / "model.safetensors").write_bytes(b"partial")
    result = finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=CONFIG)
    assert result.metrics["details"]["train"]["resumed_from"].endswith("checkpoint-2")
    assert result.metrics["details"]["train"]["steps"] == 4
    assert (out / "metrics.json").is_file()


def test_resume_refuses_checkpoints_of_another_run(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=CONFIG, callbacks=[StopAt(2)])
    other = TrainConfig(**{**CONFIG.__dict__, "learning_rate": 5e-4})
    with pytest.raises(SlimformerError, match="different run"):
        finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=other)
    result = finetune(tiny_model_dir, "sst2", out, data_dir=glue_dir, config=other, resume=False)
    assert result.metrics["details"]["train"]["resumed_from"] is None


def test_training_learns_the_toy_task(tiny_model_dir, glue_dir, tmp_path):
    # Proves the loop really trains: the toy sentiment words are separable within a few dozen steps.
    config = TrainConfig(max_length=16, batch_size=8, epochs=6, learning_rate=3e-3, save_steps=1000)
    result = finetune(tiny_model_dir, "sst2", tmp_path / "out", data_dir=glue_dir, config=config)
    assert result.metrics["eval"]["after"]["dev"]["accuracy"] >= 0.8
    untrained = evaluate(load_model(tiny_model_dir, "sst2"), load_task("sst2", glue_dir), max_length=16)
    assert untrained["score"] < result.score


@pytest.mark.integration
def test_real_minilm_evaluates_on_real_sst2_dev():
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
    if not (root / "SST-2").is_dir():
        pytest.skip("real GLUE files not found beside the project")
    metrics = evaluate("minilm-l6", "sst2", data_dir=root, max_length=64, max_eval_samples=128)
    # an untrained head on a real encoder: a valid accuracy on exactly the 128 sampled sentences
    assert metrics["task"] == "sst2" and 0.0 <= metrics["score"] <= 1.0


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from slimformer.io import atomic_directory, write_json_atomic

    mask = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "m.json", {"a": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
        with atomic_directory(tmp_path / "folder") as staging:
            (staging / "x").write_text("1")
        assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    finally:
        os.umask(mask)
