"""Calibration statistics: run the ORIGINAL model, accumulate what each weight's input looks like.

For every distinct activation that feeds a candidate weight (Q, K and V reading one input count
once), batch by batch: the Gram matrix ``X^T X`` (float64, ``O(K^2)`` memory) and the absolute
maximum. Activations are never kept beyond their batch. The model's own outputs are kept: they
are the reference the ``auto`` search measures its error against; they wait on disk
(``OutputStore``), read back a batch at a time.

The activations are exposed by adding them as outputs to an in-memory copy of the model; weights
stay on disk (ONNX Runtime reads external data from the model's folder).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lrcompile.io.data import Feed, FeedSource
from lrcompile.io.spill import OutputStore
from lrcompile.numerics.quantize import dynamic_quantization
from lrcompile.numerics.whiten import (
    Whitening,
    accumulate_gram,
    numerical_rank,
    whitening_from_gram,
)
from lrcompile.passes.candidates import WeightGroup
from lrcompile.runtime.metrics import ErrorAccumulator
from lrcompile.runtime.rows import rows_per_run, split_rows, splittable
from lrcompile.runtime.sessions import create_session, runtime_errors

logger = logging.getLogger(__name__)

# ``--rank auto`` refuses activations whose Gram matrix has a numerical rank below this fraction of
# its width: its whitening and its probes would describe data that has (almost) no directions.
MIN_RANK_FRACTION = 0.5


@dataclasses.dataclass
class ActivationStats:
    """Streaming statistics of one activation, as ``[rows, K]``."""

    gram: np.ndarray | None = None
    rows: int = 0  # rows in the Gram matrix
    batch_rows: int = 0  # the most rows of one batch, padding included
    # Sum over all rows of the squared step of ONNX DynamicQuantizeLinear on their batch (uint8
    # over the batch's range, 0 included), and the rows it sums over.
    steps: float = 0.0
    stepped_rows: int = 0

    @property
    def dynamic_noise(self) -> float | None:
        """The mean variance per element of the rounding DynamicQuantizeLinear adds to this
        activation (``step^2 / 12``), None without data."""
        return self.steps / self.stepped_rows / 12 if self.stepped_rows else None

    def add(self, x: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Adds one batch; ``keep`` (a boolean per row, ``real_rows``) selects the rows that
        enter the Gram matrix."""
        rows = np.reshape(x, (-1, x.shape[-1]))
        self.batch_rows = max(self.batch_rows, len(rows))
        if rows.size:
            self.steps += len(rows) * dynamic_quantization(rows)[0] ** 2
            self.stepped_rows += len(rows)
        if keep is not None:
            rows = rows[keep]
        self.gram = accumulate_gram(self.gram, rows)
        self.rows += len(rows)


def real_rows(x: np.ndarray, feed: Feed, mask: str | None) -> np.ndarray | None:
    """Which rows of activation ``x`` are real tokens, not padding: where ``feed[mask]``
    (``[batch, sequence]``) is nonzero, when ``x`` is ``[batch, sequence, K]`` or
    ``[batch * sequence, K]`` (flattened in that order); None (every row) when ``x``'s rows do
    not line up with the mask (a KV cache's mask also spans past tokens)."""
    if mask is None or mask not in feed:
        return None
    positions = np.asarray(feed[mask])
    lined_up = x.shape[:-1] == positions.shape or (x.ndim == 2 and x.shape[0] == positions.size)
    return positions.reshape(-1) != 0 if lined_up else None


def padding_share(feeds: Sequence[Feed], mask: str) -> float | None:
    """The share of the feeds' ``mask`` positions that are padding (zero); None when the mask
    holds values other than 0 and 1 (an additive mask, 0 where tokens attend, would read
    inverted)."""
    positions = [np.asarray(feed[mask]) for feed in feeds if mask in feed]
    if not positions or any(not np.isin(p, (0, 1)).all() for p in positions):
        return None
    return sum(int(np.sum(p == 0)) for p in positions) / sum(p.size for p in positions)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Statistics per activation, the feeds they came from, and the model's outputs on them."""

    stats: dict[tuple[str, bool], ActivationStats]
    feeds: list[Feed]
    # The outputs of the measured feeds (``measured``) only, piece by piece (``rows``): an
    # OutputStore, read back on demand.
    reference: Sequence[dict[str, np.ndarray]]
    source: str
    synthetic: bool = False
    # The statistics are of the first ``fitted`` feeds (None: all); the others are held back, so
    # that ``auto`` measures its candidates on batches its factors were not fitted to.
    fitted: int | None = None
    rows: int | None = None  # rows per run (``runtime.rows``); None: whole batches

    @property
    def held_back(self) -> int:
        """How many feeds the statistics left out."""
        return 0 if self.fitted is None else len(self.feeds) - self.fitted

    def fitted_feeds(self) -> Sequence[Feed]:
        """The feeds the statistics are of: what anything fitted to data (factors, FP8 ranges)
        may see."""
        return self.feeds if self.fitted is None else self.feeds[: self.fitted]

    def measured(
        self, batches: int | None = None
    ) -> tuple[Sequence[Feed], Sequence[dict[str, np.ndarray]]]:
        """The feeds ``auto`` measures candidates on (the first ``batches`` of them), with their
        reference outputs, piece by piece: those held back from the statistics, or all of them
        when none were."""
        feeds = self.feeds[self.fitted :] if self.held_back else self.feeds
        pieces = [split_rows(feed, self.rows) for feed in feeds[:batches]]
        flat = [piece for batch in pieces for piece in batch]
        return flat, self.reference[: len(flat)]

    def gram(self, group: WeightGroup) -> np.ndarray | None:
        """``X^T X / rows`` of everything the group's weight multiplies (over all its nodes): a
        mean, so that whitened factors do not depend on how many calibration rows there were."""
        stats = [self.stats.get(activation_key(node), ActivationStats()) for node in group.nodes]
        if any(stat.gram is None for stat in stats):
            return None
        return np.sum([stat.gram for stat in stats], axis=0) / max(sum(s.rows for s in stats), 1)

    def dynamic_noise(self, group: WeightGroup) -> float | None:
        """The mean variance per element of DynamicQuantizeLinear's rounding of what the group's
        nodes multiply (``ActivationStats.dynamic_noise``); None without statistics."""
        stats = [self.stats.get(activation_key(node)) for node in group.nodes]
        noises = [stat.dynamic_noise for stat in stats if stat is not None]
        if not noises or None in noises:
            return None
        return max(noises)

    def batch_rows(self, group: WeightGroup) -> int:
        """The most rows of activation one of the group's nodes multiplies in one batch (what
        the latency objective measures at); 0 without statistics."""
        stats = [self.stats.get(activation_key(node)) for node in group.nodes]
        return max((stat.batch_rows for stat in stats if stat is not None), default=0)

    def degenerate_output(self) -> tuple[str, str] | None:
        """``(output, problem)`` when a reference output is not finite or identically zero."""
        accumulators: dict[str, ErrorAccumulator] = {}  # what verification refuses, too
        for batch in self.measured()[1]:  # the outputs errors are measured against
            for name, value in batch.items():
                accumulators.setdefault(name, ErrorAccumulator(classes=False)).add(value, value)
        for name, accumulator in accumulators.items():
            problem = accumulator.reference_problem()
            if problem is not None:
                return name, problem
        return None

    def degenerate_input(
        self,
        groups: Sequence[WeightGroup],
        whitening: Mapping[str, Whitening] | None = None,
        fraction: float = MIN_RANK_FRACTION,
    ) -> tuple[str, str, int, int, int] | None:
        """``(tensor, node, numerical rank, width, rows)`` of the first activation feeding
        ``groups`` whose Gram matrix has a numerical rank below ``fraction`` of its width:
        rows too few or too alike (synthetic 0/1 token ids make every token alike).
        ``whitening`` (by group key, from ``whitenings``, before the Gram matrices are freed)
        lends its Cholesky factors where a group reads one activation, so that they are not
        computed twice."""
        seen = set()
        for group in groups:
            keys = {activation_key(node) for node in group.nodes}
            white = (whitening or {}).get(group.key) if len(keys) == 1 else None
            for node in group.nodes:
                key = activation_key(node)
                stat = self.stats.get(key)
                if key in seen or stat is None or stat.gram is None:
                    continue
                seen.add(key)
                rank = numerical_rank(stat.gram, whitening=white)
                width = stat.gram.shape[0]
                if rank < fraction * width:
                    where = node.name or f"the {node.op_type} producing {node.outputs[0].name!r}"
                    return key[0], where, rank, width, stat.rows
        return None

    def whitenings(
        self, groups: Sequence[WeightGroup]
    ) -> Iterator[tuple[tuple[WeightGroup, ...], Whitening]]:
        """The groups by the activations they read (Q, K and V share one), each batch of them
        with its Cholesky whitening, one at a time; groups without statistics are left out.

        A Gram matrix is freed as soon as every group reading it has had its whitening, so that
        whoever uses each whitening and drops it (``--rank auto`` caches the factors) holds one
        Cholesky factor, not all of them: for a 0.5B LM they are 4.5 GB.
        """
        readers: dict[tuple, list[WeightGroup]] = {}
        for group in groups:
            inputs = tuple(sorted({activation_key(node) for node in group.nodes}))
            readers.setdefault(inputs, []).append(group)
        pending = collections.Counter(key for inputs in readers for key in inputs)
        for inputs, members in readers.items():
            gram = self.gram(members[0])
            if gram is not None:
                white = whitening_from_gram(gram)
                del gram
                if white.jitter:
                    logger.info("%s: Gram needed jitter %.3g", members[0].name, white.jitter)
                yield tuple(members), white
            for key in inputs:
                pending[key] -= 1
                if pending[key] == 0 and key in self.stats:
                    self.stats[key].gram = None

    def whitening(self, groups: Sequence[WeightGroup]) -> dict[str, Whitening]:
        """The Cholesky whitening of each group with statistics, keyed by ``group.key``; groups
        reading the same activations (Q, K, V) share one factorization. The Gram matrices are
        freed (see ``whitenings``)."""
        return {group.key: white for members, white in self.whitenings(groups) for group in members}


def calibrate(
    model: onnx.ModelProto,
    groups: Sequence[WeightGroup],
    source: FeedSource,
    *,
    data_folder: str | Path | None = None,
    on_batch: Callable[[int, int, str], None] | None = None,
    keep_reference: bool = True,
    fitted: int | None = None,
) -> Calibration:
    """Runs the original ``model`` (external data in ``data_folder``) on ``source``'s feeds,
    accumulating the statistics of ``groups``' inputs; ``on_batch(done, total, "")`` reports
    progress. The model's outputs are kept (for ``auto``) unless ``keep_reference`` is off.
    With ``fitted``, only the first ``fitted`` feeds enter the statistics (without the reference
    the others are not run)."""
    proto = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
    constants = {t.name for t in proto.graph.initializer}
    activations = {activation_key(n) for g in groups for n in g.nodes} - {
        (name, t) for name in constants for t in (False, True)
    }
    feeds = source.feeds
    fed = set(feeds[0]) if feeds else set()
    run = feeds if keep_reference or fitted is None else feeds[:fitted]
    needed = {name for name, _ in activations} - fed
    outputs = [o.name for o in proto.graph.output]
    if not keep_reference and needed:
        outputs = []
        del proto.graph.output[:]  # run only what the activations need
    exposed = sorted(needed - set(outputs))
    # Appended outputs need no type: ONNX Runtime infers it.
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in exposed)
    # The session options of every probe (``runtime.metrics.ErrorMeter``): no pre-packed weight
    # copies, no arena, so that the reference and the probes run the same kernels.
    session = create_session(proto, data_folder=data_folder, low_memory=True)
    names = outputs + exposed
    stats = {key: ActivationStats() for key in activations}
    kept = outputs if keep_reference else []
    with runtime_errors("calibration"):
        rows = None
        if kept and splittable(_first_dimensions(proto, fed)):
            rows = rows_per_run(run, lambda piece: session.run(kept, piece))
        run_ = _Run(session, names, kept, rows, source.mask, on_batch)
        reference = run_(run, stats, fitted)
    calibration = Calibration(stats, feeds, reference, source.description, source.synthetic)
    return dataclasses.replace(calibration, fitted=fitted, rows=rows)


@dataclasses.dataclass
class _Run:
    """Runs the feeds piece by piece (``rows`` per run), adding each activation of the fitted
    feeds to its statistics, padding rows (zeros of the feed ``mask``) left out of the Gram
    matrices, and keeping the outputs of the measured feeds."""

    session: object
    names: list[str]
    outputs: list[str]
    rows: int | None
    mask: str | None
    on_batch: Callable[[int, int, str], None] | None

    def __call__(self, feeds, stats, fitted: int | None) -> OutputStore:
        reference = OutputStore(prefix="lrcompile-calibration-")
        report = self.on_batch or (lambda done, total, detail: None)
        for index, feed in enumerate(feeds):
            report(index, len(feeds), "")
            fits = fitted is None or index < fitted
            keeps = fitted is None or index >= fitted  # what ``Calibration.measured`` reads
            seen = collections.Counter()  # rows of each activation in the whole batch
            for piece in split_rows(feed, self.rows):
                values = dict(zip(self.names, self.session.run(self.names, piece), strict=True))
                values |= piece
                if fits:
                    for key, stat in stats.items():
                        x = values[key[0]].T if key[1] else values[key[0]]
                        stat.add(x, real_rows(x, piece, self.mask))
                        seen[key] += int(np.prod(x.shape[:-1]))
                if keeps and self.outputs:
                    reference.append({name: values[name] for name in self.outputs})
            for key, rows in seen.items():
                stats[key].batch_rows = max(stats[key].batch_rows, rows)
        report(len(feeds), len(feeds), "")
        return reference


def _first_dimensions(proto: onnx.ModelProto, fed: set[str]) -> list[int | None]:
    """The static first dimension of each fed input (None where dynamic)."""
    dims = [value.type.tensor_type.shape.dim for value in proto.graph.input if value.name in fed]
    return [d[0].dim_value if d and d[0].HasField("dim_value") else None for d in dims]


def activation_key(node) -> tuple[str, bool]:
    """The activation a MatMul/Gemm multiplies its weight with: ``(name, transposed)``."""
    transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transA", 0))
    return node.inputs[0].name, transposed
