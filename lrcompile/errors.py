"""Errors, by whose fault they are.

An ``LrcompileError`` is the user's problem (the model, data or options): the CLI prints it as one
line, exit code 2. An ``InternalError`` is lrcompile's: something it made itself was rejected (ONNX
Runtime or the ONNX checker failing on a model lrcompile wrote), exit code 3, with the model kept
for a bug report. Any other exception is a bug too (exit 3) and keeps its traceback.
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


class InternalError(Exception):
    """A model lrcompile wrote was rejected: names the stage, the failure and where the model is
    kept for a bug report. Never the user's fault."""
