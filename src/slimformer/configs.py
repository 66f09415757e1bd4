"""Pruning methods as small, serialisable configs, and the registry that maps each config type to its handler.

Every method is one frozen dataclass (what to do) plus one handler (how), in the shape of peft's
``get_peft_model(model, config)`` and torchao's ``quantize_(model, config)``: :func:`slimformer.prune` looks the
config's type up here and calls its handler. A config serialises to JSON with its method name and a version, so
a run can be repeated from its output folder (``metrics.json`` keeps the config). A new method is a new config
class plus a handler registered with :func:`register_handler`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from slimformer.errors import SlimformerError

if TYPE_CHECKING:
    from slimformer.prune.plan import PruningPlan
    from slimformer.tasks import TaskData

CONFIG_VERSION = 1


class ConfigError(SlimformerError):
    """A method config that cannot work (impossible target, unknown option, malformed file)."""


@dataclass(frozen=True)
class PruneConfig:
    """Base of every pruning method's config. Subclasses set ``method`` and ``needs_data``."""

    method: ClassVar[str] = ""
    # whether the handler scores units on task examples (calibration data); plan files and fixed layer
    # strategies do not
    needs_data: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.check()  # an impossible target fails here, before any model is loaded or scored

    def check(self) -> None:
        """Refuse impossible settings before any work starts (no model needed)."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "version": CONFIG_VERSION, **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        from slimformer.io import write_json_atomic

        return write_json_atomic(path, self.to_dict())


@dataclass
class PruneContext:
    """What a handler gets besides the model and its config: the task data (calibration / evaluation), the
    token limit, where importance scores may be cached, and whether to show progress bars."""

    data: TaskData | None
    max_length: int = 128
    cache_dir: str | os.PathLike[str] | None = None
    progress: bool = True
    # where a method that trains keeps its checkpoints (to resume an interrupted run); None: a temporary folder
    work_dir: str | os.PathLike[str] | None = None


@dataclass
class PruneOutcome:
    """What a handler returns: the plan to remove (weights may already be refit in place), method-specific
    details for the report, and seconds per phase."""

    plan: PruningPlan
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


_CONFIGS: dict[str, type[PruneConfig]] = {}
_HANDLERS: dict[type[PruneConfig], Callable[..., Any]] = {}


def register_config(cls: type[PruneConfig]) -> type[PruneConfig]:
    """Class decorator: make a config type known by its ``method`` name (for :func:`config_from_dict`)."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} needs a `method` name")
    _CONFIGS[cls.method] = cls
    return cls


def register_handler(config_type: type[PruneConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function that carries out ``config_type``. It is called as
    ``handler(model, tokenizer, config, context)`` and returns a :class:`PruneOutcome`."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def handler_for(config: PruneConfig) -> Callable[..., Any]:
    # the handlers live beside the code they drive; importing them registers them
    import slimformer.budget.method
    import slimformer.learned.method
    import slimformer.prune.methods
    import slimformer.sparse.method  # noqa: F401

    for config_type in type(config).__mro__:
        if config_type in _HANDLERS:
            return _HANDLERS[config_type]
    raise ConfigError(f"No handler is registered for {type(config).__name__}.")


def known_methods() -> list[str]:
    return sorted(_CONFIGS)


def config_from_dict(data: dict[str, Any]) -> PruneConfig:
    """Rebuild a config from :meth:`PruneConfig.to_dict` output (or a ``metrics.json`` that holds one)."""
    if isinstance(data, dict) and "config" in data and "method" not in data:
        data = data["config"]  # a report: its config
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"Not a pruning config (no 'method'): {str(data)[:200]}")
    method = data["method"]
    if method not in _CONFIGS:
        raise ConfigError(f"Unknown pruning method {method!r}; known: {', '.join(known_methods())}.")
    version = data.get("version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ConfigError(f"Config version {version!r} is newer than this slimformer understands ({CONFIG_VERSION}).")
    cls = _CONFIGS[method]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names - {"method", "version"})
    if unknown:
        raise ConfigError(f"Unknown option(s) for {method}: {', '.join(unknown)}.")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    absent = [name for name in required if name not in data]
    if absent:
        raise ConfigError(f"The {method} config lacks {', '.join(absent)}.")
    return cls(**{k: v for k, v in data.items() if k in names})


def load_config(path: str | os.PathLike[str]) -> PruneConfig:
    """A config from a JSON file: one written by :meth:`PruneConfig.save`, or an output folder's ``metrics.json``
    (or the folder itself), to repeat that run."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"Cannot read the config file {path}: {error.strerror or error}.") from None
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}.") from None
    return config_from_dict(data)


def _fraction(option: str, value: float, *, low_open: bool = False, what: str = "to remove") -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0)
    if not isinstance(value, int | float) or not ok:
        interval = "(0, 1]" if low_open else "[0, 1)"
        raise ConfigError(f"{option} {value!r} is impossible: it is the fraction {what}, in {interval}.")


_SCORING_METHODS = ("gradient", "fisher", "magnitude", "random")
_TUNE_CHOICES = ("weights", "scales", "none")


def _check_scoring(method: str) -> None:
    if method not in _SCORING_METHODS:
        raise ConfigError(f"Unknown importance method {method!r}; choose one of {', '.join(_SCORING_METHODS)}.")


def _positive(option: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} must be a positive whole number, got {value!r}.")


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory(text: str | None) -> int | None:
    """Bytes from a human size such as ``"6GB"``, ``"512MiB"`` or ``"2e9"`` (None stays None: the default)."""
    if text is None:
        return None
    value = str(text).strip().replace(" ", "").upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _BYTE_UNITS or amount < 0:
        raise ConfigError(f"max_memory {text!r} is not a size: write e.g. 6GB, 512MiB or a number of bytes.")
    return int(amount * _BYTE_UNITS[unit])


def _check_drop_layers(strategy: str | None) -> None:
    if strategy is not None:
        from slimformer.prune.layers import parse_drop_layers

        parse_drop_layers(strategy)


# --------------------------------------------------------------------------------------------- methods


@register_config
@dataclass(frozen=True)
class Fractions(PruneConfig):
    """Remove a fraction of the heads and FFN neurons, ranked by importance (Michel et al. 2019's gradient by
    default), globally or the same fraction in every layer; optionally also drop whole layers."""

    method: ClassVar[str] = "fractions"

    heads: float = 0.0
    ffn: float = 0.0
    importance: str = "gradient"
    scope: str = "global"
    min_heads_per_layer: int = 0
    min_neurons_per_layer: int = 0
    ffn_multiple: int = 1
    n_examples: int = 256
    label_free: bool = False
    drop_layers: str | None = None
    seed: int = 0

    def check(self) -> None:
        _fraction("heads", self.heads)
        _fraction("ffn", self.ffn)
        if self.heads == 0 and self.ffn == 0 and self.drop_layers is None:
            raise ConfigError("Fractions(heads=0, ffn=0) removes nothing: give heads and/or ffn above 0.")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"scope must be 'global' or 'layer', got {self.scope!r}.")
        _check_scoring(self.importance)
        _positive("n_examples", self.n_examples)
        _positive("ffn_multiple", self.ffn_multiple)
        _check_drop_layers(self.drop_layers)

    @property
    def needs_scores(self) -> bool:
        return self.importance in ("gradient", "fisher") and (self.heads > 0 or self.ffn > 0)


@register_config
@dataclass(frozen=True)
class Iterative(PruneConfig):
    """Prune heads and whole MLPs step by step while the dev score stays above ``keep_score`` x the dense score
    (Michel et al. 2019; Prasanna et al. 2020's s-pruning)."""

    method: ClassVar[str] = "iterative"

    keep_score: float = 0.9
    step: float = 0.1
    importance: str = "gradient"
    n_examples: int = 256
    label_free: bool = False
    seed: int = 0

    def check(self) -> None:
        _fraction("keep_score", self.keep_score, low_open=True, what="of the dense score to keep")
        _fraction("step", self.step, low_open=True, what="of the remaining heads pruned per step")
        _check_scoring(self.importance)
        _positive("n_examples", self.n_examples)


@register_config
@dataclass(frozen=True)
class DropLayers(PruneConfig):
    """Drop whole layers (Sajjad et al. 2020): ``top:K``, ``bottom:K``, ``alternate:K``, ``symmetric:K``, or
    ``contribution:K`` (the layers that change the hidden state least on task examples)."""

    method: ClassVar[str] = "drop_layers"

    strategy: str = "top:2"
    n_examples: int = 256
    seed: int = 0

    def check(self) -> None:
        _check_drop_layers(self.strategy)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.strategy.startswith("contribution")


@register_config
@dataclass(frozen=True)
class PlanFile(PruneConfig):
    """Apply a saved pruning plan (``plan.json`` of an earlier run)."""

    method: ClassVar[str] = "plan"
    needs_data: ClassVar[bool] = False

    path: str = ""

    def check(self) -> None:
        if not self.path:
            raise ConfigError("PlanFile needs the path of a plan.json.")


FISHER_SCALES = ("global", "layer")
FISHER_PRECISIONS = ("float32", "bfloat16", "auto")
UNIT_CHOICES = ("fisher", "refit")
FISHER_KINDS = ("empirical", "model")  # the Fishers slimformer.gradients.gate_gradients estimates


@dataclass(frozen=True)
class _Budget(PruneConfig):
    """Shared settings of the retraining-free budget pruner (Kwon et al. 2022)."""

    fraction: float = 0.5
    tune: str = "weights"
    rearrange: bool = True
    calibration_examples: int = 2048
    label_free: bool = False
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0
    # RAM the refit's streamed activations may take before they spill to disk ("6GB"); None: half of what is free
    max_memory: str | None = None
    # also refit the task head's output layer to the dense model's logits (with tune="weights")
    refit_head: bool = False
    # "global": the search compares every unit's Fisher as it is; "layer": each layer's Fisher is scaled to sum 1
    # first (a more even allocation across layers); None: "layer" for sentence-embedding models, where it keeps
    # more of the embeddings (bench/results/embeddings.md), "global" for task models
    fisher_scale: str | None = None
    # the neurons' Fisher is multiplied by this before the search (the heads' by 1): the least-squares refit recovers
    # more of a pruned FFN's output than of a pruned attention's, which the Fisher of unrefitted masks cannot see, so
    # below 1 the plan keeps more heads and fewer neurons at the same FLOPs. None: 0.5 for sentence-embedding models
    # with tune="weights" (all-MiniLM-L6-v2 at 50%, 3 calibration seeds: retrieval nDCG@10 +1.2, STS-B +0.2;
    # bench/results/embedding_diagnosis.md), 1 otherwise (task models: SST-2 and STS-B within the seeds' noise,
    # the 48-class task 0.65 lower at 50%; bench/results/head_neuron_balance.md)
    neuron_weight: float | None = None
    # prune in this many rounds, the budget approached geometrically (0.5 in 2: 0.71 then 0.5), the Fisher measured
    # again on the pruned and refit model before each round: the importance of what is left changes once its
    # neighbours are gone, and one diagonal estimate from the dense model cannot see that
    steps: int = 1
    # the arithmetic of the Fisher's forward and backward passes on a float32 model: "bfloat16" runs them under
    # autocast (about half the Fisher time on MiniLM-L6, 43% less on all-mpnet-base-v2, on a CPU with native
    # bfloat16 dot products; bench/results/budget_scaling.md); "auto" chooses bfloat16 where the processor has them (see
    # slimformer.budget.fisher.fisher_autocast; the default: within the seeds' noise in score on SST-2 and STS-B at
    # 50 / 40 / 30%, bench/results/fisher_precision.md); "float32" gives the same plan on every machine
    fisher_precision: str = "auto"
    # which heads and neurons each layer keeps (how many comes from the Fisher search): "fisher", Kwon's ranking
    # after rearrangement; "refit", the ones whose removal the least-squares refit makes up for best, chosen layer
    # by layer on the pruned model's inputs (structured OBS as in ZipLM, Kurtic et al. 2023; tune="weights" only).
    # None: "refit" for sentence-embedding models refit by least squares (all-MiniLM-L6-v2 at 50%, 3 calibration
    # seeds: retrieval nDCG@10 +1.2, STS-B -0.07; bench/results/embedding_diagnosis.md), "fisher" otherwise (the
    # 48-class task: within the seeds' spread; bench/results/many_class_diagnosis.md)
    unit_choice: str | None = None
    # the Fisher the search ranks units by: "empirical", of the labels' loss (Kwon et al.; the model's predicted
    # labels with label_free); "model", of the model's own predictive distribution (needs no labels;
    # slimformer.gradients.model_fisher_probe_loss); None: chosen from the task
    # (slimformer.budget.method.default_fisher: "model" for classifiers with many classes)
    fisher: str | None = None
    # how much the weight refit weighs each calibration token by the loss's sensitivity to its sub-layer output
    # (the squared gradient norm the Fisher's backward sees there; slimformer.budget.stream.DenseTargets): 0, every
    # token alike (a plain reconstruction); 1, each token by its sensitivity; between, a mix. tune="weights" only.
    # None: chosen from the model (slimformer.budget.method.default_token_weighting)
    token_weighting: float | None = None

    def check(self) -> None:
        parse_memory(self.max_memory)
        weighting = self.token_weighting
        if weighting is not None and not (isinstance(weighting, int | float) and 0.0 <= weighting <= 1.0):
            raise ConfigError(f"token_weighting must be in [0, 1], got {self.token_weighting!r}.")
        if self.fisher not in (None, *FISHER_KINDS):
            raise ConfigError(f"Unknown fisher {self.fisher!r}: choose one of {', '.join(FISHER_KINDS)}.")
        if self.unit_choice not in (None, *UNIT_CHOICES):
            raise ConfigError(f"Unknown unit_choice {self.unit_choice!r}: choose one of {', '.join(UNIT_CHOICES)}.")
        if self.unit_choice == "refit" and self.tune != "weights":
            raise ConfigError("unit_choice='refit' chooses units by the weight refit: it needs tune='weights'.")
        _positive("steps", self.steps)
        if self.fisher_precision not in FISHER_PRECISIONS:
            raise ConfigError(
                f"Unknown fisher_precision {self.fisher_precision!r}: choose one of {', '.join(FISHER_PRECISIONS)}."
            )
        if self.fisher_scale not in (None, *FISHER_SCALES):
            raise ConfigError(f"Unknown fisher_scale {self.fisher_scale!r}: choose one of {', '.join(FISHER_SCALES)}.")
        if self.neuron_weight is not None and not self.neuron_weight > 0:
            raise ConfigError(
                f"neuron_weight must be > 0 (it multiplies the neurons' Fisher), got {self.neuron_weight!r}."
            )
        _fraction(f"the {self.method} fraction", self.fraction, low_open=True, what="of the dense model's cost to keep")
        if self.tune not in _TUNE_CHOICES:
            raise ConfigError(f"Unknown tune {self.tune!r}: choose one of {', '.join(_TUNE_CHOICES)}.")
        _positive("calibration_examples", self.calibration_examples)
        _positive("seq_len", self.seq_len)
        _positive("batch_size", self.batch_size)


@register_config
@dataclass(frozen=True)
class FlopsBudget(_Budget):
    """Keep ``fraction`` of the encoder FLOPs (counted at ``seq_len`` tokens), without retraining: Kwon et al.
    2022's Fisher mask search and rearrangement, then a layer-wise least-squares refit (``tune``: ``weights`` as
    in ZipLM, Kurtic et al. 2023; ``scales``, Kwon's one scale per unit; or ``none``)."""

    method: ClassVar[str] = "flops_budget"


@register_config
@dataclass(frozen=True)
class LatencyBudget(_Budget):
    """Keep ``fraction`` of the measured latency (batch ``latency_batch_size`` x ``seq_len``, ``threads`` CPU
    threads), predicted by a per-layer latency lookup table measured once per machine; otherwise as
    :class:`FlopsBudget`."""

    method: ClassVar[str] = "latency_budget"

    latency_batch_size: int = 32
    threads: int = 2

    def check(self) -> None:
        super().check()
        _positive("latency_batch_size", self.latency_batch_size)
        _positive("threads", self.threads)


# --------------------------------------------------------------------------------------------- sparse methods


def _check_training(config: PruneConfig) -> None:
    """The settings every method that trains while pruning shares (sparse training, learned gates): epochs,
    learning rate, batch, length, checkpoint interval, training subset, distillation mix and temperature."""
    if not (isinstance(config.epochs, int | float) and config.epochs > 0):
        raise ConfigError(f"epochs must be > 0, got {config.epochs!r}.")
    if not config.learning_rate > 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate!r}.")
    for name in ("batch_size", "max_length", "save_steps"):
        _positive(name, getattr(config, name))
    if config.max_train_samples is not None:
        _positive("max_train_samples", config.max_train_samples)
    if not 0.0 <= config.distill_alpha <= 1.0:
        raise ConfigError(f"distill_alpha must be in [0, 1], got {config.distill_alpha!r}.")
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {config.temperature!r}.")


def _check_granularity(granularity: str) -> None:
    from slimformer.sparse.masks import Granularity, SparsityError

    try:
        Granularity.parse(granularity)
    except SparsityError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class _Sparse(PruneConfig):
    """Shared settings of the weight-level methods: remove ``sparsity`` of the encoder's linear weights (query,
    key, value, attention output, FFN up and down; embeddings and task head are kept), ranked over all matrices
    (``scope="global"``) or within each (``layer``), single weights or groups (``granularity``: ``weight``,
    ``block:B`` square tiles, ``head`` whole heads and FFN neurons). Heads and neurons left with no weights are
    removed physically; the rest is stored sparse."""

    sparsity: float = 0.5
    granularity: str = "weight"
    scope: str = "global"

    def check(self) -> None:
        _fraction("sparsity", self.sparsity, what="of the encoder's linear weights to remove")
        if self.sparsity == 0:
            raise ConfigError("sparsity 0 removes nothing: give the fraction of weights to remove, e.g. 0.8.")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"scope must be 'global' or 'layer', got {self.scope!r}.")
        _check_granularity(self.granularity)


@register_config
@dataclass(frozen=True)
class Magnitude(_Sparse):
    """One-shot magnitude pruning, no data and no training: the weights (or groups) of smallest absolute value
    go (Han et al. 2015, "Learning both Weights and Connections")."""

    method: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False


@dataclass(frozen=True)
class _SparseTraining(_Sparse):
    """Settings of the methods that prune while training on the task (distilling from the dense model).

    ``prune_start`` / ``prune_end``: the fractions of training where the cubic sparsity schedule begins (after
    a dense warm-up) and reaches the target (then the sparse model trains on)."""

    epochs: float = 3.0
    learning_rate: float = 3e-5
    batch_size: int = 32
    max_length: int = 128
    max_train_samples: int | None = None
    # logit distillation from the dense model: weight of the distillation loss (the task loss gets the rest)
    distill_alpha: float = 0.9
    temperature: float = 2.0
    prune_start: float = 0.1
    prune_end: float = 0.7
    save_steps: int = 200
    seed: int = 0
    # debiasing pruning (Joniak & Aizawa 2022's question, a counterfactual objective): the weight of a symmetric KL
    # between the predictions on each training input and on it with gendered words swapped (he <-> she, ...)
    debias_weight: float = 0.0
    # the swap also exchanges common first names (john <-> mary, ...; Maudslay et al. 2019), not only gendered words:
    # off by default, since on SST-2 it did not shrink the EEC gap (bench/results/fairness.md)
    debias_names: bool = False
    # robust tickets (Zheng et al. 2022): the weight of the task loss under a PGD attack on the word embeddings,
    # each token moved by at most adversarial_epsilon x the mean word-embedding norm, in adversarial_steps steps
    adversarial_weight: float = 0.0
    adversarial_epsilon: float = 0.1
    adversarial_steps: int = 3

    def check(self) -> None:
        super().check()
        if not (self.debias_weight >= 0 and self.adversarial_weight >= 0):
            raise ConfigError("debias_weight and adversarial_weight must be >= 0.")
        if not self.adversarial_epsilon > 0:
            raise ConfigError(f"adversarial_epsilon must be > 0, got {self.adversarial_epsilon!r}.")
        _positive("adversarial_steps", self.adversarial_steps)
        _check_training(self)
        if not 0.0 <= self.prune_start < self.prune_end <= 1.0:
            raise ConfigError(
                f"prune_start {self.prune_start!r} and prune_end {self.prune_end!r} must satisfy "
                "0 <= prune_start < prune_end <= 1 (fractions of training)."
            )


@register_config
@dataclass(frozen=True)
class GradualMagnitude(_SparseTraining):
    """Gradual magnitude pruning while distilling from the dense model, with GMP*'s recipe (Kurtic & Alistarh
    2022, "GMP*: Well-Tuned Gradual Magnitude Pruning Can Outperform Most BERT-Pruning Methods"): a large first
    pruning step (``initial_sparsity``), a cubic schedule over ``pruning_events`` steps (Zhu & Gupta 2017), the
    learning rate re-warmed after each pruning step and decayed linearly until the next (``rewarm``)."""

    method: ClassVar[str] = "gmp"

    # higher than the other methods' 3e-5: the weights must recover from large pruning steps (on STS-B, 3 epochs
    # to 80%: 75.62 at 1e-4, 67.97 at 3e-5; bench/results/sparse.md)
    learning_rate: float = 1e-4
    initial_sparsity: float = 0.7
    pruning_events: int = 10
    rewarm: bool = True

    def check(self) -> None:
        super().check()
        _fraction("initial_sparsity", self.initial_sparsity, what="of the weights removed at the first step")
        _positive("pruning_events", self.pruning_events)


@register_config
@dataclass(frozen=True)
class Movement(_SparseTraining):
    """Movement pruning (Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning"): scores
    learned with the weights keep the weights that move away from zero. ``soft=False``: the top-scoring groups
    at the scheduled sparsity (hard top-k); ``soft=True``: a weight survives while its score is positive, with an
    L1 penalty on sigmoid(score) whose strength slimformer steers to follow the sparsity schedule (where it
    ends more than a point off the target, the top learned scores are kept at the target, and the report says so). With
    ``granularity="block:32"`` / ``"head"``, Lagunas et al. 2021's block movement pruning."""

    method: ClassVar[str] = "movement"

    soft: bool = False
    score_learning_rate: float = 1e-2
    # where the scores start: "magnitude" (each group's mean |W| over its pool's mean: before any movement the
    # ranking is magnitude pruning's, and movement has to outweigh it) or "zero" (Sanh et al.: the ranking is all
    # movement, which needs their long schedules), or "fisher" (whole heads and neurons only: ranked by the
    # diagonal Fisher of their masks on the training data, Kwon et al. 2022's importance; scores spread by rank
    # over (0, 2) in each pool, so that top-k before any step keeps what that importance keeps). "auto": magnitude
    # for single weights (MiniLM-L6 / STS-B at 80%
    # in 540 steps: 82.14 from magnitude, 10.15 from zero; bench/results/sparse.md), zero for blocks and heads,
    # where zero-started scores are what has been measured
    score_init: str = "auto"

    def check(self) -> None:
        super().check()
        if not self.score_learning_rate > 0:
            raise ConfigError(f"score_learning_rate must be > 0, got {self.score_learning_rate!r}.")
        if self.score_init not in SCORE_INITS:
            raise ConfigError(f"score_init must be one of {', '.join(SCORE_INITS)}, got {self.score_init!r}.")
        if self.score_init == "fisher":
            from slimformer.sparse.masks import Granularity

            if Granularity.parse(self.granularity).kind != "head":
                raise ConfigError(
                    "score_init='fisher' ranks whole heads and FFN neurons (Kwon et al.'s masks): use it with "
                    "granularity='head'."
                )

    @property
    def score_start(self) -> str:
        """Where the scores start, ``auto`` resolved: ``magnitude`` or ``zero``."""
        if self.score_init != "auto":
            return self.score_init
        from slimformer.sparse.masks import Granularity

        return "magnitude" if Granularity.parse(self.granularity).kind == "weight" else "zero"


SCORE_INITS = ("auto", "magnitude", "zero", "fisher")
LEARNED_UNITS = ("heads", "ffn", "blocks", "hidden")


@register_config
@dataclass(frozen=True)
class Learned(PruneConfig):
    """Learned structured pruning: a hard-concrete gate (Louizos, Welling & Kingma 2018, "Learning Sparse Neural
    Networks through L0 Regularization") on every head, FFN neuron, whole attention and FFN block and hidden
    dimension (``units``, comma-separated; hidden dimensions only when asked), trained with the weights while
    distilling from the dense model.
    The expected share of encoder weights removed is driven to ``target_sparsity`` by a Lagrangian whose
    multipliers are learned by gradient ascent, the target raised linearly over the first ``target_warmup`` of
    the gate phase, from the gates' own expected sparsity at the start (CoFi: Xia, Zhong & Chen 2022,
    "Structured Pruning Learns Compact and Accurate Models"; head gates alone are Voita et al. 2019). Then the
    structure is fixed (each gate group keeps its expected number of open gates, those with the largest
    log_alpha) and the model trains ``final_epochs`` more before everything closed is removed.

    ``target_speedup`` (instead of a size): the expected latency of the gated model, predicted from the gates' open
    probabilities by the per-layer latency table of :class:`LatencyBudget` (measured once per machine, batch
    ``latency_batch_size`` x ``seq_len``, ``threads`` threads), is driven to 1 / ``target_speedup`` of the dense
    model's; hidden-dimension gates are not available then (the table is measured at the model's full width).

    ``layer_distill_weight`` > 0 adds CoFi's layer distillation (each layer's hidden states matched to the
    teacher's through a learned projection); it costs a teacher forward pass per step, so it is off by default."""

    method: ClassVar[str] = "learned"

    target_sparsity: float = 0.75
    # hidden dimensions are opt-in: on STS-B at 90% in 3 + 1 epochs, gating them too cost 10 points (70.45 vs
    # 80.75 without; bench/results/learned.md)
    units: str = "heads,ffn,blocks"
    epochs: float = 3.0
    final_epochs: float = 1.0
    learning_rate: float = 3e-5
    gate_learning_rate: float = 0.1
    # the Lagrange multipliers' own rate: CoFi trains for tens of epochs; in a few hundred steps the multipliers
    # must grow fast enough to outweigh the distillation loss's pull to keep every gate open
    multiplier_learning_rate: float = 0.5
    # log_alpha at the start: 2.0 leaves about 3 gates in 4 fully open in each sample, so training starts close
    # to the fine-tuned model (CoFi starts at 0, a half-open model)
    gate_init: float = 2.0
    # the head and neuron gates start spread around gate_init by their Fisher importance rank (Kwon et al.
    # 2022's mask gradients), +- spread / 2, so the Lagrangian meets them in order instead of in lockstep; 0: all
    # start at gate_init. Opt-in: at 8x on SST-2 in 1,000 steps, spread 4 gave 81.88 against 81.31 (one seed,
    # inside the noise; bench/results/learned_sst2.md)
    gate_init_spread: float = 0.0
    target_warmup: float = 0.5
    batch_size: int = 32
    max_length: int = 128
    max_train_samples: int | None = None
    distill_alpha: float = 0.9
    temperature: float = 2.0
    layer_distill_weight: float = 0.0
    save_steps: int = 200
    seed: int = 0
    target_speedup: float | None = None
    latency_batch_size: int = 32
    seq_len: int = 128
    threads: int = 2

    @property
    def unit_set(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.units.split(",") if u.strip())

    @property
    def target_reduction(self) -> float:
        """What the Lagrangian drives the gates to: the share of the encoder's weights removed, or with
        ``target_speedup`` the share of the predicted latency removed (1 - 1 / speedup)."""
        return 1 - 1 / self.target_speedup if self.target_speedup is not None else self.target_sparsity

    def check(self) -> None:
        _fraction("target_sparsity", self.target_sparsity, what="of the encoder's weights to remove")
        if not 0 < self.target_sparsity < 1:
            raise ConfigError(f"target_sparsity must be strictly between 0 and 1, got {self.target_sparsity!r}.")
        unknown = sorted(self.unit_set - set(LEARNED_UNITS))
        if unknown or not self.unit_set:
            raise ConfigError(f"units {self.units!r} must be a comma-separated subset of {','.join(LEARNED_UNITS)}.")
        if not {"heads", "ffn", "hidden"} & self.unit_set:
            raise ConfigError("units need heads, ffn or hidden: blocks alone only gate whole blocks of them.")
        _check_training(self)
        for name in ("gate_learning_rate", "multiplier_learning_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if not self.gate_init_spread >= 0:
            raise ConfigError(f"gate_init_spread must be >= 0, got {self.gate_init_spread!r}.")
        if not self.final_epochs >= 0:
            raise ConfigError(f"final_epochs must be >= 0, got {self.final_epochs!r}.")
        if not 0 <= self.target_warmup <= 1:
            raise ConfigError(
                f"target_warmup must be in [0, 1] (a fraction of the gate phase), got {self.target_warmup!r}."
            )
        if not self.layer_distill_weight >= 0:
            raise ConfigError(f"layer_distill_weight must be >= 0, got {self.layer_distill_weight!r}.")
        if self.target_speedup is not None:
            if not (isinstance(self.target_speedup, int | float) and self.target_speedup > 1):
                raise ConfigError(f"target_speedup must be above 1, got {self.target_speedup!r}.")
            if "hidden" in self.unit_set:
                raise ConfigError(
                    "target_speedup reads a latency table measured at the model's full width, so it cannot steer "
                    "hidden-dimension gates: drop 'hidden' from units, or give target_sparsity instead."
                )
        for name in ("latency_batch_size", "seq_len", "threads"):
            _positive(name, getattr(self, name))


# the names `slimformer prune --sparse NAME` takes: (config type, fixed settings, default granularity)
SPARSE_METHODS: dict[str, tuple[type[_Sparse], dict[str, Any], str]] = {
    "magnitude": (Magnitude, {}, "weight"),
    "gmp": (GradualMagnitude, {}, "weight"),
    "movement": (Movement, {}, "weight"),
    "soft-movement": (Movement, {"soft": True}, "weight"),
    "block-movement": (Movement, {}, "block:32"),
    "head-movement": (Movement, {}, "head"),
}


def sparse_config(name: str, sparsity: float, *, granularity: str | None = None, **options: Any) -> _Sparse:
    """The config a sparse method name describes (``magnitude``, ``gmp``, ``movement``, ``soft-movement``,
    ``block-movement``, ``head-movement``); ``options`` are the config's fields, those it lacks are ignored (so a
    caller may pass training settings to ``magnitude``)."""
    if name not in SPARSE_METHODS:
        raise ConfigError(f"Unknown sparse method {name!r}; choose one of {', '.join(SPARSE_METHODS)}.")
    cls, fixed, default_granularity = SPARSE_METHODS[name]
    names = {f.name for f in fields(cls)}
    settings = {k: v for k, v in options.items() if k in names and v is not None}
    return cls(sparsity=sparsity, granularity=granularity or default_granularity, **settings, **fixed)


__all__ = [
    "CONFIG_VERSION",
    "ConfigError",
    "DropLayers",
    "FlopsBudget",
    "Fractions",
    "GradualMagnitude",
    "Iterative",
    "LatencyBudget",
    "Magnitude",
    "Movement",
    "PlanFile",
    "PruneConfig",
    "PruneContext",
    "PruneOutcome",
    "config_from_dict",
    "handler_for",
    "known_methods",
    "load_config",
    "parse_memory",
    "register_config",
    "register_handler",
    "sparse_config",
]
