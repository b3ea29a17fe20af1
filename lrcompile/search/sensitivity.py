"""Per-layer spectra and sensitivities: how much of each layer's error reaches the outputs.

    (whitened) SVD of each ``auto`` layer -> squared singular values
      -> that layer alone factored at half its break-even rank, measured end to end
         (one model and one ONNX Runtime session for all layers: ``passes.probe_graph``)

A layer's sensitivity is the squared relative error of the model's outputs when that layer alone
is factored at half its break-even rank, divided by the layer's own predicted relative squared
error there. It is measured on the first ``SENSITIVITY_BATCHES`` calibration batches held back from
the statistics (``Calibration.measured``), so a layer whose factors fit the calibration data
better than other data counts as the more sensitive. On MiniLM's
embeddings it spans ~300x (attention projections ~0.02, MLP layers up to ~7), which the spectra
alone cannot see.

With ``quantize`` each ``auto`` layer's options are its stored forms (``quantized_layers``:
integers alone, with a correction of each rank in ``CORRECTION_RANKS`` that has fewer parameters
than the weight, int8 under int4), their errors the whitened energies of what each leaves of the
quantization error. Its sensitivity is
measured by adding the leading ``PROBE_CORRECTION_RANK`` components of that error to the layer
alone (``probe_model(perturb=True)``): the error a quantized layer makes, of a known size.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lrcompile.calibration.statistics import Calibration
from lrcompile.factors.provider import FactorProvider
from lrcompile.factors.quantized import cache_key, correction_bytes, stored_bytes
from lrcompile.io.spill import Spill
from lrcompile.numerics.allocate import Choice, LayerSpectrum, QuantizedLayer
from lrcompile.passes.factored_graph import factor_names
from lrcompile.passes.probe_graph import PROBE_INPUT, probe_model
from lrcompile.runtime.metrics import ErrorMeter
from lrcompile.search.decisions import Planner

logger = logging.getLogger(__name__)

SENSITIVITY_BATCHES = 2
CORRECTION_RANKS = (16, 32, 64, 128, 256)  # the corrections auto chooses among
PROBE_CORRECTION_RANK = 32

# on_step(done, total, description)
StepCallback = Callable[[int, int, str], None]


def layer_spectra(
    planner: Planner,
    provider: FactorProvider,
    rows: Mapping[str, int] | None = None,
) -> list[LayerSpectrum]:
    """The (whitened) squared singular values of every group whose spec is ``auto`` and whose
    factors the provider cached (its weight is finite), with its ``rows`` per batch (by group
    key) and dtype."""
    rows = rows or {}
    spectra = []
    for group in planner.groups:
        cached = provider.cached(group.key)
        if planner.specs[group.key].kind != "auto" or cached is None:
            continue
        k, n = group.shape
        energies = np.square(cached.spectrum)
        dtype = (group.cast or group.tensor.dtype).numpy().name
        per_batch = rows.get(group.key, 1)
        spectra.append(
            LayerSpectrum(group.key, k, n, energies, len(group.nodes), rows=per_batch, dtype=dtype)
        )
    return spectra


def measure_sensitivities(
    model: ir.Model,
    spectra: Sequence[LayerSpectrum],
    planner: Planner,
    provider: FactorProvider,
    calibration: Calibration,
    *,
    on_step: StepCallback | None = None,
) -> list[LayerSpectrum]:
    """``spectra`` with each layer's measured sensitivity (see the module docstring)."""
    feeds, reference = calibration.measured(SENSITIVITY_BATCHES)
    predicted: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lrcompile-probes-") as folder:
        spill, factors = Spill(folder), {}
        names = factor_names(model.graph, planner.groups, [layer.name for layer in spectra])
        for layer in spectra:
            rank = probe_rank(layer, planner.multiple)
            share = float(layer.energies[rank:].sum() / max(layer.energies.sum(), 1e-300))
            if rank is None or share <= 0.0:
                continue  # nothing to learn: the layer keeps the neutral sensitivity
            plan = planner.only(layer.name, rank)
            fitted = provider.fit(planner.groups, plan, names, spill=spill, weight_errors=False)
            if layer.name in fitted:  # else the layer stays dense whatever its rank
                factors[layer.name], predicted[layer.name] = fitted[layer.name].pair, share
        measured = _measure(model, factors, predicted, feeds, reference, False, on_step)
    return _with_sensitivities(spectra, measured)


def correction_ranks(k: int, n: int, available: int) -> tuple[int, ...]:
    """The ranks of ``CORRECTION_RANKS`` a ``k x n`` weight may take, of ``available`` fitted
    components: those with fewer parameters than the weight (one as large is the weight again)."""
    return tuple(r for r in CORRECTION_RANKS if r <= available and r * (k + n) < k * n)


def quantized_layers(
    planner: Planner,
    provider: FactorProvider,
    rows: Mapping[str, int] | None = None,
    noise: Mapping[str, float | None] | None = None,
) -> list[QuantizedLayer]:
    """The stored forms every ``auto`` group whose quantized form the provider cached may take
    (see the module docstring), by bytes and relative squared error in output space, with its
    ``rows`` per batch (by group key) and dtype. With the ``noise`` of its input
    (``Calibration.dynamic_noise``), a float32 MatMul may also take ``"w8a8"``: int8 weights per
    channel times activations quantized at run time (DynamicQuantizeLinear), whose rounding
    adds ``noise * ||W||^2`` of output error (white noise through the weight)."""
    template = planner.quantize
    higher = dataclasses.replace(template, bits=8, group=None) if template.bits == 4 else None
    per_channel = template if template.bits == 8 and template.group is None else higher
    layers = []
    for group in planner.groups:
        entry = provider.cached(cache_key(group.key, template))
        if planner.specs[group.key].kind != "auto" or entry is None:
            continue
        weight, residual = provider.quantized_energies(group.key, template)
        if weight <= 0.0:
            continue  # a zero weight: its integers are exact
        k, n = group.shape
        base = stored_bytes(group, template)
        choices = [Choice(0, base, residual / weight)]
        kept = np.cumsum(np.square(entry.spectrum))
        for rank in correction_ranks(k, n, entry.left.shape[1]):
            error = max(residual - float(kept[rank - 1]), 0.0) / weight
            choices.append(Choice(rank, base + correction_bytes(rank, k, n), error))
        if higher is not None and (energies := provider.quantized_energies(group.key, higher)):
            choices.append(Choice("int8", stored_bytes(group, higher), energies[1] / weight))
        dtype = (group.cast or group.tensor.dtype).numpy().name
        variance = (noise or {}).get(group.key)
        if variance is not None and _dynamic_eligible(group, dtype):
            int8 = provider.quantized_energies(group.key, per_channel) if per_channel else None
            if int8 is not None:
                rounding = variance * provider.plain_energy(group.key, per_channel)
                error = (int8[1] + rounding) / weight
                choices.append(Choice("w8a8", stored_bytes(group, per_channel), error))
        dense = k * n * int(group.tensor.dtype.itemsize)
        per_batch = (rows or {}).get(group.key, 1)
        shape = {"nodes": len(group.nodes), "rows": per_batch, "dtype": dtype}
        layers.append(QuantizedLayer(group.key, k, n, dense, tuple(choices), **shape))
    return layers


def _dynamic_eligible(group, dtype: str) -> bool:
    """Whether ``group`` may run W8A8: float32 MatMuls (DynamicQuantizeLinear reads float32;
    MatMulInteger has no Gemm's transposes or bias)."""
    return dtype == "float32" and all(node.op_type == "MatMul" for node in group.nodes)


def measure_quantized_sensitivities(
    model: ir.Model,
    layers: Sequence[QuantizedLayer],
    planner: Planner,
    provider: FactorProvider,
    calibration: Calibration,
    *,
    on_step: StepCallback | None = None,
) -> list[QuantizedLayer]:
    """``layers`` with each one's measured sensitivity to its quantization error."""
    feeds, reference = calibration.measured(SENSITIVITY_BATCHES)
    template, groups = planner.quantize, {group.key: group for group in planner.groups}
    names = factor_names(model.graph, planner.groups, [layer.name for layer in layers])
    factors, predicted = {}, {}
    for layer in layers:
        entry = provider.cached(cache_key(layer.name, template))
        rank = min(PROBE_CORRECTION_RANK, entry.left.shape[1])
        weight, _ = provider.quantized_energies(layer.name, template)
        share = float(np.sum(np.square(entry.spectrum[:rank]))) / weight
        if rank == 0 or share <= 0.0:
            continue  # nothing to learn: the layer keeps the neutral sensitivity
        fit, dtype = entry.at_rank(rank), groups[layer.name].tensor.dtype.numpy()
        pair = (np.asarray(fit.left, dtype), np.asarray(fit.right, dtype))
        factors[layer.name] = tuple(
            ir.tensor(array, name=name) for array, name in zip(pair, names[layer.name], strict=True)
        )
        predicted[layer.name] = share
    measured = _measure(model, factors, predicted, feeds, reference, True, on_step)
    return _with_sensitivities(layers, measured)


def _measure(model, factors, predicted, feeds, reference, perturb, on_step) -> dict[str, float]:
    """Each layer's sensitivity: its probe's squared output error over its predicted share."""
    order = list(factors)
    meter = ErrorMeter(probe_model(model, factors, order, perturb)) if order else None
    measured = {}
    for index, key in enumerate(order):
        if on_step is not None:
            on_step(index, len(order), key)
        error = meter(feeds, reference, extra={PROBE_INPUT: np.array(index, np.int64)})
        measured[key] = max(error**2 / predicted[key], 1e-12)
        logger.debug("%s: sensitivity %.3g", key, measured[key])
    del meter
    if on_step is not None:
        on_step(len(order), len(order), "")
    return measured


def _with_sensitivities(layers, measured: Mapping[str, float]) -> list:
    return [
        dataclasses.replace(layer, sensitivity=measured[layer.name])
        if layer.name in measured
        else layer
        for layer in layers
    ]


def probe_rank(layer: LayerSpectrum, multiple: int) -> int | None:
    """Half the break-even rank, a multiple of ``multiple``; None when no rank saves."""
    half = layer.k * layer.n / (layer.k + layer.n) / 2
    rank = max(multiple, int(half) // multiple * multiple)
    return rank if rank * (layer.k + layer.n) < layer.k * layer.n else None
