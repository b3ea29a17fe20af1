"""One model for every sensitivity probe: each searched layer dense or factored at run time.

    MatMul(x, W)  ->  If(probe == i, then: MatMul(MatMul(x, A), B), else: MatMul(x, W))

Layer ``i`` runs factored when the scalar int64 input ``PROBE_INPUT`` is ``i`` and dense
otherwise, so that measuring each layer alone factored takes one ONNX Runtime session and one
run per layer, with no rebuilt model and no wasted work (only the taken branch runs).

With ``perturb`` the taken branch adds the pair to the dense product instead,
``MatMul(x, W) + MatMul(MatMul(x, A), B)``: a layer's error of a known shape (the leading part
of its quantization error) put into the model alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from lrcompile.passes.candidates import WeightGroup, find_candidates
from lrcompile.passes.factored_graph import factor_values, factored_nodes

PROBE_INPUT = "lrcompile_probe"


def probe_model(
    model: ir.Model, factors: Mapping[str, tuple], order: Sequence[str], perturb: bool = False
) -> ir.Model:
    """A clone of ``model`` in which the groups keyed in ``factors`` (named tensors ``(A, B)``)
    switch on the probe input: the group ``order[i]`` runs factored (``perturb``: dense plus
    ``x A B``) when it is ``i``."""
    probe = model.clone()
    graph = probe.graph
    selector = ir.Value(name=PROBE_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    graph.inputs.append(selector)
    groups, _ = find_candidates(graph, ())
    position = {key: index for index, key in enumerate(order)}
    for group in groups:
        if group.key in factors:
            pair = factors[group.key]
            _switch(graph, group, *pair, selector, position[group.key], perturb)
    return probe


def _switch(
    graph: ir.Graph, group: WeightGroup, left, right, selector: ir.Value, index: int, perturb
) -> None:
    a, b = factor_values(graph, group, left, right)
    for node in group.nodes:
        output = node.outputs[0]
        name = output.name
        constant = ir.node("Constant", [], {"value_int": index}, name=f"{name}_probe_index")
        test = ir.node("Equal", [selector, constant.outputs[0]], name=f"{name}_probe_test")
        first, second = factored_nodes(node, a, b)
        if perturb:  # x A B alone (no bias), added to the dense product
            second = ir.node("MatMul", [first.outputs[0], b], name=f"{name}_lr_B")
        first.outputs[0].name, second.outputs[0].name = f"{name}_probe_mid", f"{name}_probe_lr"
        dense = _copy(node, f"{name}_dense")
        dense.outputs[0].name = f"{name}_probe_dense"
        taken = [first, second]
        if perturb:
            exact = _copy(node, f"{name}_exact")
            exact.outputs[0].name = f"{name}_probe_exact"
            total = ir.node("Add", [exact.outputs[0], second.outputs[0]], name=f"{name}_perturbed")
            total.outputs[0].name = f"{name}_probe_perturbed"
            taken += [exact, total]
        branches = {
            "then_branch": ir.Graph([], [taken[-1].outputs[0]], nodes=taken, name="lr"),
            "else_branch": ir.Graph([], [dense.outputs[0]], nodes=[dense], name="dense"),
        }
        switch = ir.node("If", [test.outputs[0]], branches, name=f"{name}_probe")
        switch.outputs[0].type = output.type
        for value in (constant, test):
            value.outputs[0].name = value.name
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [constant, test, switch], [output], [switch.outputs[0]]
        )


def _copy(node: ir.Node, name: str) -> ir.Node:
    """A new node computing what ``node`` does, from the same inputs."""
    return ir.Node(
        node.domain, node.op_type, list(node.inputs), list(node.attributes.values()), name=name
    )
