"""Store embedding tables read by Gather as int8 rows, each with its own scale.

    Gather(T[V, D], ids)  ->  Mul(Cast(Gather(Tq[V, D], ids)), Gather(s[V, 1], ids))

``Tq = round(T / s)`` in int8 with ``s = max|T[v]| / 127`` per row: the rows a run looks up are
converted, never the table. Plain ONNX ops, so ONNX Runtime and TensorRT run it as written.
A standard ``DequantizeLinear -> Gather`` would not do: ONNX Runtime 1.32 CPU does not fuse it
and dequantizes the whole table on every run (measured; docs/quantization.md).

A table qualifies when it is a float initializer of rank 2, at least ``MIN_WIDTH`` wide, read
only by Gathers along axis 0 as
their data (a table also read as an lm_head's weight, tied, stays float: its MatMul reads it
whole, unless its MatMul is quantized too: its Gathers then read int8 rows and its MatMul the
integers of its own plan, both from the same float table). Runs with ``--quantize`` in every
model lrcompile measures and writes, so ``auto`` and the check see its error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from lrcompile.numerics.quantize import quantize
from lrcompile.passes.candidates import ALIAS_OPS, has_live_readers
from lrcompile.passes.factored_graph import free_name, initializer

FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
MIN_WIDTH = 16  # narrower tables stay float


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A table the pass quantizes: its name, shape, dtype and the Gathers reading it."""

    name: str
    shape: tuple[int, int]
    dtype: ir.DataType
    nodes: tuple[str, ...]

    @property
    def bytes_before(self) -> int:
        return self.shape[0] * self.shape[1] * int(self.dtype.itemsize)

    @property
    def bytes_after(self) -> int:
        """int8 values and one scale per row, in the table's type."""
        return self.shape[0] * self.shape[1] + self.shape[0] * int(self.dtype.itemsize)


def embedding_tables(graph: ir.Graph) -> list[Embedding]:
    """The tables of ``graph`` the pass quantizes, in initializer order."""
    tables = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in FLOATS or len(tensor.shape) != 2:
            continue
        if int(tensor.shape[1]) < MIN_WIDTH:
            continue  # no embedding (the pass's own per-row scales are [V, 1])
        if value.is_graph_output() or value.is_graph_input():
            continue
        readers = _readers(value)
        if readers and all(_gathers_rows(node, value) for node in readers):
            shape = (int(tensor.shape[0]), int(tensor.shape[1]))
            names = tuple(node.name or node.outputs[0].name for node in readers)
            tables.append(Embedding(value.name, shape, tensor.dtype, names))
    return tables


def _readers(value: ir.Value) -> list[ir.Node]:
    """The nodes reading ``value``, but for alias chains nothing live reads (a tied lm_head's
    Transpose once its MatMul reads the quantized copy)."""
    return [
        node
        for node, _ in value.uses()
        if not (node.op_type in ALIAS_OPS and not has_live_readers(node.outputs[0]))
    ]


def _gathers_rows(node: ir.Node, value: ir.Value) -> bool:
    return (
        node.op_type == "Gather"
        and node.domain == ""
        and node.inputs[0] is value
        and node.inputs[1] is not value
        and node.attributes.get_int("axis", 0) in (0, -2)
        and node.graph is value.graph
    )


@dataclasses.dataclass(frozen=True)
class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Replaces every qualifying table's Gathers (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables = embedding_tables(graph)
        for table in tables:
            _rewrite(graph, graph.initializers[table.name], table)
        return ir.passes.PassResult(model, modified=bool(tables))

    def ensures(self, model: ir.Model) -> None:
        if embedding_tables(model.graph):
            raise ir.passes.PostconditionError("a float embedding table is still gathered")


def quantized_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Tq, s)``: int8 rows and their float32 scales ``[V, 1]``, symmetric round to nearest."""
    stored = quantize(np.asarray(table, np.float32).T, 8)  # per column of T^T: per row of T
    return np.ascontiguousarray(stored.q.T), stored.scale.reshape(-1, 1)


def _rewrite(graph: ir.Graph, value: ir.Value, table: Embedding) -> None:
    q, scale = quantized_rows(value.const_value.numpy())
    scale = scale.astype(table.dtype.numpy())
    q_value = initializer(graph, ir.tensor(q, name=free_name(graph, f"{table.name}_q")))
    scale_name = free_name(graph, f"{table.name}_q_scale")
    scale_value = initializer(graph, ir.tensor(scale, name=scale_name))
    for node in _readers(value):
        name, ids, output = node.name or node.outputs[0].name, node.inputs[1], node.outputs[0]
        rows = ir.node("Gather", [q_value, ids], {"axis": 0}, name=f"{name}_q")
        scales = ir.node("Gather", [scale_value, ids], {"axis": 0}, name=f"{name}_q_scale")
        cast = ir.node("Cast", [rows.outputs[0]], {"to": table.dtype}, name=f"{name}_q_cast")
        product = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{name}_q_rows")
        for each in (rows, scales, cast):
            each.outputs[0].name = each.name
        product.outputs[0].type, product.outputs[0].shape = output.type, output.shape
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [rows, scales, cast, product], [output], [product.outputs[0]]
        )
    graph.initializers.pop(table.name)
