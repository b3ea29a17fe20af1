"""``--objective latency``: the searched layers' measured seconds, and what the ranks predict.

    each layer (K x N, its rows per calibration batch)
      -> its curve in the latency table (``lrcompile.runtime.latency``: measured on ONNX Runtime
         CPU, or read from the cache for this runtime and machine)
      -> the allocation's costs (``lrcompile.numerics.allocate``: a rank only where it is faster)

The prediction for the whole model assumes everything but the searched MatMuls keeps its time:
``T / (T - saved)``, with ``T`` the original model's measured time per batch and ``saved`` the
table's seconds saved by the chosen ranks. The compile measures both models after writing the
output (``LatencyEstimate.measured_speedup``), so the report shows how far the table holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from lrcompile.numerics.allocate import LayerSpectrum, Seconds
from lrcompile.runtime.latency import LatencyTable, Shape

# The dtypes ONNX Runtime CPU's MatMul runs; a weight in another (bfloat16) is timed as float32.
_TIMED_DTYPES = ("float32", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class LatencyEstimate:
    """Seconds per batch: the searched layers dense and at the chosen ranks (from the table),
    and, once the output is written, both whole models measured side by side."""

    layers_dense: float
    layers: float
    target: str
    shapes: int  # distinct (shape, rows) timed
    measured: int  # of them, measured by this compile (the others came from the cache)
    cache: str | None
    model_dense: float | None = None
    model: float | None = None

    @property
    def predicted_speedup(self) -> float | None:
        """The whole model's speedup the table predicts (needs ``model_dense``)."""
        if self.model_dense is None:
            return None
        rest = self.model_dense - (self.layers_dense - self.layers)
        return self.model_dense / rest if rest > 0 else None  # the table outran the model

    @property
    def measured_speedup(self) -> float | None:
        """The whole model's measured speedup (needs both times)."""
        if self.model_dense is None or not self.model:
            return None
        return self.model_dense / self.model

    def to_dict(self) -> dict[str, Any]:
        predicted, measured = self.predicted_speedup, self.measured_speedup
        return dataclasses.asdict(self) | {
            "predicted_speedup": predicted,
            "measured_speedup": measured,
            "measured_over_predicted": measured / predicted if predicted and measured else None,
        }


def layer_seconds(
    spectra: Sequence[LayerSpectrum],
    multiple: int,
    table: LatencyTable,
    on_step: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, Seconds], int]:
    """Each layer's measured seconds per node run (dense: ``rank=None``), by layer name, and how
    many distinct shapes they are; ``on_step(done, total, shape)`` reports the shapes measured."""
    shapes = {
        layer.name: Shape(
            layer.k,
            layer.n,
            max(layer.rows, 1),
            multiple,
            layer.dtype if layer.dtype in _TIMED_DTYPES else "float32",
        )
        for layer in spectra
    }
    curves = table.curves(list(shapes.values()), on_step)
    return {name: curves[shape.key].seconds for name, shape in shapes.items()}, len(curves)


def estimate(
    table: LatencyTable, layers_dense: float, layers: float, shapes: int
) -> LatencyEstimate:
    """The estimate of an allocation costing ``layers`` of the ``layers_dense`` seconds."""
    cache = str(table.path) if table.path is not None else None
    return LatencyEstimate(layers_dense, layers, table.target, shapes, table.measured, cache)
