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

from lrcompile.numerics.allocate import LayerSpectrum, QuantizedLayer, Seconds
from lrcompile.plan import Quantize
from lrcompile.runtime.latency import LatencyTable, Shape
from lrcompile.runtime.latency_models import Form

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


def quantized_seconds(
    layers: Sequence[QuantizedLayer],
    template: Quantize,
    accuracy_level: int | None,
    table: LatencyTable,
    on_step: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, Seconds], int]:
    """``layer_seconds`` of quantized layers: each one's seconds per node run dense (None) and
    in each stored form it may take (a ``Choice.label``: a correction rank, 0 for none,
    ``"int8"`` or ``"w8a8"``), measured as written and run at ``accuracy_level``."""
    forms: dict[str, dict[int | str, tuple[Shape, int]]] = {}
    for layer in layers:
        dtype = layer.dtype if layer.dtype in _TIMED_DTYPES else "float32"
        ranks = tuple(c.label for c in layer.choices if isinstance(c.label, int))
        own = Form(template.bits, template.group, template.symmetric, accuracy_level, ranks)
        shape = Shape(layer.k, layer.n, max(layer.rows, 1), 1, dtype, own)
        forms[layer.name] = {rank: (shape, rank) for rank in ranks}
        for label, dynamic in (("int8", False), ("w8a8", True)):
            if any(c.label == label for c in layer.choices):
                higher = Form(8, None, template.symmetric, accuracy_level, (0,), dynamic)
                forms[layer.name][label] = (dataclasses.replace(shape, form=higher), 0)
    shapes = [shape for options in forms.values() for shape, _ in options.values()]
    curves = table.curves(shapes, on_step)

    def seconds(options: dict[int | str, tuple[Shape, int]]) -> Seconds:
        def of(label: int | str | None) -> float:
            shape, rank = options[0 if label is None else label]
            curve = curves[shape.key]
            return curve.dense if label is None else curve.seconds(rank)

        return of

    return {name: seconds(options) for name, options in forms.items() if options}, len(curves)


def objective_seconds(
    layers: Sequence[LayerSpectrum | QuantizedLayer],
    quantize: Quantize | None,
    multiple: int,
    accuracy_level: int | None,
    table: LatencyTable,
    on_step: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, Seconds], int]:
    """``quantized_seconds`` of quantized layers (``quantize`` given), else ``layer_seconds``."""
    if quantize is not None:
        return quantized_seconds(layers, quantize, accuracy_level, table, on_step)
    return layer_seconds(layers, multiple, table, on_step)


def estimate(
    table: LatencyTable, layers_dense: float, layers: float, shapes: int
) -> LatencyEstimate:
    """The estimate of an allocation costing ``layers`` of the ``layers_dense`` seconds."""
    cache = str(table.path) if table.path is not None else None
    return LatencyEstimate(layers_dense, layers, table.target, shapes, table.measured, cache)
