"""What a task is: its labels, its official metrics, and where its data lives (GLUE folder and hub config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimformer.errors import TaskError

GLUE_HUB_REPO = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    """A sequence-classification (or regression) task, or a sentence-embedding task (``kind="embedding"``).

    An embedding task scores a sentence-embedding model without a head: ``embedding_eval`` "sts" (cosine
    similarity of the two texts' embeddings against gold scores) or "retrieval" (queries against a corpus).

    ``text_columns`` names the one or two texts generically (the hub's column names for GLUE, the file's for a
    custom task); the ``tsv_*`` fields say how to read the task from the classic GLUE folder layout, and the
    ``hub_*`` fields how to read it from the Hugging Face hub.
    """

    name: str
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    primary_metric: str
    text_columns: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    # "binary" scores class 1 (GLUE's positive class); "macro" averages over the classes.
    f1_average: str = "binary"
    # --- the classic GLUE layout: data_dir/<glue_dir>/<split>.tsv
    glue_dir: str | None = None
    # Column names in the header, or 0-based field indices for a file without a header (CoLA).
    tsv_text_columns: tuple[str | int, ...] = ()
    tsv_label_column: str | int = "label"
    # The label as written in the file, in class-index order; None for regression (the label is a number).
    tsv_label_values: tuple[str, ...] | None = None
    # --- the Hugging Face hub: load_dataset(GLUE_HUB_REPO, hub_config); (our split, hub split) pairs.
    hub_config: str | None = None
    hub_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("dev", "validation"))
    aliases: tuple[str, ...] = ()
    kind: str = "classification"
    embedding_eval: str | None = None

    @property
    def is_embedding(self) -> bool:
        """True for a task scored on sentence embeddings (no task head)."""
        return self.kind == "embedding"

    @property
    def is_regression(self) -> bool:
        """True when the label is a real number (STS-B) rather than a class."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Output size of the model head: the number of classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True when each example is a pair of texts (``text_a`` and ``text_b``)."""
        return len(self.text_columns) == 2

    @property
    def tsv_has_header(self) -> bool:
        """GLUE files name their columns in a header line, except CoLA's, which are addressed by index."""
        return not any(isinstance(column, int) for column in self.tsv_columns)

    @property
    def tsv_columns(self) -> tuple[str | int, ...]:
        """The text columns then the label column of the GLUE TSV files."""
        return (*self.tsv_text_columns, self.tsv_label_column)


_BINARY = ("0", "1")
_ENTAILMENT_2 = ("entailment", "not_entailment")
_MNLI = ("entailment", "neutral", "contradiction")


def _glue(
    name: str,
    glue_dir: str,
    *,
    labels: tuple[str, ...] | None,
    metrics: tuple[str, ...],
    texts: tuple[str, ...],
    tsv_texts: tuple[str | int, ...],
    tsv_label: str | int,
    tsv_values: tuple[str, ...] | None,
    **extra: Any,
) -> TaskSpec:
    if metrics == ("matthews_correlation",):
        primary = "matthews_correlation"
    else:
        primary = "combined_score" if len(metrics) > 1 else metrics[0]
    return TaskSpec(
        name=name,
        label_names=labels,
        metrics=metrics,
        primary_metric=primary,
        text_columns=texts,
        glue_dir=glue_dir,
        tsv_text_columns=tsv_texts,
        tsv_label_column=tsv_label,
        tsv_label_values=tsv_values,
        hub_config=name,
        **extra,
    )


_PAIR = ("sentence1", "sentence2")

# Label names and their order follow the Hugging Face hub's nyu-mll/glue, so that models fine-tuned here and
# there agree on what class 0 means. The files write 0/1 for the binary tasks and words for the NLI tasks.
# (The table is kept compact by hand: "fmt: skip".)
GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # CoLA's files have no header: source, label, original mark (usually blank), sentence.
        _glue(
            "cola", "CoLA", labels=("unacceptable", "acceptable"), metrics=("matthews_correlation",),
            texts=("sentence",), tsv_texts=(3,), tsv_label=1, tsv_values=_BINARY,
        ),
        _glue(
            "sst2", "SST-2", labels=("negative", "positive"), metrics=("accuracy",),
            texts=("sentence",), tsv_texts=("sentence",), tsv_label="label", tsv_values=_BINARY,
            aliases=("sst",),
        ),
        # MRPC's header starts with a byte-order mark, read away by the utf-8-sig encoding.
        _glue(
            "mrpc", "MRPC", labels=("not_equivalent", "equivalent"), metrics=("f1", "accuracy"),
            texts=_PAIR, tsv_texts=("#1 String", "#2 String"), tsv_label="Quality", tsv_values=_BINARY,
        ),
        _glue(
            "stsb", "STS-B", labels=None, metrics=("pearson", "spearmanr"),
            texts=_PAIR, tsv_texts=_PAIR, tsv_label="score", tsv_values=None, aliases=("sts",),
        ),
        _glue(
            "qqp", "QQP", labels=("not_duplicate", "duplicate"), metrics=("f1", "accuracy"),
            texts=("question1", "question2"), tsv_texts=("question1", "question2"), tsv_label="is_duplicate",
            tsv_values=_BINARY,
        ),
        _glue(
            "mnli", "MNLI", labels=_MNLI, metrics=("accuracy",),
            texts=("premise", "hypothesis"), tsv_texts=_PAIR, tsv_label="gold_label", tsv_values=_MNLI,
            dev_splits=("dev_matched", "dev_mismatched"),
            hub_splits=(
                ("train", "train"),
                ("dev_matched", "validation_matched"),
                ("dev_mismatched", "validation_mismatched"),
            ),
            aliases=("multinli",),
        ),
        _glue(
            "qnli", "QNLI", labels=_ENTAILMENT_2, metrics=("accuracy",),
            texts=("question", "sentence"), tsv_texts=("question", "sentence"), tsv_label="label",
            tsv_values=_ENTAILMENT_2,
        ),
        _glue(
            "rte", "RTE", labels=_ENTAILMENT_2, metrics=("accuracy",),
            texts=_PAIR, tsv_texts=_PAIR, tsv_label="label", tsv_values=_ENTAILMENT_2,
        ),
        _glue(
            "wnli", "WNLI", labels=("not_entailment", "entailment"), metrics=("accuracy",),
            texts=_PAIR, tsv_texts=_PAIR, tsv_label="label", tsv_values=_BINARY,
        ),
    )
}  # fmt: skip


# Sentence-embedding tasks: what sentence-transformers models are used for, scored without a head.
EMBEDDING_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # STS-B's files and hub config, scored as sentence-transformers scores STS: Spearman of the cosine
        # similarity of the two sentences' embeddings against the gold scores
        TaskSpec(
            name="stsb-embed", label_names=None, metrics=("spearman_cosine", "pearson_cosine"),
            primary_metric="spearman_cosine", text_columns=_PAIR, glue_dir="STS-B", tsv_text_columns=_PAIR,
            tsv_label_column="score", hub_config="stsb", aliases=("sts-embed",), kind="embedding",
            embedding_eval="sts",
        ),
        # SQuAD v1.1 dev as a retrieval set: every question against the unique paragraphs, its own paragraph the
        # one relevant passage (read by slimformer.tasks.retrieval)
        TaskSpec(
            name="squad-retrieval", label_names=None, metrics=("ndcg@10", "mrr@10", "recall@1", "recall@10"),
            primary_metric="ndcg@10", text_columns=("question",), aliases=("squad-ir",), kind="embedding",
            embedding_eval="retrieval",
        ),
    )
}  # fmt: skip


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_BY_NORMALISED_NAME = {
    _normalise(alias): spec
    for spec in (*GLUE_TASKS.values(), *EMBEDDING_TASKS.values())
    # an embedding task reads a GLUE folder too (STS-B), but the folder's name means the GLUE task
    for alias in (spec.name, *(() if spec.is_embedding else (spec.glue_dir or spec.name,)), *spec.aliases)
}


def get_task_spec(name: str | TaskSpec) -> TaskSpec:
    """The GLUE or embedding task called ``name`` (any case; "SST-2", "sts-b" and the like work too)."""
    if isinstance(name, TaskSpec):
        return name
    spec = _BY_NORMALISED_NAME.get(_normalise(str(name)))
    if spec is None:
        raise TaskError(
            f"Unknown task {name!r}. Known GLUE tasks: {', '.join(GLUE_TASKS)}; sentence-embedding tasks: "
            f"{', '.join(EMBEDDING_TASKS)}. "
            "For your own data use a custom task (--task custom --train-file ... --dev-file ...; --task custom-sts "
            "or custom-retrieval for sentence-embedding files)."
        )
    return spec
