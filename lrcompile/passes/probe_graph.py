"""One model for every sensitivity probe: each searched layer dense or factored at run time.

    MatMul(x, W)  ->  If(probe == i, then: MatMul(MatMul(x, A), B), else: MatMul(x, W))

Layer ``i`` runs factored when the scalar int64 input ``PROBE_INPUT`` is ``i`` and dense
otherwise, so that measuring each layer alone factored takes one ONNX Runtime session and one
run per layer, with no rebuilt model and no wasted work (only the taken branch runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from lrcompile.passes.candidates import WeightGroup, find_candidates
from lrcompile.passes.factored_graph import factor_values, factored_nodes

PROBE_INPUT = "lrcompile_probe"


def probe_model(model: ir.Model, factors: Mapping[str, tuple], order: Sequence[str]) -> ir.Model:
    """A clone of ``model`` in which the groups keyed in ``factors`` (named tensors ``(A, B)``)
    switch on the probe input: the group ``order[i]`` runs factored when it is ``i``."""
    probe = model.clone()
    graph = probe.graph
    selector = ir.Value(name=PROBE_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    graph.inputs.append(selector)
    groups, _ = find_candidates(graph, ())
    position = {key: index for index, key in enumerate(order)}
    for group in groups:
        if group.key in factors:
            _switch(graph, group, *factors[group.key], selector, position[group.key])
    return probe


def _switch(
    graph: ir.Graph, group: WeightGroup, left, right, selector: ir.Value, index: int
) -> None:
    a, b = factor_values(graph, group, left, right)
    for node in group.nodes:
        output = node.outputs[0]
        name = output.name
        constant = ir.node("Constant", [], {"value_int": index}, name=f"{name}_probe_index")
        test = ir.node("Equal", [selector, constant.outputs[0]], name=f"{name}_probe_test")
        first, second = factored_nodes(node, a, b)
        first.outputs[0].name, second.outputs[0].name = f"{name}_probe_mid", f"{name}_probe_lr"
        dense = ir.Node(
            node.domain, node.op_type, list(node.inputs), list(node.attributes.values()),
            name=f"{name}_dense",
        )  # fmt: skip
        dense.outputs[0].name = f"{name}_probe_dense"
        branches = {
            "then_branch": ir.Graph([], [second.outputs[0]], nodes=[first, second], name="lr"),
            "else_branch": ir.Graph([], [dense.outputs[0]], nodes=[dense], name="dense"),
        }
        switch = ir.node("If", [test.outputs[0]], branches, name=f"{name}_probe")
        switch.outputs[0].type = output.type
        for value in (constant, test):
            value.outputs[0].name = value.name
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [constant, test, switch], [output], [switch.outputs[0]]
        )
