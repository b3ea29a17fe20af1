"""Model inputs: ``.npz`` files checked against the model, batching, and synthetic data.

An ``.npz`` holds one array per model input, samples along axis 0. Batches are slices along that
axis: ``batch_size`` rows, or exactly the model's batch dimension when it is static.

Synthetic data (Polygraphy's seeded ``DataLoader``): each value uniform in a range, inclusive:
``[0, 1]`` for floats and integers by default; for an integer input that indexes a table (a
``Gather``, found by ``lrcompile.passes.inputs``) ``[0, rows - 1]``; any input's range set by
``val_ranges`` (``--val-range NAME:LO,HI``). Dynamic dimensions: ``io.shapes``.
"""

from __future__ import annotations

import dataclasses
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lrcompile.errors import DataError
from lrcompile.io.past import GENAI_META_KEY, dims_of, is_past, past_dims, with_empty_past
from lrcompile.io.shapes import InputSpec, format_shape, resolve_shapes

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that are fed at run time (initializers listed as inputs excluded); a
    KV-cache input's symbolic dimensions that the graph tells are given as sizes
    (``io.past.past_dims``)."""
    pasts = past_dims(model.graph, model.meta.get(GENAI_META_KEY))
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        dims = pasts.get(value.name, dims_of(value.shape))
        specs.append(InputSpec(value.name or "", np.dtype(dtype), dims))
    return specs


def load_npz(path: str | Path, inputs: Sequence[InputSpec]) -> Feed:
    """Reads an ``.npz`` and checks it against the model's inputs.

    Raises:
        DataError: The file is missing or not an npz, is empty, names an unknown input, lacks an
            input, or has an array of the wrong dtype, rank, static dimension or length.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file, expected an .npz of model inputs") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        # numpy reads a file that is no zip archive as a pickle, and says so: not the problem.
        why = "not a zip archive" if "pickle" in str(e) or not zipfile.is_zipfile(path) else e
        raise DataError(f"{path}: not a readable .npz file ({why})") from None
    if not isinstance(arrays, dict) or not arrays:
        raise DataError(f"{path}: holds no arrays, expected one per model input")
    check_feed(str(path), arrays, inputs)
    return arrays


def check_feed(source: str, arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec]) -> None:
    """Checks names, dtypes, ranks, static dimensions and lengths of ``arrays`` (see load_npz)."""
    expected = {spec.name: spec for spec in inputs}
    names = ", ".join(expected) or "none"
    for name in arrays:
        if name not in expected:
            raise DataError(f"{source}: array {name!r} is not a model input (inputs: {names})")
    for spec in inputs:
        if spec.name not in arrays:
            if is_past(spec.name):
                continue  # an empty KV cache is supplied (lrcompile.io.past)
            raise DataError(f"{source}: no array for model input {spec.name!r}")
        _check_array(source, arrays[spec.name], spec)
    lengths = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{source}: arrays differ in length along axis 0: {lengths}")
    if next(iter(lengths.values())) == 0:
        raise DataError(f"{source}: arrays hold no samples (length 0 along axis 0)")


def _check_array(source: str, array: np.ndarray, spec: InputSpec) -> None:
    where = f"{source}: array {spec.name!r}"
    if array.dtype != spec.dtype:
        raise DataError(f"{where} has dtype {array.dtype}, the model expects {spec.dtype}")
    if array.ndim != len(spec.shape) or array.ndim == 0:
        raise DataError(
            f"{where} has shape {list(array.shape)}, the model expects rank {len(spec.shape)}"
            f" {format_shape(spec.shape)} with samples along axis 0"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if axis > 0 and isinstance(want, int) and got != want:
            raise DataError(
                f"{where} has shape {list(array.shape)}, the model expects"
                f" {format_shape(spec.shape)} (axis {axis} must be {want})"
            )
    batch = spec.shape[0]
    if isinstance(batch, int) and array.shape[0] % batch:
        raise DataError(
            f"{where} has {array.shape[0]} samples, not a multiple of the model's static batch"
            f" dimension {batch}"
        )


def batches(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec], batch_size: int
) -> list[Feed]:
    """Slices ``arrays`` along axis 0 into feeds of ``batch_size`` rows (or the static batch)."""
    static = {spec.shape[0] for spec in inputs if isinstance(spec.shape[0], int)}
    size = static.pop() if len(static) == 1 else batch_size
    total = next(iter(arrays.values())).shape[0]
    return [
        {name: np.ascontiguousarray(array[start : start + size]) for name, array in arrays.items()}
        for start in range(0, total, size)
    ]


def synthetic_feeds(
    inputs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]],
    iterations: int,
    seed: int,
    val_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> list[Feed]:
    """Seeded random feeds from Polygraphy's ``DataLoader`` with the given concrete shapes, each
    input uniform in its ``val_ranges`` entry (inclusive; ``[0, 1]`` without one).

    Raises:
        DataError: An input has a dtype ONNX Runtime cannot be fed from Python (bfloat16, FP8).
    """
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import DataLoader
    from polygraphy.logger import G_LOGGER

    metadata = TensorMetadata()
    for spec in inputs:
        if spec.dtype.kind == "V" or spec.dtype.name in _UNFEEDABLE:
            raise DataError(
                f"model input {spec.name!r} is {spec.dtype.name}: ONNX Runtime's Python API cannot"
                " be fed such arrays, so no synthetic or .npz data can run this model here;"
                " compile with `verify=False` (factoring needs no data)"
            )
        metadata.add(spec.name, spec.dtype, shapes[spec.name])
    ranges = {name: tuple(bounds) for name, bounds in (val_ranges or {}).items()}
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the library never prints
        loader = DataLoader(
            seed=seed, iterations=iterations, input_metadata=metadata, val_range=ranges or None
        )
        feeds = [loader[index] for index in range(iterations)]
    return [{name: np.asarray(array) for name, array in feed.items()} for feed in feeds]


# ml_dtypes types numpy knows but ONNX Runtime's Python API does not accept as inputs.
_UNFEEDABLE = frozenset(
    {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "int4"}
)


def parse_val_ranges(items: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Parses ``["input_ids:0,30521", "x:[-1,1]"]`` (Polygraphy's ``--val-range`` convention).

    Raises:
        DataError: An entry is not ``name:LO,HI`` with LO <= HI.
    """
    ranges = {}
    for item in items:
        name, _, bounds = item.rpartition(":")
        parts = bounds.strip().strip("[]").split(",")
        try:
            low, high = (float(part) for part in parts)
        except ValueError:
            low, high = 1.0, 0.0
        if not name or not low <= high:
            raise DataError(
                f"invalid value range {item!r}: expected NAME:LO,HI with LO <= HI, e.g. ids:0,999"
            )
        ranges[name] = (low, high)
    return ranges


def load_script(spec: str, inputs: Sequence[InputSpec]) -> list[Feed]:
    """Feeds from a Polygraphy data-loader script: ``file.py`` (function ``load_data``) or
    ``file.py:function``; the function yields feed dicts.

    Raises:
        DataError: The script is missing, fails, yields nothing, or yields feeds that do not fit.
    """
    from polygraphy.backend.common import invoke_from_script

    path, _, name = spec.partition(":")
    name = name or "load_data"
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file, expected a data-loader script")
    try:
        feeds = [
            {key: np.asarray(value) for key, value in feed.items()}
            for feed in invoke_from_script(path, name)
        ]
    except Exception as e:  # the user's script: any failure is theirs to fix
        raise DataError(f"{path}: data loader {name}() failed: {type(e).__name__}: {e}") from None
    if not feeds:
        raise DataError(f"{path}: data loader {name}() yielded no feed dicts")
    for index, feed in enumerate(feeds):
        check_feed(f"{path}: feed {index}", feed, inputs)
    return feeds


@dataclasses.dataclass(frozen=True)
class FeedSource:
    """Feeds, where they came from, and the feed whose zeros mark padding rows (with the share
    of its positions that are; ``CompileConfig.padding_mask``)."""

    feeds: list[Feed]
    description: str
    synthetic: bool
    mask: str | None = None
    padding: float = 0.0


def warn_if_synthetic(source: FeedSource, doing: str, why: str, fix: str) -> None:
    """The loud warning every use of synthetic data gets: what it is used for, why that is weak,
    and what to pass instead."""
    if source.synthetic:
        logger.warning(
            "%s on SYNTHETIC inputs (%s): %s; pass %s", doing, source.description, why, fix
        )


def input_feeds(
    npz: str | None,
    script: str | None,
    inputs: Sequence[InputSpec],
    *,
    shapes: Mapping[str, Sequence[int]],
    batch_size: int,
    iterations: int,
    seed: int,
    val_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> FeedSource:
    """Feeds from an ``.npz`` (``npz``), a data-loader script, or synthetic data (``npz`` None or
    ``"synthetic"``): what calibration and verification run on.

    Raises:
        DataError: Both sources given, or the data does not fit the model.
    """
    if npz is not None and script is not None:
        raise DataError("give input data once: an .npz or a data-loader script, not both")
    if script is not None:
        return FeedSource(_filled(load_script(script, inputs), inputs), script, False)
    if npz is not None and npz != "synthetic":
        arrays = load_npz(npz, inputs)
        return FeedSource(_filled(batches(arrays, inputs, batch_size), inputs), npz, False)
    # A KV cache is empty in synthetic data too, unless its shape is given.
    generated = [s for s in inputs if not is_past(s.name) or s.name in shapes]
    feeds = _synthetic(generated, shapes, batch_size, iterations, seed, val_ranges)
    return FeedSource(_filled(feeds, inputs), f"synthetic inputs (seed {seed})", True)


def _filled(feeds: list[Feed], inputs: Sequence[InputSpec]) -> list[Feed]:
    return [with_empty_past(feed, inputs) for feed in feeds]


def _synthetic(inputs, shapes, batch_size, iterations, seed, val_ranges) -> list[Feed]:
    resolved = resolve_shapes(inputs, shapes, batch_size)
    unknown = sorted(set(val_ranges or {}) - {spec.name for spec in inputs})
    if unknown:
        raise DataError(f"`val_ranges`: {unknown[0]!r} is not a model input")
    return list(synthetic_feeds(inputs, resolved, iterations, seed, val_ranges))
