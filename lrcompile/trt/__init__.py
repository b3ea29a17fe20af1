"""Everything that needs TensorRT: building engines and running them. The only place that imports
``tensorrt``, lazily: ``import lrcompile`` and all CPU work never need it.

TensorRT's builder libraries are not on the public package index this project builds with; run
``lrcompile build`` and engine verification inside the image of ``docker/``.
"""

from __future__ import annotations

from typing import Any

from lrcompile.errors import LrcompileError

# From this version the ONNX parser maps a node carrying ``plugin_namespace`` to the registered
# plugin even when a model-local function of the same name exists (DESIGN.md).
PLUGIN_FUNCTION_MIN_VERSION = (10, 15)
INSTALL_HINT = (
    "TensorRT is not installed: build and verify engines inside the lrcompile TensorRT image"
    " (docker/README.md: docker build -f docker/Dockerfile -t lrcompile-trt .)"
)


def require_tensorrt() -> Any:
    """The ``tensorrt`` module.

    Raises:
        LrcompileError: TensorRT is not installed (one line saying how to get it).
    """
    try:
        import tensorrt
    except ImportError:
        raise LrcompileError(INSTALL_HINT) from None
    return tensorrt


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.15.1.29"`` -> ``(10, 15, 1, 29)``."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())
