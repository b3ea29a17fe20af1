"""Replace each factored block by one call that TensorRT maps to the fused LowRankGemm plugin.

    MatMul(MatMul(x, A), B) [+ bias]                   (and their Q/DQ under --fp8)
      -> lrcompile.LowRankGemm(x, x_scale, A, A_scale, mid_scale, B, B_scale, bias)
         {rank, has_bias, fp8, plugin_namespace = "lrcompile", plugin_version = "1"}

The call invokes a model-local ONNX function whose body is exactly the block it replaced, so ONNX
Runtime (which inlines functions) computes what it computed before, and TensorRT >= 10.15, seeing
``plugin_namespace``, runs the registered plugin instead (DESIGN.md). Every call has the same eight
inputs, as a TensorRT plugin has a fixed signature: without FP8 the four scales are a shared 1.0
(unused by the body and the kernel); without a bias, a shared zero vector. One function per
distinct signature (FP8 or not, bias or not, per-channel zero-point shapes), told apart by the
function's ``overload``.

Preconditions: factored pairs marked by the factorize pass (``lrcompile.factor``), MatMul pairs or
Gemm pairs without transA. Runs after factorize and FP8, before cleanup.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lrcompile.passes.factored_graph import FACTOR_KEY

logger = logging.getLogger(__name__)

DOMAIN = "lrcompile"
OP_TYPE = "LowRankGemm"
PLUGIN_NAMESPACE = "lrcompile"
PLUGIN_VERSION = "1"
INPUTS = ("x", "x_scale", "a", "a_scale", "mid_scale", "b", "b_scale", "bias")


@dataclasses.dataclass
class PluginResult(ir.passes.PassResult):
    """The pass result: blocks replaced, and factored pairs left alone with reasons."""

    replaced: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Block:
    """One factored pair with what surrounds it: Q/DQ, weights, scales, bias."""

    nodes: tuple[ir.Node, ...]
    output: ir.Value
    inputs: dict[str, ir.Value | np.ndarray | None]  # bias: a new [N] array for beta * C
    zero_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    rank: int
    fp8: bool
    per_channel_axis: bool


@dataclasses.dataclass(frozen=True)
class EmitLowRankGemmPass(ir.passes.InPlacePass):
    """Replaces each factored block by a ``lrcompile.LowRankGemm`` function call (a plugin)."""

    def call(self, model: ir.Model) -> PluginResult:
        graph = model.graph
        replaced, skipped = [], []
        functions: dict[str, ir.Function] = {}
        for second in [n for n in graph if n.metadata_props.get(FACTOR_KEY) == "B"]:
            block, reason = _find_block(second)
            if block is None:
                skipped.append((second.name or "", reason))
                continue
            overload = _overload(block)
            if overload not in functions:
                opset = model.opset_imports.get("", 1)
                functions[overload] = _function(block, overload, opset)
                model.functions[functions[overload].identifier()] = functions[overload]
            _replace(graph, block, overload)
            replaced.append(second.name or block.output.name or "")
        if replaced:
            model.opset_imports[DOMAIN] = 1
        return PluginResult(model, bool(replaced), replaced, skipped)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _through_qdq(value: ir.Value) -> tuple[ir.Value, ir.Node | None, ir.Node | None]:
    """The tensor before a Q -> DQ chain ending in ``value`` (or ``value`` itself)."""
    dq = _producer(value, "DequantizeLinear")
    q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    if dq is None or q is None:
        return value, None, None
    return q.inputs[0], q, dq


def _find_block(second: ir.Node) -> tuple[_Block | None, str]:
    mid_input, q_mid, dq_mid = _through_qdq(second.inputs[0])
    first = mid_input.producer()
    if first is None or first.metadata_props.get(FACTOR_KEY) != "A":
        return None, "its first factor is not directly before it"
    if first.op_type == "Gemm" and first.attributes.get_int("transA", 0):
        return None, "Gemm with transA is not fused"
    if len(mid_input.uses()) != 1 or mid_input.is_graph_output():
        return None, "the intermediate is read elsewhere"
    x, q_x, dq_x = _through_qdq(first.inputs[0])
    a, a_scale, dq_a = _weight(first.inputs[1])
    b, b_scale, dq_b = _weight(second.inputs[1])
    fp8 = dq_a is not None
    if fp8 != (dq_b is not None) or fp8 != (q_x is not None) or fp8 != (q_mid is not None):
        return None, "only partly quantized"
    nodes = [n for n in (q_x, dq_x, dq_a, first, q_mid, dq_mid, dq_b, second) if n is not None]
    output, bias = second.outputs[0], _gemm_bias(second)
    if isinstance(bias, str):
        return None, bias
    if bias is None:
        add, bias = _bias_add(output)
        if add is not None:
            nodes.append(add)
            output = add.outputs[0]
    scales = {
        "x_scale": q_x.inputs[1] if fp8 else None,
        "a_scale": a_scale,
        "mid_scale": q_mid.inputs[1] if fp8 else None,
        "b_scale": b_scale,
    }
    zero_shapes = (_shape(a_scale), _shape(b_scale)) if fp8 else ((), ())
    inputs = {"x": x, "a": a, "b": b, "bias": bias, **scales}
    block = _Block(
        tuple(nodes),
        output,
        inputs,
        zero_shapes,
        int(a.shape[1]),
        fp8,
        fp8 and bool(zero_shapes[0]),
    )
    return block, ""


def _weight(value: ir.Value) -> tuple[ir.Value, ir.Value | None, ir.Node | None]:
    dq = _producer(value, "DequantizeLinear")
    return (dq.inputs[0], dq.inputs[1], dq) if dq is not None else (value, None, None)


def _gemm_bias(node: ir.Node) -> ir.Value | np.ndarray | str | None:
    """The Gemm's bias as the kernel takes it, ``beta * C`` of shape ``[N]``: ``C`` itself when it
    is already that, else a new array; a string says why the bias cannot be fused."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c, beta = node.inputs[2], node.attributes.get_float("beta", 1.0)
    tensor = ir.convenience.get_const_tensor(c)
    if tensor is None:
        return "its Gemm bias C is computed at run time"
    shape = tuple(int(d) for d in tensor.shape)
    n = int(node.inputs[1].shape[-1])
    if shape == (n,) and beta == 1.0:
        return c
    if shape not in ((), (1,), (n,), (1, n)):
        return f"its Gemm bias C of shape {list(shape)} is not one value per output ([{n}])"
    array = tensor.numpy()
    return np.broadcast_to(array * np.asarray(beta, array.dtype), (1, n))[0].copy()


def _bias_add(value: ir.Value) -> tuple[ir.Node | None, ir.Value | None]:
    """A following ``Add(value, bias)`` with a constant 1-D bias that only ``value`` reaches."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    tensor = ir.convenience.get_const_tensor(other) if other is not None else None
    if tensor is None or len(tensor.shape) != 1:
        return None, None
    return add, other


def _shape(value: ir.Value | None) -> tuple[int, ...]:
    tensor = value.const_value if value is not None else None
    return tuple(int(d) for d in tensor.shape) if tensor is not None else ()


def _overload(block: _Block) -> str:
    has_bias = block.inputs["bias"] is not None
    parts = ["fp8" if block.fp8 else "float", "bias" if has_bias else "nobias"]
    a_zero, b_zero = block.zero_shapes
    if a_zero or b_zero:
        parts.append(f"pc{'x'.join(map(str, a_zero))}_{'x'.join(map(str, b_zero))}")
    second = next(n for n in block.nodes if n.metadata_props.get(FACTOR_KEY) == "B")
    if second.op_type == "Gemm":  # a Gemm body differs from MatMul (+ Add)
        parts.append("gemm")
    return "_".join(parts)


def _function(block: _Block, overload: str, opset: int) -> ir.Function:
    """The body: exactly the block, on the eight function inputs, at the model's opset."""
    inputs = [ir.Value(name=name) for name in INPUTS]
    x, x_scale, a, a_scale, mid_scale, b, b_scale, bias = inputs
    nodes: list[ir.Node] = []

    def add(op: str, args, attributes=None) -> ir.Value:
        nodes.append(ir.node(op, args, attributes or {}))
        return nodes[-1].outputs[0]

    def zero(shape: tuple[int, ...]) -> ir.Value:
        return add("Constant", [], {"value": ir.tensor(np.zeros(shape, ml_dtypes.float8_e4m3fn))})

    def matmul(op: ir.Node, left: ir.Value, right: ir.Value) -> ir.Value:
        attributes = {k: v.value for k, v in op.attributes.items()}
        return add(op.op_type, [left, right], attributes)

    first = next(n for n in block.nodes if n.metadata_props.get(FACTOR_KEY) == "A")
    second = next(n for n in block.nodes if n.metadata_props.get(FACTOR_KEY) == "B")
    if block.fp8:
        zx, zm = zero(()), zero(())
        axis = {"axis": 1} if block.per_channel_axis else {}
        x = add("DequantizeLinear", [add("QuantizeLinear", [x, x_scale, zx]), x_scale, zx])
        a = add("DequantizeLinear", [a, a_scale, zero(block.zero_shapes[0])], axis)
        b = add("DequantizeLinear", [b, b_scale, zero(block.zero_shapes[1])], axis)
    mid = matmul(first, x, a)
    if block.fp8:
        mid = add("DequantizeLinear", [add("QuantizeLinear", [mid, mid_scale, zm]), mid_scale, zm])
    if second.op_type == "Gemm" and block.inputs["bias"] is not None:
        attributes = {k: v.value for k, v in second.attributes.items()}
        if isinstance(block.inputs["bias"], np.ndarray):
            attributes["beta"] = 1.0  # the bias input already is beta * C
        output = add("Gemm", [mid, b, bias], attributes)
    else:
        output = matmul(second, mid, b)
        if block.inputs["bias"] is not None:
            output = add("Add", [output, bias])
    graph = ir.Graph(inputs, [output], nodes=nodes, opset_imports={"": opset})
    attributes = [
        ir.Attr("rank", ir.AttributeType.INT, 0),
        ir.Attr("has_bias", ir.AttributeType.INT, 0),
        ir.Attr("fp8", ir.AttributeType.INT, 0),
        ir.Attr("plugin_namespace", ir.AttributeType.STRING, PLUGIN_NAMESPACE),
        ir.Attr("plugin_version", ir.AttributeType.STRING, PLUGIN_VERSION),
    ]
    return ir.Function(DOMAIN, OP_TYPE, overload, graph=graph, attributes=attributes)


def _replace(graph: ir.Graph, block: _Block, overload: str) -> None:
    one = _shared(
        graph,
        "lrcompile_unit_scale",
        np.array(1.0, block.inputs["x"].dtype.numpy() if block.inputs["x"].dtype else np.float32),
    )
    values = dict(block.inputs)
    for name in ("x_scale", "a_scale", "mid_scale", "b_scale"):
        values[name] = values[name] or one
    if isinstance(values["bias"], np.ndarray):  # beta * C as one [N] vector
        name = f"{block.nodes[-1].name or block.output.name}_bias"
        values["bias"] = _shared(graph, name, values["bias"])
    if values["bias"] is None:
        n = int(block.inputs["b"].shape[-1])
        values["bias"] = _shared(graph, f"lrcompile_zero_bias_{n}", np.zeros(n, one.dtype.numpy()))
    call = ir.node(
        OP_TYPE,
        [values[name] for name in INPUTS],
        {
            "rank": block.rank,
            "has_bias": int(block.inputs["bias"] is not None),
            "fp8": int(block.fp8),
            "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION,
        },
        domain=DOMAIN,
        overload=overload,
        name=f"{block.nodes[-1].name or block.output.name}_LowRankGemm",
    )
    # Q/DQ of an input shared with other blocks (Q, K, V) stay for them; cleanup drops the rest.
    private = {block.nodes[-1]}
    for node in reversed(block.nodes[:-1]):  # consumers come later in the block
        outputs = node.outputs
        if all(use.node in private for out in outputs for use in out.uses()) and not any(
            out.is_graph_output() for out in outputs
        ):
            private.add(node)
    ir.convenience.replace_nodes_and_values(
        graph,
        block.nodes[-1],
        [n for n in block.nodes if n in private],
        [call],
        [block.output],
        [call.outputs[0]],
    )


def _shared(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value
