"""Quantized weights and the low-rank corrections of their error, as the provider makes them.

    W [K, N] -> Q(W): integers, scales (and zero points) per block (``numerics.quantize``)
      -> R = W - DQ(Q(W)), with the scales as the model will store them
      -> the (whitened) SVD of R: its factors at the largest correction rank a plan may ask for,
         and its spectrum, cached with the integers (``FactorCache``)
    Quantize(bits, group, ..., correction=r) -> the integers, the scales, A = left[:, :r],
      B = right[:r], as named tensors

With calibration data the correction is the activation-whitened rank-r fit of the residual, the
closed-form optimum of ``E||x (W - DQ(Q(W)) - A B)||`` on the calibration activations (QERA);
without, the plain SVD of the residual. The correction factors are stored in float16 (read
through a Cast in a float32 model): half the bytes, and they carry the small residual only.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lrcompile.numerics import decompose, whiten
from lrcompile.numerics import quantize as quantize_lib
from lrcompile.numerics.quantize import QuantizedWeight, quantize
from lrcompile.numerics.whiten import Whitening
from lrcompile.plan import Quantize

# The widest correction the cache holds: a rank-r fit at any r up to it is a slice.
CORRECTION_CACHE_RANK = 256
CORRECTION_DTYPE = np.dtype(np.float16)


@dataclasses.dataclass(frozen=True)
class QuantizedFit:
    """One weight as the rewrite stores it, and what the report says of it."""

    q: ir.TensorProtocol  # INT4 or INT8, [K, N]
    scale: ir.TensorProtocol  # [ceil(K / group), N], or [N] per output channel
    zero: ir.TensorProtocol | None
    left: ir.TensorProtocol | None  # the correction, [K, r] and [r, N] (None without one)
    right: ir.TensorProtocol | None
    nbytes: int
    relative_error: float | None  # ||W - DQ(Q(W)) - A B|| / ||W||
    seconds: float


def cache_key(key: str, template: Quantize) -> str:
    """The cache key of a group's quantized form: its settings (not its correction rank)."""
    symmetric = "s" if template.symmetric else "a"
    return f"{key}#int{template.bits}g{template.group or 0}{symmetric}{template.base}"


def quantized_with_residual(
    weight: np.ndarray, template: Quantize, read_dtype: np.dtype
) -> tuple[QuantizedWeight, np.ndarray]:
    """``Q(W)`` (scales rounded to ``read_dtype``, as stored) and ``W - DQ(Q(W))`` (float32)."""
    quantized = quantize(
        np.asarray(weight, dtype=np.float32),
        template.bits,
        template.group,
        symmetric=template.symmetric,
        base=template.base,
    )
    stored = quantized.scale.astype(read_dtype).astype(np.float32)
    quantized = dataclasses.replace(quantized, scale=stored)
    residual = np.asarray(weight, dtype=np.float32) - quantized.dequantize()
    return quantized, residual


def residual_factors(
    residual: np.ndarray, top: int, whitening: Whitening | None
) -> tuple[decompose.Factorization, np.ndarray]:
    """The residual's (whitened) factors at rank ``top`` and its whole spectrum (rank 0: no SVD,
    no factors, no spectrum)."""
    if top == 0:
        k, n = residual.shape
        empty = np.zeros(0, np.float32)
        method = "whitened" if whitening is not None else "exact"
        left, right = np.zeros((k, 0), np.float32), np.zeros((0, n), np.float32)
        return decompose.Factorization(left, right, empty, 0.0, method), empty
    return whiten.factorize_top(residual, top, whitening)


def stored_arrays(
    quantized: QuantizedWeight, per_channel: bool, read_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The integers (int4 as ``ml_dtypes.int4``), scales in ``read_dtype`` ([N] per output
    channel, else per block) and zero points, as DequantizeLinear reads them."""
    kind = ml_dtypes.int4 if quantized.bits == 4 else np.int8
    q = quantized.q.astype(kind)
    scale = quantized.scale.astype(read_dtype)
    zero = quantized.zero.astype(kind) if quantized.zero is not None else None
    if per_channel:
        scale = scale.reshape(-1)
        zero = zero.reshape(-1) if zero is not None else None
    return q, scale, zero


def stored_bytes(group, decision: Quantize) -> int:
    """Bytes of ``group``'s weight stored as ``decision`` says: integers, scales in the weight's
    read dtype, zero points, and the correction's factors."""
    k, n = group.shape
    scale = np.dtype((group.cast or group.tensor.dtype).numpy()).itemsize
    values = quantize_lib.stored_bytes(
        k, n, decision.bits, decision.group, symmetric=decision.symmetric, scale_bytes=scale
    )
    return values + correction_bytes(decision.correction, k, n)


def correction_bytes(rank: int, k: int, n: int) -> int:
    """Bytes of a rank-``rank`` correction ``[K, r] + [r, N]`` as stored."""
    return rank * (k + n) * CORRECTION_DTYPE.itemsize
