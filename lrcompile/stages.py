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
from collections.abc import Sequence
from pathlib import Path

from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from lrcompile.calibration import chunks as calibration_chunks
from lrcompile.calibration import refusals
from lrcompile.calibration.ranges import RangeCalibration
from lrcompile.calibration.statistics import Calibration, padding_share
from lrcompile.check.verify import check_labels
from lrcompile.config import DEFAULT_ITERATIONS, DEFAULT_PADDING_MASK, CompileConfig
from lrcompile.errors import DataError, LrcompileError
from lrcompile.io import data as data_lib
from lrcompile.io import model as model_io
from lrcompile.io.spill import Spill
from lrcompile.passes.candidates import WeightGroup, find_candidates, ops_left_alone
from lrcompile.passes.factor_cache import FactorCache
from lrcompile.passes.inputs import index_ranges
from lrcompile.passes.low_rank import FactorizeLowRankPass, ProgressCallback
from lrcompile.passes.opset import with_fp8_opset
from lrcompile.pipeline import PipelineResult, build_pipeline
from lrcompile.plan import Calibrated, Prepared, stage_callback
from lrcompile.runtime.latency import model_latencies
from lrcompile.search.auto import AutoResult, MeasuredLayers, choose_ranks, measure_layers

logger = logging.getLogger(__name__)


def load(path: Path, config: CompileConfig, outputs: Sequence[Path] = ()) -> Prepared:
    """The model at ``path``, prepared: initializers dropped from the graph inputs (old exporters
    list weights as optional inputs, which are no constants until removed), opset >= 19 under
    FP8, and its candidates found (the graph is unchanged until the rewrite).

    Raises:
        LrcompileError: The model is invalid, or one of ``outputs`` is not usable.
    """
    model = model_io.load_model(path)
    for output_path in outputs:
        model_io.check_output_path(path, output_path)
    check_labels(path, model, config.labels)
    inputs = data_lib.model_inputs(model)
    RemoveInitializersFromInputsPass()(model)
    if config.fp8:
        model = with_fp8_opset(model, path)
    groups, skipped = find_candidates(model.graph, model.functions.values())
    return Prepared(path, model, inputs, groups, skipped, ops_left_alone(model))


def check_device(device: str) -> None:
    """Checks that torch can reach a GPU when ``device`` is ``cuda``."""
    if device == "cuda":
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise LrcompileError(
                "--device cuda needs torch with a CUDA GPU; none is available here"
                " (the CPU path, --device cpu, needs no torch)"
            )


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
    model, groups = prepared.model, prepared.groups
    compensate = config.compensate and groups
    blocks = calibration_chunks.blocks(model, groups, config.compensate) if compensate else None
    chunks = calibration_chunks.memory_chunks(model, groups)
    if not auto:
        _warn_if_synthetic(source)
        return Calibrated(prepared, source, chunks, blocks=blocks)
    fitted = fitted_batches(source, config.validation)
    plan = Calibrated(prepared, source, chunks, fitted=fitted, blocks=blocks)
    on_batch = stage_callback(progress, "calibrating")
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
    factorize, rows = _cache_factors(plan, factorize, progress)
    seconds = {"factors": time.perf_counter() - start}  # further calibration chunks, SVDs
    _warn_if_synthetic(plan.source)  # after the checks: a refusal is the one line the user sees
    layers = measure_layers(
        prepared.model,
        prepared.groups,
        factorize,
        statistics,
        stage_callback(progress, "sensitivity"),
        rows,
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
        on_step=stage_callback(progress, "searching"),
        on_latency=stage_callback(progress, "timing"),
    )
    return dataclasses.replace(factorize, chosen_ranks=auto.ranks), auto


def timed(plan: Calibrated, auto: AutoResult | None, output: Path) -> AutoResult | None:
    """``auto`` with, under the latency objective, the original and the written model measured
    side by side on the largest fitted calibration batch (the rows the table was measured at).
    The timing only informs: when ONNX Runtime cannot time a model it is logged, not raised."""
    if auto is None or auto.latency is None:
        return auto
    feed = max(plan.fitted_feeds(), key=lambda feed: sum(v.size for v in feed.values()))
    try:
        [[dense, compiled]] = model_latencies([plan.prepared.path, output], [feed])
    except LrcompileError as e:
        logger.warning("the whole-model timing failed, no measured speedup: %s", e)
        return auto
    latency = dataclasses.replace(auto.latency, model_dense=dense, model=compiled)
    return dataclasses.replace(auto, latency=latency)


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
) -> tuple[FactorizeLowRankPass, dict[str, int]]:
    """Chunk by chunk, whitens the layers one activation at a time, refuses degenerate
    activations, and caches each ``auto`` layer's factors; returns the pass with the whitening of
    the other layers (their override's spec needs it when the model is rewritten), and each
    layer's rows per batch."""
    kept, rows = {}, {}
    for chunk, statistics in zip(plan.chunks, plan.chunk_statistics(progress), strict=True):
        rows |= {group.key: statistics.batch_rows(group) for group in chunk}
        kept |= _cache_chunk(plan, statistics, chunk, factorize)
    return dataclasses.replace(factorize, whitening=kept), rows


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
            if not (searched and whitened.cache_finite(group) is not None):
                kept[group.key] = white
    return kept


def calibration_source(prepared: Prepared, config: CompileConfig) -> data_lib.FeedSource:
    """The calibration feeds ``config`` names (synthetic when it names none).

    Its ``mask`` is ``config.padding_mask`` when the model has that input as ``[batch,
    sequence]``, the data is not synthetic, and the mask holds padding (zeros; only 0 and 1).

    Raises:
        DataError: The data does not fit the model, or ``--padding-mask`` names an input it
            lacks (the default name is used only where it exists).
    """
    source = feeds(prepared, config, config.calib, config.calib_script)
    mask = padding_mask(prepared.inputs, config.padding_mask)
    if mask is None or source.synthetic:
        return source  # a synthetic mask's zeros are random, not padding
    padding = padding_share(source.feeds, mask)
    if padding is None:
        if config.padding_mask != DEFAULT_PADDING_MASK:
            raise DataError(
                f"--padding-mask {mask!r}: the calibration data holds values other than 0 and 1"
                ' in it; expected 1 at real tokens and 0 at padding (pass "" to count every row)'
            )
        logger.warning(
            "%s holds values other than 0 and 1 (an additive mask?): padding is not left out of"
            " the calibration statistics; --padding-mask names a 0/1 mask",
            mask,
        )
        return source
    if padding >= 1.0:
        raise DataError(
            f"--padding-mask {mask!r}: every position of the calibration data is padding (0):"
            ' no rows to fit the factors to; pass "" to count every row'
        )
    return dataclasses.replace(source, mask=mask, padding=padding) if padding else source


def statistics_description(source: data_lib.FeedSource) -> str:
    """What calibration statistics of ``source``'s feeds are of: its description, and the
    padding they leave out where activations line up with the mask."""
    if source.mask is None:
        return source.description
    return (
        f"{source.description} (its padding, {source.mask} == 0 at {source.padding:.0%} of"
        " positions, left out of the statistics of activations that line up with it)"
    )


def padding_mask(inputs: Sequence[data_lib.InputSpec], name: str) -> str | None:
    """``name`` when it is a 2-D model input (a ``[batch, sequence]`` padding mask), else None.

    Raises:
        DataError: ``name`` is not the default and not a 2-D input.
    """
    spec = next((spec for spec in inputs if spec.name == name), None)
    if spec is not None and len(spec.shape) == 2:
        return name
    if name and name != DEFAULT_PADDING_MASK:
        found = f"of shape {list(spec.shape)}" if spec is not None else "not an input"
        raise DataError(
            f"--padding-mask {name!r}: {found} of the model; expected a [batch, sequence] input"
            f' (inputs: {", ".join(s.name for s in inputs)}), or "" to count every row'
        )
    return None


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
