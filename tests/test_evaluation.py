"""The one evaluation path: dev splits only are tokenized, and Evaluator, evaluate_model, evaluate and predict agree."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from slimformer.errors import TaskError
from slimformer.evaluation import Evaluator, evaluate, evaluate_model, predict
from slimformer.models import load_model
from slimformer.tasks import TaskData, load_task, tokenize_task
from test_train import write_sst2


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def sst2(tmp_path):
    return load_task("sst2", write_sst2(tmp_path / "glue", n_train=24, n_dev=16), source="local")


def with_untokenizable_train(data: TaskData) -> TaskData:
    """``data`` whose train split has no text column: tokenizing it raises, so any evaluation that touches it fails."""
    broken = Dataset.from_dict({"label": [0, 1] * 40})
    return TaskData(spec=data.spec, splits={"train": broken, **data.dev}, source=data.source)


def test_evaluating_tokenizes_the_dev_split_only(tiny_model_dir, sst2):
    loaded = load_model(tiny_model_dir, "sst2")
    poisoned = with_untokenizable_train(sst2)
    with pytest.raises(TaskError, match="lacks the column"):
        tokenize_task(poisoned, loaded.tokenizer, max_length=16)  # what evaluating used to do first

    reference = evaluate_model(loaded.model, loaded.tokenizer, sst2, max_length=16, progress=False)
    assert set(reference) == {"dev"}
    assert evaluate_model(loaded.model, loaded.tokenizer, poisoned, max_length=16, progress=False) == reference
    assert Evaluator(loaded.tokenizer, poisoned, max_length=16).evaluate(loaded.model) == reference
    assert evaluate(loaded, poisoned, max_length=16)["eval"] == reference


def test_evaluator_predict_and_evaluate_model_agree(tiny_model_dir, sst2):
    loaded = load_model(tiny_model_dir, "sst2")
    evaluator = Evaluator(loaded.tokenizer, sst2, max_length=16, batch_size=5)
    assert evaluator.sizes == {"dev": 16}
    dev = tokenize_task(TaskData(spec=sst2.spec, splits=sst2.dev, source=sst2.source), loaded.tokenizer, max_length=16)
    logits = predict(loaded.model, loaded.tokenizer, dev["dev"], batch_size=5, progress=False)
    np.testing.assert_array_equal(evaluator.logits(loaded.model)["dev"], logits)
    first = evaluator.evaluate(loaded.model)
    assert evaluator.evaluate(loaded.model) == first  # reusable
    assert first == evaluate_model(loaded.model, loaded.tokenizer, sst2, max_length=16, batch_size=5, progress=False)
    assert evaluator.score(loaded.model) == first["dev"]["accuracy"]
    # splits named explicitly are evaluated, the training split too if asked
    on_train = evaluate_model(loaded.model, loaded.tokenizer, sst2, max_length=16, splits=["train"], progress=False)
    assert set(on_train) == {"train"}


def test_no_dev_split_is_an_error(tiny_model_dir, sst2):
    loaded = load_model(tiny_model_dir, "sst2")
    train_only = TaskData(spec=sst2.spec, splits={"train": sst2.train}, source=sst2.source)
    with pytest.raises(TaskError, match="no dev split"):
        Evaluator(loaded.tokenizer, train_only, max_length=16)
    with pytest.raises(TaskError, match="no split"):
        evaluate_model(loaded.model, loaded.tokenizer, train_only, splits=["test"], progress=False)
