"""ONNX Runtime sessions, set up the one way this project runs models on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

_FP8_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
    }
)


def has_fp8(model: onnx.ModelProto) -> bool:
    """Whether the main graph holds FP8 initializers (FP8 Q/DQ weights or zero points)."""
    return any(t.data_type in _FP8_TYPES for t in model.graph.initializer)


def session_options(*, fp8: bool = False, data_folder: str | Path | None = None) -> Any:
    """Session options: BASIC optimisation for FP8 models, external data resolved in a folder.

    ONNX Runtime's QDQ fusion at the default level builds FP8 ops with no CPU kernel (DESIGN.md).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if fp8:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(data_folder)
        )
    options.log_severity_level = 3
    return options


def create_session(model: str | Path | onnx.ModelProto, *, data_folder: str | Path | None = None):
    """A CPU session for a model file, or for an in-memory model whose external data lies in
    ``data_folder``."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        options = session_options(fp8=has_fp8(model), data_folder=data_folder)
        source: Any = model.SerializeToString()
    else:
        proto = onnx.load(str(model), load_external_data=False)
        options = session_options(fp8=has_fp8(proto))
        source = str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
