"""slimformer: make pre-trained transformer language models smaller and faster for a task."""

from slimformer._version import __version__
from slimformer.errors import SlimformerError
from slimformer.models import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "SlimformerError", "__version__", "load_model"]
