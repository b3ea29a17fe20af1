"""Store the weights the plan quantizes as integers read through DequantizeLinear.

    MatMul(x, W)              -> MatMul(x, DQ(Wq, s, z))
                                 [+ MatMul(MatMul(x, Cast(A)), Cast(B))]     (the correction)
    Gemm(a, W, C; alpha, tA, tB) -> Gemm(a, DQ(Wq, s, z), C; tA, beta)       (alpha, tB folded)
                                 [+ Gemm(Gemm(a, Cast(A); tA), Cast(B))]

    MatMul(x, W), dynamic  -> Mul(Cast(MatMulInteger(xq, Wq, xz[, z]), float), Mul(xs, s))
                              with xq, xs, xz = DynamicQuantizeLinear(x)    (W8A8)

``DQ`` is ONNX DequantizeLinear along axis 0 in blocks of ``group`` rows (``block_size``), or
per output channel (axis 1), which ONNX Runtime fuses with the MatMul into MatMulNBits at its
default optimisation level. The dynamic form is the pattern ONNX Runtime's ``quantize_dynamic``
writes, which it fuses alike (DynamicQuantizeMatMul, or MatMulIntegerToFloat where layers
reading one input share one DynamicQuantizeLinear after its common-subexpression pass):
activations quantized to uint8 per tensor at run time, integer GEMM. The scales are in the float
type the node reads; the correction's factors are stored in float16 and read through a Cast
where the node reads another type. The sum keeps the original output name. The pass takes the
plan (``Quantize`` decisions) and the provider's tensors (``factors.quantized.QuantizedFit``) and
only rewrites the graph.

Preconditions: opset >= 21 (blocked and 4-bit DequantizeLinear); every quantized group is a
candidate of the model with tensors of its shape. Runs after the factorize pass, before cleanup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_ir as ir

from lrcompile.passes.candidates import WeightGroup, find_candidates
from lrcompile.passes.factored_graph import factor_names, initializer
from lrcompile.plan import Plan

MIN_OPSET = 21
# The initializers of one quantized weight: integers, scales, zero points, the correction's A, B.
SUFFIXES = ("_q", "_q_scale", "_q_zero", "_lr_A", "_lr_B")
QUANTIZED_KEY = "lrcompile.quantized"  # node metadata: "base", "A", "B" or "sum"


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replaces each weight ``plan`` quantizes by its DequantizeLinear (plus its correction)."""

    plan: Plan
    weights: Mapping[str, object] = dataclasses.field(repr=False)  # key -> QuantizedFit

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 1)
        if self.plan.quantized and opset < MIN_OPSET:
            raise ir.passes.PreconditionError(
                f"blocked and 4-bit DequantizeLinear need opset >= {MIN_OPSET}, the model has "
                f"{opset}"
            )
        groups = {group.key: group for group in _candidates(model)}
        for key in self.plan.quantized:
            if key not in groups or key not in self.weights:
                raise ir.passes.PreconditionError(f"no group or no tensors for {key!r}")
            if tuple(self.weights[key].q.shape) != groups[key].shape:
                raise ir.passes.PreconditionError(f"{key!r}: integers not of the weight's shape")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        decisions = self.plan.quantized
        targets = [group for group in _candidates(model) if group.key in decisions]
        for group in targets:
            _rewrite(model.graph, group, decisions[group.key], self.weights[group.key])
        return ir.passes.PassResult(model, modified=bool(targets))

    def ensures(self, model: ir.Model) -> None:
        left = {group.key for group in _candidates(model)} & set(self.plan.quantized)
        if left:
            raise ir.passes.PostconditionError(f"groups {sorted(left)} still read their weight")


def tensor_names(model: ir.Model, groups, plan: Plan) -> tuple[dict, dict]:
    """The initializer names of the plan's factors and of its quantized weights' tensors
    (``SUFFIXES``), unique in the model and between them."""
    names = factor_names(model.graph, groups, plan.factored)
    taken = [name for pair in names.values() for name in pair]
    quantized = factor_names(model.graph, groups, plan.quantized, SUFFIXES, taken)
    return names, quantized


def _candidates(model: ir.Model) -> list[WeightGroup]:
    groups, _ = find_candidates(model.graph, model.functions.values())
    return groups


def _rewrite(graph: ir.Graph, group: WeightGroup, decision, fit) -> None:
    read = group.cast or group.tensor.dtype
    weight = None if decision.dynamic else _dequantized(graph, group, decision, fit, read)
    # W8A8 reads the integers (and scales, zero points) directly, once per group.
    integers = [initializer(graph, t) if t is not None else None
                for t in (fit.q, fit.scale, fit.zero)] if decision.dynamic else None  # fmt: skip
    factors = None
    if fit.left is not None:
        factors = tuple(
            _read_as(graph, group, initializer(graph, t), read) for t in (fit.left, fit.right)
        )
    for node in group.nodes:
        output = node.outputs[0]
        if weight is None:
            *before, base = _dynamic_nodes(node, *integers)
        else:
            before, base = [], _base_node(node, weight)
        base.metadata_props[QUANTIZED_KEY] = "base"
        graph.insert_before(node, before)
        nodes, result = [base], base
        if factors is not None:
            first, second = _correction_nodes(node, *factors)
            total = ir.node(
                "Add", [base.outputs[0], second.outputs[0]], name=f"{_name(node)}_q_sum"
            )
            for part, role in ((first, "A"), (second, "B"), (total, "sum")):
                part.metadata_props[QUANTIZED_KEY] = role
            for value, suffix in ((base, "_q_base"), (first, "_q_mid"), (second, "_q_lr")):
                value.outputs[0].name = f"{output.name}{suffix}"
                value.outputs[0].type = output.type
            nodes, result = [base, first, second, total], total
        result.outputs[0].type, result.outputs[0].shape = output.type, output.shape
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], nodes, [output], [result.outputs[0]]
        )


def _dequantized(graph: ir.Graph, group: WeightGroup, decision, fit, read) -> ir.Value:
    """The DequantizeLinear of the integers, before the group's first node."""
    inputs = [initializer(graph, fit.q), initializer(graph, fit.scale)]
    if fit.zero is not None:
        inputs.append(initializer(graph, fit.zero))
    attributes = {"axis": 0, "block_size": decision.group} if decision.group else {"axis": 1}
    node = ir.node("DequantizeLinear", inputs, attributes, name=f"{group.name}_DequantizeLinear")
    node.outputs[0].name = f"{group.name}_dq"
    node.outputs[0].dtype, node.outputs[0].shape = read, ir.Shape(list(group.shape))
    graph.insert_before(group.nodes[0], [node])
    return node.outputs[0]


def _read_as(graph: ir.Graph, group: WeightGroup, value: ir.Value, read) -> ir.Value:
    """``value`` as the node reads it: through a Cast when it is stored in another type."""
    if value.dtype == read:
        return value
    cast = ir.node("Cast", [value], {"to": read}, name=f"{value.name}_Cast")
    cast.outputs[0].name = f"{value.name}_cast"
    cast.outputs[0].dtype, cast.outputs[0].shape = read, value.shape
    graph.insert_before(group.nodes[0], [cast])
    return cast.outputs[0]


def _base_node(node: ir.Node, weight: ir.Value) -> ir.Node:
    """``node`` reading the dequantized weight (a Gemm's alpha and transB are in it already)."""
    if node.op_type == "MatMul":
        return ir.node("MatMul", [node.inputs[0], weight], name=f"{_name(node)}_q")
    attributes = {"transA": node.attributes.get_int("transA", 0)}
    inputs = [node.inputs[0], weight]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs.append(node.inputs[2])
        attributes["beta"] = node.attributes.get_float("beta", 1.0)
    return ir.node("Gemm", inputs, attributes, name=f"{_name(node)}_q")


def _dynamic_nodes(node: ir.Node, q: ir.Value, scale: ir.Value, zero) -> list[ir.Node]:
    """``quantize_dynamic``'s pattern for ``MatMul(x, W)``, its last node the float result."""
    name = _name(node)
    quantized = ir.node(
        "DynamicQuantizeLinear", [node.inputs[0]], num_outputs=3, name=f"{name}_q_act"
    )
    xq, xs, xz = quantized.outputs
    for value, suffix in zip(quantized.outputs, ("quantized", "scale", "zero_point"), strict=True):
        value.name = f"{name}_x_{suffix}"
    scales = ir.node("Mul", [xs, scale], name=f"{name}_q_scales")
    inputs = [xq, q, xz] if zero is None else [xq, q, xz, zero]
    integer = ir.node("MatMulInteger", inputs, name=f"{name}_q_int")
    cast = ir.node("Cast", [integer.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_q_cast")
    result = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{name}_q")
    for part, suffix in ((scales, "_q_scales"), (integer, "_q_int"), (cast, "_q_float")):
        part.outputs[0].name = f"{name}{suffix}"
    return [quantized, scales, integer, cast, result]


def _correction_nodes(node: ir.Node, a: ir.Value, b: ir.Value) -> tuple[ir.Node, ir.Node]:
    """``x @ A`` then ``@ B``, without a Gemm's bias (the base node adds it)."""
    x = node.inputs[0]
    if node.op_type == "MatMul":
        first = ir.node("MatMul", [x, a], name=f"{_name(node)}_q_lr_A")
    else:
        trans_a = node.attributes.get_int("transA", 0)
        first = ir.node("Gemm", [x, a], {"transA": trans_a}, name=f"{_name(node)}_q_lr_A")
    second = ir.node(first.op_type, [first.outputs[0], b], name=f"{_name(node)}_q_lr_B")
    return first, second


def _name(node: ir.Node) -> str:
    return node.name or node.outputs[0].name
