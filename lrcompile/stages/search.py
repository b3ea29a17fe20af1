"""The search stage: the plan, one decision per weight group.

rank specs + the calibration's facts (spectra, finite, whitened)
  -> fixed specs: each group's decision from its shape and spectrum
  -> ``auto``: spectra and sensitivities (``measure``, shared by a sweep's settings), then the
     allocation that meets the tolerance or budget (``choose``), each candidate compiled by the
     output's pipeline and measured on the original model (unchanged until the rewrite)
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError
from lrcompile.factors.provider import FactorProvider, ProgressCallback
from lrcompile.plan import Plan
from lrcompile.runtime.latency import model_latencies
from lrcompile.search.auto import AutoResult, MeasuredLayers, choose_ranks, measure_layers
from lrcompile.search.decisions import Planner, uses_auto
from lrcompile.stages.calibrate import Calibrated
from lrcompile.stages.load import Prepared, quantize_template

logger = logging.getLogger(__name__)


def planner(prepared: Prepared, calibrated: Calibrated, config: CompileConfig) -> Planner:
    """The plan of ``prepared``'s groups for any ``auto`` ranks."""
    return Planner(
        prepared.groups,
        prepared.specs,
        calibrated.facts,
        multiple=config.rank_multiple,
        allow_no_saving=config.allow_no_saving,
        quantize=quantize_template(config),
    )


def search(
    prepared: Prepared,
    calibrated: Calibrated,
    config: CompileConfig,
    provider: FactorProvider,
    progress: ProgressCallback | None = None,
) -> tuple[Plan, AutoResult | None]:
    """The plan, and under ``auto`` how its ranks were found."""
    if not uses_auto(prepared.specs):
        return planner(prepared, calibrated, config)(), None
    layers = measure(prepared, calibrated, config, provider, progress)
    return choose(prepared, calibrated, config, provider, layers, progress)


def measure(
    prepared: Prepared,
    calibrated: Calibrated,
    config: CompileConfig,
    provider: FactorProvider,
    progress: ProgressCallback | None = None,
) -> MeasuredLayers:
    """``auto``'s tolerance-independent half: every searched layer's spectrum and sensitivity."""
    return measure_layers(
        prepared.model,
        planner(prepared, calibrated, config),
        provider,
        calibrated.statistics,
        _callback(progress, "sensitivity"),
        calibrated.rows,
        calibrated.noise,
    )


def choose(
    prepared: Prepared,
    calibrated: Calibrated,
    config: CompileConfig,
    provider: FactorProvider,
    layers: MeasuredLayers,
    progress: ProgressCallback | None = None,
) -> tuple[Plan, AutoResult]:
    """The plan of the ranks ``config`` (tolerance, budget, objective) asks for, from
    ``measure``'s layers, each candidate measured on the prepared model (still the original)."""
    plans = planner(prepared, calibrated, config)
    auto = choose_ranks(
        prepared.model,
        plans,
        provider,
        calibrated.statistics,
        config,
        layers,
        on_step=_callback(progress, "searching"),
        on_latency=_callback(progress, "timing"),
    )
    return plans(auto.ranks), auto


def timed(
    calibrated: Calibrated,
    prepared: Prepared,
    auto: AutoResult | None,
    output: Path,
    accuracy_level: int | None = None,
):
    """``auto`` with, under the latency objective, the original and the written model measured
    side by side on the largest fitted calibration batch (the rows the table was measured at),
    quantized weights at ``accuracy_level``.
    The timing only informs: when ONNX Runtime cannot time a model it is logged, not raised."""
    if auto is None or auto.latency is None:
        return auto
    feed = max(calibrated.fitted_feeds(), key=lambda feed: sum(v.size for v in feed.values()))
    try:
        [[dense, compiled]] = model_latencies(
            [prepared.path, output], [feed], accuracy_level=accuracy_level
        )
    except LrcompileError as e:
        logger.warning("the whole-model timing failed, no measured speedup: %s", e)
        return auto
    latency = dataclasses.replace(auto.latency, model_dense=dense, model=compiled)
    return dataclasses.replace(auto, latency=latency)


def _callback(progress: ProgressCallback | None, stage: str):
    """``report(done, total, detail)`` of ``stage`` (None without ``progress``)."""
    if progress is None:
        return None
    return lambda done, total, detail: progress(stage, done, total, detail)
