"""The per-layer report: what happened to each weight, with totals (JSON here; tables in
``lrcompile.cli.render``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

Status = Literal["factored", "quantized", "dense", "skipped"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One weight (or one skipped node) and what was done to it."""

    nodes: tuple[str, ...]
    op: str
    weight: str | None
    status: Status
    shape: tuple[int, int] | None = None
    spec: str | None = None
    rank: int | None = None
    method: str | None = None
    kept_energy: float | None = None
    relative_error: float | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    factors: tuple[str, ...] = ()
    reason: str | None = None
    seconds: float = 0.0
    # A quantized layer's own output error, relative L2: auto's prediction, and measured on the
    # batches auto held back (``check.layer_errors``).
    predicted_output_error: float | None = None
    output_error: float | None = None
    fused: str | None = None  # what one weight packs: "q/k/v" (genai's qkv_proj, GPT-2's c_attn)

    @property
    def flop_ratio(self) -> float | None:
        """Predicted factored/dense FLOPs per activation row (below 1 is faster)."""
        return self.flops_after / self.flops_before if self.flops_before else None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["nodes"] = list(self.nodes)
        data["factors"] = list(self.factors)
        data["shape"] = list(self.shape) if self.shape else None
        data["flop_ratio"] = self.flop_ratio
        return data


@dataclasses.dataclass(frozen=True)
class Totals:
    """Sums over the layers that have a weight (factored or left dense)."""

    layers: int
    factored: int
    dense: int
    skipped: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    bytes_before: int = 0
    bytes_after: int = 0
    quantized: int = 0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flop_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["params_ratio"] = self.params_ratio
        data["flop_ratio"] = self.flop_ratio
        return data


def totals(layers: Sequence[LayerReport]) -> Totals:
    """Counts and sums of parameters and per-row FLOPs over ``layers``."""

    def count(status: Status) -> int:
        return sum(1 for layer in layers if layer.status == status)

    return Totals(
        layers=len(layers),
        factored=count("factored"),
        dense=count("dense"),
        skipped=count("skipped"),
        params_before=sum(layer.params_before for layer in layers),
        params_after=sum(layer.params_after for layer in layers),
        flops_before=sum(layer.flops_before for layer in layers),
        flops_after=sum(layer.flops_after for layer in layers),
        bytes_before=sum(layer.bytes_before for layer in layers),
        bytes_after=sum(layer.bytes_after for layer in layers),
        quantized=count("quantized"),
    )
