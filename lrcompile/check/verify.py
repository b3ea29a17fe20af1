"""Accuracy check: run a reference and a candidate model on the same inputs and compare outputs.

Polygraphy's runners run the reference, then the candidate (one model in memory at a time, the
reference's outputs waiting on disk); per output the error is accumulated over all batches:

- relative L2 error ``||y - y_ref|| / ||y_ref||`` over all data (the gate: ``<= tolerance``);
- cosine similarity of the flattened outputs;
- max absolute error.

A relative L2 over all data is used rather than Polygraphy's elementwise default, which fails
compressed models on near-zero outputs (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrcompile.check.gate import check_gate, check_labels
from lrcompile.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_ITERATIONS,
    DEFAULT_TOLERANCE,
    InputShapes,
    checked_shapes,
)
from lrcompile.errors import DataError, LrcompileError, ModelLoadError
from lrcompile.io import data as data_lib
from lrcompile.io.indices import check_index_values
from lrcompile.io.model import load_model
from lrcompile.io.past import is_present
from lrcompile.io.spill import OutputStore
from lrcompile.passes.inputs import index_ranges, synthetic_ranges
from lrcompile.runtime.metrics import ErrorAccumulator, Labels, OutputMetrics, add_batch
from lrcompile.runtime.rows import rows_per_run, split_rows, splittable
from lrcompile.runtime.sessions import (
    create_session,
    integer_weights_note,
    internal_error,
    runtime_errors,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The comparison of every output, and the verdict."""

    outputs: tuple[OutputMetrics, ...]
    tolerance: float
    batches: int
    data_source: str
    synthetic: bool = False
    metric: str = "rel-l2"
    # How ONNX Runtime ran the candidate's integer weights (None: it has none, or an engine).
    integer_weights: str | None = None

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)

    @property
    def worst_relative_l2(self) -> float:
        return max((o.relative_l2 for o in self.outputs), default=0.0)

    @property
    def worst_error(self) -> float:
        """The largest gated error (under ``metric``) of any output."""
        return max((o.error for o in self.outputs), default=0.0)

    @property
    def data_label(self) -> str:
        """Where the data came from, marked SYNTHETIC when it was."""
        data = self.data_source
        if not self.synthetic:
            return data
        return (
            data.replace("synthetic", "SYNTHETIC", 1)
            if "synthetic" in data
            else f"SYNTHETIC {data}"
        )

    @property
    def worst_cache(self) -> str | None:
        """The output with the largest gated error when it is a cache output gated on rel-l2
        under kl/top1/ppl (so the verdict names it and its measure), else None."""
        worst = max(self.outputs, key=lambda o: o.error, default=None)
        classed = worst is None or worst.kl is not None or worst.perplexity is not None
        return None if classed or self.metric not in ("kl", "top1", "ppl") else worst.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "metric": self.metric,
            "batches": self.batches,
            "data_source": self.data_source,
            "synthetic": self.synthetic,
            "integer_weights": self.integer_weights,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def verify(
    reference: str | Path,
    candidate: str | Path,
    *,
    data: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    metric: str = "rel-l2",
    input_shapes: InputShapes | None = None,
    val_ranges: Mapping[str, tuple[float, float]] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    feeds: data_lib.FeedSource | None = None,
    providers: Sequence[str] = ("cpu",),
    engine: bool | None = None,
    labels: Labels | None = None,
    written: bool = False,
    accuracy_level: int | None = None,
    gate_cache: bool = True,
) -> VerifyResult:
    """Compares ``candidate`` against ``reference`` with Polygraphy and ONNX Runtime.

    Args:
        reference, candidate: The original ONNX model, and the one to check against it.
        data: An ``.npz`` of inputs (samples along axis 0); synthetic inputs when None.
        tolerance, metric: Largest error allowed per output, under ``rel-l2``, ``cosine``,
            ``kl``, ``top1`` or ``ppl`` (``lrcompile.runtime.metrics``).
        input_shapes, val_ranges, iterations, seed: Of synthetic inputs: shapes and value
            ranges by input name (``CompileConfig``), how many batches, their seed.
        batch_size: Rows per batch for ``data`` and for a dynamic leading dimension.
        feeds: Ready feeds to use instead of ``data`` (for example the calibration feeds).
        providers: ONNX Runtime's providers, in priority order (``cpu``, ``cuda``, ``tensorrt``).
        engine: The candidate is a TensorRT engine (default: its suffix is .engine or .plan).
        labels: ``(input, output)``: the output's logits predict the input's next entry
            (``("input_ids", "logits")``); adds both perplexities (``ppl``: their ratio).
        written: lrcompile wrote ``candidate`` (a compile's check): its rejection is internal.
        accuracy_level: Of the MatMulNBits ONNX Runtime fuses from the candidate's integer
            weights (None: ONNX Runtime's default, int8 activations).
        gate_cache: Off, KV-cache outputs under kl/top1/ppl are reported, not gated.

    Raises:
        LrcompileError: A model or the data is invalid, or the models' inputs/outputs differ.
        InternalError: ``written``, and the candidate was rejected (kept for a bug report).
    """
    check_gate(tolerance, metric, labels)
    engine = Path(candidate).suffix in (".engine", ".plan") if engine is None else engine
    ref_model = _load_pair(reference, candidate, engine, written, labels)
    if feeds is None:
        feeds = _feeds(ref_model, data, input_shapes, val_ranges, batch_size, iterations, seed)
    outputs = [value.name for value in ref_model.graph.outputs]
    with _quiet_polygraphy():
        runners = _runners(reference, candidate, providers, engine, written, accuracy_level)
        pieces = _run_pair(runners, feeds.feeds, (reference, candidate), written, ref_model)
        accumulators = _accumulate(pieces, outputs, candidate, labels)
    _refuse_degenerate(reference, accumulators, feeds)
    gate = (tolerance, metric, gate_cache)
    metrics = tuple(accumulators[name].metrics(name, *gate) for name in outputs)
    fused = None if engine else integer_weights_note(candidate, accuracy_level)
    batches, source = len(feeds.feeds), feeds.description
    return VerifyResult(metrics, tolerance, batches, source, feeds.synthetic, metric, fused)


def _refuse_degenerate(reference, accumulators, feeds) -> None:
    """No verdict on a reference output that is not finite or identically zero on the data."""
    for name, accumulator in accumulators.items():
        problem = accumulator.reference_problem()
        if problem is not None:
            hint = ", or `val_ranges` to keep synthetic inputs in range" if feeds.synthetic else ""
            raise DataError(
                f"{reference}: output {name!r} is {problem} on {feeds.description}: no verdict"
                " can rest on it; pass `verify_data` (or `calib`) with inputs the model is meant"
                f" for{hint}"
            )


def warn_if_synthetic(feeds: data_lib.FeedSource, doing: str) -> None:
    """The synthetic-data warning of a check."""
    data_lib.warn_if_synthetic(
        feeds,
        doing,
        "random data says little about real inputs",
        "`verify_data`/`data` FILE.npz, or at least `input_shapes` with real sizes",
    )


def _feeds(ref_model, data, shapes, ranges, batch_size, iterations, seed):
    """The check's feeds: ``data`` (an .npz), else synthetic (with the warning)."""
    limits = index_ranges(ref_model.graph)
    feeds = data_lib.input_feeds(
        None if data is None else str(data),
        None,
        data_lib.model_inputs(ref_model),
        shapes=checked_shapes(shapes),
        batch_size=batch_size,
        iterations=iterations,
        seed=seed,
        val_ranges=synthetic_ranges(ref_model.graph) | dict(ranges or {}),
    )
    if not feeds.synthetic:
        check_index_values(feeds.description, feeds.feeds, limits)
    warn_if_synthetic(feeds, "checking")
    return feeds


def _load_pair(reference, candidate, engine: bool, written: bool, labels: Labels | None):
    """The reference model, after checking that the labels fit it and that the candidate exists
    and has its signature."""
    if engine and not Path(candidate).is_file():
        raise ModelLoadError(f"{candidate}: no such file, expected a TensorRT engine")
    ref_model = load_model(reference)
    check_labels(reference, ref_model, labels)
    if engine:
        return ref_model
    try:
        _check_same_signature(reference, candidate, ref_model, load_model(candidate))
    except LrcompileError as e:
        if not written:
            raise
        raise internal_error(f"checking {candidate}", str(e), candidate) from e
    return ref_model


def _accumulate(pieces, outputs, candidate, labels) -> dict[str, ErrorAccumulator]:
    """Each output's error over every (feed, reference, candidate) piece of a batch."""
    accumulators = {
        name: ErrorAccumulator(classes=not is_present(name), cache=is_present(name))
        for name in outputs
    }
    for feed, ref_out, cand_out in pieces:
        missing = [name for name in outputs if name not in cand_out]
        if missing:
            raise LrcompileError(f"{candidate}: has no output {missing[0]!r}")
        add_batch(accumulators, {name: ref_out[name] for name in outputs}, cand_out, feed, labels)
    return accumulators


def _runners(
    reference, candidate, providers: Sequence[str], engine: bool, written: bool, level=None
) -> list:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    if engine:
        from lrcompile.trt.build import engine_runner

        candidate_runner = engine_runner(candidate)
    else:
        loader = _session_loader(candidate, providers, candidate if written else None, level)
        candidate_runner = OnnxrtRunner(loader, name="candidate")
    reference_runner = OnnxrtRunner(_session_loader(reference, providers), name="reference")
    return [reference_runner, candidate_runner]


def _run_pair(
    runners: list, feeds: Iterable[data_lib.Feed], paths: tuple, written: bool, ref_model
) -> Iterable[tuple[data_lib.Feed, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]:
    """Each piece's feed, reference and candidate outputs, one model in memory at a time.

    Polygraphy's runners run the reference on every feed first; its outputs wait on disk (in
    ``TMPDIR``, read back one piece at a time) while the candidate runs, so a check never holds two
    models, nor more than one piece of outputs: batches whose outputs would pass the budget run in
    pieces of rows (``runtime.rows``; an LM's logits).
    """
    reference, candidate = runners
    feeds = list(feeds)
    store = OutputStore(prefix="lrcompile-reference-")
    try:
        with runtime_errors(f"running {paths[0]}"), reference as active:
            infer = lambda piece: list(active.infer(feed_dict=piece).values())  # noqa: E731
            split = splittable((s.shape or (None,))[0] for s in data_lib.model_inputs(ref_model))
            rows = rows_per_run(feeds, infer) if split else None
            feeds = [piece for feed in feeds for piece in split_rows(feed, rows)]
            for feed in feeds:
                store.append(active.infer(feed_dict=feed))
        ours, what = paths[1] if written else None, f"running {paths[1]}"
        with contextlib.ExitStack() as stack:
            with runtime_errors(what, ours):
                active = stack.enter_context(candidate)
            for feed, ref_out in zip(feeds, store, strict=True):
                with runtime_errors(what, ours):
                    out = dict(active.infer(feed_dict=feed))
                yield feed, ref_out, out
    finally:
        store.close()


@contextlib.contextmanager
def _quiet_polygraphy() -> Iterator[None]:
    # The library never prints; Polygraphy logs to stdout, so only its errors get through.
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def _session_loader(path: str | Path, providers: Sequence[str], written=None, level=None):
    def load():
        return create_session(path, providers=providers, written=written, accuracy_level=level)

    return load


def _check_same_signature(reference, candidate, ref_model, cand_model) -> None:
    ref_in = [v.name for v in data_lib.model_inputs(ref_model)]
    cand_in = [v.name for v in data_lib.model_inputs(cand_model)]
    if sorted(ref_in) != sorted(cand_in):
        raise LrcompileError(
            f"{candidate}: inputs {cand_in} differ from the reference {reference}'s {ref_in}"
        )
    ref_out = [v.name for v in ref_model.graph.outputs]
    cand_out = [v.name for v in cand_model.graph.outputs]
    if sorted(ref_out) != sorted(cand_out):
        raise LrcompileError(
            f"{candidate}: outputs {cand_out} differ from the reference {reference}'s {ref_out}"
        )
