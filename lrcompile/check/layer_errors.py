"""Each quantized layer's own output error, measured on data its form was not fitted to.

    the batches ``auto`` held back -> the ORIGINAL model, each quantized layer's input exposed
      -> per layer: ||x W_hat - x W|| / ||x W|| over those batches, where ``x W_hat`` is the
         layer as written: ``x DQ(Q(W)) + (x A) B``, or under W8A8 ``x`` rounded as ONNX
         DynamicQuantizeLinear does (uint8 over the run's range, 0 included) times the integers

It sits beside auto's prediction of the same quantity (the whitened energy of what the form
leaves, from the fitted batches' statistics, plus DynamicQuantizeLinear's rounding noise for
W8A8): a layer whose measurement is far above its prediction is one the error model misjudges.
Each layer is measured alone, on the original model's activations; how its error travels to the
outputs is the sensitivity's business (``search.sensitivity``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lrcompile.calibration.statistics import activation_key, real_rows
from lrcompile.factors.quantized import QuantizedFit
from lrcompile.io.data import Feed
from lrcompile.numerics.quantize import QuantizedWeight, dynamic_quantization
from lrcompile.passes.candidates import WeightGroup, effective_weight, release_weight
from lrcompile.plan import Quantize
from lrcompile.runtime.sessions import create_session, runtime_errors

logger = logging.getLogger(__name__)


def measure_layer_errors(
    original: onnx.ModelProto,
    data_folder: Path,
    groups: Sequence[WeightGroup],
    decisions: Mapping[str, Quantize],
    fits: Mapping[str, QuantizedFit],
    feeds: Sequence[Feed],
    mask: str | None = None,
) -> dict[str, float]:
    """The relative L2 of each decided group's output against the original's, by group key, on
    ``feeds`` (see the module docstring); ``original`` is the model before the rewrite, its
    external data in ``data_folder``. Rows the input ``mask`` marks as padding are left out, as
    the statistics the prediction comes from leave them out (``calibration.statistics``).

    Raises:
        LrcompileError: ONNX Runtime cannot run the original model with its activations exposed.
    """
    chosen = [group for group in groups if group.key in decisions and group.key in fits]
    if not chosen or not feeds:
        return {}
    keys = {activation_key(node) for group in chosen for node in group.nodes}
    exposed = sorted({name for name, _ in keys} - set(feeds[0]))
    run = _exposing(original, data_folder, exposed)
    sums = {group.key: np.zeros(2) for group in chosen}  # ||x W_hat - x W||^2, ||x W||^2
    # A feed at a time (each is a piece of rows, ``Calibration.measured``), every layer's input
    # of it at once, as calibration holds them; the weights are read again for each feed.
    with runtime_errors("measuring each layer's error"):
        for feed in feeds:
            values = dict(zip(exposed, run(feed), strict=True)) | dict(feed)
            for group in chosen:
                decision, fit = decisions[group.key], fits[group.key]
                sums[group.key] += _squares(group, decision, fit, values, feed, mask)
            del values
    errors = {key: float(np.sqrt(d / r)) if r else 0.0 for key, (d, r) in sums.items()}
    for key, error in errors.items():
        logger.debug("%s: measured output error %.4g", key, error)
    return errors


def _squares(group, decision, fit, values, feed, mask) -> np.ndarray:
    """``||x W_hat - x W||^2`` and ``||x W||^2`` over the group's inputs in ``values`` (their
    real rows: ``mask``'s padding left out)."""
    weight = np.asarray(effective_weight(group), np.float32)
    written = _written(group, decision, fit)
    squares = np.zeros(2)
    for node in group.nodes:
        name, transposed = activation_key(node)
        x = np.asarray(values[name], np.float32)
        x = x.T if transposed else x  # a Gemm's transA: [K, M]
        keep = real_rows(x, feed, mask)
        x = np.reshape(x, (-1, x.shape[-1]))
        # The whole run's rows go through the layer (W8A8's range is the run's), the real ones
        # are counted.
        exact, approximate = x @ weight, written(x)
        if keep is not None:
            exact, approximate = exact[keep], approximate[keep]
        squares += [
            np.sum(np.square(approximate - exact, dtype=np.float64)),
            np.sum(np.square(exact, dtype=np.float64)),
        ]
    del weight
    release_weight(group)
    return squares


def _exposing(original, data_folder, exposed: list[str]):
    """``feed -> the values named exposed``, by a session of ``original`` that computes only
    them (nothing to run when every one is fed)."""
    if not exposed:
        return lambda feed: []
    proto = onnx.ModelProto.FromString(original.SerializeToString())
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in exposed)
    session = create_session(proto, data_folder=data_folder, low_memory=True)
    return lambda feed: session.run(exposed, feed)


def _written(group: WeightGroup, decision: Quantize, fit: QuantizedFit):
    """``x -> x W_hat``: the layer as written, in float32 (float16 factors widened)."""
    k = group.shape[0]
    q = np.asarray(fit.q.numpy()).astype(np.int8)
    scale = np.asarray(fit.scale.numpy(), np.float32).reshape(-1, group.shape[1])
    zero = None if fit.zero is None else np.asarray(fit.zero.numpy()).astype(np.int8)
    zero = None if zero is None else zero.reshape(scale.shape)
    stored = QuantizedWeight(q, scale, zero, decision.bits, decision.group or k)
    correction = None
    if fit.left is not None:
        correction = [np.asarray(t.numpy(), np.float32) for t in (fit.left, fit.right)]

    def corrected(x: np.ndarray, base: np.ndarray) -> np.ndarray:
        return base if correction is None else base + (x @ correction[0]) @ correction[1]

    if not decision.dynamic:
        dequantized = stored.dequantize()
        return lambda x: corrected(x, x @ dequantized)
    integers = (q.astype(np.int32) - (0 if zero is None else zero.astype(np.int32))).astype(
        np.float32
    )
    return lambda x: corrected(x, dynamic_product(x, integers) * scale.reshape(-1))


def dynamic_product(x: np.ndarray, integers: np.ndarray) -> np.ndarray:
    """``(xq - xz) @ integers * xs``: ``x`` quantized as ONNX DynamicQuantizeLinear does (uint8
    over its range, 0 included, round half to even), times the weight's integers (exact while
    the sums stay within float32's 24 bits, K x 255 x 255 < 2^24, up to K = 258; beyond, to
    float32 rounding)."""
    step, zero = dynamic_quantization(x)
    step = np.float32(step) if step else np.float32(1.0)
    quantized = np.clip(np.round(x / step) + zero, 0, 255) - zero
    return (quantized.astype(np.float32) @ integers) * step
