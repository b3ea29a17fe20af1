"""``lrcompile build``: an ONNX model -> a TensorRT engine, through Polygraphy's loaders.

    parse (plugin module imported first, strongly typed network)
      -> optimisation profile from --input-shapes name:min,opt,max
      -> build (workspace limit, timing cache) -> save

Precision comes from the graph (Q/DQ and tensor types): TensorRT >= 10 networks here are strongly
typed, so no precision flags are set.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from lrcompile.errors import DataError, LrcompileError
from lrcompile.io.model import load_model
from lrcompile.passes.plugin import DOMAIN, OP_TYPE
from lrcompile.trt import PLUGIN_FUNCTION_MIN_VERSION, require_tensorrt, version_tuple

Shape = tuple[int, ...]
_PROFILE = re.compile(r"^([^:]+):(\d+(?:x\d+)*),(\d+(?:x\d+)*),(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class ProfileShapes:
    """The min, opt and max shape of one input."""

    min: Shape
    opt: Shape
    max: Shape


def parse_profile_shapes(items: Sequence[str]) -> dict[str, ProfileShapes]:
    """Parses ``["input_ids:1x1,8x128,32x512", ...]`` (entries separated by spaces or ';').

    Raises:
        DataError: An entry is malformed, ranks differ, or min <= opt <= max fails.
    """
    shapes = {}
    for item in items:
        for entry in filter(None, re.split(r"[;\s]+", item)):
            match = _PROFILE.match(entry)
            if not match:
                raise DataError(
                    f"invalid `input_shapes` {entry!r}: expected name:MIN,OPT,MAX with shapes"
                    " like 1x128, e.g. input_ids:1x1,8x128,32x512"
                )
            name, *dims = match.groups()
            low, opt, high = (tuple(int(d) for d in shape.split("x")) for shape in dims)
            if not len(low) == len(opt) == len(high):
                raise DataError(f"`input_shapes` {name}: min, opt and max differ in rank")
            if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise DataError(f"`input_shapes` {name}: expected min <= opt <= max per dimension")
            shapes[name] = ProfileShapes(low, opt, high)
    return shapes


def uses_plugin(model_path: str | Path) -> bool:
    """Whether the model calls the LowRankGemm plugin."""
    model = onnx.load(str(model_path), load_external_data=False)
    return any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in model.graph.node)


def build_engine(
    model_path: str | Path,
    engine_path: str | Path | None = None,
    shapes: Mapping[str, ProfileShapes] | None = None,
    *,
    workspace_mib: int = 4096,
    timing_cache: str | Path | None = None,
) -> Path:
    """Builds and saves (atomically) a TensorRT engine for ``model_path``.

    Args:
        model_path: The ONNX model (checked before TensorRT is looked for).
        engine_path: Where to write; ``<model>.engine`` by default.
        shapes: Optimisation profile per dynamic input (``parse_profile_shapes``).
        workspace_mib: TensorRT's workspace limit.
        timing_cache: A timing cache file, read and updated.

    Raises:
        LrcompileError: A bad model, TensorRT missing or too old for the plugin, or the build
            fails.
    """
    load_model(model_path)  # bad input fails here, before TensorRT is looked for
    engine_path = Path(engine_path) if engine_path else Path(model_path).with_suffix(".engine")
    shapes = shapes or {}
    trt = require_tensorrt()
    if uses_plugin(model_path):
        if version_tuple(trt.__version__) < PLUGIN_FUNCTION_MIN_VERSION:
            raise LrcompileError(
                f"{model_path} calls the LowRankGemm plugin through ONNX functions, which TensorRT"
                f" maps to plugins from 10.15; this is TensorRT {trt.__version__}"
            )
        import lrcompile.plugins.low_rank_gemm  # noqa: F401  (registers the plugin)
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )

    profile = Profile()
    for name, shape in shapes.items():
        profile.add(name, min=shape.min, opt=shape.opt, max=shape.max)
    network = NetworkFromOnnxPath(str(model_path), strongly_typed=True)
    config = CreateConfig(
        profiles=[profile] if shapes else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mib << 20},
        load_timing_cache=str(timing_cache) if timing_cache else None,
    )
    engine = EngineFromNetwork(
        network, config, save_timing_cache=str(timing_cache) if timing_cache else None
    )
    staging = engine_path.with_name(f".{engine_path.name}.tmp")
    try:
        SaveEngine(engine, str(staging))()
    except Exception as e:  # TensorRT reports parse/build failures as assorted exceptions
        staging.unlink(missing_ok=True)
        raise LrcompileError(f"{model_path}: TensorRT build failed: {e}") from None
    os.replace(staging, engine_path)
    return engine_path


def engine_runner(engine_path: str | Path, name: str = "candidate"):
    """A Polygraphy ``TrtRunner`` for a saved engine (plugin module imported first)."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    import lrcompile.plugins.low_rank_gemm  # noqa: F401  (an engine may embed the plugin)

    return TrtRunner(EngineFromPath(str(engine_path)), name=name)
