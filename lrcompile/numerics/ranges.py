"""Activation ranges for FP8 scales from calibration values: plain numerics.

A range is the largest ``|x|`` (``max``) or a percentile of ``|x|`` read off a histogram over
``[0, max]`` (``percentile:P``); values beyond the range saturate when quantized.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lrcompile.errors import DataError

HISTOGRAM_BINS = 4096


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    """The calibrated range of one tensor: its max |x|, the value chosen for the scale, and the
    fraction of calibration values above that value (which saturate)."""

    amax: float
    value: float
    clipped: float = 0.0


def parse_range_method(spec: str) -> float | None:
    """``max`` -> None; ``percentile:99.99`` -> 99.99.

    Raises:
        DataError: Anything else.
    """
    if spec == "max":
        return None
    kind, _, value = spec.partition(":")
    try:
        percentile = float(value)
    except ValueError:
        percentile = -1.0
    if kind != "percentile" or not 0.0 < percentile <= 100.0:
        raise DataError(
            f"invalid FP8 calibration {spec!r}: expected max or percentile:P with 0 < P <= 100"
        )
    return percentile


def histogram(values: np.ndarray, amax: float) -> np.ndarray:
    """Counts of ``|values|`` in ``HISTOGRAM_BINS`` equal bins over ``[0, amax]``."""
    return np.histogram(np.abs(values), HISTOGRAM_BINS, (0.0, amax or 1.0))[0]


def percentile_range(amax: float, counts: np.ndarray, percentile: float) -> ActivationRange:
    """The range at ``percentile`` of a histogram of ``|x|`` over ``[0, amax]``."""
    total = int(counts.sum())
    if total == 0 or amax == 0.0:
        return ActivationRange(amax, amax)
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, percentile / 100.0 * total))
    value = min(amax, (index + 1) * amax / len(counts))
    clipped = float(total - cumulative[min(index, len(counts) - 1)]) / total
    return ActivationRange(amax, value, clipped)
