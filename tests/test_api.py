"""The front door: `slimformer.prune(model, config, data)` with every method config, configs as JSON, one report
schema, models that remember their task, and impossible targets refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

import slimformer
from conftest import tiny_inputs, write_review_csvs
from slimformer.configs import ConfigError, config_from_dict, known_methods, load_config
from slimformer.errors import TaskError
from slimformer.measure import flops
from slimformer.prune import PruningPlan
from slimformer.tasks import load_custom_task, load_task
from test_train import write_sst2

REPORT_KEYS = {
    "schema_version",
    "command",
    "invocation",
    "slimformer_version",
    "model",
    "task",
    "primary_metric",
    "config",
    "score",
    "eval",
    "models",
    "flops_seq_len",
    "latency",
    "seconds",
    "details",
}

EVERY_METHOD = [
    slimformer.FlopsBudget(0.5, calibration_examples=16, seq_len=16),
    slimformer.LatencyBudget(0.7, tune="scales", rearrange=False, latency_batch_size=2, threads=1),
    slimformer.Fractions(heads=0.5, ffn=0.25, scope="layer", n_examples=16),
    slimformer.Iterative(keep_score=0.5, step=0.25, n_examples=16),
    slimformer.DropLayers("top:1"),
    slimformer.PlanFile("plan.json"),
    slimformer.Magnitude(sparsity=0.8, granularity="block:16", scope="layer"),
    slimformer.GradualMagnitude(sparsity=0.9, epochs=2, initial_sparsity=0.5, pruning_events=4),
    slimformer.Movement(sparsity=0.9, soft=True, granularity="head", max_train_samples=100),
    slimformer.Learned(target_sparsity=0.6, epochs=2, final_epochs=1, max_train_samples=64, batch_size=8),
]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def sst2(tmp_path):
    return load_task("sst2", write_sst2(tmp_path / "glue"))


def real_ids(seed: int = 2) -> dict[str, torch.Tensor]:
    inputs = tiny_inputs(seed=seed)
    inputs["input_ids"] = inputs["input_ids"] + 1000  # word-piece ids of the MiniLM vocabulary
    return inputs


def _synthetic_latency_table(model, config) -> None:
    """A latency table for ``model`` in the test's cache, where ``config`` looks for one: the one-door test checks
    the door, not this machine's timing (a tiny model timed on a loaded machine can leave no encoder time to
    cut, and then the budget is rightly refused). Measuring is tested in test_latency_table.py."""
    from slimformer.budget.latency_table import LatencyTable, cache_path, table_key
    from slimformer.io import write_json_atomic

    layout = PruningPlan.keep_all(model).layout
    heads, neurons = max(layout.heads), max(layout.ffn)
    key = table_key(model, batch_size=config.latency_batch_size, seq_len=config.seq_len, threads=config.threads)
    table = LatencyTable(
        head_counts=[0, heads], attn_ms=[0.1, 0.1 + 0.5 * heads], neuron_counts=[0, neurons],
        ffn_ms=[0.1, 0.1 + 0.01 * neurons], fixed_ms=0.1, rest_ms=0.2, key=key,
    )  # fmt: skip
    write_json_atomic(cache_path(key), table.to_dict())


@pytest.mark.parametrize("config", EVERY_METHOD, ids=lambda c: c.method)
def test_every_config_round_trips_through_json(config, tmp_path):
    data = config.to_dict()
    assert data["method"] == config.method and data["version"] == 1
    assert config_from_dict(json.loads(json.dumps(data))) == config
    assert load_config(config.save(tmp_path / "config.json")) == config
    # an output folder's report holds the config that made it
    (tmp_path / "metrics.json").write_text(json.dumps({"config": data, "score": {}}))
    assert load_config(tmp_path) == config
    assert {c.method for c in EVERY_METHOD} == set(known_methods())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: slimformer.Fractions(heads=1.2), r"heads 1\.2 is impossible"),
        (lambda: slimformer.Fractions(), "removes nothing"),
        (lambda: slimformer.Fractions(heads=0.5, importance="vibes"), "Unknown importance method 'vibes'"),
        (lambda: slimformer.FlopsBudget(0.0), "is impossible"),
        (lambda: slimformer.FlopsBudget(1.5), "is impossible"),
        (lambda: slimformer.FlopsBudget(0.5, tune="magic"), "Unknown tune 'magic'"),
        (lambda: slimformer.LatencyBudget(0.5, threads=0), "threads must be a positive"),
        (lambda: slimformer.Iterative(keep_score=0.0), "keep_score 0.0 is impossible"),
        (lambda: slimformer.DropLayers("sideways:2"), "sideways"),
    ],
)
def test_impossible_targets_are_refused_when_the_config_is_made(make, message):
    with pytest.raises(slimformer.SlimformerError, match=message):
        make()


def test_config_files_that_cannot_work_get_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="Unknown pruning method 'shrink'"):
        config_from_dict({"method": "shrink"})
    with pytest.raises(ConfigError, match=r"Unknown option.*colour"):
        config_from_dict({"method": "flops_budget", "fraction": 0.5, "colour": "red"})
    with pytest.raises(ConfigError, match="newer"):
        config_from_dict({"method": "flops_budget", "version": 99, "fraction": 0.5})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="must be a pruning config"):
        slimformer.prune("minilm-l6", {"method": "flops_budget"})


@pytest.mark.parametrize("config", EVERY_METHOD, ids=lambda c: c.method)
def test_every_method_goes_through_one_door_and_writes_one_report(config, tiny_model_dir, sst2, tmp_path):
    loaded = slimformer.load_model(tiny_model_dir, "sst2")
    if isinstance(config, slimformer.PlanFile):
        plan = PruningPlan.keep_all(loaded.model)
        plan = PruningPlan(
            layout=plan.layout,
            kept_heads=[[0, 2], [1]],
            kept_neurons=[list(range(32)), list(range(0, 64, 3))],
            model_type=plan.model_type,
        )
        config = slimformer.PlanFile(str(plan.save(tmp_path / "plan.json")))
    if isinstance(config, slimformer.LatencyBudget):
        _synthetic_latency_table(loaded.model, config)
    dense_flops = flops(loaded.model, seq_len=16).encoder
    out = tmp_path / "pruned"
    result = slimformer.prune(
        loaded, config, sst2, out=out, max_length=16, seq_len=16, measure=isinstance(config, slimformer.FlopsBudget)
    )
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) == REPORT_KEYS and report["command"] == "prune"
    assert report["config"] == config.to_dict() and load_config(out) == config
    assert report["models"]["before"]["encoder_flops"] == dense_flops
    assert report["models"]["after"]["encoder_flops"] == flops(result.model, seq_len=16).encoder
    if "sparse" in report["details"]:  # weight-level: the zeros stay in the matrices, FLOPs fall only by removal
        linear = report["models"]["after"]["linear_weights"]
        assert linear["nonzero"] < linear["total"] or report["models"]["after"]["encoder_flops"] < dense_flops
    else:
        assert report["models"]["after"]["encoder_flops"] < dense_flops
    assert report["flops_seq_len"] == 16 and report["task"]["name"] == "sst2"
    assert set(report["eval"]["after"]) == {"dev"} and report["score"]["after"] == result.score
    assert report["details"]["plan"]["heads_per_layer"] == report["models"]["after"]["heads_per_layer"] or (
        report["details"]["plan"]["layers"]["after"] < 2
    )
    assert result.plan == PruningPlan.load(out / "plan.json")
    card = (out / "README.md").read_text()  # every output folder has a model card with the report's numbers
    assert f"| accuracy | {report['score']['before']:.4f} | {report['score']['after']:.4f} |" in card
    reloaded = slimformer.load_model(out)
    with torch.no_grad():  # save -> reload gives the same model
        torch.testing.assert_close(reloaded.model(**real_ids()).logits, result.model(**real_ids()).logits)
    if isinstance(config, slimformer.FlopsBudget):
        assert report["models"]["after"]["encoder_flops"] <= 0.5 * dense_flops
        assert report["latency"]["speedup"] > 0 and report["models"]["after"]["disk_bytes"] > 0
        assert {"fisher", "search", "tune", "remove"} <= set(report["seconds"])


def test_a_pruned_folder_remembers_its_task_and_later_commands_need_no_data(tiny_model_dir, tmp_path):
    write_review_csvs(tmp_path, repeats=6)
    data = load_custom_task(
        tmp_path / "train.csv", tmp_path / "dev.csv", text_columns=["review"], label_column="sentiment"
    )
    loaded = slimformer.load_model(tiny_model_dir, data.spec)
    folder = slimformer.save(loaded, tmp_path / "mine", task=data)
    assert slimformer.remembered_task(folder).train_file == str((tmp_path / "train.csv").resolve())

    result = slimformer.prune(
        folder, slimformer.FlopsBudget(0.5, calibration_examples=8, seq_len=16), out=tmp_path / "p"
    )
    assert result.report["task"]["kind"] == "custom" and result.report["eval"]["after"]
    assert slimformer.remembered_task(tmp_path / "p") == slimformer.remembered_task(folder)
    evaluated = slimformer.evaluate(tmp_path / "p", max_length=16)
    assert evaluated["eval"]["dev"]["accuracy"] == pytest.approx(result.report["eval"]["after"]["dev"]["accuracy"])

    (tmp_path / "train.csv").unlink()  # the data moved: say so, and how to give it again
    with pytest.raises(TaskError, match=r"no longer exists.*--train-file"):
        slimformer.prune(folder, slimformer.Fractions(heads=0.5, n_examples=8), out=tmp_path / "p2")


def test_data_that_does_not_fit_the_model_head_is_refused(tiny_model_dir, sst2, tmp_path):
    with pytest.raises(TaskError, match="No task given"):
        slimformer.prune(tiny_model_dir, slimformer.Fractions(heads=0.5))
    loaded = slimformer.load_model(tiny_model_dir, "mnli")  # three labels
    with pytest.raises(TaskError, match="predicts 3 label"):
        slimformer.prune(loaded, slimformer.Fractions(heads=0.5), sst2)


def test_front_door_names_are_the_functions_even_after_every_submodule_is_imported():
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(slimformer.__path__, "slimformer."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in ("prune", "distill", "measure", "evaluate", "finetune", "save", "export_onnx", "load_model"):
        assert callable(getattr(slimformer, name)), name
    assert slimformer.prune.__module__ == "slimformer.api"
