"""``--rank auto``: the cheapest ranks whose outputs stay within the tolerance on calibration data.

    whitened spectra -> per-layer sensitivity (one end-to-end probe per layer)
      -> allocation path (lrcompile.allocate: all-dense ... cheapest)
      -> bisection over the path, each probe compiled and run end to end in ONNX Runtime

A layer's sensitivity is the squared relative error of the model's outputs when that layer alone
is factored at half its break-even rank, divided by the layer's own predicted relative squared
error there: how much of its error reaches the outputs. It is measured on the first
``SENSITIVITY_BATCHES`` calibration batches. On MiniLM's embeddings it spans ~300x (attention
projections ~0.02, MLP layers up to ~7), which the spectra alone cannot see.

The spectra are only an error model; the end-to-end measurement on the calibration data decides.
The search keeps the cheapest allocation it measured within the tolerance (all-dense, error 0, is
always within it). Bisection assumes the error grows along the path, which it does in practice
but not by construction: every answer it returns was measured, so it may be conservative, never
over the tolerance on the calibration data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lrcompile.allocate import (
    Allocation,
    LayerSpectrum,
    Objective,
    allocation_path,
    most_accurate_within,
)
from lrcompile.calibrate import Calibration
from lrcompile.candidates import WeightGroup
from lrcompile.passes.low_rank import FactorizeLowRankPass, effective_weight
from lrcompile.runtime import create_session, runtime_errors
from lrcompile.verify import ErrorAccumulator

logger = logging.getLogger(__name__)

SENSITIVITY_BATCHES = 2

StepCallback = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class SearchStep:
    """One probe of the bisection: a point on the path and its measured output error."""

    index: int
    cost_ratio: float
    predicted_error: float
    measured_error: float
    passed: bool


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "measured_error": self.measured_error,
            "cost_ratio": self.cost_ratio,
            "ranks": self.ranks,
            "sensitivities": self.sensitivities,
            "seconds": self.seconds,
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "path": [
                {"cost_ratio": a.cost_ratio, "predicted_error": a.predicted_error}
                for a in self.path
            ],
        }


def layer_spectra(
    groups: Sequence[WeightGroup], factorize: FactorizeLowRankPass
) -> list[LayerSpectrum]:
    """The (whitened) squared singular values of every group whose spec is ``auto``."""
    spectra = []
    for group in groups:
        if factorize.spec_for(group).kind != "auto":
            continue
        weight = effective_weight(group)
        if not np.all(np.isfinite(weight)):
            continue
        _, s, _ = factorize.svd(group, weight)
        k, n = group.shape
        energies = np.square(np.asarray(s, dtype=np.float64))
        spectra.append(LayerSpectrum(group.key, k, n, energies, len(group.nodes)))
    return spectra


def measure_sensitivities(
    model: ir.Model,
    model_folder: str | Path,
    spectra: Sequence[LayerSpectrum],
    factorize: FactorizeLowRankPass,
    calibration: Calibration,
    *,
    on_step: StepCallback | None = None,
) -> list[LayerSpectrum]:
    """``spectra`` with each layer's measured sensitivity (see the module docstring)."""
    subset = dataclasses.replace(
        calibration,
        feeds=calibration.feeds[:SENSITIVITY_BATCHES],
        reference=calibration.reference[:SENSITIVITY_BATCHES],
    )
    result = []
    for index, layer in enumerate(spectra):
        if on_step is not None:
            on_step(index, len(spectra), layer.name)
        rank = _probe_rank(layer, factorize.rank_multiple)
        predicted = float(layer.energies[rank:].sum() / max(layer.energies.sum(), 1e-300))
        if rank is None or predicted <= 0.0:
            result.append(layer)  # nothing to learn: keep the neutral sensitivity
            continue
        candidate = model.clone()
        dataclasses.replace(factorize, chosen_ranks={layer.name: rank}, progress=None)(candidate)
        error = measure_error(candidate, model_folder, subset)
        sensitivity = error**2 / predicted
        logger.debug("%s: sensitivity %.3g (rank %d)", layer.name, sensitivity, rank)
        result.append(dataclasses.replace(layer, sensitivity=max(sensitivity, 1e-12)))
    if on_step is not None:
        on_step(len(spectra), len(spectra), "")
    return result


def _probe_rank(layer: LayerSpectrum, multiple: int) -> int | None:
    """Half the break-even rank, a multiple of ``multiple``; None when no rank saves."""
    half = layer.k * layer.n / (layer.k + layer.n) / 2
    rank = max(multiple, int(half) // multiple * multiple)
    return rank if rank * (layer.k + layer.n) < layer.k * layer.n else None


def search_ranks(
    model: ir.Model,
    model_folder: str | Path,
    groups: Sequence[WeightGroup],
    factorize: FactorizeLowRankPass,
    calibration: Calibration,
    *,
    tolerance: float,
    objective: Objective = "flops",
    budget: float | None = None,
    then: Sequence[ir.passes.PassBase] = (),
    on_step: StepCallback | None = None,
    on_sensitivity: StepCallback | None = None,
) -> AutoResult:
    """Bisects the allocation path for the cheapest allocation within ``tolerance``.

    Args:
        model: The prepared model; it is not modified (probes run on clones).
        model_folder: Where the model's external data lies.
        groups: Its candidate groups.
        factorize: The configured pass (spec ``auto``, whitening, cache); probes replace its ranks.
        calibration: Feeds and the original model's outputs on them.
        tolerance: Largest relative L2 error of any output.
        objective: Cost to minimize: ``flops`` or ``params``.
        budget: Instead of bisecting for ``tolerance``, take the most accurate allocation whose
            cost ratio is at most ``budget`` (measured once, for the report).
        then: Passes each probe runs after factoring (FP8 Q/DQ), so that what is measured is
            what will be written.
        on_step: Called as ``on_step(probes_done, probes_expected, description)``.
        on_sensitivity: Called likewise while sensitivities are measured.
    """
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    spectra = layer_spectra(groups, factorize)
    seconds = {"spectra": lap()}
    spectra = measure_sensitivities(
        model, model_folder, spectra, factorize, calibration, on_step=on_sensitivity
    )
    seconds["sensitivity"] = lap()
    path = allocation_path(spectra, multiple=factorize.rank_multiple, objective=objective)
    expected = int(np.ceil(np.log2(max(len(path), 2)))) + 1
    steps: list[SearchStep] = []

    def probe(index: int) -> bool:
        allocation = path[index]
        if on_step is not None:
            on_step(len(steps), expected, f"cost x{allocation.cost_ratio:.3f}")
        candidate = model.clone()
        dataclasses.replace(factorize, chosen_ranks=allocation.ranks, progress=None)(candidate)
        for pass_ in then:
            pass_(candidate)
        error = measure_error(candidate, model_folder, calibration)
        passed = error <= tolerance
        steps.append(
            SearchStep(index, allocation.cost_ratio, allocation.predicted_error, error, passed)
        )
        logger.info(
            "auto probe %d/%d: cost x%.3f, predicted %.3g, measured %.4f (%s)",
            index,
            len(path) - 1,
            allocation.cost_ratio,
            allocation.predicted_error,
            error,
            "within" if passed else "over",
        )
        return passed

    if budget is not None:
        best = most_accurate_within(path, budget)
        probe(best)
    else:
        best = _bisect(len(path), probe)
    seconds["bisection"] = lap()
    if on_step is not None:
        on_step(expected, expected, "done")
    measured = next((s.measured_error for s in steps if s.index == best), 0.0)
    sensitivities = {layer.name: layer.sensitivity for layer in spectra}
    return AutoResult(
        dict(path[best].ranks),
        tolerance,
        measured,
        path[best].cost_ratio,
        tuple(steps),
        tuple(path),
        sensitivities,
        seconds,
    )


def measure_error(model: ir.Model, model_folder: str | Path, calibration: Calibration) -> float:
    """Largest relative L2 error of any output of ``model`` against the calibration reference."""
    session = create_session(ir.serde.serialize_model(model), data_folder=model_folder)
    names = list(calibration.reference[0])
    sums = {name: ErrorAccumulator() for name in names}
    with runtime_errors("a candidate model"):
        for feed, reference in zip(calibration.feeds, calibration.reference, strict=True):
            for name, value in zip(names, session.run(names, feed), strict=True):
                sums[name].add(reference[name], value)
    return max(sums[name].metrics(name, 0.0).relative_l2 for name in names)


def _bisect(length: int, passes: Callable[[int], bool]) -> int:
    """The largest index in [0, length) with ``passes(index)``, index 0 assumed to pass."""
    low, high = 0, length - 1
    if high == 0 or passes(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low
