"""Loading and saving models: validated on the way in, atomic on the way out.

Loading reads the protobuf without its external data; weights stay memory-mapped
(``onnx_ir.ExternalTensor``) until a pass reads them. Every external-data reference is checked
first: it must stay inside the model's folder (a ``location`` of ``../../etc/passwd`` or an absolute
path is an ONNX path-traversal vulnerability class) and lie within its file.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from lrcompile.errors import ModelLoadError, OutputPathError

# ONNX Runtime rejects IR version 14 (what onnx 1.23 writes); 10 is accepted everywhere we target.
OUTPUT_IR_VERSION = 10
# Protobuf cannot serialize 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def load_model(path: str | Path) -> ir.Model:
    """Loads and validates a model, leaving external weights on disk until they are read.

    Raises:
        ModelLoadError: The file is missing or not ONNX, fails the ONNX checker, or references
            external data that is missing, outside the model's folder, or out of range.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise ModelLoadError(f"{path}: {what}, expected an ONNX model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf does not parse: {e})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph in the file)")
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_reference(path, tensor)
        else:
            _check_inline_tensor(path, tensor)
    try:
        # By path, so external data resolves against the model's folder (and > 2 GB works).
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ModelLoadError(f"{path}: fails the ONNX checker: {_first_line(e)}") from None
    except UnicodeDecodeError as e:  # the checker's message quotes a name that is not UTF-8
        message = e.object.decode("utf-8", "replace")
        raise ModelLoadError(f"{path}: fails the ONNX checker: {_first_line(message)}") from None
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def external_data_files(path: str | Path) -> set[Path]:
    """The resolved external-data files that the model at ``path`` references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    return {(path.parent / _location(t)).resolve() for t in _external_tensors(proto.graph)}


def runnable_proto(model: ir.Model) -> tuple[onnx.ModelProto, Path | None]:
    """``model`` as a protobuf for ONNX Runtime, and the folder its external data is read from.

    The tensors of one model can lie in several folders: the input's, and the factors spilled to
    the scratch folder. ONNX Runtime reads external data from one folder and refuses files outside
    it (after following links), so the locations are rewritten relative to the files' common
    folder (the written model keeps its own locations).

    Raises:
        ValueError: One location names files in two folders.
    """
    files: dict[str, str] = {}
    for tensor in _ir_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            path = os.path.realpath(os.path.join(tensor.base_dir, tensor.location))
            if files.setdefault(tensor.location, path) != path:
                raise ValueError(f"external data {tensor.location!r} names two files")
    proto = ir.serde.serialize_model(model)
    if not files:
        return proto, None
    root = os.path.commonpath([os.path.dirname(path) for path in files.values()])
    for tensor in _external_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = os.path.relpath(files[entry.value], root)
    return proto, Path(root)


def save_model(model: ir.Model, path: str | Path, *, external_data: bool | None = None) -> None:
    """Saves ``model`` to ``path`` atomically, with IR version 10.

    The model and its external data are written into a temporary folder beside ``path`` and
    renamed into place; a failure leaves nothing behind.

    Args:
        model: The model; it is not changed except for loading external tensors into memory when
            the output is saved without external data.
        path: Output path.
        external_data: ``True`` writes all weights to ``<name>.data`` beside the model, ``False``
            keeps them inline, ``None`` chooses external data when the model would pass 2 GB.
    """
    path = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    model.ir_version = min(model.ir_version, OUTPUT_IR_VERSION)
    data_name = f"{path.name}.data" if external_data else None
    if not external_data:
        # Tensors still pointing into the input's data file would be written as references to it.
        ir.external_data.load_to_model(model)
    with write_errors(path), staging_folder(path.parent) as staging:
        ir.save(model, staging / path.name, external_data=data_name)
        if data_name is not None:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turns a failed write for the output ``path`` (a full disk, a size limit) into one line."""
    try:
        yield
    except OSError as e:
        raise OutputPathError(
            f"{path}: could not write the output ({e.strerror or e}); nothing was written"
        ) from None


def keep_for_bug_report(model: ir.Model | str | Path, name: str) -> Path:
    """Keeps a model lrcompile made (in memory, a file with its external data, or a folder of
    them) in a new folder of the temporary directory that nothing removes; returns its path.

    A model saved from memory takes every weight into ``<name>.onnx.data`` beside it.
    """
    folder = Path(tempfile.mkdtemp(prefix="lrcompile-bug-"))
    if isinstance(model, ir.Model):
        path = folder / f"{name}.onnx"
        ir.save(model, path, external_data=f"{name}.onnx.data")
        return path
    source = Path(model)
    if source.is_dir():
        shutil.copytree(source, folder / name)
        return folder / name
    for data in external_data_files(source):
        target = folder / data.relative_to(source.parent.resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data, target)
    shutil.copy2(source, folder / source.name)
    return folder / source.name


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of all initializers of the main graph (what an inline model would carry)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += math.ceil(math.prod(tensor.shape.numpy()) * tensor.dtype.itemsize)
    return total


def check_output_path(input_path: str | Path, output_path: str | Path) -> None:
    """Refuses an output that would overwrite the input model or its external data.

    Raises:
        OutputPathError: ``output_path`` is the input, its folder is missing, or its data file
            would overwrite one the input reads.
    """
    src, dst = Path(input_path).resolve(), Path(output_path).resolve()
    if src == dst:
        raise OutputPathError(f"{output_path}: the output must not be the input model")
    if not dst.parent.is_dir():
        raise OutputPathError(f"{output_path}: the output folder {dst.parent} does not exist")
    if dst.is_dir():
        raise OutputPathError(f"{output_path}: is a directory, expected a file path")
    data = dst.parent / f"{dst.name}.data"
    if data in external_data_files(src) or data == src:
        raise OutputPathError(
            f"{output_path}: its external data file {data.name} is read by the input model;"
            " choose another output name"
        )


def needs_external_data(model: ir.Model) -> bool:
    """Whether the output should keep its weights in external data: the input does, or it would
    pass the protobuf limit."""
    external = any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )
    return external or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


@contextlib.contextmanager
def staging_folder(parent: Path) -> Iterator[Path]:
    """A temporary folder beside the output (same filesystem: renames are atomic), removed on
    exit, interruption included."""
    staging = Path(tempfile.mkdtemp(prefix=".lrcompile-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for subgraph in attr.graphs:
                yield from _tensors(subgraph)


def _ir_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs included."""
    for graph in (model.graph, *model.graph.subgraphs()):
        yield from (v.const_value for v in graph.initializers.values() if v.const_value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from attr.value


def _external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    return (t for t in _tensors(graph) if t.data_location == onnx.TensorProto.EXTERNAL)


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
