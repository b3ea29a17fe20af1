"""Activation ranges of a model on calibration feeds: what FP8 scales are made from.

    model (factored, not yet quantized) + tensor names + feeds -> {name: ActivationRange}

The tensors are exposed as extra outputs of an in-memory copy and fetched batch by batch; with a
percentile method a second pass over the same feeds fills a histogram per tensor. The FP8 pass
receives the result as data: no pass runs a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lrcompile.io.data import Feed
from lrcompile.io.model import runnable_proto
from lrcompile.numerics.ranges import (
    HISTOGRAM_BINS,
    ActivationRange,
    histogram,
    parse_range_method,
    percentile_range,
)
from lrcompile.runtime.sessions import create_session, runtime_errors


@dataclasses.dataclass(frozen=True)
class RangeCalibration:
    """Measures the ranges of tensors of a model, as it is when called, on ``feeds``; ``method``
    is ``max`` or ``percentile:P``. External data is found wherever the model's tensors lie (the
    input's folder, factors spilled to a scratch folder)."""

    feeds: Sequence[Feed] = dataclasses.field(repr=False)
    method: str = "max"

    def __post_init__(self) -> None:
        parse_range_method(self.method)

    def __call__(self, model: ir.Model, names: Sequence[str]) -> dict[str, ActivationRange]:
        proto, folder = runnable_proto(model)
        percentile = parse_range_method(self.method)
        return activation_ranges(
            proto, names, self.feeds, data_folder=folder, percentile=percentile, written=model
        )


def activation_ranges(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Sequence[Feed],
    *,
    data_folder: str | Path | None,
    percentile: float | None = None,
    written: ir.Model | None = None,
) -> dict[str, ActivationRange]:
    """Ranges of the tensors ``names`` of ``model`` over ``feeds``: the max |x|, or (with
    ``percentile``) a histogram's percentile in a second pass over the same feeds. ``written``:
    lrcompile made the model (its failures are internal errors, ``sessions.runtime_errors``)."""
    session, fetch = _session(model, names, feeds, data_folder, written)
    amax = dict.fromkeys(names, 0.0)
    for values in _batches(session, fetch, feeds, written):
        for name in names:
            if values[name].size:
                amax[name] = max(amax[name], float(np.max(np.abs(values[name]))))
    if percentile is None:
        return {name: ActivationRange(amax[name], amax[name]) for name in names}
    counts = {name: np.zeros(HISTOGRAM_BINS, np.int64) for name in names}
    for values in _batches(session, fetch, feeds, written):
        for name in names:
            counts[name] += histogram(values[name], amax[name])
    return {name: percentile_range(amax[name], counts[name], percentile) for name in names}


def _session(model, names, feeds, data_folder, written):
    """A session of ``model`` with ``names`` exposed, and the names to fetch (those not fed)."""
    outputs = {o.name for o in model.graph.output}
    fed = set(feeds[0]) if feeds else set()
    exposed = sorted(set(names) - outputs - fed)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in exposed)
    name = "the factored model (activation ranges)" if written is not None else None
    session = create_session(model, data_folder=data_folder, written=written, name=name)
    return session, sorted(set(names) - fed)


def _batches(session, fetch, feeds, written) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the fetched values and the fed inputs."""
    for feed in feeds:
        with runtime_errors("measuring activation ranges", written):
            fetched = session.run(fetch, feed) if fetch else []  # run([]) returns everything
        yield dict(zip(fetch, fetched, strict=True)) | feed
