"""The command line end to end on a tiny model and tiny GLUE-format files: finetune -> importance -> prune ->
evaluate -> measure -> export, plus the exit status and message of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_inputs, write_review_csvs
from slimformer.cli import app
from slimformer.models import load_model
from slimformer.prune import PruningPlan, masked
from test_train import write_sst2

runner = CliRunner()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_pipeline_through_the_cli(tiny_model_dir, tmp_path):
    glue = write_sst2(tmp_path / "glue")
    tuned = tmp_path / "tuned"
    common = ["--task", "sst2", "--data-dir", glue, "--max-length", "16"]
    invoke("finetune", "--model", tiny_model_dir, "--out", tuned, *common, "--max-steps", "3", "--batch-size", "8")
    assert json.loads((tuned / "metrics.json").read_text())["details"]["train"]["steps"] == 3

    invoke("importance", "--model", tuned, *common, "--out", tmp_path / "imp", "--n-examples", "16")
    scores = json.loads((tmp_path / "imp" / "importance.json").read_text())
    assert scores["method"] == "gradient"
    assert (tmp_path / "imp" / "head_importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    pruned = tmp_path / "pruned"
    out = invoke(
        "prune", "--model", tuned, *common, "--out", pruned, "--heads", "0.5", "--ffn", "0.5", "--n-examples", "16"
    ).output
    assert "heads" in out
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert (metrics["models"]["before"]["heads"], metrics["models"]["after"]["heads"]) == (8, 4)
    plan = PruningPlan.load(pruned / "plan.json")
    assert sum(len(h) for h in plan.kept_heads) == 4
    # the physically pruned model computes what the masked dense model computes
    dense, removed = load_model(tuned).model, load_model(pruned).model
    inputs = tiny_inputs(seed=3)
    inputs["input_ids"] = inputs["input_ids"] + 1000  # word-piece ids of the MiniLM vocabulary
    with torch.no_grad(), masked(dense, plan):
        torch.testing.assert_close(removed(**inputs).logits, dense(**inputs).logits, atol=1e-5, rtol=0)

    # no data options: the folder remembers the task it was trained on (and where its data is)
    evaluated = invoke("evaluate", "--model", pruned, "--max-length", "16", "--json").stdout
    assert json.loads(evaluated)["eval"]["dev"] == pytest.approx(metrics["eval"]["after"]["dev"])

    measured = json.loads(
        invoke(
            "measure",
            "--model",
            pruned,
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--json",
        ).stdout
    )
    assert measured["params"]["total"] == metrics["models"]["after"]["params"]["total"]
    assert sum(measured["config"]["heads"]) == 4

    # re-applying the saved plan to the fine-tuned model gives the same model
    again = tmp_path / "again"
    invoke("prune", "--model", tuned, *common, "--out", again, "--plan", pruned / "plan.json")
    assert json.loads((again / "metrics.json").read_text())["eval"]["after"] == metrics["eval"]["after"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "slimformer.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_bad_input_exits_2_with_a_message(tiny_model_dir, tmp_path):
    glue = write_sst2(tmp_path / "glue")
    result = run_cli("evaluate", "--model", tiny_model_dir, "--task", "nonsense", "--data-dir", glue)
    assert result.returncode == 2
    assert "Unknown task 'nonsense'" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(
        "prune",
        "--model",
        tiny_model_dir,
        "--task",
        "sst2",
        "--data-dir",
        glue,
        "--out",
        tmp_path / "p",
        "--heads",
        "1.2",
    )
    assert result.returncode == 2
    assert "heads 1.2 is impossible" in result.stderr
    assert not (tmp_path / "p").exists()  # nothing half-written
    result = run_cli("prune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", glue, "--out", tmp_path / "p")
    assert result.returncode == 2 and "exactly one way" in result.stderr


def test_budget_pruning_through_the_cli(tiny_model_dir, tmp_path):
    glue = write_sst2(tmp_path / "glue")
    common = ["--task", "sst2", "--data-dir", glue, "--max-length", "16"]
    out = tmp_path / "budget"
    printed = invoke(
        "prune",
        "--model",
        tiny_model_dir,
        *common,
        "--out",
        out,
        "--budget-flops",
        "0.5",
        "--calibration-examples",
        "16",
        "--tune",
        "scales",
    ).stdout
    assert "speedup" in printed and "took" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["fraction"] == 0.5 and "one scale per unit" in report["details"]["description"]
    # FLOPs are budgeted at 128 tokens, as measured by `slimformer measure --seq-len 128`
    measured = json.loads(
        invoke(
            "measure",
            "--model",
            out,
            "--seq-len",
            "128",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--json",
        ).stdout
    )
    assert measured["flops"]["encoder"] == report["models"]["after"]["encoder_flops"]
    assert measured["flops"]["encoder"] <= 0.5 * report["models"]["before"]["encoder_flops"]
    result = runner.invoke(
        app,
        [
            "prune",
            "--model",
            tiny_model_dir,
            *map(str, common),
            "--out",
            str(tmp_path / "x"),
            "--budget-flops",
            "0.5",
            "--heads",
            "0.5",
        ],
    )
    assert result.exit_code != 0 and "exactly one way" in str(result.exception)


def test_a_model_fine_tuned_on_a_custom_csv_is_pruned_and_analysed_with_no_data_options(tiny_model_dir, tmp_path):
    write_review_csvs(tmp_path, repeats=8)
    tuned = tmp_path / "mine"
    data = ["--train-file", tmp_path / "train.csv", "--dev-file", tmp_path / "dev.csv"]
    columns = ["--text-columns", "review", "--label-column", "sentiment"]
    invoke(
        "finetune", "--model", tiny_model_dir, "--out", tuned, *data, *columns, "--max-steps", "2", "--max-length", "16"
    )

    pruned = tmp_path / "half"
    invoke("prune", "--model", tuned, "--out", pruned, "--budget-flops", "0.5", "--calibration-examples", "8")
    report = json.loads((pruned / "metrics.json").read_text())
    assert report["task"]["kind"] == "custom" and report["task"]["labels"] == ["neg", "pos"]
    assert report["models"]["after"]["encoder_flops"] <= 0.5 * report["models"]["before"]["encoder_flops"]
    assert set(report["eval"]["after"]) == {"dev"}

    invoke("importance", "--model", pruned, "--out", tmp_path / "imp", "--n-examples", "8")
    invoke("analyze", "ablate", "--model", tuned, "--out", tmp_path / "ablate", "--max-length", "16")
    assert (tmp_path / "ablate" / "results.json").is_file()
    # the same folder with another task's data: the labels do not fit its head
    glue = write_sst2(tmp_path / "glue")
    result = runner.invoke(app, ["evaluate", "--model", str(tuned), "--task", "sst2", "--data-dir", str(glue)])
    assert result.exit_code != 0 and "labels ['neg', 'pos'] differ" in str(result.exception)


def test_budget_pruning_fisher_precision_reaches_the_pruner_and_its_report(tiny_model_dir, tmp_path):
    glue = write_sst2(tmp_path / "glue")
    out = tmp_path / "bf16"
    common = ["--task", "sst2", "--data-dir", glue, "--max-length", "16", "--calibration-examples", "16"]
    budget = ["--budget-flops", "0.5", "--fisher-precision"]
    others = ["--neuron-weight", "0.5", "--token-weighting", "0.5"]
    invoke("prune", "--model", tiny_model_dir, *common, "--out", out, *budget, "bfloat16", *others)
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["fisher_precision"] == "bfloat16" and report["details"]["fisher_precision"] == "bfloat16"
    assert report["config"]["neuron_weight"] == 0.5 and report["details"]["neuron_weight"] == 0.5
    assert report["config"]["token_weighting"] == 0.5 and report["details"]["token_weighting"] == 0.5
    bad = ["prune", "--model", tiny_model_dir, *common, "--out", tmp_path / "bad", *budget, "float16"]
    failed = runner.invoke(app, [str(a) for a in bad])
    assert failed.exit_code != 0 and "fisher_precision" in str(failed.exception) + failed.output
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_budget_pruning_with_a_memory_limit_spills_and_says_so(tiny_model_dir, tmp_path):
    glue = write_sst2(tmp_path / "glue")
    common = ["--task", "sst2", "--data-dir", glue, "--max-length", "16", "--calibration-examples", "16"]
    out = tmp_path / "budget"
    invoke("prune", "--model", tiny_model_dir, *common, "--out", out, "--budget-flops", "0.5", "--max-memory", "0")
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["max_memory"] == "0"
    assert report["details"]["refit_memory"]["bytes_spilled"] > 0 and report["details"]["refit_memory"]["limit"] == 0
    peaks = report["details"]["peak_memory_mib"]  # the high-water mark after each phase, in the order they ran
    assert list(peaks) == ["fisher", "search", "rearrange", "tune"] and list(peaks.values()) == sorted(peaks.values())
    bad = runner.invoke(
        app,
        [
            "prune",
            "--model",
            tiny_model_dir,
            *common,
            "--out",
            tmp_path / "x",
            "--budget-flops",
            "0.5",
            "--max-memory",
            "lots",
        ],
    )
    assert bad.exit_code != 0 and "not a size" in str(bad.exception) and not (tmp_path / "x").exists()
