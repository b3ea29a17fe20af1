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
from lrcompile.io import inline, past, validate
from lrcompile.io.validate import external_data_files

# ONNX Runtime rejects IR version 14 (what onnx 1.23 writes); 10 is accepted everywhere we target.
OUTPUT_IR_VERSION = 10
# Protobuf cannot serialize 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def load_model(path: str | Path) -> ir.Model:
    """Loads and validates a model, leaving its weights on disk until they are read: external
    data memory-mapped, and inline weights too, read in place from the file (``io.inline``).

    Raises:
        ModelLoadError: The file is missing or not ONNX, fails the ONNX checker, or references
            external data that is missing, outside the model's folder, or out of range.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise ModelLoadError(f"{path}: {what}, expected an ONNX model file")
    try:
        proto, source = inline.skeleton(path)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model (protobuf does not parse: {e})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror})") from None
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph in the file)")
    validate.check_tensors(path, proto, source)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    _inline_attribute_tensors(model)
    if source is not None:
        model.meta[inline.META_KEY] = source
    genai = past.genai_sizes(path)
    if genai is not None:
        model.meta[past.GENAI_META_KEY] = genai
    return model


def _inline_attribute_tensors(model: ir.Model) -> None:
    """Reads into memory the tensors of node attributes (a Constant's value) that lie in external
    data: a saved model writes only its initializers to its own data file, and an attribute would
    keep naming the input's (Optimum's exports store some Constants there)."""
    graphs = (model.graph, *model.functions.values())
    for node in (node for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph)):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, _in_memory(attr.value))
            elif attr.type == ir.AttributeType.TENSORS and any(
                isinstance(t, ir.ExternalTensor) for t in attr.value
            ):
                node.attributes[name] = ir.AttrTensors(name, [_in_memory(t) for t in attr.value])


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name)


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
    for tensor in validate.external_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = os.path.relpath(files[entry.value], root)
    return proto, Path(root)


def save_model(model: ir.Model, path: str | Path, *, external_data: bool | None = None) -> None:
    """Saves ``model`` to ``path`` atomically, with IR version 10.

    The model and its external data are written into a temporary folder beside ``path`` and
    renamed into place; a failure leaves nothing behind.

    Args:
        model: The model (not changed).
        path: Output path.
        external_data: ``True`` writes all weights to ``<name>.data`` beside the model, ``False``
            keeps them inline (written tensor by tensor, ``inline.write_inline``), ``None``
            chooses external data when the model would pass 2 GB.
    """
    path = Path(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    model.ir_version = min(model.ir_version, OUTPUT_IR_VERSION)
    data_name = f"{path.name}.data" if external_data else None
    with write_errors(path), staging_folder(path.parent) as staging:
        if data_name is None:
            inline.write_inline(model, staging / path.name)
        else:
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
    source = inline.mapped_source(model)  # inline weights read in place stay inline
    external = any(
        isinstance(v.const_value, ir.ExternalTensor) and not inline.is_mapped(v.const_value, source)
        for v in model.graph.initializers.values()
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
