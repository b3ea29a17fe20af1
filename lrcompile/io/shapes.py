"""A model input's spec, and concrete shapes for synthetic inputs: ``--input-shapes`` parsed and
resolved against the model.

A dynamic dimension takes, in order: the size ``--input-shapes`` gives it; the size a given shape
sets for a dimension of the same name (``past_key_values.0.key:4x2x0x64`` sets ``batch_size`` to
4 for ``input_ids`` too, as ONNX Runtime will require); ``batch_size`` when it is the leading
one; else 1.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from lrcompile.errors import DataError

_SHAPE = re.compile(r"^([^:]+):(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and dimensions (int when static, else a name or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parses ``["input_ids:1x128", "mask:1x128"]`` (comma-separated entries too).

    Raises:
        DataError: An entry is not ``name:DxDx...``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        for entry in filter(None, (e.strip() for e in item.split(","))):
            match = _SHAPE.match(entry)
            if not match:
                raise DataError(
                    f"invalid input shape {entry!r}: expected name:DxDx..., e.g. input_ids:1x128"
                )
            shapes[match.group(1)] = tuple(int(d) for d in match.group(2).split("x"))
    return shapes


def resolve_shapes(
    inputs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]], batch_size: int
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for synthetic data (the module docstring says which size each dimension
    takes).

    Raises:
        DataError: ``shapes`` names an unknown input, contradicts a static dimension, or gives
            one named dimension two sizes.
    """
    specs = {spec.name: spec for spec in inputs}
    for name in shapes:
        if name not in specs:
            raise DataError(
                f"`input_shapes`: {name!r} is not a model input (inputs: {sorted(specs)})"
            )
    named = _named_sizes(specs, shapes)
    resolved = {}
    for spec in inputs:
        if spec.name in shapes:
            resolved[spec.name] = tuple(shapes[spec.name])
            continue
        resolved[spec.name] = tuple(
            d
            if isinstance(d, int)
            else named[d][0]
            if d in named
            else batch_size
            if axis == 0
            else 1
            for axis, d in enumerate(spec.shape)
        )
    return resolved


def _named_sizes(
    specs: Mapping[str, InputSpec], shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, str]]:
    """The size each given shape sets for a named dimension, with the input that set it."""
    named: dict[str, tuple[int, str]] = {}
    for name, given in shapes.items():
        spec = specs[name]
        _check_given_shape(spec, tuple(given))
        for dim, size in zip(spec.shape, given, strict=True):
            if not isinstance(dim, str):
                continue
            first, source = named.setdefault(dim, (size, name))
            if first != size:
                raise DataError(
                    f"`input_shapes`: {source} and {name} give dimension {dim!r} two sizes"
                    f" ({first} and {size}); ONNX Runtime needs one"
                )
    return named


def _check_given_shape(spec: InputSpec, shape: tuple[int, ...]) -> None:
    fits = len(shape) == len(spec.shape) and all(
        not isinstance(want, int) or want == got
        for got, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise DataError(
            f"`input_shapes`: {spec.name}:{'x'.join(map(str, shape))} does not fit the model's"
            f" input shape {format_shape(spec.shape)}"
        )


def format_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
