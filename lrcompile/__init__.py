"""lrcompile: an ONNX deployment compiler that makes models faster by low-rank factorization.

The three-line API::

    import lrcompile
    result = lrcompile.compile_model("model.onnx", rank="0.5")   # -> model.lr.onnx
    check = lrcompile.verify("model.onnx", result.output_path, data="inputs.npz")
"""

from lrcompile.compiler import CompileResult, compile_model
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError
from lrcompile.verify import VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "CompileConfig",
    "CompileResult",
    "LrcompileError",
    "VerifyResult",
    "__version__",
    "compile_model",
    "verify",
]
