"""Finding the MatMul/Gemm nodes whose weight is a constant 2-D float matrix.

A candidate is ``MatMul(x, W)`` with ``W`` an initializer or a ``Constant`` output, or
``Gemm(A, B, C)`` with a constant ``B``, where the weight may be reached the way exporters store
it: through chains of ``Identity`` (aliases of reused weights), a 2-D ``Transpose`` (weights
stored ``[N, K]``) and float-to-float ``Cast`` (fp16 storage read in fp32), in any combination.
The effective weight is ``[K, N]`` with ``y = x @ W_eff``: the stored matrix, transposed by the
chain's Transpose and by Gemm's ``transB``, scaled by Gemm's ``alpha``. Nodes reading one stored
weight the same way (through any aliases) form one group, factored once.

A group's weight may have other readers (a ``Gather`` of a tied embedding, nodes that are no
candidates): ``other_readers`` names them, since factoring would then keep the dense weight beside
its factors. MatMul/Gemm nodes in If/Loop/Scan bodies and in model-local functions are listed as
skipped, with the reason. Other weight-bearing or quantized ops (LSTM, Conv, MatMulInteger, ...)
are counted by ``ops_left_alone``.

Discovery never touches tensor data, so external weights stay on disk until the factor provider
reads them (``effective_weight``) and unmaps them again (``release_weight``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from lrcompile.numerics.decompose import compute_dtype

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)
_OPS = ("MatMul", "Gemm")
ALIAS_OPS = ("Identity", "Transpose", "Cast")
# Ops lrcompile leaves alone, by why: counted for the report's "left alone" line.
_QUANTIZED = (
    "MatMulInteger", "QLinearMatMul", "MatMulNBits", "ConvInteger", "QLinearConv", "QGemm",
    "QAttention", "DynamicQuantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulBnb4", "GatherBlockQuantized",
)  # fmt: skip
_WEIGHTED = ("LSTM", "GRU", "RNN", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where a node's weight comes from: the stored constant and the chain that reads it."""

    value: ir.Value
    tensor: ir.TensorProtocol
    transposed: bool  # by a Transpose in the chain
    cast: ir.DataType | None  # the dtype the node reads, when a Cast changes it
    chain: tuple[ir.Node, ...] = ()


@dataclasses.dataclass(frozen=True)
class WeightGroup:
    """Nodes that read one constant weight the same way, and the weight's effective shape."""

    weight: ir.Value  # the stored constant (initializer or Constant output)
    tensor: ir.TensorProtocol
    transposed: bool
    alpha: float
    nodes: tuple[ir.Node, ...]
    cast: ir.DataType | None = None  # the nodes read the weight cast to this dtype
    other_readers: tuple[str, ...] = ()  # op types of non-candidate readers of the weight
    fused: str | None = None  # what the weight packs: "q/k/v" (``fused_role``)

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
        """Unique per group: the weight's name, marked when read transposed, scaled or cast."""
        key = self.name + ("^T" if self.transposed else "")
        key += f"*{self.alpha:g}" if self.alpha != 1.0 else ""
        return key + (f":{self.cast.name.lower()}" if self.cast is not None else "")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A MatMul/Gemm that is not rewritten, and why."""

    node: ir.Node
    reason: str


def find_candidates(
    graph: ir.Graph, functions: Iterable[ir.Function] = ()
) -> tuple[list[WeightGroup], list[Skipped]]:
    """Groups the factorable MatMul/Gemm nodes of ``graph`` by weight; lists the rest with reasons.

    Nodes inside If/Loop/Scan bodies and in ``functions`` (the model's local functions) are listed
    as skipped: they are not rewritten.
    """
    groups: dict[tuple, list[ir.Node]] = {}
    sources: dict[tuple, WeightSource] = {}
    skipped: list[Skipped] = []
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if not _is_matmul(node):
            continue
        reason, source = _problem(node, graph, opset)
        if reason is not None:
            skipped.append(Skipped(node, reason))
            continue
        transposed, alpha = _gemm_orientation(node)
        key = (id(source.value), source.transposed ^ transposed, alpha, source.cast)
        groups.setdefault(key, []).append(node)
        sources[key] = source
    for function in functions:
        for node in function:
            if _is_matmul(node):
                reason = (
                    f"inside the model-local function {function.name}; functions are not rewritten"
                )
                skipped.append(Skipped(node, reason))
    members = {node for nodes in groups.values() for node in nodes}
    candidates = [
        WeightGroup(
            sources[key].value,
            sources[key].tensor,
            key[1],
            key[2],
            tuple(nodes),
            key[3],
            tuple(sorted(_other_readers(sources[key].value, members))),
            fused_role(sources[key].value, nodes),
        )
        for key, nodes in groups.items()
    ]
    return candidates, skipped


def fused_role(weight: ir.Value, nodes: Iterable[ir.Node]) -> str | None:
    """``"q/k/v"`` when the weight packs an attention's query, key and value in one matrix:
    its product (plus a bias) is the packed query of a ``GroupQueryAttention`` or
    ``MultiHeadAttention`` given no key (onnxruntime-genai's builder writes these), or the weight
    or node is named so (``qkv``, ``query_key_value``, ``c_attn``: HF exports). It is one candidate
    like any other; the report names it."""
    names = " ".join([weight.name or "", *(node.name or "" for node in nodes)]).lower()
    if any(mark in names for mark in ("qkv", "query_key_value", "c_attn")):
        return "q/k/v"
    for node in nodes:
        product = node.outputs[0]
        biased = [u.node.outputs[0] for u in product.uses() if u.node.op_type == "Add"]
        for value in (product, *biased):
            for use in value.uses():
                reader = use.node
                packed = len(reader.inputs) < 2 or reader.inputs[1] is None
                attention = reader.op_type in ("GroupQueryAttention", "MultiHeadAttention")
                if attention and use.idx == 0 and packed:
                    return "q/k/v"
    return None


def resolve_weight(value: ir.Value) -> WeightSource | None:
    """The stored constant behind ``value`` through Identity, 2-D Transpose and float Cast
    nodes; None when ``value`` is computed at run time."""
    chain: list[ir.Node] = []
    transposed, cast = False, None
    while value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type not in (*ALIAS_OPS, "Constant"):
            return None
        if producer.op_type == "Constant":
            break
        if producer.op_type == "Transpose":
            perm = producer.attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return None
            transposed = not transposed
        if producer.op_type == "Cast":
            # The stored tensor's dtype is checked once it is found (float to float only).
            target = ir.DataType(producer.attributes.get_int("to", 0))
            if target not in FLOAT_TYPES:
                return None
            cast = cast or target  # the last Cast of the chain decides what the node reads
        chain.append(producer)
        value = producer.inputs[0]
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None:
        return None
    if cast == tensor.dtype:
        cast = None
    return WeightSource(value, tensor, transposed, cast, tuple(chain))


def read_weight(source: WeightSource) -> np.ndarray:
    """The matrix a node reads through ``source``'s chain: the stored tensor, transposed when
    the chain transposes it, in the dtype it casts to."""
    array = source.tensor.numpy()
    array = array.T if source.transposed else array
    return array.astype(source.cast.numpy()) if source.cast is not None else array


def effective_weight(group: WeightGroup) -> np.ndarray:
    """``[K, N]`` with ``y = x @ W``: transposed under Gemm's transB, scaled by its alpha."""
    weight = group.tensor.numpy()
    if group.transposed:
        weight = weight.T
    if group.alpha != 1.0:
        weight = weight.astype(compute_dtype(weight.dtype)) * group.alpha
    return weight


def release_weight(group: WeightGroup) -> None:
    """Unmaps ``group``'s weight, once read, when it lies in external data: its pages would stay
    resident for as long as the model lives (for a 0.5B LM, 2.4 GB through a whole search).
    No view of it may be alive (the map refuses to close under one)."""
    if isinstance(group.tensor, ir.ExternalTensor):
        group.tensor.release()


def has_live_readers(value: ir.Value, ignore: frozenset[ir.Node] = frozenset()) -> bool:
    """Whether anything still reads ``value``: a graph output, or a node other than ``ignore``
    and other than alias chains (Identity/Transpose/Cast) that nothing live reads."""
    return bool(_live_readers(value, ignore)) or value.is_graph_output()


def ops_left_alone(model: ir.Model) -> list[tuple[str, str, int]]:
    """``(op_type, why, count)`` of the quantized and weight-bearing ops lrcompile does not
    factor, in the main graph, its subgraphs and the model's functions."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    nodes = [*ir.traversal.RecursiveGraphIterator(model.graph)]
    nodes += [node for function in model.functions.values() for node in function]
    for node in nodes:
        if node.op_type in _QUANTIZED:
            counts[(node.op_type, "already quantized")] += 1
        elif node.op_type in _WEIGHTED:
            counts[(node.op_type, "not MatMul/Gemm")] += 1
    return [(op, why, count) for (op, why), count in sorted(counts.items())]


def _is_matmul(node: ir.Node) -> bool:
    return node.op_type in _OPS and node.domain in ("", "ai.onnx")


def _live_readers(value: ir.Value, ignore: frozenset[ir.Node]) -> list[str]:
    readers = []
    for node, _ in value.uses():
        if node in ignore:
            continue
        if node.op_type in ALIAS_OPS:  # an alias read by nothing live is dead: not a reader
            output = node.outputs[0]
            through = _live_readers(output, ignore)
            readers.extend(through or ([node.op_type] if output.is_graph_output() else []))
            continue
        readers.append(node.op_type)
    return readers


def _other_readers(value: ir.Value, members: set[ir.Node]) -> set[str]:
    readers = set(_live_readers(value, frozenset(members)))
    return readers | ({"graph output"} if value.is_graph_output() else set())


def _problem(node: ir.Node, graph: ir.Graph, opset: int) -> tuple[str | None, WeightSource | None]:
    if node.graph is not graph:
        return "inside an If/Loop/Scan body; subgraphs are not rewritten", None
    if node.op_type == "Gemm" and opset < 11:
        return "Gemm before opset 11 requires its C input; upgrade", None
    return _weight_problem(node)


def _gemm_orientation(node: ir.Node) -> tuple[bool, float]:
    if node.op_type != "Gemm":
        return False, 1.0
    trans_b = bool(node.attributes.get_int("transB", 0))
    return trans_b, float(node.attributes.get_float("alpha", 1.0))


def _weight_problem(node: ir.Node) -> tuple[str | None, WeightSource | None]:
    """Why ``node``'s second input is no factorable weight (None if it is), and its source."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "has no second input", None
    weight = node.inputs[1]
    if weight.is_graph_input():
        return "weight is a graph input (can be overridden at run time)", None
    try:
        source = resolve_weight(weight)
    except ValueError as e:
        return f"weight Constant is malformed: {e}", None
    if source is None:
        producer = weight.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is already quantized (produced by DequantizeLinear)", None
        op = producer.op_type if producer is not None else "graph"
        return f"second input is computed at run time (by {op}), not a constant weight", None
    if source.value.is_graph_input():
        return "weight is a graph input (can be overridden at run time)", None
    tensor = source.tensor
    if tensor.dtype not in FLOAT_TYPES:
        return f"weight dtype {tensor.dtype.name} is not a float type", None
    if len(tensor.shape) != 2:
        return f"weight is {len(tensor.shape)}-D {list(tensor.shape)}, expected 2-D", None
    return None, source
