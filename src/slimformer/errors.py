"""Errors slimformer raises on bad input.

Every error says what was wrong and what to do about it; the CLI prints the message and exits with status 2.
"""

from __future__ import annotations


class SlimformerError(Exception):
    """Base class of every error slimformer raises on purpose."""


class ModelLoadError(SlimformerError):
    """A model name or folder could not be resolved or loaded."""


class UnsupportedArchitectureError(SlimformerError):
    """The model's family has no architecture spec."""


class TaskError(SlimformerError):
    """An unknown task name or an impossible task configuration."""


class DataFileError(SlimformerError):
    """A data file is missing or malformed; the message names the file and, where known, the line."""

    def __init__(self, path: object, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")
