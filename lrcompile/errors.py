"""Errors that are the user's problem.

Anything raised as an ``LrcompileError`` is printed by the CLI as one line (exit code 2); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class LrcompileError(Exception):
    """A problem with the user's input: names the file, node or value and what was expected."""


class ModelLoadError(LrcompileError):
    """The model file is missing, unreadable, invalid or has bad external data."""


class RankSpecError(LrcompileError):
    """A rank spec or a per-layer override file is invalid."""


class DataError(LrcompileError):
    """Input data (an ``.npz`` file or input shapes) does not fit the model."""


class OutputPathError(LrcompileError):
    """The output path is not usable (for example it equals the input)."""
