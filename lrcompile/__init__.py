"""lrcompile: an ONNX deployment compiler that makes models faster by low-rank factorization.

The Python API mirrors the command line::

    import lrcompile
    result = lrcompile.compile_model("model.onnx", rank="auto", calib="calib.npz")  # compile
    check = lrcompile.verify("model.onnx", result.output_path, data="heldout.npz")  # verify
    info = lrcompile.inspect_model("model.onnx", lrcompile.CompileConfig(rank="auto"))  # inspect
    engine = lrcompile.build_engine(result.output_path)  # build (needs TensorRT)

One call of the API alone compiles at several ``auto`` settings from one calibration::

    settings = {"a.onnx": {"tolerance": 0.02}, "b.onnx": {"budget": 0.8}}
    for path, result in lrcompile.compile_sweep("model.onnx", settings, rank="auto"): ...
"""

from lrcompile.check.verify import VerifyResult, verify
from lrcompile.compiler import CompileResult, compile_model
from lrcompile.config import CompileConfig
from lrcompile.errors import (
    DataError,
    LrcompileError,
    ModelLoadError,
    OutputPathError,
    RankSpecError,
)
from lrcompile.inspection import Inspection, inspect_model
from lrcompile.sweep import compile_sweep
from lrcompile.trt.build import build_engine

__version__ = "0.1.0"

__all__ = [
    "CompileConfig",
    "CompileResult",
    "DataError",
    "Inspection",
    "LrcompileError",
    "ModelLoadError",
    "OutputPathError",
    "RankSpecError",
    "VerifyResult",
    "__version__",
    "build_engine",
    "compile_model",
    "compile_sweep",
    "inspect_model",
    "verify",
]
