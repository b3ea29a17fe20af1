"""One first factor for the corrections of layers that read the same input (q/k/v, gate/up).

    MatMul(x, A_q) -> ... , MatMul(x, A_k) -> ... , MatMul(x, A_v) -> ...
      ->  Split(MatMul(x, [A_q A_k A_v]), [r_q, r_k, r_v], axis=-1) -> each layer's MatMul(., B)

Each correction keeps its own factors and numbers (the columns of a product do not depend on
the other columns): only the first MatMuls become one wider MatMul, one kernel launch reading
``x`` once instead of one per layer. The concatenated factor is stored once, in the factors'
type (read through one Cast where the layers read another). Runs after ``QuantizeWeightsPass``
(it finds the correction's first nodes by their metadata); the old factors are left unread for
cleanup.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from lrcompile.passes.factored_graph import free_name, initializer
from lrcompile.passes.quantized import QUANTIZED_KEY


@dataclasses.dataclass(frozen=True)
class ShareFirstFactorPass(ir.passes.InPlacePass):
    """Merges the first MatMuls of the corrections that read one input (see the module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared = [members for members in _sharing(graph).values() if len(members) > 1]
        for members in shared:
            _merge(graph, members)
        return ir.passes.PassResult(model, modified=bool(shared))


def _sharing(graph: ir.Graph) -> dict[tuple, list[tuple[ir.Node, ir.Value, ir.DataType | None]]]:
    """The corrections' first MatMuls by (input, stored type, read type), in graph order, each
    with its stored factor and the type it is cast to (None: read as stored)."""
    groups = collections.defaultdict(list)
    for node in graph:
        if node.metadata_props.get(QUANTIZED_KEY) != "A" or node.op_type != "MatMul":
            continue
        factor, cast = node.inputs[1], None
        producer = factor.producer()
        if producer is not None and producer.op_type == "Cast":
            factor, cast = producer.inputs[0], producer.attributes.get_int("to")
        if factor.const_value is None or factor.name not in graph.initializers:
            continue
        key = (id(node.inputs[0]), factor.dtype, cast)
        groups[key].append((node, factor, None if cast is None else ir.DataType(cast)))
    return groups


def _merge(graph: ir.Graph, members) -> None:
    first, _, cast = members[0]
    x = first.inputs[0]
    arrays = [factor.const_value.numpy() for _, factor, _ in members]
    name = free_name(graph, f"{x.name or first.name}_lr_A_shared")
    value = initializer(graph, ir.tensor(np.concatenate(arrays, axis=1), name=name))
    nodes = []
    if cast is not None:
        convert = ir.node("Cast", [value], {"to": cast}, name=f"{name}_Cast")
        convert.outputs[0].name = f"{name}_cast"
        nodes.append(convert)
        value = convert.outputs[0]
    product = ir.node("MatMul", [x, value], name=f"{name}_MatMul")
    product.outputs[0].name = f"{name}_mid"
    widths = np.array([array.shape[1] for array in arrays], np.int64)
    sizes = initializer(graph, ir.tensor(widths, name=free_name(graph, f"{name}_split")))
    split = ir.node(  # ``num_outputs`` here is how many outputs the node has, no attribute
        "Split", [product.outputs[0], sizes], {"axis": -1}, num_outputs=len(members),
        name=f"{name}_Split",
    )  # fmt: skip
    for node in (product, split):
        node.metadata_props[QUANTIZED_KEY] = "A"
    nodes += [product, split]
    graph.insert_before(first, nodes)
    for (node, _, _), output in zip(members, split.outputs, strict=True):
        output.name = f"{node.outputs[0].name}_shared"
        output.type, output.shape = node.outputs[0].type, node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(output)
