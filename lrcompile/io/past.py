"""Empty KV-cache inputs for language-model exports that carry one.

    input_ids[b, s] (+ masks, positions) given, past_key_values.*[b, heads, past, d] not
      -> each past input supplied as zeros with past = 0 (a prompt without history)

Optimum and most ONNX LM exports take ``past_key_values.*`` inputs and return ``present.*``.
Calibration and check data usually hold only the prompt: the past is then empty. Only its
sequence length is 0; every other dimension comes from somewhere:

- static in the input's type (Optimum writes heads and head size as numbers);
- named by a fed input (``batch_size``): that input's size;
- told by the node that reads the past (``past_dims``): a ``GroupQueryAttention`` or
  ``MultiHeadAttention``'s head counts and the width of its query (onnxruntime-genai's builder
  names the head size ``kv_cache_dim``), or the other inputs of a ``Concat`` that appends to it;
- ``genai_config.json`` beside the model (``head_size``, ``num_key_value_heads``).

A past with more than one dimension left unknown is refused with the ``--input-shapes`` to give.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lrcompile.errors import DataError

logger = logging.getLogger(__name__)

PAST_PREFIXES = ("past_key_values", "past.", "past_key", "past_value")
PRESENT_PREFIX = "present"  # Optimum's present.N.key, genai's present.N.key, present_key_values


def is_past(name: str) -> bool:
    """Whether the input ``name`` is a KV-cache input."""
    return name.startswith(PAST_PREFIXES)


def is_present(name: str) -> bool:
    """Whether the output ``name`` is a KV cache: keys and values, never class scores (its last
    axis is the head size), so the checks gate it on ``rel-l2`` under ``kl`` and ``top1``."""
    return name.startswith(PRESENT_PREFIX)


GENAI_META_KEY = "lrcompile.genai_config"  # ir.Model.meta: the past's sizes from genai_config.json
_MS = "com.microsoft"
# (domain, op) -> (index of past_key, index of past_value); their layout is [batch, heads, past, d].
_ATTENTION_PASTS = {
    (_MS, "GroupQueryAttention"): (3, 4),
    (_MS, "MultiHeadAttention"): (6, 7),
    ("", "Attention"): (4, 5),
}


def genai_sizes(model_path: Path) -> dict[int, int] | None:
    """The past's ``{axis: size}`` that ``genai_config.json`` beside ``model_path`` states (heads on
    axis 1, head size on axis 3), or None when there is no such file or it says neither."""
    config_path = model_path.parent / "genai_config.json"
    if not config_path.is_file():
        return None
    try:
        decoder = json.loads(config_path.read_text())["model"]["decoder"]
        sizes = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("%s: not read (%s); the past's sizes come from the graph", config_path, e)
        return None
    sizes = {axis: int(size) for axis, size in sizes.items() if isinstance(size, int) and size > 0}
    return sizes or None


def past_dims(graph: ir.Graph, genai: Mapping[int, int] | None = None) -> dict[str, tuple]:
    """Each KV-cache input's dimensions with what the graph (or ``genai``, from
    ``genai_config.json``) tells of its symbolic ones filled in; static ones stay as they are."""
    result = {}
    for value in graph.inputs:
        if not is_past(value.name or "") or value.shape is None:
            continue
        told = _told_by_readers(value)
        if len(value.shape) == 4:  # [batch, heads, past, head size], as genai's builder writes
            told = {**(genai or {}), **told}
        dims = tuple(
            told.get(axis, dim) if not isinstance(dim, int) else dim
            for axis, dim in enumerate(dims_of(value.shape))
        )
        result[value.name] = dims
    return result


def dims_of(shape: ir.Shape | None) -> tuple:
    """A shape's dimensions: ints where static, else the symbolic name (None when unnamed)."""
    return tuple(
        d if isinstance(d, int) else (d.value if d is not None else None) for d in (shape or ())
    )


def _told_by_readers(past: ir.Value) -> dict[int, int]:
    """``{axis: size}`` of ``past`` that the nodes reading it imply."""
    told: dict[int, int] = {}
    for node in past.consumers():
        slots = _ATTENTION_PASTS.get((node.domain or "", node.op_type))
        reads = slots is not None and past in [
            node.inputs[i] for i in slots if i < len(node.inputs)
        ]
        if reads and len(past.shape) == 4:
            told.update(_attention_sizes(node))
        elif node.op_type == "Concat" and not node.domain:
            axis = node.attributes.get_int("axis", 0) % len(past.shape)
            for other in node.inputs:
                if other is not None and other is not past and other.shape is not None:
                    dims = dims_of(other.shape)
                    told.update(
                        (i, d) for i, d in enumerate(dims) if i != axis and isinstance(d, int)
                    )
    return told


def _attention_sizes(node: ir.Node) -> dict[int, int]:
    """The past's heads (axis 1) and head size (axis 3) from an attention node: its head counts,
    and the width of its query (q, k and v packed in one when the key input is absent)."""
    attrs = node.attributes
    q_heads = attrs.get_int("num_heads", 0) or attrs.get_int("q_num_heads", 0)
    kv_heads = attrs.get_int("kv_num_heads", 0) or q_heads
    if not q_heads:
        return {}
    sizes = {1: kv_heads}
    query, key = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if query is not None and query.shape is not None and len(query.shape) == 4:
        head = query.shape[3]  # the ONNX Attention's [batch, heads, sequence, head size]
        if isinstance(head, int):
            sizes[3] = head
        return sizes
    width = _width(query)
    packed = key is None and node.op_type == "GroupQueryAttention"
    heads = q_heads + 2 * kv_heads if packed else q_heads
    if width is not None and width % heads == 0:
        sizes[3] = width // heads
    return sizes


def _width(value: ir.Value | None, depth: int = 0) -> int | None:
    """The last dimension of ``value``: from its type, else from the weight that makes it (a
    MatMul's, a bias's, a MatMulNBits's ``N``), through casts and dequantization."""
    if value is None or depth > 8:
        return None
    if value.shape is not None and value.shape.rank() and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N", 0) or None
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        return _width(node.inputs[1], depth + 1)
    if node.op_type in ("Cast", "Identity", "DequantizeLinear", "Add", "Mul"):
        widths = (_width(v, depth + 1) for v in node.inputs[:2])
        return next((w for w in widths if w is not None), None)
    return None


def with_empty_past(feed: Mapping[str, np.ndarray], inputs: Sequence) -> dict[str, np.ndarray]:
    """``feed`` with every missing KV-cache input of ``inputs`` supplied empty."""
    known: dict[str, int] = {}
    for spec in inputs:
        if spec.name in feed:
            for dim, size in zip(spec.shape, feed[spec.name].shape, strict=False):
                if isinstance(dim, str):
                    known[dim] = int(size)
    batch = next((int(array.shape[0]) for array in feed.values() if array.ndim), 1)
    result = dict(feed)
    for spec in inputs:
        if spec.name in feed or not is_past(spec.name):
            continue
        shape = [_size(dim, axis, known, batch) for axis, dim in enumerate(spec.shape)]
        unknown = [spec.shape[axis] for axis, size in enumerate(shape) if size is None]
        if len(unknown) > 1:
            example = "x".join(
                _example(size, dim) for size, dim in zip(shape, spec.shape, strict=True)
            )
            raise DataError(
                f"input {spec.name!r}: the graph does not tell the sizes of its dimensions"
                f" {unknown} (nor a genai_config.json beside the model); give the empty past's"
                f" shape, e.g. --input-shapes {spec.name}:{example} with 0 for the past length"
            )
        result[spec.name] = np.zeros([0 if s is None else s for s in shape], spec.dtype)
    return result


def _example(size: int | None, dim) -> str:
    if size is not None:
        return str(size)
    return "0" if "past" in str(dim) or "seq" in str(dim) else f"<{dim}>"


def _size(dim, axis: int, known: Mapping[str, int], batch: int) -> int | None:
    """``dim``'s size in an empty past, or None when nothing tells it (the past length)."""
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and dim in known:
        return known[dim]
    if axis == 0:
        return batch
    return None
