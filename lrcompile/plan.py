"""The plan: one decision per stored weight, made by the search before anything is rewritten.

    search (rank specs, overrides, ``auto``) -> Plan -> factor provider -> passes -> report

A decision says what becomes of a weight group (the MatMul/Gemm nodes reading one stored weight
the same way, ``lrcompile.passes.candidates.WeightGroup``), keyed by the group's ``key``:

- ``Keep(reason)``: it stays dense, and why (``rank`` when a rank was considered and did not pay);
- ``Factor(rank, fit)``: ``W ~= A @ B`` of that rank, fitted by plain SVD (``svd``) or by
  activation-whitened SVD (``whitened``: the calibration statistics, or error compensation's);
- ``Quantize(bits, group, symmetric, base, correction, fit)``: ``W ~= DQ(Q(W)) + A @ B``, the
  weight in ``bits``-bit integers (blocks of ``group`` rows) and, when ``correction`` > 0, a
  low-rank fit of its quantization error, by plain or whitened SVD.

Each kind is fitted by the provider and applied by its own pass. The plan holds no arrays and no
graph objects: it is data the report and the tests can read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, Literal

Fit = Literal["svd", "whitened"]
FITS: tuple[str, ...] = ("svd", "whitened")


@dataclasses.dataclass(frozen=True)
class Keep:
    """The weight stays dense."""

    reason: str
    rank: int | None = None  # the rank its spec gave, when that rank saves nothing

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "keep", "reason": self.reason, "rank": self.rank}


@dataclasses.dataclass(frozen=True)
class Factor:
    """The weight becomes two factors of rank ``rank``."""

    rank: int
    fit: Fit = "svd"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"a factored rank must be >= 1, got {self.rank}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "factor", "rank": self.rank, "fit": self.fit}


@dataclasses.dataclass(frozen=True)
class Quantize:
    """The weight becomes integers read through DequantizeLinear, plus a low-rank correction."""

    bits: int
    group: int | None = None  # rows per block along K; None: all of them (per output channel)
    symmetric: bool = True
    base: str = "rtn"  # how the integers are chosen (``numerics.quantize``)
    correction: int = 0  # the rank of ``A @ B`` fitted to ``W - DQ(Q(W))`` (0: none)
    fit: Fit = "svd"  # how the correction is fitted
    # int8 per-channel weights multiplied by the activations quantized to uint8 at run time
    # (DynamicQuantizeLinear -> MatMulInteger, ``passes.quantized``): W8A8, not weight-only.
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.correction < 0:
            raise ValueError(f"a correction rank must be >= 0, got {self.correction}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.dynamic and (self.bits != 8 or self.group is not None):
            raise ValueError("dynamic activations need int8 weights per output channel")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "quantize", **dataclasses.asdict(self)}

    def __str__(self) -> str:
        text = f"int{self.bits}" + (f" g{self.group}" if self.group else " per-channel")
        text += f" {self.base}" + ("" if self.symmetric else " asym")
        text += f" + {self.fit} r{self.correction}" if self.correction else ""
        return text + (", dynamic int8 activations" if self.dynamic else "")


Decision = Keep | Factor | Quantize


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """One weight group's decision, and the rank spec it was made from."""

    key: str
    spec: str
    decision: Decision


@dataclasses.dataclass(frozen=True)
class Plan:
    """The decisions for a model's weight groups, in graph order."""

    weights: tuple[WeightPlan, ...]

    def __post_init__(self) -> None:
        keys = [weight.key for weight in self.weights]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a plan decides each weight once; repeated: {sorted(keys)}")

    def __iter__(self) -> Iterator[WeightPlan]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __contains__(self, key: object) -> bool:
        return any(weight.key == key for weight in self.weights)

    def decision(self, key: str) -> Decision | None:
        """The decision for the group ``key`` (None when the plan does not cover it)."""
        return next((w.decision for w in self.weights if w.key == key), None)

    def spec(self, key: str) -> str | None:
        return next((w.spec for w in self.weights if w.key == key), None)

    @property
    def factored(self) -> dict[str, Factor]:
        """The ``Factor`` decisions by group key."""
        return {w.key: w.decision for w in self.weights if isinstance(w.decision, Factor)}

    @property
    def quantized(self) -> dict[str, Quantize]:
        """The ``Quantize`` decisions by group key."""
        return {w.key: w.decision for w in self.weights if isinstance(w.decision, Quantize)}

    def only(self, keys: Iterable[str]) -> Plan:
        """The decisions for ``keys`` alone (a block of an error-compensated rewrite)."""
        wanted = set(keys)
        return Plan(tuple(w for w in self.weights if w.key in wanted))

    def to_dict(self) -> list[dict[str, Any]]:
        return [{"key": w.key, "spec": w.spec, **w.decision.to_dict()} for w in self.weights]
