"""``--rank auto``: the cheapest ranks whose outputs stay within the tolerance on calibration data.

    whitened factors, each component's energy on the fitted and on the held-back batches
      -> per-layer sensitivity (``lrcompile.search.sensitivity``)
      -> an allocation path per pricing of truncation (``numerics.allocate.PRICINGS``: by the
         held-back energies, the fitted ones, the larger of the two; all-dense ... cheapest), its
         cost per-row FLOPs, parameters, or seconds measured on ONNX Runtime (``search.latency``)
      -> bisection over the paths, each probe compiled by the same pipeline as the output
         (``lrcompile.pipeline``, FP8 included) and run end to end in ONNX Runtime
         (``search.probes``)

The spectra are only an error model; the end-to-end measurement on the calibration data decides:
on the batches held back from the statistics (``CompileConfig.validation``), which the factors
were not fitted to.
Which pricing predicts a model's error best differs by model and budget (on a 0.5B LM the
held-back energies won at 0.9 of the FLOPs and lost at 0.8 and 0.6), so each gets its path and
the measurement chooses. The search keeps the cheapest allocation it measured within the
tolerance (all-dense, error 0, is always within it); within a budget, the one of least measured
error. Bisection assumes the error grows along the path, which it does in practice
but not by construction: every answer it returns was measured, so it may be conservative, never
over the tolerance on the calibration data.

``measure_layers`` (spectra, sensitivities) is the expensive half and does not depend on the
tolerance, budget or objective; ``choose_ranks`` (path, probes) answers one of those from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from lrcompile.calibration.statistics import Calibration
from lrcompile.config import CompileConfig
from lrcompile.numerics.allocate import (
    Allocation,
    LayerSpectrum,
    allocation_path,
    priced,
    pricings,
)
from lrcompile.passes.candidates import WeightGroup
from lrcompile.passes.low_rank import FactorizeLowRankPass
from lrcompile.runtime.latency import LatencyTable, cache_path
from lrcompile.search.latency import LatencyEstimate, estimate, layer_seconds
from lrcompile.search.probes import Prober, SearchStep, search
from lrcompile.search.sensitivity import StepCallback, layer_spectra, measure_sensitivities

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AutoResult:
    """The chosen ranks (by group key; None = dense), what they reach, and how they were found."""

    ranks: dict[str, int | None]
    tolerance: float
    measured_error: float
    cost_ratio: float
    steps: tuple[SearchStep, ...]
    path: tuple[Allocation, ...]
    sensitivities: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    batches: int = 0  # calibration batches in all
    held_back: int = 0  # of them, held back from the statistics: the ones measured on (0: all)
    latency: LatencyEstimate | None = None  # the latency objective's table and prediction
    pricing: str = "fitted"  # whose path the ranks are on (``numerics.allocate.PRICINGS``)

    @property
    def dense_layers(self) -> int:
        """How many of the searched layers the chosen allocation leaves dense."""
        return sum(rank is None for rank in self.ranks.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "measured_error": self.measured_error,
            "cost_ratio": self.cost_ratio,
            "ranks": self.ranks,
            "sensitivities": self.sensitivities,
            "seconds": self.seconds,
            "batches": self.batches,
            "held_back": self.held_back,
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "pricing": self.pricing,
            # A probe whose outputs went non-finite measured no error: null, never NaN/Infinity.
            "steps": [
                dataclasses.asdict(step)
                | {
                    "measured_error": step.measured_error
                    if math.isfinite(step.measured_error)
                    else None
                }
                for step in self.steps
            ],
            "path": [
                {"cost_ratio": a.cost_ratio, "predicted_error": math.sqrt(a.predicted_error)}
                for a in self.path
            ],
        }


@dataclasses.dataclass(frozen=True)
class MeasuredLayers:
    """What every answer of the search starts from: each ``auto`` layer's (whitened) spectrum and
    measured sensitivity, and the seconds they took. It depends on the calibration and the
    factors, not on the tolerance, budget or objective, so one serves several of those."""

    spectra: tuple[LayerSpectrum, ...]
    seconds: dict[str, float]


def measure_layers(
    model: ir.Model,
    groups: Sequence[WeightGroup],
    factorize: FactorizeLowRankPass,
    calibration: Calibration,
    on_sensitivity: StepCallback | None = None,
    rows: Mapping[str, int] | None = None,
) -> MeasuredLayers:
    """The spectra and sensitivities of the ``auto`` layers: what ``choose_ranks`` starts from.

    Args:
        model: The prepared model; it is not modified (one probe model holds every layer).
        groups: Its candidate groups.
        factorize: The configured pass (spec ``auto``, whitening, cache).
        calibration: Feeds and the original model's outputs on them.
        on_sensitivity: Called as ``on_sensitivity(layers_done, layers, layer)``.
        rows: Rows of activation per batch by group key (``Calibration.batch_rows``), what the
            latency objective measures at.
    """
    clock = _Clock()
    spectra = layer_spectra(groups, factorize, rows)
    clock.lap("spectra")
    spectra = measure_sensitivities(
        model, spectra, groups, factorize, calibration, on_step=on_sensitivity
    )
    clock.lap("sensitivity")
    return MeasuredLayers(tuple(spectra), clock.seconds)


def choose_ranks(
    model: ir.Model,
    factorize: FactorizeLowRankPass,
    calibration: Calibration,
    config: CompileConfig,
    layers: MeasuredLayers,
    *,
    on_step: StepCallback | None = None,
    on_latency: StepCallback | None = None,
) -> AutoResult:
    """The cheapest allocation on the path through ``layers`` measured within the tolerance
    (bisection), or the most accurate within ``config.budget`` (measured once).

    Args:
        model: The prepared model; it is not modified (probes run on clones).
        factorize: The configured pass (spec ``auto``, whitening, cache); probes replace its ranks.
        calibration: Feeds and the original model's outputs on them.
        config: The target ``(1 - headroom) * tolerance``, the ``objective``, the ``budget``, and
            the passes every probe runs after factoring (FP8, plugin), so that what is measured
            is what will be written.
        layers: From ``measure_layers``, on the same calibration and factors.
        on_step: Called as ``on_step(probes_done, probes_expected, description)``.
        on_latency: Called as ``on_latency(shapes_done, shapes, shape)`` while the latency
            objective measures the layers' shapes not in its cache.
    """
    clock = _Clock()
    multiple, objective = factorize.rank_multiple, config.objective
    table = seconds = shapes = None
    if objective == "latency":
        table = LatencyTable(cache_path())
        seconds, shapes = layer_seconds(layers.spectra, multiple, table, on_latency)
        clock.lap("latency")
    paths = _paths(layers.spectra, multiple, objective, seconds)
    prober = Prober(model, factorize, calibration, config, paths, on_step)
    pricing, best = search(paths, prober, config.budget)
    clock.lap("bisection")
    prober.done()
    path = paths[pricing]
    measured = prober.error(pricing, best)
    latency = None
    if table is not None:
        latency = estimate(table, path[best].dense_cost, path[best].cost, shapes)
    return AutoResult(
        dict(path[best].ranks),
        prober.tolerance,
        measured,
        path[best].cost_ratio,
        tuple(prober.steps),
        tuple(path),
        {layer.name: layer.sensitivity for layer in layers.spectra},
        layers.seconds | clock.seconds,
        len(calibration.feeds),
        calibration.held_back,
        latency,
        pricing,
    )


def _paths(spectra, multiple, objective, seconds) -> dict[str, list[Allocation]]:
    """The allocation path of each pricing (``numerics.allocate.pricings``) of ``spectra``."""
    return {
        pricing: allocation_path(
            [priced(layer, pricing) for layer in spectra],
            multiple=multiple,
            objective=objective,
            seconds=seconds,
        )
        for pricing in pricings(spectra)
    }


class _Clock:
    """Seconds per stage, from one lap to the next."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now
