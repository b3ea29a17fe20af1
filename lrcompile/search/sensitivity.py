"""Per-layer spectra and sensitivities: how much of each layer's error reaches the outputs.

    (whitened) SVD of each ``auto`` layer -> squared singular values
      -> that layer alone factored at half its break-even rank, measured end to end

A layer's sensitivity is the squared relative error of the model's outputs when that layer alone
is factored at half its break-even rank, divided by the layer's own predicted relative squared
error there. It is measured on the first ``SENSITIVITY_BATCHES`` calibration batches. On MiniLM's
embeddings it spans ~300x (attention projections ~0.02, MLP layers up to ~7), which the spectra
alone cannot see.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lrcompile.calibration.statistics import Calibration
from lrcompile.numerics.allocate import LayerSpectrum
from lrcompile.passes.candidates import WeightGroup
from lrcompile.passes.low_rank import FactorizeLowRankPass, effective_weight
from lrcompile.pipeline import build_pipeline
from lrcompile.runtime.metrics import measure_error

logger = logging.getLogger(__name__)

SENSITIVITY_BATCHES = 2

# on_step(done, total, description)
StepCallback = Callable[[int, int, str], None]


def layer_spectra(
    groups: Sequence[WeightGroup], factorize: FactorizeLowRankPass
) -> list[LayerSpectrum]:
    """The (whitened) squared singular values of every group whose spec is ``auto``; their
    factors land in ``factorize``'s cache."""
    spectra = []
    for group in groups:
        if factorize.spec_for(group).kind != "auto":
            continue
        weight = effective_weight(group)
        if not np.all(np.isfinite(weight)):
            continue
        k, n = group.shape
        energies = np.square(factorize.cached(group, weight).spectrum)
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
    feeds = calibration.feeds[:SENSITIVITY_BATCHES]
    reference = calibration.reference[:SENSITIVITY_BATCHES]
    result = []
    for index, layer in enumerate(spectra):
        if on_step is not None:
            on_step(index, len(spectra), layer.name)
        rank = probe_rank(layer, factorize.rank_multiple)
        predicted = float(layer.energies[rank:].sum() / max(layer.energies.sum(), 1e-300))
        if rank is None or predicted <= 0.0:
            result.append(layer)  # nothing to learn: keep the neutral sensitivity
            continue
        candidate = model.clone()
        probe = dataclasses.replace(factorize, chosen_ranks={layer.name: rank}, progress=None)
        build_pipeline(probe).run(candidate)
        error = measure_error(candidate, model_folder, feeds, reference)
        sensitivity = error**2 / predicted
        logger.debug("%s: sensitivity %.3g (rank %d)", layer.name, sensitivity, rank)
        result.append(dataclasses.replace(layer, sensitivity=max(sensitivity, 1e-12)))
    if on_step is not None:
        on_step(len(spectra), len(spectra), "")
    return result


def probe_rank(layer: LayerSpectrum, multiple: int) -> int | None:
    """Half the break-even rank, a multiple of ``multiple``; None when no rank saves."""
    half = layer.k * layer.n / (layer.k + layer.n) / 2
    rank = max(multiple, int(half) // multiple * multiple)
    return rank if rank * (layer.k + layer.n) < layer.k * layer.n else None
