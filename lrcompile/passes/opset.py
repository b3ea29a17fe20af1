"""Raise the default-domain opset with ONNX's version converter (FP8 Q/DQ needs opset 19,
blocked and 4-bit DequantizeLinear 21).

model at opset < N -> the same model converted to opset N (external data still on disk)
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from lrcompile.errors import LrcompileError

logger = logging.getLogger(__name__)

MIN_OPSET = 19


def with_opset(
    model: ir.Model, input_path: Path, minimum: int = MIN_OPSET, purpose: str = "FP8"
) -> ir.Model:
    """The model at opset >= ``minimum``, upgraded by ONNX's converter (with a warning) if lower.

    Raises:
        LrcompileError: The converter cannot convert the model.
    """
    opset = model.opset_imports.get("", 1)
    if opset >= minimum:
        return model
    try:
        upgraded = upgrade_opset(model, minimum)
    except ValueError as e:
        raise LrcompileError(
            f"{input_path}: {purpose} needs opset >= {minimum}, the model has {opset} and {e}"
        ) from None
    logger.warning(
        "%s: upgraded the default opset %d -> %d for %s", input_path, opset, minimum, purpose
    )
    return upgraded


def upgrade_opset(model: ir.Model, version: int = MIN_OPSET) -> ir.Model:
    """The model with its default-domain opset raised to ``version`` by ONNX's converter.

    Raises:
        ValueError: The converter cannot convert the model.
    """
    import onnx.version_converter

    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, version)
    except Exception as e:  # the converter raises assorted C++ errors
        raise ValueError(f"the ONNX version converter failed: {str(e).splitlines()[0]}") from None
    upgraded = ir.serde.deserialize_model(converted)
    base = next(
        (
            v.const_value.base_dir
            for v in model.graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)
        ),
        None,
    )
    if base is not None:
        ir.external_data.set_base_dir(upgraded.graph, base)
    upgraded.meta.update(model.meta)  # e.g. the inline file its weights are read from in place
    return upgraded
