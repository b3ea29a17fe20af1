"""``--rank auto``: the cheapest ranks whose outputs stay within the tolerance on calibration data.

    whitened spectra -> per-layer sensitivity (``lrcompile.search.sensitivity``)
      -> allocation path (``lrcompile.numerics.allocate``: all-dense ... cheapest), its cost
         per-row FLOPs, parameters, or seconds measured on ONNX Runtime (``search.latency``)
      -> bisection over the path, each probe compiled by the same pipeline as the output
         (``lrcompile.pipeline``, FP8 included) and run end to end in ONNX Runtime

The spectra are only an error model; the end-to-end measurement on the calibration data decides:
on the batches held back from the statistics (``CompileConfig.validation``), which the factors
were not fitted to.
The search keeps the cheapest allocation it measured within the tolerance (all-dense, error 0, is
always within it). Bisection assumes the error grows along the path, which it does in practice
but not by construction: every answer it returns was measured, so it may be conservative, never
over the tolerance on the calibration data.

``measure_layers`` (spectra, sensitivities) is the expensive half and does not depend on the
tolerance, budget or objective; ``choose_ranks`` (path, probes) answers one of those from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from lrcompile import pipeline
from lrcompile.calibration.ranges import RangeCalibration
from lrcompile.calibration.statistics import Calibration
from lrcompile.config import CompileConfig
from lrcompile.factors.provider import FactorProvider
from lrcompile.io.spill import Spill
from lrcompile.numerics.allocate import (
    Allocation,
    LayerSpectrum,
    QuantizedLayer,
    allocation_path,
    most_accurate_within,
)
from lrcompile.passes.quantized import tensor_names
from lrcompile.runtime.latency import LatencyTable, cache_path
from lrcompile.runtime.metrics import measure_error
from lrcompile.search.decisions import Planner
from lrcompile.search.latency import LatencyEstimate, estimate, objective_seconds
from lrcompile.search.sensitivity import (
    StepCallback,
    layer_spectra,
    measure_quantized_sensitivities,
    measure_sensitivities,
    quantized_layers,
)

logger = logging.getLogger(__name__)

# The bisection stops when the cheapest allocation measured within the tolerance and the most
# expensive one measured over it differ by at most this fraction of the dense cost: the last
# halvings of a 4,000-point path (a 0.5B LM) would each cost a full run over the calibration data
# to gain less than this.
RESOLUTION = 0.005


@dataclasses.dataclass(frozen=True)
class SearchStep:
    """One probe of the bisection: a point on the path and its measured output error."""

    index: int
    cost_ratio: float
    predicted_error: float  # the allocation's predicted relative L2 (sqrt of its squared error)
    measured_error: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class AutoResult:
    """The chosen ranks (by group key; None = dense; with ``quantize`` the correction's rank or
    ``"int8"``), what they reach, and how they were found."""

    ranks: dict[str, int | str | None]
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
    # Each searched layer's predicted relative L2 of the outputs from its choice alone.
    predicted: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def local(self) -> dict[str, float]:
        """Each searched layer's predicted relative L2 of its own output (``predicted`` without
        its sensitivity): what ``check.layer_errors`` measures."""
        sensitivity = self.sensitivities
        return {
            name: error / math.sqrt(sensitivity[name]) if sensitivity.get(name) else 0.0
            for name, error in self.predicted.items()
        }

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
            "predicted": self.predicted,
            "local": self.local,
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

    spectra: tuple[LayerSpectrum | QuantizedLayer, ...]
    seconds: dict[str, float]


def measure_layers(
    model: ir.Model,
    planner: Planner,
    provider: FactorProvider,
    calibration: Calibration,
    on_sensitivity: StepCallback | None = None,
    rows: Mapping[str, int] | None = None,
    noise: Mapping[str, float | None] | None = None,
) -> MeasuredLayers:
    """The spectra and sensitivities of the ``auto`` layers: what ``choose_ranks`` starts from.

    Args:
        model: The prepared model; it is not modified (one probe model holds every layer).
        planner: The plan of its candidate groups for any ranks (specs, facts).
        provider: Holds every ``auto`` layer's cached factors.
        calibration: Feeds and the original model's outputs on them.
        on_sensitivity: Called as ``on_sensitivity(layers_done, layers, layer)``.
        rows: Rows of activation per batch by group key (``Calibration.batch_rows``), what the
            latency objective measures at.
        noise: The rounding noise of DynamicQuantizeLinear on each group's input, by group key
            (``Calibration.dynamic_noise``): with ``quantize``, what its W8A8 option costs.
    """
    clock = _Clock()
    if planner.quantize is not None:
        layers = quantized_layers(planner, provider, rows, noise)
        clock.lap("spectra")
        layers = measure_quantized_sensitivities(
            model, layers, planner, provider, calibration, on_step=on_sensitivity
        )
        clock.lap("sensitivity")
        return MeasuredLayers(tuple(layers), clock.seconds)
    spectra = layer_spectra(planner, provider, rows)
    clock.lap("spectra")
    spectra = measure_sensitivities(
        model, spectra, planner, provider, calibration, on_step=on_sensitivity
    )
    clock.lap("sensitivity")
    return MeasuredLayers(tuple(spectra), clock.seconds)


def choose_ranks(
    model: ir.Model,
    planner: Planner,
    provider: FactorProvider,
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
        planner: The plan of its candidate groups for any ranks; a probe plans the path's ranks.
        provider: Fits each probe's factors (``auto`` layers from its cache).
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
    multiple, objective = planner.multiple, config.objective
    table = seconds = shapes = None
    if objective == "latency":
        table = LatencyTable(cache_path())
        level, spectra = config.accuracy_level, layers.spectra
        seconds, shapes = objective_seconds(
            spectra, planner.quantize, multiple, level, table, on_latency
        )
        clock.lap("latency")
    path = allocation_path(layers.spectra, multiple=multiple, objective=objective, seconds=seconds)
    prober = _Prober(model, planner, provider, calibration, config, path, on_step)
    if config.budget is not None:
        best = most_accurate_within(path, config.budget)
        prober(best)
    else:
        best = _bisect([allocation.cost_ratio for allocation in path], prober)
    clock.lap("bisection")
    prober.done()
    measured = next((s.measured_error for s in prober.steps if s.index == best), 0.0)
    chosen = path[best]
    latency = estimate(table, chosen.dense_cost, chosen.cost, shapes) if table is not None else None
    return AutoResult(
        dict(chosen.ranks), prober.tolerance, measured, chosen.cost_ratio, tuple(prober.steps),
        tuple(path), {layer.name: layer.sensitivity for layer in layers.spectra},
        layers.seconds | clock.seconds, len(calibration.feeds), calibration.held_back, latency,
        {name: math.sqrt(error) for name, error in chosen.errors.items()},
    )  # fmt: skip


class _Clock:
    """Seconds per stage, from one lap to the next."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


class _Prober:
    """Compiles the allocation at a path index like the output, measures it, records the step."""

    def __init__(self, model, planner, provider, calibration, config, path, on_step) -> None:
        self.model, self.planner, self.provider = model, planner, provider
        self.calibration, self.config, self.path, self.on_step = calibration, config, path, on_step
        self.tolerance = config.tolerance * (1.0 - config.headroom)
        # FP8 ranges from the fitted batches only, as in the output (``stages.rewrite``).
        self.ranges = RangeCalibration(calibration.fitted_feeds(), config.fp8_calib)
        span = path[0].cost_ratio - path[-1].cost_ratio if path else 0.0
        self.expected = int(np.ceil(np.log2(max(min(len(path), span / RESOLUTION), 2)))) + 1
        self.steps: list[SearchStep] = []

    def __call__(self, index: int) -> bool:
        allocation = self.path[index]
        if self.on_step is not None:
            self.on_step(len(self.steps), self.expected, f"cost x{allocation.cost_ratio:.3f}")
        predicted = math.sqrt(allocation.predicted_error)  # relative L2, as measured (rel-l2)
        # The probe's factors wait on disk, and its unchanged weights stay where they are (the
        # clone shares them): the session holds about one copy of the model.
        with tempfile.TemporaryDirectory(prefix="lrcompile-probe-") as folder:
            candidate = self.model.clone()
            plan, spill = self.planner(allocation.ranks), Spill(folder)
            names, quantized_names = tensor_names(candidate, self.planner.groups, plan)
            groups = self.planner.groups
            fitted = self.provider.fit(groups, plan, names, spill=spill, weight_errors=False)
            quantized = self.provider.fit_quantized(
                groups, plan, quantized_names, spill=spill, weight_errors=False
            )
            factors = {key: each.pair for key, each in fitted.items()}
            pipeline.apply(candidate, plan, factors, self.config, self.ranges, quantized)
            feeds, reference = self.calibration.measured()  # batches not fitted to
            config = self.config
            error = measure_error(
                candidate, feeds, reference, config.metric, config.labels, config.accuracy_level,
                config.gate_cache,
            )  # fmt: skip
            del candidate, fitted, factors, quantized
        passed = error <= self.tolerance
        self.steps.append(SearchStep(index, allocation.cost_ratio, predicted, error, passed))
        logger.info(
            "auto probe %d/%d: cost x%.3f, predicted %.3g, measured %.4f (%s)",
            index,
            len(self.path) - 1,
            allocation.cost_ratio,
            predicted,
            error,
            "within" if passed else "over",
        )
        return passed

    def done(self) -> None:
        if self.on_step is not None:
            self.on_step(self.expected, self.expected, "done")


def _bisect(costs: Sequence[float], passes: Callable[[int], bool]) -> int:
    """The largest index in [0, len(costs)) with ``passes(index)``, index 0 assumed to pass,
    to within ``RESOLUTION`` of the cost: it stops once the passing and failing ends of the
    bracket differ by at most that (``costs`` falls along the path)."""
    low, high = 0, len(costs) - 1
    if high == 0 or passes(high):
        return high
    while high - low > 1 and costs[low] - costs[high] > RESOLUTION:
        middle = (low + high) // 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low
