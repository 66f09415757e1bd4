"""Sentence-embedding models: a transformer encoder, a pooling of its token states, and optional normalisation.

This is the model kind of sentence-transformers (Reimers & Gurevych 2019, "Sentence-BERT"): all-MiniLM-L6-v2 and
all-mpnet-base-v2 are encoders whose mean-pooled, L2-normalised last hidden states are the embedding.
:class:`SentenceEmbedder` wraps the plain transformers encoder (``AutoModel``) so that everything slimformer does
to a task model (gates, importance, budget search, refit, physical removal, FLOPs, latency) applies unchanged: it
exposes the encoder's ``config`` and ``base_model``, and its output carries the embedding (also as ``logits``, so
code that reads a model's output vector reads the embedding).

A folder is read from, and written in, the sentence-transformers layout (``modules.json``, ``1_Pooling``,
``2_Normalize``, ``sentence_bert_config.json``), so ``SentenceTransformer(folder)`` loads what slimformer saves.
Only the Transformer -> Pooling (-> Normalize) pipeline is supported; anything else (Dense layers, other modules)
is refused with an error naming the module.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from slimformer.errors import ModelLoadError

MODULES_FILE = "modules.json"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
POOLING_MODES = ("mean", "cls", "max")
# sentence-transformers' module types, as older (<= 5) and newer (6) versions write them
_TRANSFORMER_TYPES = ("Transformer",)
_POOLING_TYPES = ("Pooling",)
_NORMALIZE_TYPES = ("Normalize",)


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector: ``mode`` ("mean" over real tokens, "cls" the first token, or
    "max" per dimension over real tokens), then L2 normalisation when ``normalize``. ``max_seq_length`` is the
    number of tokens the model reads per text (sentence-transformers truncates there)."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ModelLoadError(
                f"Unsupported pooling mode {self.mode!r}; slimformer pools by {', '.join(POOLING_MODES)}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EmbeddingOutput(ModelOutput):
    """``embeddings``: [batch, hidden] sentence vectors; ``logits`` is the same tensor (see the module docs);
    ``hidden_states`` as the encoder returns them when asked (``output_hidden_states=True``)."""

    embeddings: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """The sentence vectors of a batch of token states [batch, tokens, hidden], padding ignored."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling.mode == "cls":
        vectors = hidden[:, 0]
    elif pooling.mode == "max":
        vectors = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(vectors, p=2, dim=-1) if pooling.normalize else vectors


class SentenceEmbedder(nn.Module):
    """A sentence-embedding model: ``encoder`` (a transformers base model such as ``BertModel``) + ``pooling``.

    The encoder's own pooler (BERT's tanh layer over the first token) is not part of a sentence embedding: it is
    taken out of the forward pass, so parameters, FLOPs and latency count what the embedding really costs, but kept
    aside and written back on saving, so that sentence-transformers loads the folder without warnings about
    missing weights.
    """

    is_sentence_embedder = True
    # no task head: the measuring and refit code asks for it by this flag, not by the class
    has_task_head = False

    def __init__(self, encoder: PreTrainedModel, pooling: Pooling | None = None) -> None:
        super().__init__()
        # kept out of the module tree (not a registered submodule): not counted, not run, still saved
        self.__dict__["_unused_pooler"] = getattr(encoder, "pooler", None)
        if self._unused_pooler is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.pooling = pooling or Pooling()

    @property
    def config(self):
        return self.encoder.config

    @property
    def base_model(self) -> PreTrainedModel:
        return self.encoder.base_model

    @property
    def name_or_path(self) -> str:
        return self.encoder.name_or_path

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> EmbeddingOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        outputs = self.encoder(**inputs)
        embeddings = pool(outputs.last_hidden_state, attention_mask, self.pooling)
        return EmbeddingOutput(embeddings=embeddings, logits=embeddings, hidden_states=outputs.hidden_states)

    def save_pretrained(self, folder: str | os.PathLike[str], **kwargs: Any) -> None:
        """The encoder as a transformers folder plus the sentence-transformers module files."""
        if self._unused_pooler is not None:
            self.encoder.pooler = self._unused_pooler
        try:
            self.encoder.save_pretrained(folder, **kwargs)
        finally:
            self.encoder.pooler = None
        write_sentence_transformers_files(folder, self.pooling, hidden_size=int(self.config.hidden_size))


def is_sentence_embedder(model: Any) -> bool:
    return bool(getattr(model, "is_sentence_embedder", False))


# ------------------------------------------------------------------------------------------------ folders


def _module_kind(entry: dict[str, Any]) -> str:
    return str(entry.get("type", "")).rsplit(".", 1)[-1]


def is_sentence_transformers_folder(folder: str | os.PathLike[str]) -> bool:
    """True for a folder with a sentence-transformers ``modules.json``."""
    return (Path(folder) / MODULES_FILE).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(data, (dict, list)):
        raise ModelLoadError(f"{path} does not hold a JSON object.")
    return data


def _pooling_mode(config: dict[str, Any], path: Path) -> str:
    # sentence-transformers 6 writes "pooling_mode"; earlier versions one boolean per mode
    if "pooling_mode" in config:
        mode = str(config["pooling_mode"])
        modes = [mode.replace("_tokens", "").replace("cls_token", "cls")]
    else:
        flags = {
            "mean": config.get("pooling_mode_mean_tokens"),
            "cls": config.get("pooling_mode_cls_token"),
            "max": config.get("pooling_mode_max_tokens"),
            "mean_sqrt_len": config.get("pooling_mode_mean_sqrt_len_tokens"),
            "weighted_mean": config.get("pooling_mode_weightedmean_tokens"),
            "lasttoken": config.get("pooling_mode_lasttoken"),
        }
        modes = [name for name, on in flags.items() if on]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelLoadError(
            f"{path}: pooling {modes or 'none'} is not supported; slimformer pools by exactly one of "
            f"{', '.join(POOLING_MODES)}."
        )
    return modes[0]


def read_pooling(folder: str | os.PathLike[str]) -> Pooling:
    """The pooling, normalisation and maximum length a sentence-transformers folder declares."""
    folder = Path(folder)
    modules = _read_json(folder / MODULES_FILE)
    if not isinstance(modules, list):
        raise ModelLoadError(f"{folder / MODULES_FILE} must hold a list of modules.")
    kinds = [_module_kind(entry) for entry in modules]
    supported = (*_TRANSFORMER_TYPES, *_POOLING_TYPES, *_NORMALIZE_TYPES)
    unsupported = [kind for kind in kinds if kind not in supported]
    if unsupported or not kinds or kinds[0] not in _TRANSFORMER_TYPES or kinds.count("Pooling") != 1:
        raise ModelLoadError(
            f"{folder} is a sentence-transformers model made of {kinds}; slimformer supports Transformer -> "
            f"Pooling (-> Normalize) only{f' ({unsupported[0]} is not supported)' if unsupported else ''}."
        )
    pooling_entry = modules[kinds.index("Pooling")]
    pooling_path = folder / str(pooling_entry.get("path", POOLING_DIR)) / "config.json"
    mode = _pooling_mode(_read_json(pooling_path), pooling_path)
    max_length = None
    transformer_config = folder / str(modules[0].get("path") or "") / TRANSFORMER_CONFIG
    if transformer_config.is_file():
        max_length = _read_json(transformer_config).get("max_seq_length")
    return Pooling(
        mode=mode,
        normalize="Normalize" in kinds[kinds.index("Pooling") :],
        max_seq_length=int(max_length) if max_length else None,
    )


def write_sentence_transformers_files(folder: str | os.PathLike[str], pooling: Pooling, *, hidden_size: int) -> None:
    """``modules.json`` and the module folders, in the layout every sentence-transformers version reads."""
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
        (folder / NORMALIZE_DIR).mkdir(exist_ok=True)
        (folder / NORMALIZE_DIR / "config.json").write_text("{}\n")
    (folder / MODULES_FILE).write_text(json.dumps(modules, indent=2) + "\n")
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling.mode == "cls",
        "pooling_mode_mean_tokens": pooling.mode == "mean",
        "pooling_mode_max_tokens": pooling.mode == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / POOLING_DIR / "config.json").write_text(json.dumps(pooling_config, indent=2) + "\n")
    transformer = {"max_seq_length": pooling.max_seq_length or 512, "do_lower_case": False}
    (folder / TRANSFORMER_CONFIG).write_text(json.dumps(transformer, indent=2) + "\n")
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine"}, indent=2) + "\n"
    )


__all__ = [
    "EmbeddingOutput",
    "Pooling",
    "SentenceEmbedder",
    "is_sentence_embedder",
    "is_sentence_transformers_folder",
    "pool",
    "read_pooling",
    "write_sentence_transformers_files",
]
