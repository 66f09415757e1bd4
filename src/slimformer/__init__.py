"""slimformer: make pre-trained transformer language models smaller and faster for a task."""

from slimformer.errors import SlimformerError
from slimformer.models import DEFAULT_MODEL, LoadedModel, load_model

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "LoadedModel", "SlimformerError", "__version__", "load_model"]
