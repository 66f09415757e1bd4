"""Tasks: the nine GLUE tasks, sentence-embedding tasks (STS, SQuAD retrieval) and custom data files (classification,
regression, STS pairs, retrieval pairs), their official metrics, and cached tokenization."""

from slimformer.tasks.data import TaskData, custom_task_spec, load_custom_task, load_task, read_glue_file
from slimformer.tasks.embedding_files import (
    CUSTOM_EMBEDDING_TASKS,
    custom_embedding_kind,
    load_custom_embedding_task,
    read_sentences,
    with_calibration_texts,
)
from slimformer.tasks.metrics import compute_metrics, retrieval_metrics, sts_metrics
from slimformer.tasks.ref import TaskRef
from slimformer.tasks.spec import EMBEDDING_TASKS, GLUE_HUB_REPO, GLUE_TASKS, TaskSpec, get_task_spec
from slimformer.tasks.tokenize import cache_root, tokenize_task, tokenized_cache_dir

__all__ = [
    "CUSTOM_EMBEDDING_TASKS",
    "EMBEDDING_TASKS",
    "GLUE_HUB_REPO",
    "GLUE_TASKS",
    "TaskData",
    "TaskRef",
    "TaskSpec",
    "cache_root",
    "compute_metrics",
    "custom_embedding_kind",
    "custom_task_spec",
    "get_task_spec",
    "load_custom_embedding_task",
    "load_custom_task",
    "load_task",
    "read_glue_file",
    "read_sentences",
    "retrieval_metrics",
    "sts_metrics",
    "tokenize_task",
    "tokenized_cache_dir",
    "with_calibration_texts",
]
