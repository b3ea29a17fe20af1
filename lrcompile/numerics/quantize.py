"""Weight quantization as ONNX's DequantizeLinear computes it back: plain numerics.

    W[K, N] -> q (int4 or int8), scale and zero point per (block of ``group`` rows of K, column)
    DQ(q) = (q - zero) * scale          (ONNX DequantizeLinear, axis 0, block_size ``group``)

Blocks run along K, the axis a MatMul reduces over, which is what ONNX Runtime's MatMulNBits
expects; ``group=None`` is one block of all K rows (per output channel). A last block shorter
than ``group`` is allowed, as in ONNX. Values are signed: int4 in [-8, 7], int8 in [-128, 127];
symmetric scales put zero at 0, asymmetric ones map each block's [min, max] onto the whole range.

Two bases: ``rtn`` (round to nearest, the block's maximum as its range) and ``mse`` (the range
shrunk by the factor among ``MSE_SHRINKS`` that gives each block the least squared error: a
clipping search in the spirit of HQQ's and ORT's optimized quantizers, which trades the rare
largest values for finer steps everywhere else).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Base = Literal["rtn", "mse"]
BASES: tuple[str, ...] = ("rtn", "mse")
BITS: tuple[int, ...] = (4, 8)
MSE_SHRINKS = np.linspace(1.0, 0.5, 26)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """``W ~= (q - zero) * scale`` with blocks of ``group`` rows (all K rows: ``group`` is K)."""

    q: np.ndarray  # int8 array of W's shape, values within ``bits``
    scale: np.ndarray  # [ceil(K / group), N], float32
    zero: np.ndarray | None  # like ``scale``, int8 (None: symmetric)
    bits: int
    group: int

    def dequantize(self) -> np.ndarray:
        """``(q - zero) * scale`` in float32, as DequantizeLinear computes it."""
        k = self.q.shape[0]
        scale = np.repeat(self.scale, self.group, axis=0)[:k]
        q = self.q.astype(np.float32)
        if self.zero is not None:
            q -= np.repeat(self.zero, self.group, axis=0)[:k].astype(np.float32)
        return q * scale

    @property
    def nbytes(self) -> int:
        """Bytes as stored, scales in float32 (``stored_bytes``)."""
        k, n = self.q.shape
        return stored_bytes(k, n, self.bits, self.group, symmetric=self.zero is None)


def stored_bytes(
    k: int, n: int, bits: int, group: int | None, *, symmetric: bool, scale_bytes: int = 4
) -> int:
    """Bytes of a [K, N] weight quantized in blocks of ``group`` rows (None: all K): ``bits`` per
    value (int4 packed two per byte), a scale of ``scale_bytes`` and (asymmetric) a zero point
    of ``bits`` per block and column."""
    blocks = -(-k // (group or k)) * n
    zeros = 0 if symmetric else -(-blocks * bits // 8)
    return -(-k * n * bits // 8) + blocks * scale_bytes + zeros


def quantize(
    w: np.ndarray,
    bits: int,
    group: int | None = None,
    *,
    symmetric: bool = True,
    base: Base = "rtn",
) -> QuantizedWeight:
    """``w`` ([K, N]) quantized to ``bits`` in blocks of ``group`` rows (None: all of K).

    Raises:
        ValueError: ``bits`` is not 4 or 8, ``group`` is not positive, or ``base`` unknown.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    k, n = w.shape
    group = k if group is None else group
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    blocks = -(-k // group)
    padded = np.zeros((blocks * group, n), np.float32)
    padded[:k] = w
    shaped = padded.reshape(blocks, group, n)
    rows = np.arange(blocks * group).reshape(blocks, group) < k  # real rows of each block
    low, high = _range(shaped, rows)
    shrinks = MSE_SHRINKS if base == "mse" else MSE_SHRINKS[:1]
    best = None
    for shrink in shrinks:
        q, scale, zero = _grid(shaped, low * shrink, high * shrink, bits, symmetric)
        error = np.sum(
            np.square((q - zero[:, None]) * scale[:, None] - shaped) * rows[..., None], 1
        )
        if best is None:
            best = [q, scale, zero, error]
            continue
        better = error < best[3]  # [blocks, N]: each block and column keeps its best
        best[0] = np.where(better[:, None], q, best[0])
        best[1], best[2] = np.where(better, scale, best[1]), np.where(better, zero, best[2])
        best[3] = np.minimum(error, best[3])
    q, scale, zero, _ = best
    q = q.reshape(blocks * group, n)[:k].astype(np.int8)
    zeros = None if symmetric else zero.astype(np.int8)
    return QuantizedWeight(q, scale.astype(np.float32), zeros, bits, group)


def dynamic_quantization(x: np.ndarray) -> tuple[float, float]:
    """ONNX DynamicQuantizeLinear's step and zero point for ``x``: uint8 over its range, 0
    included (the zero point rounded half to even from the float32 step; a step of 0 when ``x``
    is all zeros, then a zero point of 0)."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (high - low) / 255
    zero = float(np.clip(np.round(-low / np.float32(step)), 0, 255)) if step else 0.0
    return step, zero


def _range(shaped: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each block's minimum and maximum over its real rows ([blocks, N] each)."""
    real = rows[..., None]
    low = np.min(np.where(real, shaped, np.inf), axis=1)
    high = np.max(np.where(real, shaped, -np.inf), axis=1)
    return low, high


def _grid(shaped, low, high, bits: int, symmetric: bool):
    """Round each block onto its grid: ``(q, scale, zero)``, ``q`` as float32 of ``shaped``'s
    shape, ``scale`` and ``zero`` per block and column (zero 0 when symmetric)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        amax = np.maximum(np.abs(low), np.abs(high))
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        zero = np.zeros_like(scale)
    else:
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)  # zero stays representable
        span = high - low
        scale = np.where(span > 0, span / (qmax - qmin), 1.0).astype(np.float32)
        zero = np.clip(np.round(qmin - low / scale), qmin, qmax).astype(np.float32)
    q = np.clip(np.round(shaped / scale[:, None] + zero[:, None]), qmin, qmax).astype(np.float32)
    return q, scale, zero
