"""slimformer: make pre-trained transformer language models smaller and faster for a task.

The front door: ``slimformer.prune(model, config, data)`` with a config from :mod:`slimformer.configs`
(``FlopsBudget``, ``LatencyBudget``, ``Fractions``, ``Iterative``, ``DropLayers``, ``PlanFile``; sparse:
``Magnitude``, ``GradualMagnitude``, ``Movement``), and
``finetune``, ``distill``, ``evaluate``, ``measure``, ``save``, ``load_model``, ``export_onnx``, ``push_to_hub``.
"""

from slimformer._version import __version__

# api imports the subpackages slimformer.prune, .distill and .measure before the names below are bound, so that
# these names stay the front-door functions (a later first import of a subpackage would rebind them).
from slimformer.api import (
    PruneResult,
    compress,
    distill,
    evaluate,
    export_onnx,
    finetune,
    measure,
    prune,
    quantize,
    remembered_task,
    save,
)
from slimformer.configs import (
    DropLayers,
    FlopsBudget,
    Fractions,
    GradualMagnitude,
    Iterative,
    LatencyBudget,
    Learned,
    Magnitude,
    Movement,
    PlanFile,
    PruneConfig,
    config_from_dict,
    load_config,
)
from slimformer.deploy import Compress, Quantize
from slimformer.errors import SlimformerError
from slimformer.hub import push_to_hub
from slimformer.models import DEFAULT_MODEL, LoadedModel, load_model
from slimformer.tasks import TaskData, TaskRef, load_custom_embedding_task, load_custom_task, load_task
from slimformer.train import TrainConfig

__all__ = [
    "DEFAULT_MODEL",
    "Compress",
    "DropLayers",
    "FlopsBudget",
    "Fractions",
    "GradualMagnitude",
    "Iterative",
    "LatencyBudget",
    "Learned",
    "LoadedModel",
    "Magnitude",
    "Movement",
    "PlanFile",
    "PruneConfig",
    "PruneResult",
    "Quantize",
    "SlimformerError",
    "TaskData",
    "TaskRef",
    "TrainConfig",
    "__version__",
    "compress",
    "config_from_dict",
    "distill",
    "evaluate",
    "export_onnx",
    "finetune",
    "load_config",
    "load_custom_embedding_task",
    "load_custom_task",
    "load_model",
    "load_task",
    "measure",
    "prune",
    "push_to_hub",
    "quantize",
    "remembered_task",
    "save",
]
