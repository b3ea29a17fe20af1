"""Inline weights read in place: a model file's initializers as external data of the file itself.

    model.onnx (weights inline) -> scan its protobuf fields (headers only, never the weights)
      -> a skeleton ModelProto: each main-graph initializer's ``raw_data`` replaced by an external
         reference to its own bytes in model.onnx (location, offset, length)
      -> onnx_ir: those initializers are memory-mapped ``ExternalTensor``s, like external data

So a model with its weights inline costs what one with external data costs: no protobuf copy of
the weights is held, and every serialization for ONNX Runtime (calibration, each probe) is the
graph alone, its weights read from the input file. ``write_inline`` writes an inline output
tensor by tensor: a weight the compile left as it was is copied byte for byte from the input (its
original ``TensorProto``), any other is serialized as ``onnx_ir`` would, and the message framing
around them is ``SerializeToString``'s (fields in number order), so the output's bytes are those of
saving the whole model at once, without the whole model in memory.

Only raw-data tensors of at least ``MIN_BYTES`` in the main graph are mapped; the rest (small
tensors, typed-field data, subgraph initializers, ``Constant`` attributes) stay in the skeleton.
"""

from __future__ import annotations

import dataclasses
import itertools
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

MIN_BYTES = 1024
META_KEY = "lrcompile.inline_source"  # ir.Model.meta: the InlineSource its tensors map into

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_LENGTH_DELIMITED = 2


@dataclasses.dataclass(frozen=True)
class Field:
    """One protobuf field in a buffer: its number and wire type, and its byte ranges (the whole
    field from its tag, and its value)."""

    number: int
    wire_type: int
    start: int
    value_start: int
    end: int


@dataclasses.dataclass(frozen=True)
class InlineSource:
    """The input file and, per mapped initializer, its ``TensorProto``'s range and its raw data's
    offset in the file."""

    path: Path
    tensors: dict[int, tuple[int, int]]  # raw data offset -> (TensorProto start, end)


def fields(buffer, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in ``buffer[start:end]``, in order.

    Raises:
        ValueError: The bytes are no protobuf message (a field runs past ``end``).
    """
    position = start
    while position < end:
        key, value_start = _varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, field_end = _varint(buffer, value_start)
        elif wire_type == 1:
            field_end = value_start + 8
        elif wire_type == _LENGTH_DELIMITED:
            length, value_start = _varint(buffer, value_start)
            field_end = value_start + length
        elif wire_type == 5:
            field_end = value_start + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {position}")
        if field_end > end:
            raise ValueError(f"field {number} at byte {position} runs past its message")
        yield Field(number, wire_type, position, value_start, field_end)
        position = field_end


def skeleton(path: Path) -> tuple[onnx.ModelProto, InlineSource | None]:
    """The model at ``path`` with its inline main-graph weights as external references into the
    file itself, and where they are (None when it maps none: the proto is then the file's).

    Raises:
        ValueError: The file is no protobuf message.
        onnx.onnx_cpp2py_export.checker.ValidationError: Nor an ONNX model (from parsing).
    """
    with open(path, "rb") as file, _Mapped(file) as buffer:
        top = list(fields(buffer, 0, len(buffer)))
        graph = next((f for f in top if f.number == _MODEL_GRAPH), None)
        if graph is None or graph.wire_type != _LENGTH_DELIMITED:
            return onnx.ModelProto.FromString(bytes(buffer)), None
        tensors: dict[int, tuple[int, int]] = {}
        parts = []
        for field in fields(buffer, graph.value_start, graph.end):
            mapped = _mapped_tensor(buffer, field, path.name) if _is_initializer(field) else None
            if mapped is None:
                parts.append(buffer[field.start : field.end])
                continue
            reference, raw_offset = mapped
            tensors[raw_offset] = (field.value_start, field.end)
            parts.append(_length_delimited(_GRAPH_INITIALIZER, reference))
        if not tensors:
            return onnx.ModelProto.FromString(bytes(buffer)), None
        graph_bytes = b"".join(parts)
        model = b"".join(
            _length_delimited(_MODEL_GRAPH, graph_bytes) if f is graph else buffer[f.start : f.end]
            for f in top
        )
    return onnx.ModelProto.FromString(model), InlineSource(path.resolve(), tensors)


def mapped_source(model: ir.Model) -> InlineSource | None:
    """The inline file ``model``'s weights map into (``load_model`` records it), if any."""
    return model.meta.get(META_KEY)


def is_mapped(tensor, source: InlineSource | None) -> bool:
    """Whether ``tensor`` is one of ``source``'s weights, read in place from the input file."""
    return (
        source is not None
        and isinstance(tensor, ir.ExternalTensor)
        and Path(tensor.path).resolve() == source.path
        and tensor.offset in source.tensors
    )


def write_inline(model: ir.Model, path: str | Path) -> None:
    """Writes ``model`` with every tensor inline, tensor by tensor (see the module docstring)."""
    source = mapped_source(model)
    proto = ir.serde.serialize_model(model)  # the weights stay external references: small
    tensors = [_Inline(model, tensor, source) for tensor in proto.graph.initializer]
    del proto.graph.initializer[:]
    before, after = _split(proto.graph.SerializeToString(), _GRAPH_INITIALIZER)
    proto.ClearField("graph")
    model_before, model_after = _split(proto.SerializeToString(), _MODEL_GRAPH)
    headers = [
        _tag(_GRAPH_INITIALIZER, _LENGTH_DELIMITED) + _encode_varint(t.size) for t in tensors
    ]
    graph_length = len(before) + sum(len(h) + t.size for h, t in zip(headers, tensors, strict=True))
    with open(path, "wb") as file:
        file.write(model_before)
        file.write(
            _tag(_MODEL_GRAPH, _LENGTH_DELIMITED) + _encode_varint(graph_length + len(after))
        )
        file.write(before)
        for header, tensor in zip(headers, tensors, strict=True):
            file.write(header)
            tensor.write(file)
        file.write(after)
        file.write(model_after)


class _Inline:
    """One initializer as an inline ``TensorProto``: its size, then its bytes written to a file
    (a mapped weight's own bytes copied from the input a block at a time)."""

    BLOCK = 64 << 20

    def __init__(self, model: ir.Model, proto: onnx.TensorProto, source) -> None:
        value = model.graph.initializers.get(proto.name)
        self.tensor = value.const_value if value is not None else None
        self.proto, self.source = proto, source
        if is_mapped(self.tensor, source):
            start, end = source.tensors[self.tensor.offset]
            self.span, self.size = (start, end), end - start
        else:
            self.span, self.size = None, len(self._serialized())

    def write(self, file) -> None:
        if self.span is None:
            file.write(self._serialized())
            return
        start, end = self.span
        with open(self.source.path, "rb") as original:
            original.seek(start)
            for offset in range(start, end, self.BLOCK):
                file.write(original.read(min(self.BLOCK, end - offset)))

    def _serialized(self) -> bytes:
        """As ``onnx_ir`` saves it inline: an external tensor (spilled factors) loaded first."""
        if isinstance(self.tensor, ir.ExternalTensor):
            tensor = self.tensor
            loaded = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)
            return ir.serde.serialize_tensor(loaded).SerializeToString()
        return self.proto.SerializeToString()


def _mapped_tensor(buffer, field: Field, location: str) -> tuple[bytes, int] | None:
    """An initializer's ``TensorProto`` with its raw data as an external reference into the file,
    and that data's offset; None when it has no raw data worth mapping, or is external already."""
    parts, raw = [], None
    for inner in fields(buffer, field.value_start, field.end):
        if inner.number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            if inner.number == _TENSOR_DATA_LOCATION and buffer[inner.value_start] == 0:
                continue  # DEFAULT: replaced below
            return None
        if inner.number == _TENSOR_RAW_DATA:
            raw = inner
            continue
        parts.append(buffer[inner.start : inner.end])
    if raw is None or raw.end - raw.value_start < MIN_BYTES:
        return None
    offset, length = raw.value_start, raw.end - raw.value_start
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = _length_delimited(1, key.encode()) + _length_delimited(2, str(value).encode())
        parts.append(_length_delimited(_TENSOR_EXTERNAL_DATA, entry))
    parts.append(_tag(_TENSOR_DATA_LOCATION, 0) + _encode_varint(onnx.TensorProto.EXTERNAL))
    return b"".join(parts), offset


def _is_initializer(field: Field) -> bool:
    return field.number == _GRAPH_INITIALIZER and field.wire_type == _LENGTH_DELIMITED


def _split(message: bytes, number: int) -> tuple[bytes, bytes]:
    """The bytes of ``message``'s fields numbered below ``number`` and above it (serialization
    writes fields in number order, so a field ``number`` goes between the two)."""
    parsed = list(fields(message, 0, len(message)))
    if any(f.number == number for f in parsed):
        raise ValueError(f"field {number} is already in the message")
    if any(a.number > b.number for a, b in itertools.pairwise(parsed)):
        raise ValueError("the message's fields are not in number order")
    cut = next((f.start for f in parsed if f.number > number), len(message))
    return message[:cut], message[cut:]


def _varint(buffer, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(buffer):
            raise ValueError("a varint runs past the end of the file")
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _encode_varint(number << 3 | wire_type)


def _length_delimited(number: int, value: bytes) -> bytes:
    return _tag(number, _LENGTH_DELIMITED) + _encode_varint(len(value)) + value


class _Mapped:
    """A read-only map of a whole file (empty files map to ``b""``)."""

    def __init__(self, file) -> None:
        size = os.fstat(file.fileno()).st_size
        self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __enter__(self):
        return self._map if self._map is not None else b""

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._map.close()
