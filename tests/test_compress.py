"""slimformer compress: budget pruning + optional recovery + int8, every stage measured, one report and folder."""

from __future__ import annotations

import json

import pytest

import slimformer
from slimformer.configs import ConfigError
from slimformer.errors import SlimformerError
from slimformer.tasks import load_task
from test_train import write_sst2

pytest.importorskip("onnxruntime")


@pytest.fixture()
def sst2(tmp_path):
    return load_task("sst2", write_sst2(tmp_path / "glue"))


def test_compress_to_a_flops_budget_writes_every_stage_and_a_runnable_artifact(
    tiny_model_dir, sst2, tmp_path, monkeypatch
):
    from test_compression_costs import ADV, write_eec

    (tmp_path / "advglue").mkdir()
    (tmp_path / "advglue" / "dev.json").write_text(json.dumps(ADV))
    monkeypatch.setenv("ADVGLUE_DIR", str(tmp_path / "advglue"))
    monkeypatch.setenv("EEC_DIR", str(write_eec(tmp_path / "eec.csv")))
    out = tmp_path / "compressed"
    config = slimformer.Compress(budget_flops=0.5, calibration_examples=16, int8_calibration_examples=16)
    result = slimformer.compress(tiny_model_dir, config, sst2, out=out, max_length=16, seq_len=16, rounds=1)

    stages = result.report["details"]["stages"]
    assert [s["stage"] for s in stages] == ["dense", "dense int8", "pruned", "pruned int8"]
    assert [s["runtime"] for s in stages] == ["pytorch fp32", "onnxruntime int8 (dynamic)"] * 2
    pruned = next(s for s in stages if s["stage"] == "pruned")
    assert 0.4 <= pruned["encoder_flops_fraction"] <= 0.5 + 1e-9  # the budget search lands at or just under the budget
    assert all(s["ms_32x128"] > 0 and s["ms_1x32"] > 0 for s in stages)
    assert stages[0]["speedup_32x128"] == pytest.approx(1.0)
    assert result.report["details"]["attempts"] == [
        {"flops_fraction": 0.5, "measured_speedup": result.report["details"]["attempts"][0]["measured_speedup"]}
    ]

    assert {p.name for p in out.iterdir()} >= {"model.onnx", "report.md", "pareto.png", "metrics.json", "pruned"}
    report = json.loads((out / "metrics.json").read_text())
    assert report["command"] == "compress" and report["config"]["budget_flops"] == 0.5
    # the artifact is the final stage: scored through onnxruntime again, it gives the reported score
    evaluated = slimformer.evaluate(out, sst2, max_length=16)
    assert evaluated["score"] == pytest.approx(stages[-1]["score"])
    assert report["score"]["after"] == pytest.approx(stages[-1]["score"])
    # and the pruned PyTorch folder is the pruned stage
    reloaded = slimformer.evaluate(out / "pruned", sst2, max_length=16)
    assert reloaded["score"] == pytest.approx(pruned["score"])
    manifest = json.loads((out / "slimformer.json").read_text())
    assert manifest["format"] == "onnx" and manifest["plan"] and manifest["compress"]["budget_flops"] == 0.5
    assert "pruned and quantized to int8" in (out / "README.md").read_text()
    markdown = (out / "report.md").read_text()
    assert "| pruned int8 | onnxruntime int8 (dynamic) |" in markdown and "pareto.png" in markdown
    # beyond the score: every stage scored on AdvGLUE, its loyalty to the dense model and its EEC gaps
    costs = {s["stage"]: s["costs"] for s in stages}
    assert costs["dense"]["loyalty"]["dev"]["label_loyalty"] == 1.0 and set(costs["dense"]["loyalty"]) == {
        "dev",
        "advglue",
    }
    assert all(0 <= c["advglue"] <= 1 and isinstance(c["eec_gender_gap"], float) for c in costs.values())
    assert costs["dense int8"]["loyalty"]["dev"]["probability_loyalty"] > 0.9  # int8 barely moves a tiny model
    assert "## Beyond the score" in markdown and "| pruned int8 |" in markdown.split("## Beyond the score")[1]


def test_compress_to_a_target_speedup_measures_and_retries(tiny_model_dir, sst2, tmp_path):
    # the first FLOPs fraction is what dense int8's measured speedup says is needed; while the measured speedup
    # falls short, the fraction shrinks by the shortfall; the fastest attempt is kept
    target = 3.0
    config = slimformer.Compress(
        target_speedup=target, max_attempts=2, calibration_examples=16, int8_calibration_examples=16
    )
    result = slimformer.compress(tiny_model_dir, config, sst2, max_length=16, seq_len=16, rounds=1, costs=False)
    details = result.report["details"]
    attempts = details["attempts"]
    assert attempts[0]["flops_fraction"] == pytest.approx(min(1.0, details["dense_int8_speedup"] / target), abs=1e-3)
    if attempts[0]["measured_speedup"] < target:
        shrunk = attempts[0]["flops_fraction"] * attempts[0]["measured_speedup"] / target
        assert len(attempts) == 2 and attempts[1]["flops_fraction"] == pytest.approx(shrunk, abs=1e-3)
    else:
        assert len(attempts) == 1
    best = max(attempts, key=lambda a: a["measured_speedup"])
    assert details["flops_fraction"] == best["flops_fraction"]
    assert result.out_dir is None


def test_an_unreachable_target_speedup_is_a_clear_error(tiny_model_dir, sst2, tmp_path):
    config = slimformer.Compress(target_speedup=1e9, calibration_examples=16, int8_calibration_examples=16)
    with pytest.raises(SlimformerError, match="ask for a smaller --target-speedup"):
        slimformer.compress(tiny_model_dir, config, sst2, out=tmp_path / "never", max_length=16, seq_len=16, rounds=1)
    assert not (tmp_path / "never").exists()


def test_compress_with_kd_recovery_adds_the_recovered_stage(tiny_model_dir, sst2, tmp_path, monkeypatch):
    import slimformer.api

    seen = []
    real_distill = slimformer.api.distill

    def recording(*args, **kwargs):
        seen.append(kwargs["distill_config"].masked_copies)
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(slimformer.api, "distill", recording)
    config = slimformer.Compress(
        budget_flops=0.5,
        recover="kd",
        epochs=1,
        masked_copies=1,
        calibration_examples=16,
        int8_calibration_examples=16,
    )
    result = slimformer.compress(
        tiny_model_dir, config, sst2, max_length=16, seq_len=16, rounds=1, progress=False, costs=False
    )
    names = [s["stage"] for s in result.report["details"]["stages"]]
    assert names == ["dense", "dense int8", "pruned", "pruned + kd", "pruned + kd int8"]
    assert seen == [1]  # the masked copies reached the distillation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "one of --target-speedup or --budget-flops"),
        ({"target_speedup": 2.0, "budget_flops": 0.5}, "one of --target-speedup or --budget-flops"),
        ({"target_speedup": 0.5}, "above 1"),
        ({"budget_flops": 1.5}, "fraction of FLOPs"),
        ({"budget_flops": 0.5, "recover": "magic"}, "Unknown recovery"),
        ({"budget_flops": 0.5, "masked_copies": 2}, "needs --recover kd"),
        ({"budget_flops": 0.5, "recover": "kd", "masked_copies": -1}, "masked-copies"),
        ({"budget_flops": 0.5, "runtime": "openvino", "mode": "dynamic"}, "no dynamic int8"),
        ({"budget_flops": 0.5, "runtime": "tensorrt"}, "Unknown runtime"),
    ],
)
def test_impossible_compress_settings_are_refused_before_any_work(settings, message):
    with pytest.raises(ConfigError, match=message):
        slimformer.Compress(**settings)


def test_compress_command(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from slimformer.cli import app

    glue = write_sst2(tmp_path / "glue")
    out = tmp_path / "compressed"
    arguments = ["compress", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", str(glue), "--out", str(out)]
    arguments += ["--budget-flops", "0.6", "--calibration-examples", "16", "--max-length", "16", "--seq-len", "16"]
    result = CliRunner().invoke(app, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pruned int8" in result.output and (out / "report.md").is_file()
