"""Statistics for error compensation: the inputs each layer sees in the model compressed so far,
paired with the inputs it sees in the original (``lrcompile.numerics.whiten``'s module docstring).

    original model, the chunk's activations exposed, on the fitted feeds -> those activations,
      on disk
    the model as rewritten so far, the same activations exposed, on the same feeds
      -> per activation G' = X'^T X' and C = X'^T X (float64, K x K each)

One ONNX Runtime session at a time, so that memory holds about one model; one batch of original
activations is read back at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lrcompile.calibration.statistics import activation_key, real_rows
from lrcompile.io.data import Feed
from lrcompile.io.model import runnable_proto
from lrcompile.io.spill import OutputStore
from lrcompile.numerics.whiten import Whitening, compensating_whitening
from lrcompile.passes.candidates import WeightGroup
from lrcompile.runtime.sessions import create_session, runtime_errors


@dataclasses.dataclass
class PairedStats:
    """Streaming ``X'^T X'`` and ``X'^T X`` of one activation, as ``[rows, K]``."""

    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    rows: int = 0

    def add(
        self, current: np.ndarray, original: np.ndarray, keep: np.ndarray | None = None
    ) -> None:
        """Adds one batch of the activation now (``current``) and in the original model;
        ``keep`` as in ``ActivationStats.add``."""
        width = current.shape[-1]
        now = np.asarray(current, dtype=np.float64).reshape(-1, width)
        before = np.asarray(original, dtype=np.float64).reshape(-1, width)
        if keep is not None:  # padding rows left out, as in the plain statistics
            now, before = now[keep], before[keep]
        gram, cross = now.T @ now, now.T @ before
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.rows += len(now)


def compensating_whitenings(
    original: onnx.ModelProto,
    current: ir.Model,
    groups: Sequence[WeightGroup],
    feeds: Sequence[Feed],
    *,
    data_folder: str | Path | None = None,
    mask: str | None = None,
) -> dict[str, Whitening]:
    """Each group's compensating whitening (by ``group.key``): fitted to the outputs the
    ``original`` model's inputs give (its external data in ``data_folder``), for the inputs the
    ``current`` model gives it on ``feeds``. Groups reading one activation (Q, K, V) share one;
    groups that multiply a constant are left out (they have no activations). Rows where the
    feed ``mask`` is zero (padding) are left out (``statistics.real_rows``)."""
    constants = {tensor.name for tensor in original.graph.initializer}
    groups = [g for g in groups if not {node.inputs[0].name for node in g.nodes} & constants]
    keys = sorted({activation_key(node) for group in groups for node in group.nodes})
    store = OutputStore(prefix="lrcompile-compensation-", mmap=True)
    try:
        for values in _activations(original, keys, feeds, data_folder):
            store.append(values)
        proto, folder = runnable_proto(current)
        stats = {key: PairedStats() for key in keys}
        now = _activations(proto, keys, feeds, folder, written=current)
        for values, before, feed in zip(now, store, feeds, strict=True):
            for key, stat in stats.items():
                x = values[_name(key)]
                stat.add(x, before[_name(key)], real_rows(x, feed, mask))
    finally:
        store.close()
    shared: dict[tuple, Whitening] = {}
    whitenings = {}
    for group in groups:
        reads = tuple(sorted({activation_key(node) for node in group.nodes}))
        if reads not in shared:
            rows = max(sum(stats[key].rows for key in reads), 1)
            gram = sum(stats[key].gram for key in reads) / rows
            cross = sum(stats[key].cross for key in reads) / rows
            shared[reads] = compensating_whitening(gram, cross)
        whitenings[group.key] = shared[reads]
    return whitenings


def _name(key: tuple[str, bool]) -> str:
    """The stored name of an activation: its tensor, ``.T`` when a Gemm reads it transposed."""
    return f"{key[0]}.T" if key[1] else key[0]


def _activations(
    model: onnx.ModelProto,
    keys: Sequence[tuple[str, bool]],
    feeds: Sequence[Feed],
    folder,
    written: ir.Model | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Each feed's activations ``keys`` (as ``[..., K]``), the model run with them as its only
    outputs (those that are graph inputs come from the feed); ``written``: the model as
    lrcompile rewrote it (its failures are internal errors)."""
    proto = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
    fed = set(feeds[0]) if feeds else set()
    exposed = sorted({name for name, _ in keys} - fed)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in exposed)
    session = None
    if exposed:
        name = "the model rewritten so far (error compensation)" if written is not None else None
        session = create_session(
            proto, data_folder=folder, low_memory=True, written=written, name=name
        )
    del proto
    with runtime_errors("error compensation", written):
        for feed in feeds:
            values = dict(feed)
            if session is not None:
                values |= dict(zip(exposed, session.run(exposed, feed), strict=True))
            yield {_name(key): values[key[0]].T if key[1] else values[key[0]] for key in keys}
