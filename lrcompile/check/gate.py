"""What a check gates on: a tolerance under a metric, and labels that fit the model."""

from __future__ import annotations

from lrcompile.errors import DataError, LrcompileError
from lrcompile.runtime.metrics import METRICS, Labels


def check_gate(tolerance: float, metric: str, labels: Labels | None) -> None:
    """The tolerance, metric and labels make a gate.

    Raises:
        LrcompileError: They do not.
    """
    if not tolerance >= 0:
        raise LrcompileError(f"`tolerance` must be >= 0, got {tolerance}")
    if metric not in METRICS:
        raise LrcompileError(f"`metric` {metric!r} is not one of {', '.join(METRICS)}")
    if metric == "ppl" and labels is None:
        raise LrcompileError("`metric=ppl` needs `labels` INPUT:OUTPUT (e.g. input_ids:logits)")


def check_labels(path, model, labels: Labels | None) -> None:
    """The labels name an integer input and an output of the model.

    Raises:
        DataError: They do not.
    """
    if labels is None:
        return
    inputs = {value.name: value for value in model.graph.inputs}
    label_input, output = labels
    if label_input not in inputs:
        raise DataError(
            f"{path}: `labels` names no input {label_input!r} (inputs: {', '.join(inputs)})"
        )
    dtype = inputs[label_input].dtype
    if dtype is None or not dtype.is_integer():
        raise DataError(
            f"{path}: `labels` input {label_input!r} is {dtype}, expected integer token ids"
        )
    names = [value.name for value in model.graph.outputs]
    if output not in names:
        raise DataError(
            f"{path}: `labels` names no output {output!r} (outputs: {', '.join(names)})"
        )
