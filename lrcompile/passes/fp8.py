"""Quantize the inputs of MatMul/Gemm nodes to FP8 E4M3 with Q/DQ that TensorRT fuses.

    MatMul(x, W) -> MatMul(DQ(Q(x, s_x, z)), DQ(W8, s_w, z))     (Q/DQ: Quantize/DequantizeLinear)

The rules TensorRT needs (DESIGN.md): Q/DQ on the inputs of the MatMuls, never on outputs;
constant scales; per-tensor activation scales; weight scales per-tensor, or per-channel over the
output channels of ``W[K, N]`` with an EXPLICIT ``axis=1`` (TensorRT assumes 0 when it is
missing); FLOAT8E4M3FN zero points (without them the parser assumes INT8). ``scale = amax / 448``.

Targets: the factored pairs (nodes the factorize pass marked, scope ``factored``), or every
MatMul/Gemm with a constant float weight (scope ``all``). A tensor feeding several targets gets one
Q/DQ pair; a shared weight one FP8 initializer. Activation ranges are data the pass is given:
``activation_names(model)`` lists the tensors, and the pipeline has the calibration stage
(``lrcompile.calibration.ranges``) measure them on the model as it is then (factored, not yet
quantized). The pass runs no model.

Preconditions: opset >= 19 (``lrcompile.passes.opset``). Runs after the factorize pass, before
cleanup.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lrcompile.numerics.ranges import ActivationRange
from lrcompile.passes.candidates import find_candidates, read_weight, resolve_weight
from lrcompile.passes.factored_graph import FACTOR_KEY
from lrcompile.passes.opset import MIN_OPSET

logger = logging.getLogger(__name__)

FP8_MAX = 448.0
# Saturating a few values is the point of percentile calibration; saturating outliers at several
# times the range is worth a warning (those values lose most of their magnitude).
OUTLIER_FACTOR = 2.0
SCOPES = ("factored", "all")
WEIGHT_MODES = ("per-tensor", "per-channel")
Scope = Literal["factored", "all"]
WeightMode = Literal["per-tensor", "per-channel"]


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One tensor given FP8 Q/DQ, with its scale (min and max over channels) and range."""

    name: str
    kind: Literal["activation", "weight"]
    scale_min: float
    scale_max: float
    amax: float
    clipped: float = 0.0


@dataclasses.dataclass(frozen=True)
class QuantizeFp8Pass(ir.passes.InPlacePass):
    """Adds FP8 E4M3 Q/DQ on the activation and weight inputs of MatMul/Gemm nodes."""

    scope: Scope = "factored"
    weights: WeightMode = "per-tensor"
    ranges: Mapping[str, ActivationRange] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")

    def activation_names(self, model: ir.Model) -> list[str]:
        """The activations whose ranges the pass needs on ``model``, sorted."""
        targets, _ = self._targets(model.graph)
        return sorted({node.inputs[0].name for node in targets})

    def report(self, model: ir.Model) -> tuple[list[QuantizedTensor], list[tuple[str, str]]]:
        """What the pass will do on ``model``, before it runs: the tensors it will quantize (with
        their scales and ranges; weights are read) and the nodes it will leave alone, with why."""
        targets, skipped = self._targets(model.graph)
        tensors: dict[str, QuantizedTensor] = {}
        for node in targets:
            x, w = node.inputs[0], node.inputs[1]
            if x.name not in tensors:
                tensors[x.name] = _activation_scale(x, node, self.ranges[x.name])[1]
            if w.name not in tensors:
                tensors[w.name] = _weight_scales(node, self.weights)[1]
        return list(tensors.values()), skipped

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 1)
        if opset < MIN_OPSET:
            raise ir.passes.PreconditionError(
                f"FP8 Q/DQ needs opset >= {MIN_OPSET}, the model has {opset}"
            )
        missing = sorted(set(self.activation_names(model)) - set(self.ranges))
        if missing:
            raise ir.passes.PreconditionError(
                f"no calibrated range for {missing}: see activation_names()"
            )

    def ensures(self, model: ir.Model) -> None:
        targets, _ = self._targets(model.graph)
        if targets:  # a target whose inputs are dequantized is no target any more
            names = [node.name or node.outputs[0].name for node in targets]
            raise ir.passes.PostconditionError(f"nodes {names} still read unquantized inputs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        targets, _ = self._targets(graph)
        rewriter = _Rewriter(graph, self.weights)
        for node in targets:
            rewriter.quantize_activation(node, self.ranges[node.inputs[0].name])
            rewriter.quantize_weight(node)
        return ir.passes.PassResult(model, bool(targets))

    def _targets(self, graph: ir.Graph) -> tuple[list[ir.Node], list[tuple[str, str]]]:
        """Nodes to quantize, in graph order, and those refused with reasons."""
        wanted = {n for n in graph if n.metadata_props.get(FACTOR_KEY) in ("A", "B")}
        skipped = []
        if self.scope == "all":
            groups, refused = find_candidates(graph)
            wanted |= {node for group in groups for node in group.nodes}
            skipped = [(s.node.name or "", s.reason) for s in refused if _is_weight_refusal(s)]
        targets = []
        for node in graph:
            if node not in wanted:
                continue
            producer = node.inputs[0].producer()
            if producer is not None and producer.op_type == "DequantizeLinear":
                skipped.append((node.name or "", "input is already quantized (DequantizeLinear)"))
                continue
            targets.append(node)
        return targets, skipped


def _is_weight_refusal(skipped) -> bool:
    # Activation x activation MatMuls are not weights at all; the rest are worth reporting.
    return "computed at run time" not in skipped.reason


class _Rewriter:
    """Creates the Q/DQ nodes and FP8 initializers, once per tensor, before their first use."""

    def __init__(self, graph: ir.Graph, weights: WeightMode) -> None:
        self.graph = graph
        self.weights = weights
        self.done: dict[str, ir.Value] = {}

    def quantize_activation(self, node: ir.Node, limits: ActivationRange) -> None:
        x = node.inputs[0]
        if x.name not in self.done:
            scale_value, report = _activation_scale(x, node, limits)
            scale = self._constant(f"{x.name}_fp8_scale", scale_value)
            zero = self._constant(f"{x.name}_fp8_zero", np.zeros((), ml_dtypes.float8_e4m3fn))
            q = ir.node("QuantizeLinear", [x, scale, zero], name=f"{x.name}_QuantizeLinear")
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{x.name}_DQ")
            q.outputs[0].name, dq.outputs[0].name = f"{x.name}_fp8", f"{x.name}_fp8_dq"
            if x.dtype is not None:
                dq.outputs[0].dtype = x.dtype
            dq.outputs[0].shape = x.shape
            self.graph.insert_before(node, [q, dq])
            self.done[x.name] = dq.outputs[0]
            if limits.amax > OUTLIER_FACTOR * limits.value:
                logger.warning(
                    "%s: calibration values reach %.4g, %.1fx beyond the FP8 range at scale %.3g;"
                    " %.3g%% of them saturate",
                    x.name,
                    limits.amax,
                    limits.amax / limits.value,
                    report.scale_max,
                    100 * limits.clipped,
                )
        node.replace_input_with(0, self.done[x.name])

    def quantize_weight(self, node: ir.Node) -> None:
        w = node.inputs[1]
        if w.name not in self.done:
            scaled, _ = _weight_scales(node, self.weights)
            quantized = _to_fp8(scaled.weight.astype(np.float32) / scaled.shaped)
            fp8 = self._constant(f"{w.name}_fp8", quantized)
            scale = self._constant(f"{w.name}_fp8_scale", scaled.scale)
            zero = self._constant(
                f"{w.name}_fp8_zero", np.zeros(scaled.scale.shape, quantized.dtype)
            )
            attributes = {"axis": scaled.axis} if scaled.axis is not None else {}
            dq = ir.node("DequantizeLinear", [fp8, scale, zero], attributes, name=f"{w.name}_DQ")
            dq.outputs[0].name = f"{w.name}_fp8_dq"
            dq.outputs[0].dtype, dq.outputs[0].shape = scaled.dtype, ir.Shape(quantized.shape)
            self.graph.insert_before(node, [dq])
            self.done[w.name] = dq.outputs[0]
        node.replace_input_with(1, self.done[w.name])

    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(value.const_value.dtype)
        self.graph.register_initializer(value)
        return value


@dataclasses.dataclass(frozen=True)
class _ScaledWeight:
    """A weight as its node reads it, with its FP8 scales (``shaped`` broadcasts over it)."""

    weight: np.ndarray
    dtype: ir.DataType
    scale: np.ndarray
    shaped: np.ndarray  # float32
    axis: int | None  # the per-channel axis, None per tensor


def _activation_scale(
    x: ir.Value, node: ir.Node, limits: ActivationRange
) -> tuple[np.ndarray, QuantizedTensor]:
    """The scale of the activation ``x`` that ``node`` reads, and its report entry."""
    dtype = x.dtype or node.inputs[1].dtype or ir.DataType.FLOAT
    scale = _scale(np.array(limits.value), dtype)
    value = float(scale.astype(np.float32))
    return scale, QuantizedTensor(x.name, "activation", value, value, limits.amax, limits.clipped)


def _weight_scales(node: ir.Node, mode: WeightMode) -> tuple[_ScaledWeight, QuantizedTensor]:
    """The weight ``node`` reads (through Transpose, Cast) with its scales, and its report entry.

    Per output channel: ``W[K, N]`` for MatMul, ``B[N, K]`` for Gemm(transB=1) (DESIGN.md).
    """
    w = node.inputs[1]
    source = resolve_weight(w)
    weight = read_weight(source)
    dtype = source.cast or source.tensor.dtype
    axis = 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
    per_channel = mode == "per-channel"
    amax = np.max(np.abs(weight.astype(np.float32)), axis=1 - axis if per_channel else None)
    scale = _scale(np.asarray(amax), dtype)
    shaped = np.expand_dims(scale, 1 - axis) if per_channel else scale
    scales = scale.astype(np.float32)
    report = QuantizedTensor(
        w.name, "weight", float(scales.min()), float(scales.max()), float(np.max(amax))
    )
    scaled = _ScaledWeight(
        weight, dtype, scale, shaped.astype(np.float32), axis if per_channel else None
    )
    return scaled, report


def _scale(amax: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """``amax / 448`` in the tensor's float dtype; 1/448 where amax is 0 (any scale fits zeros)."""
    amax = np.where(amax > 0, amax, 1.0).astype(np.float64)
    return (amax / FP8_MAX).astype(dtype.numpy())


def _to_fp8(scaled: np.ndarray) -> np.ndarray:
    """Round to E4M3 (nearest even), saturating at +-448 as QuantizeLinear(saturate=1) does."""
    return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
