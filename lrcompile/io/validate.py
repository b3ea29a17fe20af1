"""What ``load_model`` checks of a model's tensors before anything reads them.

Inline data must hold exactly the bytes its shape needs; external data must stay inside the
model's folder (a ``location`` of ``../../etc/passwd`` or an absolute path is an ONNX
path-traversal vulnerability class), must not be a link out of it, and must lie within its file.
Then the ONNX checker, on the file or on the in-memory skeleton of a model whose inline weights
are read in place (``io.inline``). An operator the checker does not know (``No Op registered``:
ONNX Runtime's contrib ops, or those onnxruntime-genai's builder writes in the default domain,
such as SimplifiedLayerNormalization) is judged by ONNX Runtime instead: a model it can load is
accepted, with a warning naming the operator (once per process: a compile loads its input twice
and its output once); one it cannot is refused as before.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from lrcompile.errors import ModelLoadError
from lrcompile.io import inline

logger = logging.getLogger(__name__)

UNKNOWN_OP = "No Op registered for"  # the checker's line for an operator it has no schema of
_WARNED: set[str] = set()  # the checker's lines already warned about as accepted


def check_tensors(path: Path, proto: onnx.ModelProto, source: inline.InlineSource | None) -> None:
    """Checks every tensor of ``proto`` (the model at ``path``), then runs the ONNX checker.

    Raises:
        ModelLoadError: A tensor's data does not fit its shape or lies outside the model's folder,
            or the checker fails.
    """
    for tensor in tensors(proto.graph):
        if _is_mapped_proto(tensor, path, source):
            _check_inline_size(path, tensor, int(_external_info(tensor)["length"]))
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_reference(path, tensor)
        else:
            _check_inline_tensor(path, tensor)
    _check(path, proto, source)


def _check(path: Path, proto: onnx.ModelProto, source: inline.InlineSource | None) -> None:
    """The ONNX checker: by path where weights are external (they resolve against the model's
    folder, and > 2 GB works); on the skeleton otherwise, its mapped weights as empty tensors
    (their sizes were checked above, and the checker would look for them as files)."""
    try:
        if source is None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(_without_mapped_weights(proto, path, source))
    except onnx.checker.ValidationError as e:
        line = _first_line(e)
        if not (line.startswith(UNKNOWN_OP) and _runtime_loads(path)):
            raise ModelLoadError(f"{path}: fails the ONNX checker: {line}") from None
        if line not in _WARNED:
            _WARNED.add(line)
            logger.warning(
                "%s: the ONNX checker says %r; ONNX Runtime loads it: accepted", path, line
            )
    except UnicodeDecodeError as e:  # the checker's message quotes a name that is not UTF-8
        message = e.object.decode("utf-8", "replace")
        raise ModelLoadError(f"{path}: fails the ONNX checker: {_first_line(message)}") from None


def _runtime_loads(path: Path) -> bool:
    """Whether ONNX Runtime (CPU, no graph optimization) can load the model at ``path``."""
    try:
        import onnxruntime as ort  # the CLI says which extra installs it, when it runs a model
    except ImportError:
        return False
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # its refusal is the checker's line, not a log
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # any refusal: the checker's verdict stands
        return False
    return True


def _without_mapped_weights(proto, path, source) -> onnx.ModelProto:
    checked = onnx.ModelProto()
    checked.CopyFrom(proto)
    for tensor in checked.graph.initializer:
        if _is_mapped_proto(tensor, path, source):
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.append(0)
    return checked


def _is_mapped_proto(tensor, path: Path, source: inline.InlineSource | None) -> bool:
    """Whether ``tensor`` is one of the file's inline weights, mapped in place."""
    if source is None or tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    info = _external_info(tensor)
    return info.get("location") == path.name and int(info.get("offset", -1)) in source.tensors


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_data_files(path: str | Path) -> set[Path]:
    """The resolved external-data files that the model at ``path`` references (not the file
    itself, where its inline weights are)."""
    path = Path(path)
    proto, _ = inline.skeleton(path)
    files = {(path.parent / _location(t)).resolve() for t in external_tensors(proto.graph)}
    return files - {path.resolve()}


def tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from tensors(attr.g)
            for subgraph in attr.graphs:
                yield from tensors(subgraph)


def external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    return (t for t in tensors(graph) if t.data_location == onnx.TensorProto.EXTERNAL)


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _check_inline_tensor(model_path: Path, tensor: onnx.TensorProto) -> None:
    """The stored data must hold exactly the elements the dims promise (the checker does not
    look; reading such a tensor would fail later, far from the cause)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return
    try:
        itemsize = ir.DataType(tensor.data_type).itemsize
    except ValueError:
        raise ModelLoadError(
            f"{model_path}: tensor {tensor.name!r} has unknown data type {tensor.data_type}"
        ) from None
    count = math.prod(tensor.dims)
    if tensor.raw_data:
        stored, expected = len(tensor.raw_data), math.ceil(count * itemsize)
    else:
        stored = sum(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
        packed = itemsize < 1 or tensor.data_type in (
            onnx.TensorProto.COMPLEX64,
            onnx.TensorProto.COMPLEX128,
        )
        if packed or stored == 0:
            return  # packed or complex encodings; or no data at all, which the checker reports
        expected = count
    if stored != expected:
        raise ModelLoadError(
            f"{model_path}: tensor {tensor.name!r} stores {stored}"
            f" {'bytes' if tensor.raw_data else 'values'}, its shape {list(tensor.dims)} needs"
            f" {expected}"
        )


def _check_inline_size(model_path: Path, tensor: onnx.TensorProto, stored: int) -> None:
    """A weight read in place holds exactly the bytes its shape needs (``_check_inline_tensor``)."""
    expected = math.ceil(math.prod(tensor.dims) * ir.DataType(tensor.data_type).itemsize)
    if stored != expected:
        raise ModelLoadError(
            f"{model_path}: tensor {tensor.name!r} stores {stored} bytes, its shape"
            f" {list(tensor.dims)} needs {expected}"
        )


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _check_external_reference(model_path: Path, tensor: onnx.TensorProto) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    where = f"{model_path}: tensor {tensor.name!r}"
    location = info.get("location", "")
    if not location:
        raise ModelLoadError(f"{where}: external data without a 'location'")
    folder = model_path.parent.resolve()
    target = (folder / location).resolve()
    lexical = Path(os.path.normpath(folder / location))
    if os.path.isabs(location) or not lexical.is_relative_to(folder):
        raise ModelLoadError(
            f"{where}: external data location {location!r} points outside the model's folder"
            f" {folder}; expected a relative path inside it"
        )
    if not target.is_relative_to(folder):
        # A link out of the folder (the Hugging Face cache's ../../blobs/ layout): refused, as
        # ONNX Runtime refuses it, since a link can point anywhere (CVE-2024-27318).
        raise ModelLoadError(
            f"{where}: external data {location!r} is a symbolic link to {target}, outside the"
            f" model's folder {folder}; ONNX Runtime refuses such links too: copy the model and"
            " its data into one folder (e.g. huggingface-cli download REPO --local-dir DIR)"
        )
    if not target.is_file():
        raise ModelLoadError(f"{where}: external data file {location!r} is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(f"{where}: external data offset/length are not integers") from None
    size = target.stat().st_size
    expected = math.ceil(math.prod(tensor.dims) * ir.DataType(tensor.data_type).itemsize)
    if length is not None and length != expected:
        raise ModelLoadError(
            f"{where}: external data length {length} does not match its shape"
            f" {list(tensor.dims)} ({expected} bytes)"
        )
    if offset < 0 or offset + expected > size:
        raise ModelLoadError(
            f"{where}: external data [{offset}, {offset + expected}) lies outside {location!r}"
            f" ({size} bytes); the file is truncated or the offset is wrong"
        )


def _first_line(error: Exception | str) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__
