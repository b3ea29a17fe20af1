"""Refusals of calibration data that cannot support ``--rank auto``: one clear line, exit 2.

Constant or non-finite reference outputs leave no error to measure; activations of too low a
numerical rank (too few or too alike rows) leave the whitened factors fitted to noise.
"""

from __future__ import annotations

from lrcompile.calibration.statistics import Calibration
from lrcompile.errors import DataError


def refuse_degenerate_output(statistics: Calibration, path, source) -> None:
    """``--rank auto`` on reference outputs that cannot support it (of the model at ``path``, on
    ``source``) stops here, with the fix."""
    output = statistics.degenerate_output()
    if output is not None:
        raise DataError(
            f"{path}: output {output[0]!r} is {output[1]} on the calibration data"
            f" ({source.description}): `rank=auto` cannot measure errors against it; pass `calib`"
            " with inputs the model is meant for"
        )


def refuse_degenerate_input(statistics: Calibration, path, source, groups, white) -> None:
    """``--rank auto`` on degenerate activations stops here, with the fix."""
    degenerate = statistics.degenerate_input(groups, white)
    if degenerate is not None:
        tensor, node, rank, width, rows = degenerate
        held = statistics.held_back
        fitted = f", the {statistics.fitted} of {len(statistics.feeds)} batches fitted" * bool(held)
        raise DataError(
            f"{path}: the calibration activations {tensor!r} (input of {node}, {width}"
            f" wide) have numerical rank {rank} over {rows} rows{fitted} ({source.description}):"
            f" too few or too alike for `rank=auto`; pass `calib` with at least {width} varied"
            " rows of real inputs"
            + " beyond the held-back `validation` batches" * bool(held)
            + " (synthetic data only passes with larger `input_shapes`, and is weak)"
        )
