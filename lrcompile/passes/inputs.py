"""Graph queries about the model's inputs: which integer inputs index a table, and its size.

    int input -> [Cast | Unsqueeze | Squeeze | Reshape | Flatten | Expand | Identity | Add c]*
              -> Gather(table, indices) along an axis of R rows   =>  valid values [0, R - 1 - c]

Token ids into an embedding, node or edge indices into a feature table: synthetic values must
stay in the table's range, or every row looks alike (all 0/1) or the model reads out of bounds.
When an input reaches several tables the smallest range applies. An integer attention mask
(``*attention_mask``) is all ones in synthetic data: every token attended, as in a prompt without
padding (random 0/1 masks leave rows with no token, which onnxruntime-genai's
``GroupQueryAttention`` refuses).
"""

from __future__ import annotations

import onnx_ir as ir

from lrcompile.passes.candidates import resolve_weight

_INTEGER_TYPES = frozenset(
    {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8,
     ir.DataType.UINT64, ir.DataType.UINT32, ir.DataType.UINT16, ir.DataType.UINT8}
)  # fmt: skip
_PASS_THROUGH = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Identity")


def index_ranges(graph: ir.Graph) -> dict[str, tuple[int, int]]:
    """``{input name: (0, largest valid index)}`` for the integer inputs that index a table."""
    ranges = {}
    for value in graph.inputs:
        if value.dtype not in _INTEGER_TYPES or value.name in graph.initializers:
            continue
        highs = list(_gather_limits(value, offset=0, seen=set()))
        if highs and min(highs) >= 0:
            ranges[value.name or ""] = (0, min(highs))
    return ranges


def synthetic_ranges(graph: ir.Graph) -> dict[str, tuple[int, int]]:
    """``index_ranges`` with every integer attention mask at ``(1, 1)``: the value ranges of
    synthetic inputs (not a bound on real data, whose masks may pad)."""
    masks = {
        value.name: (1, 1)
        for value in graph.inputs
        if value.dtype in _INTEGER_TYPES and (value.name or "").endswith("attention_mask")
    }
    return masks | index_ranges(graph)


def _gather_limits(value: ir.Value, offset: int, seen: set[int]):
    """The largest valid index of ``value`` for each table it reaches (minus added offsets)."""
    if id(value) in seen:
        return
    seen.add(id(value))
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            rows = _rows(node)
            if rows is not None:
                yield rows - 1 - offset
        elif node.op_type in _PASS_THROUGH and index == 0:
            yield from _gather_limits(node.outputs[0], offset, seen)
        elif node.op_type == "Add":
            added = _constant_int(node.inputs[1 - index])
            if added is not None:
                yield from _gather_limits(node.outputs[0], offset + max(added, 0), seen)


def _rows(gather: ir.Node) -> int | None:
    source = resolve_weight(gather.inputs[0]) if gather.inputs[0] is not None else None
    if source is None:
        return None
    shape = list(source.tensor.shape)
    if source.transposed:
        shape.reverse()
    axis = gather.attributes.get_int("axis", 0)
    axis = axis + len(shape) if axis < 0 else axis
    return int(shape[axis]) if 0 <= axis < len(shape) else None


def _constant_int(value: ir.Value | None) -> int | None:
    """The largest element of an integer constant ``value``, or None."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None or tensor.dtype not in _INTEGER_TYPES or tensor.size == 0:
        return None
    return int(tensor.numpy().max())
