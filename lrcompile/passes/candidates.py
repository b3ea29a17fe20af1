"""Finding the MatMul/Gemm nodes whose weight is a constant 2-D float matrix.

A candidate is ``MatMul(x, W)`` with ``W`` an initializer or a ``Constant`` output, or
``Gemm(A, B, C)`` with a constant ``B``. The effective weight is ``[K, N]`` with
``y = x @ W_eff``: for Gemm it is ``alpha * B`` (``alpha * B^T`` under ``transB``). Nodes that
share one weight with the same orientation and scale form one group, factored once.

Reading weights is left to the pass: discovery never touches tensor data, so external weights
stay on disk.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
_OPS = ("MatMul", "Gemm")


@dataclasses.dataclass(frozen=True)
class WeightGroup:
    """Nodes that read one constant weight the same way, and the weight's effective shape."""

    weight: ir.Value
    tensor: ir.TensorProtocol
    transposed: bool
    alpha: float
    nodes: tuple[ir.Node, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)`` of the effective weight ``y = x @ W_eff``."""
        rows, cols = (int(d) for d in self.tensor.shape)
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def name(self) -> str:
        return self.weight.name or self.nodes[0].name or "weight"

    @property
    def key(self) -> str:
        """Unique per group: the weight's name, marked when read transposed or scaled."""
        key = self.name + ("^T" if self.transposed else "")
        return key + (f"*{self.alpha:g}" if self.alpha != 1.0 else "")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A MatMul/Gemm that is not rewritten, and why."""

    node: ir.Node
    reason: str


def find_candidates(graph: ir.Graph) -> tuple[list[WeightGroup], list[Skipped]]:
    """Groups the factorable MatMul/Gemm nodes of ``graph`` by weight; lists the rest with reasons.

    Nodes inside If/Loop/Scan bodies are listed as skipped: subgraphs are not rewritten.
    """
    groups: dict[tuple[int, bool, float], list[ir.Node]] = {}
    weights: dict[tuple[int, bool, float], tuple[ir.Value, ir.TensorProtocol]] = {}
    skipped: list[Skipped] = []
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.graph is not graph:
            skipped.append(
                Skipped(node, "inside an If/Loop/Scan body; subgraphs are not rewritten")
            )
            continue
        if node.op_type == "Gemm" and opset < 11:
            skipped.append(Skipped(node, "Gemm before opset 11 requires its C input; upgrade"))
            continue
        reason, tensor = _weight_problem(node)
        if reason is not None:
            skipped.append(Skipped(node, reason))
            continue
        weight = node.inputs[1]
        transposed, alpha = _gemm_orientation(node)
        key = (id(weight), transposed, alpha)
        groups.setdefault(key, []).append(node)
        weights[key] = (weight, tensor)
    candidates = [
        WeightGroup(weights[key][0], weights[key][1], key[1], key[2], tuple(nodes))
        for key, nodes in groups.items()
    ]
    return candidates, skipped


def _gemm_orientation(node: ir.Node) -> tuple[bool, float]:
    if node.op_type != "Gemm":
        return False, 1.0
    trans_b = bool(node.attributes.get_int("transB", 0))
    return trans_b, float(node.attributes.get_float("alpha", 1.0))


def _weight_problem(node: ir.Node) -> tuple[str | None, ir.TensorProtocol | None]:
    """Why ``node``'s second input is no factorable weight (None if it is), and its tensor."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "has no second input", None
    weight = node.inputs[1]
    if weight.is_graph_input():
        return "weight is a graph input (can be overridden at run time)", None
    try:
        tensor = ir.convenience.get_const_tensor(weight)
    except ValueError as e:
        return f"weight Constant is malformed: {e}", None
    if tensor is None:
        producer = weight.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is already quantized (produced by DequantizeLinear)", None
        op = producer.op_type if producer is not None else "graph"
        return f"second input is computed at run time (by {op}), not a constant weight", None
    if tensor.dtype not in FLOAT_TYPES:
        return f"weight dtype {tensor.dtype.name} is not a float type", None
    if len(tensor.shape) != 2:
        return f"weight is {len(tensor.shape)}-D {list(tensor.shape)}, expected 2-D", None
    return None, tensor
