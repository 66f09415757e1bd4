"""Load a model and its tokenizer by alias, local folder or hub id, with a head for a task."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from slimformer.aliases import MODEL_ALIASES
from slimformer.arch import ArchSpec, get_spec, supported_model_types
from slimformer.errors import ModelLoadError, SlimformerError
from slimformer.folders import damaged_weights_error, load_pruned, quiet_transformers
from slimformer.layout import LAYOUT_KEY

if TYPE_CHECKING:
    from slimformer.tasks import TaskSpec

DEFAULT_MODEL = "minilm-l6"


@dataclass
class LoadedModel:
    """A task model (or a :class:`~slimformer.embedding.SentenceEmbedder`), its tokenizer, its architecture spec
    and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ArchSpec
    source: str


def hub_offline() -> bool:
    """True when the user asked Hugging Face libraries to stay offline."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_source(name_or_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Map an alias, a folder or a hub id to what ``from_pretrained`` takes; the flag says 'local'."""
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        return str(MODEL_ALIASES[name]()), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not a model folder: it has no config.json. Point --model at a folder "
                "written by save_pretrained / slimformer, a hub id, or one of: " + ", ".join(MODEL_ALIASES)
            )
        return str(path.resolve()), True
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model folder. Point --model at a folder with config.json.")
    looks_like_path = name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") > 1)
    if looks_like_path:
        raise ModelLoadError(f"Model folder {name!r} does not exist. Known aliases: {', '.join(MODEL_ALIASES)}.")
    return name, False


def _load_config(source: str, local: bool, name: str):
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local or hub_offline())
    except (OSError, ValueError) as error:
        if local:
            raise ModelLoadError(f"Could not read the model config in {source}: {error}") from error
        raise ModelLoadError(
            f"Could not load {name!r}: it is not a local folder, not a known alias "
            f"({', '.join(MODEL_ALIASES)}), and the Hugging Face hub could not provide it "
            f"({'offline mode is on' if hub_offline() else 'no network or unknown id'}). "
            "Pass a local model folder (for example one written by `slimformer finetune`), "
            "or use 'minilm-l6', the embedded default."
        ) from error


@contextmanager
def _loading(source: str) -> Iterator[None]:
    """transformers kept quiet, and its errors turned into one-line :class:`ModelLoadError` s naming ``source``."""
    with quiet_transformers():
        try:
            yield
        except SlimformerError:
            raise
        except SafetensorError as error:
            raise damaged_weights_error(source, error) from error
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"Could not load the model or tokenizer from {source}: {error}") from error


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run ``model`` (a task model or a sentence-embedding model's encoder) with the eager attention implementation
    inside the block, where the family can switch it (families without an SDPA path are eager already).

    Eager attention returns the attention probabilities, and under bfloat16 autocast on a CPU it is also the fast
    path: PyTorch's CPU flash-attention backward in bfloat16 took 5x its float32 time, a third of the budget
    pruner's Fisher on MiniLM-L6 / STS-B, while eager attention's batched products run at bfloat16 speed.
    """
    from slimformer.embedding import is_sentence_embedder

    target = model.encoder if is_sentence_embedder(model) else model
    previous = target.config._attn_implementation
    switch = previous != "eager" and target._can_set_attn_implementation()
    if switch:
        target.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            target.set_attn_implementation(previous)


def _download(hub_id: str) -> str:
    """A hub model's whole folder (fetched once, then from the cache): what a local folder would hold."""
    from huggingface_hub import snapshot_download

    return snapshot_download(hub_id, local_files_only=hub_offline())


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    task: str | TaskSpec | None = None,
    *,
    num_labels: int | None = None,
    regression: bool = False,
    label_names: list[str] | None = None,
) -> LoadedModel:
    """Load a sequence-classification (or regression) model and its tokenizer.

    ``name_or_path`` is ``"minilm-l6"`` (the embedded all-MiniLM-L6-v2, no network), a local Hugging Face model
    folder, or a hub id (needs a network). ``task`` (a GLUE task name or a :class:`~slimformer.tasks.TaskSpec`)
    sets the number of labels and the problem type; a folder already trained for a task keeps its head. With an
    embedding task (``stsb-embed``, ``squad-retrieval``), or for a folder slimformer saved as a sentence-embedding
    model, the model loads as a :class:`~slimformer.embedding.SentenceEmbedder` (its encoder, pooling and
    normalisation, read from the sentence-transformers files when the folder has them).
    """
    from slimformer.sparse.storage import expand_folder, is_compact

    source, local = resolve_model_source(str(name_or_path))
    if local and is_compact(source):
        # sparse-bitmask weights: expanded into a temporary ordinary folder, then loaded like any other
        loaded = load_model(
            expand_folder(source), task, num_labels=num_labels, regression=regression, label_names=label_names
        )
        loaded.source = source
        loaded.model.config.name_or_path = str(source)
        return loaded
    embedding = False
    if task is not None:
        from slimformer.tasks import get_task_spec

        spec_of_task = get_task_spec(task) if isinstance(task, str) else task
        embedding = spec_of_task.is_embedding
    if task is not None and not embedding:
        num_labels = spec_of_task.num_labels
        regression = spec_of_task.is_regression
        label_names = list(spec_of_task.label_names or []) or None
    name = str(name_or_path)
    source, local = resolve_model_source(name)
    config = _load_config(source, local, name)
    if getattr(config, "model_type", None) not in supported_model_types():
        get_spec(config)  # raises UnsupportedArchitectureError listing what is supported
    arch = get_spec(config)
    if embedding or (task is None and local and saved_as_embedder(source)):
        return _load_embedder(source, local, name, config, arch)

    overrides: dict[str, object] = {}
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if num_labels is not None:
        if trained_head and config.num_labels != num_labels:
            raise ModelLoadError(
                f"{name} has a classification head with {config.num_labels} labels, but the task needs "
                f"{num_labels}. Start from the pre-trained (headless) model instead."
            )
        overrides["num_labels"] = num_labels
        overrides["problem_type"] = "regression" if regression else "single_label_classification"
        if label_names and not trained_head:
            overrides["id2label"] = dict(enumerate(label_names))
            overrides["label2id"] = {label: i for i, label in enumerate(label_names)}
    # Re-initialising a fresh head on a pre-trained encoder is expected; hide transformers' warning about it.
    with _loading(source):
        if hasattr(config, LAYOUT_KEY):
            # unevenly pruned layers: transformers cannot build them from the config alone; a pruned model on
            # the hub is fetched whole and rebuilt like a local folder (no remote code runs)
            source = source if local else _download(source)
            for key, value in overrides.items():
                setattr(config, key, value)
            model = load_pruned(source, config, AutoModelForSequenceClassification)
            # as from_pretrained records it (the hub id for a hub model): model cards trace lineage by it
            model.config.name_or_path = source if local else name
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, local_files_only=local or hub_offline(), **overrides
            )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or hub_offline())
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=arch, source=source)


def saved_as_embedder(folder: str | os.PathLike[str]) -> bool:
    """True for a folder slimformer saved as a sentence-embedding model (its manifest says so)."""
    from slimformer.folders import read_manifest

    return (read_manifest(folder) or {}).get("model_kind") == "sentence-embedding"


def _load_embedder(source: str, local: bool, name: str, config, arch: ArchSpec) -> LoadedModel:
    """The encoder (no task head) with the pooling its sentence-transformers files declare (mean + normalise by
    default, as all-MiniLM-L6-v2 and all-mpnet-base-v2 do)."""
    from slimformer.embedding import Pooling, SentenceEmbedder, is_sentence_transformers_folder, read_pooling

    with _loading(source):
        source = source if local else _download(source)  # the pooling files live beside the weights
        pooling = read_pooling(source) if is_sentence_transformers_folder(source) else Pooling()
        if hasattr(config, LAYOUT_KEY):
            encoder = load_pruned(source, config, AutoModel)
            encoder.config.name_or_path = source if local else name
        else:
            encoder = AutoModel.from_pretrained(source, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if pooling.max_seq_length is None:
        pooling = Pooling(pooling.mode, pooling.normalize, min(int(tokenizer.model_max_length), 512))
    model = SentenceEmbedder(encoder, pooling).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=arch, source=source)
