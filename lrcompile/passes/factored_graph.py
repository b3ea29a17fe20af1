"""The factored subgraph of one weight group, as ``FactorizeLowRankPass`` writes it.

    MatMul(x, W)            -> MatMul(MatMul(x, A), B)
    MatMul(x, Cast(W))      -> MatMul(MatMul(x, Cast(A)), Cast(B))     (factors in W's dtype)
    Gemm(a, W, C; tA, tB)   -> Gemm(Gemm(a, A; tA), B, C; beta)

Factors are initializers ``<weight>_lr_A`` / ``<weight>_lr_B`` (``factor_names`` makes them unique
before anything is written); nodes ``<node>_lr_A`` / ``<node>_lr_B``, marked with the metadata
``FACTOR_KEY`` so that later passes find the pairs in any model. The last node keeps the original
output name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx_ir as ir

from lrcompile.passes.candidates import WeightGroup

FACTOR_KEY = "lrcompile.factor"  # node metadata: "A" (x @ A) or "B" (mid @ B)


FACTOR_SUFFIXES = ("_lr_A", "_lr_B")


def factor_names(
    graph: ir.Graph,
    groups: Iterable[WeightGroup],
    keys: Iterable[str],
    suffixes: tuple[str, ...] = FACTOR_SUFFIXES,
    taken: Iterable[str] = (),
) -> dict[str, tuple[str, ...]]:
    """The initializer names of the tensors replacing the weights of the groups ``keys``, in group
    order: ``<weight>`` with each suffix (``_lr_A`` and ``_lr_B``), made unique with ``_1``,
    ``_2``... where the graph or an earlier group holds the name (one weight read both ways is
    two groups); ``taken``: names already given out."""
    wanted, taken = set(keys), set(graph.initializers) | set(taken)
    names = {}
    for group in groups:
        if group.key not in wanted:
            continue
        chosen = tuple(_unique(f"{group.name}{suffix}", taken) for suffix in suffixes)
        taken.update(chosen)
        names[group.key] = chosen
    return names


def rewrite_group(graph: ir.Graph, group: WeightGroup, left, right) -> None:
    """Replaces the group's nodes by factored pairs reading the factor tensors ``left`` and
    ``right``, registered as initializers under their own names.

    Factors are stored in the weight's dtype; when the nodes read it through a Cast, the factors
    are read through one Cast each, to the same dtype.
    """
    a, b = factor_values(graph, group, left, right)
    for node in group.nodes:
        first, second = factored_nodes(node, a, b)
        # Saved with the model, so later passes (FP8, plugin) find the pairs in any model.
        first.metadata_props[FACTOR_KEY] = "A"
        second.metadata_props[FACTOR_KEY] = "B"
        output = node.outputs[0]
        first.outputs[0].name = f"{output.name}_lr_mid"
        first.outputs[0].type = output.type
        if output.shape is not None and len(output.shape) > 0:
            first.outputs[0].shape = ir.Shape([*list(output.shape)[:-1], a.shape[1]])
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [first, second], [output], [second.outputs[0]]
        )


def factor_values(graph: ir.Graph, group: WeightGroup, left, right) -> tuple[ir.Value, ir.Value]:
    """The factor tensors as initializers of ``graph``, read through a Cast each when the group
    reads its weight through one: the values the factored nodes read."""
    a, b = initializer(graph, left), initializer(graph, right)
    if group.cast is not None:
        casts = [ir.node("Cast", [v], {"to": group.cast}, name=f"{v.name}_Cast") for v in (a, b)]
        for cast, v in zip(casts, (a, b), strict=True):
            cast.outputs[0].name = f"{v.name}_cast"
            cast.outputs[0].dtype, cast.outputs[0].shape = group.cast, v.shape
        graph.insert_before(group.nodes[0], casts)
        a, b = casts[0].outputs[0], casts[1].outputs[0]
    return a, b


def factored_nodes(node: ir.Node, a: ir.Value, b: ir.Value) -> tuple[ir.Node, ir.Node]:
    """The factored pair that replaces ``node`` (``x @ A``, then ``@ B``), not yet in a graph."""
    x = node.inputs[0]
    name = node.name or node.outputs[0].name
    if node.op_type == "MatMul":
        first = ir.node("MatMul", [x, a], name=f"{name}_lr_A")
        second = ir.node("MatMul", [first.outputs[0], b], name=f"{name}_lr_B")
        return first, second
    trans_a = node.attributes.get_int("transA", 0)
    first = ir.node("Gemm", [x, a], {"transA": trans_a}, name=f"{name}_lr_A")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    attributes = {"beta": node.attributes.get_float("beta", 1.0)} if bias is not None else {}
    inputs = [first.outputs[0], b] + ([bias] if bias is not None else [])
    second = ir.node("Gemm", inputs, attributes, name=f"{name}_lr_B")
    return first, second


def tensors(arrays: Mapping[str, tuple], names: Mapping[str, tuple[str, str]]) -> dict:
    """``(left, right)`` arrays by group key as named tensors (``names``), ready to rewrite."""
    return {
        key: tuple(
            ir.tensor(array, name=name) for array, name in zip(pair, names[key], strict=True)
        )
        for key, pair in arrays.items()
    }


def free_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... where the graph holds an initializer of it."""
    return _unique(name, set(graph.initializers))


def _unique(name: str, taken: set[str]) -> str:
    unique, suffix = name, 1
    while unique in taken:
        unique, suffix = f"{name}_{suffix}", suffix + 1
    return unique


def initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """A new initializer holding ``tensor`` (an array's tensor or a spilled one), by its name."""
    value = ir.Value(name=tensor.name, const_value=tensor)
    value.shape = ir.Shape([int(d) for d in tensor.shape])
    value.type = ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value
