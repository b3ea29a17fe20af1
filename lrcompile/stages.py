"""The stages of ``compile_model`` (and ``inspect_model``), each a function of what came before.

    load -> find candidates -> calibrate -> search -> rewrite -> save -> verify

``load`` prepares the model for the passes and finds the candidates; ``calibrate`` plans the
calibration (which layers' statistics are gathered together) and, for ``auto``, gathers them;
``search`` configures the factorize pass (whitening, the ``auto`` ranks); ``rewrite`` runs the
pipeline, calibrating each chunk of layers just before it is factored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from lrcompile.calibration import chunks as calibration_chunks
from lrcompile.calibration import refusals
from lrcompile.calibration.ranges import RangeCalibration
from lrcompile.calibration.statistics import Calibration, calibrate
from lrcompile.check.verify import check_labels
from lrcompile.config import DEFAULT_ITERATIONS, CompileConfig
from lrcompile.io import data as data_lib
from lrcompile.io import model as model_io
from lrcompile.io.spill import OutputStore, Spill
from lrcompile.passes.candidates import Skipped, WeightGroup, find_candidates, ops_left_alone
from lrcompile.passes.factor_cache import FactorCache
from lrcompile.passes.inputs import index_ranges
from lrcompile.passes.low_rank import FactorizeLowRankPass, ProgressCallback, effective_weight
from lrcompile.passes.opset import with_fp8_opset
from lrcompile.pipeline import Chunk, PipelineResult, build_pipeline
from lrcompile.search.auto import AutoResult, MeasuredLayers, choose_ranks, measure_layers

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The model ready for the passes, its run-time inputs, and its candidates."""

    path: Path
    model: ir.Model
    inputs: list[data_lib.InputSpec]
    groups: list[WeightGroup]
    skipped: list[Skipped]
    left_alone: list[tuple[str, str, int]]  # (op, why, count) of ops lrcompile does not factor


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """The calibration plan: the feeds, and the chunks of layers whose statistics are gathered
    in one run of the original model, so that only one chunk's Gram matrices are ever in memory.
    Under ``auto`` the first chunk is gathered up front with the model's reference outputs
    (``statistics``) and the others by the search (``chunk_statistics``); otherwise each chunk is
    gathered when the rewrite reaches it."""

    prepared: Prepared
    source: data_lib.FeedSource | None
    chunks: tuple[tuple[WeightGroup, ...], ...]
    statistics: Calibration | None = None
    fitted: int | None = None  # auto: the statistics are of the first ``fitted`` batches
    # Temporary files to remove with the plan (``close``): the auto search's factor cache.
    scratch: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def whitened_chunks(self, progress: ProgressCallback | None = None) -> Iterator[Chunk]:
        """Each chunk's group keys and, where this plan gathers it, its whitening.

        Every chunk is calibrated on the ORIGINAL model, serialized before the first chunk is
        factored (the caller rewrites the model in place between chunks).
        """
        if self.statistics is not None or self.source is None:
            # auto (the search set the factors and ranks) or uncalibrated: one chunk, the
            # factorize pass's own whitening, if any.
            yield frozenset(group.key for group in self.prepared.groups), None
            return
        for chunk, statistics in zip(self.chunks, self.chunk_statistics(progress), strict=True):
            # whitening() frees the Gram matrices: only the Cholesky factors are kept.
            yield frozenset(group.key for group in chunk), statistics.whitening(chunk)

    def fitted_feeds(self) -> list:
        """The feeds factors and FP8 ranges may fit (under ``auto``, the first ``fitted``)."""
        return self.source.feeds if self.fitted is None else self.source.feeds[: self.fitted]

    def held_back_feeds(self) -> list:
        """The feeds ``auto`` held back from fitting, to measure on (none otherwise)."""
        return [] if self.fitted is None else self.source.feeds[self.fitted :]

    def close(self) -> None:
        """Removes the reference outputs' and the factor cache's files now (else when
        collected, or at exit)."""
        reference = self.statistics.reference if self.statistics is not None else None
        for closable in [reference, *self.scratch]:
            if isinstance(closable, OutputStore | FactorCache):
                closable.close()

    def chunk_statistics(self, progress: ProgressCallback | None = None) -> Iterator[Calibration]:
        """Each chunk's statistics in turn, each gathered by one run of the ORIGINAL model
        (serialized once, before the caller changes it); under ``auto`` the first chunk's are
        ``statistics``, gathered with the reference outputs."""
        report = _stage(progress, "calibrating") or (lambda done, total, detail: None)
        gathered = self.chunks[1:] if self.statistics is not None else self.chunks
        original = ir.serde.serialize_model(self.prepared.model) if gathered else None
        for index, chunk in enumerate(self.chunks):
            if index == 0 and self.statistics is not None:
                yield self.statistics
                continue
            report(index, len(self.chunks), f"{len(chunk)} layers")
            yield self._gather(chunk, keep_reference=False, model=original)
        report(len(self.chunks), len(self.chunks), "")

    def _gather(self, groups, *, keep_reference: bool, on_batch=None, model=None) -> Calibration:
        prepared = self.prepared
        return calibrate(
            model if model is not None else ir.serde.serialize_model(prepared.model),
            groups,
            self.source,
            data_folder=prepared.path.parent,
            keep_reference=keep_reference,
            on_batch=on_batch,
            fitted=self.fitted,
        )


def load(path: Path, config: CompileConfig, output_path: Path | None = None) -> Prepared:
    """The model at ``path``, prepared: initializers dropped from the graph inputs (old exporters
    list weights as optional inputs, which are no constants until removed), opset >= 19 under
    FP8, and its candidates found (the graph is unchanged until the rewrite).

    Raises:
        LrcompileError: The model is invalid, or ``output_path`` is not usable.
    """
    model = model_io.load_model(path)
    if output_path is not None:
        model_io.check_output_path(path, output_path)
    check_labels(path, model, config.labels)
    inputs = data_lib.model_inputs(model)
    RemoveInitializersFromInputsPass()(model)
    if config.fp8:
        model = with_fp8_opset(model, path)
    groups, skipped = find_candidates(model.graph, model.functions.values())
    return Prepared(path, model, inputs, groups, skipped, ops_left_alone(model))


def plan_calibration(
    prepared: Prepared,
    config: CompileConfig,
    factorize: FactorizeLowRankPass,
    progress: ProgressCallback | None = None,
) -> Calibrated:
    """The calibration plan; under ``auto``, its first chunk gathered with the reference outputs."""
    auto = uses_auto(factorize, prepared.groups)
    if not (config.calibrated or auto):
        return Calibrated(prepared, None, (tuple(prepared.groups),))
    source = calibration_source(prepared, config)
    if not auto:
        _warn_if_synthetic(source)
        return Calibrated(
            prepared, source, calibration_chunks.memory_chunks(prepared.model, prepared.groups)
        )
    chunks = calibration_chunks.memory_chunks(prepared.model, prepared.groups, auto=True)
    plan = Calibrated(prepared, source, chunks, fitted=fitted_batches(source, config.validation))
    on_batch = _stage(progress, "calibrating")
    statistics = plan._gather(chunks[0], keep_reference=True, on_batch=on_batch)
    return dataclasses.replace(plan, statistics=statistics)


def fitted_batches(source: data_lib.FeedSource, validation: float) -> int | None:
    """Batches auto fits to: all but ceil(validation x batches); None: no split (0, or 1 batch)."""
    batches = len(source.feeds)
    if not validation:
        return None
    if batches < 2:
        logger.warning(
            "auto: one calibration batch (%s), nothing to hold back: candidates are measured on"
            " the data their factors were fitted to, which flatters them; give more rows or a"
            " smaller --batch-size",
            source.description,
        )
        return None
    held = math.ceil(round(validation * batches, 9))  # 0.07 x 100 is 7.000000000000001
    return batches - min(held, batches - 1)


def search(
    plan: Calibrated,
    config: CompileConfig,
    factorize: FactorizeLowRankPass,
    progress: ProgressCallback | None = None,
) -> tuple[FactorizeLowRankPass, AutoResult | None]:
    """The factorize pass with whitening and, under ``auto``, the searched ranks."""
    if plan.statistics is None:
        return factorize, None
    factorize, layers = measure(plan, factorize, progress)
    return choose(plan, config, factorize, layers, progress)


def measure(
    plan: Calibrated, factorize: FactorizeLowRankPass, progress: ProgressCallback | None = None
) -> tuple[FactorizeLowRankPass, MeasuredLayers]:
    """``auto``'s tolerance-independent half: every layer's factors (cached on disk, removed with
    the plan), spectrum and sensitivity; returns the pass with the cache and the whitening."""
    prepared, statistics = plan.prepared, plan.statistics
    refusals.refuse_degenerate_output(statistics, prepared.path, plan.source)
    # auto compiles many candidates from the same decompositions: cache them (on disk).
    factorize = dataclasses.replace(factorize, cache=FactorCache())
    plan.scratch.append(factorize.cache)
    start = time.perf_counter()
    factorize = _cache_factors(plan, factorize, progress)
    seconds = {"factors": time.perf_counter() - start}  # further calibration chunks, SVDs
    _warn_if_synthetic(plan.source)  # after the checks: a refusal is the one line the user sees
    layers = measure_layers(
        prepared.model, prepared.groups, factorize, statistics, _stage(progress, "sensitivity")
    )
    return factorize, dataclasses.replace(layers, seconds=seconds | layers.seconds)


def choose(
    plan: Calibrated,
    config: CompileConfig,
    factorize: FactorizeLowRankPass,
    layers: MeasuredLayers,
    progress: ProgressCallback | None = None,
) -> tuple[FactorizeLowRankPass, AutoResult]:
    """The ranks ``config`` (tolerance, budget, objective) asks for, from ``measure``'s layers,
    each candidate measured on the prepared model (which must still be the original)."""
    prepared = plan.prepared
    auto = choose_ranks(
        prepared.model,
        factorize,
        plan.statistics,
        config,
        layers,
        on_step=_stage(progress, "searching"),
    )
    return dataclasses.replace(factorize, chosen_ranks=auto.ranks), auto


def rewrite(
    plan: Calibrated,
    config: CompileConfig,
    factorize: FactorizeLowRankPass,
    scratch: Path | None,
    progress: ProgressCallback | None = None,
) -> PipelineResult:
    """Runs the pipeline on the prepared model, chunk by chunk of layers.

    With a ``scratch`` folder (large models), each layer's factors are spilled there as they are
    made, so memory holds a few weights at a time, not the model.
    """
    prepared = plan.prepared
    factorize = dataclasses.replace(
        factorize,
        progress=progress,
        jobs=config.jobs,
        device=config.device,
        spill=Spill(scratch) if scratch is not None else None,
    )
    ranges = RangeCalibration(plan.fitted_feeds(), config.fp8_calib) if config.fp8 else None
    pipeline = build_pipeline(factorize, config)
    return pipeline.run(prepared.model, ranges=ranges, chunks=plan.whitened_chunks(progress))


def feeds(
    prepared: Prepared, config: CompileConfig, npz: str | None, script: str | None = None
) -> data_lib.FeedSource:
    """Feeds from an ``.npz``, a script, or synthetic (``npz`` None or ``synthetic``), with
    ``config``'s shapes and value ranges (index inputs kept within their tables).

    Raises:
        DataError: The data does not fit the model.
    """
    return data_lib.input_feeds(
        npz,
        script,
        prepared.inputs,
        shapes=config.input_shapes,
        batch_size=config.batch_size,
        iterations=DEFAULT_ITERATIONS,
        seed=config.seed,
        val_ranges=index_ranges(prepared.model.graph) | dict(config.val_ranges),
    )


def _cache_factors(
    plan: Calibrated, factorize: FactorizeLowRankPass, progress
) -> FactorizeLowRankPass:
    """Chunk by chunk, whitens the layers one activation at a time, refuses degenerate
    activations, and caches each ``auto`` layer's factors; returns the pass with the whitening of
    the other layers (their override's spec needs it when the model is rewritten)."""
    kept = {}
    for chunk, statistics in zip(plan.chunks, plan.chunk_statistics(progress), strict=True):
        kept |= _cache_chunk(plan, statistics, chunk, factorize)
    return dataclasses.replace(factorize, whitening=kept)


def _cache_chunk(plan, statistics: Calibration, chunk, factorize) -> dict:
    kept = {}
    for members, white in statistics.whitenings(chunk):
        whitening = {group.key: white for group in members}
        refusals.refuse_degenerate_input(
            statistics, plan.prepared.path, plan.source, members, whitening
        )
        whitened = dataclasses.replace(factorize, whitening=whitening)
        for group in members:
            searched = factorize.spec_for(group).kind == "auto" and not factorize.refusal(group)
            weight = effective_weight(group) if searched else None
            if searched and np.all(np.isfinite(weight)):
                whitened.cached(group, weight)
            else:
                kept[group.key] = white
    return kept


def calibration_source(prepared: Prepared, config: CompileConfig) -> data_lib.FeedSource:
    """The calibration feeds ``config`` names (synthetic when it names none).

    Raises:
        DataError: The data does not fit the model.
    """
    return feeds(prepared, config, config.calib, config.calib_script)


def _warn_if_synthetic(source: data_lib.FeedSource) -> None:
    data_lib.warn_if_synthetic(
        source,
        "calibrating",
        "random data makes a weak calibration and an untrustworthy 'auto' search",
        "--calib FILE.npz or --calib-script FILE.py",
    )


def uses_auto(factorize: FactorizeLowRankPass, groups: Sequence[WeightGroup]) -> bool:
    """Whether any group's spec is ``auto``."""
    return any(factorize.spec_for(group).kind == "auto" for group in groups)


def _stage(progress: ProgressCallback | None, stage: str) -> Callable | None:
    if progress is None:
        return None
    return lambda done, total, detail: progress(stage, done, total, detail)
