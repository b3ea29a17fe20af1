"""The per-layer report: what happened to each weight, with totals, as a table or JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

Status = Literal["factored", "dense", "skipped"]


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
    )


_COLUMNS = ("layer", "shape", "rank", "energy", "W err", "params", "bytes", "FLOPs", "status")


def format_table(layers: Sequence[LayerReport]) -> str:
    """The report as an aligned text table with a totals line."""
    total = totals(layers)
    total_row = (
        "total",
        "",
        "",
        "",
        "",
        f"{_human(total.params_before)}->{_human(total.params_after)}",
        f"{_human(total.bytes_before)}->{_human(total.bytes_after)}",
        f"{total.flop_ratio:.3f}",
        f"{total.factored} factored, {total.dense} dense, {total.skipped} skipped",
    )
    header, *body, last = aligned([_COLUMNS, *(_row(layer) for layer in layers), total_row])
    rule = "-" * len(header)
    return "\n".join([header, rule, *body, rule, last])


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows as lines with every column padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _row(layer: LayerReport) -> tuple[str, ...]:
    # Node names say where a layer is (exporters often name weights onnx::MatMul_922).
    name = layer.nodes[0] or layer.weight or "?"
    if len(layer.nodes) > 1:
        name += f" (x{len(layer.nodes)})"
    shape = "x".join(str(d) for d in layer.shape) if layer.shape else "-"
    status = layer.status if layer.reason is None else f"{layer.status}: {layer.reason}"
    if layer.status == "skipped":
        return (name, shape, "-", "-", "-", "-", "-", "-", status)
    energy = f"{layer.kept_energy:.4f}" if layer.kept_energy is not None else "-"
    error = f"{layer.relative_error:.4f}" if layer.relative_error is not None else "-"
    ratio = f"{layer.flop_ratio:.3f}" if layer.flop_ratio is not None else "-"
    return (
        name,
        shape,
        str(layer.rank) if layer.rank is not None else "-",
        energy,
        error,
        f"{_human(layer.params_before)}->{_human(layer.params_after)}",
        f"{_human(layer.bytes_before)}->{_human(layer.bytes_after)}",
        ratio,
        status,
    )


def _human(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)
