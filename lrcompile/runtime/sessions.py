"""ONNX Runtime sessions, set up the one way this project runs models on the CPU."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from lrcompile.errors import InternalError, LrcompileError
from lrcompile.io import inline
from lrcompile.io.model import keep_for_bug_report

# A model lrcompile made (in memory, or a file or folder of them): kept for a bug report when ONNX
# Runtime rejects it.
Written = ir.Model | str | Path

_FP8_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
    }
)


_INTEGER_TYPES = frozenset(
    {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
)


# ONNX Runtime's session entry for the accuracy level of the MatMulNBits it fuses from a
# DequantizeLinear(int4/int8) -> MatMul: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
ACCURACY_MEANINGS = {
    0: "unset (fp32 activations)",
    1: "fp32 activations",
    2: "fp16 activations",
    3: "bf16 activations",
    4: "int8 activations",
}


def has_integer_weights(model: onnx.ModelProto) -> bool:
    """Whether the main graph holds 4- or 8-bit integer initializers (quantized weights)."""
    return any(t.data_type in _INTEGER_TYPES for t in model.graph.initializer)


def integer_weights_note(path: str | Path, level: int | None) -> str | None:
    """How the model's int4/int8 weights run, when it has any: ONNX Runtime fuses
    DequantizeLinear -> MatMul into MatMulNBits, whose accuracy level sets its numerics, and
    DynamicQuantizeLinear -> MatMulInteger (W8A8) into DynamicQuantizeMatMul or
    MatMulIntegerToFloat."""
    proto, _ = inline.skeleton(Path(path))
    if not has_integer_weights(proto):
        return None
    integer = {t.name for t in proto.graph.initializer if t.data_type in _INTEGER_TYPES}
    dequantized = sum(
        n.op_type == "DequantizeLinear" and n.input[0] in integer for n in proto.graph.node
    )
    dynamic = sum(n.op_type == "MatMulInteger" for n in proto.graph.node)
    parts = []
    if dequantized or not dynamic:
        meaning = ACCURACY_MEANINGS[level if level is not None else 4]
        chosen = f"level {level}" if level is not None else "ONNX Runtime's default level (4)"
        parts.append(f"fused MatMulNBits at {chosen}, {meaning}")
    if dynamic:
        parts.append(
            f"{dynamic} MatMulInteger on activations quantized to uint8 at run time (W8A8,"
            " fused as quantize_dynamic's are)"
        )
    version = onnxruntime().__version__
    return f"integer weights run as ONNX Runtime {version} deploys them: {'; '.join(parts)}"


def has_fp8(model: onnx.ModelProto) -> bool:
    """Whether the main graph holds FP8 initializers (FP8 Q/DQ weights or zero points)."""
    return any(t.data_type in _FP8_TYPES for t in model.graph.initializer)


def session_options(
    *,
    fp8: bool = False,
    data_folder: str | Path | None = None,
    low_memory: bool = False,
    spinning: bool = True,
    accuracy_level: int | None = None,
) -> Any:
    """Session options: BASIC optimisation for FP8 models, external data resolved in a folder,
    ``accuracy_level`` of the MatMulNBits ONNX Runtime fuses from DequantizeLinear -> MatMul
    (``ACCURACY_LEVEL_KEY``; None: ONNX Runtime's default, int8 activations).

    ONNX Runtime's QDQ fusion at the default level builds FP8 ops with no CPU kernel (DESIGN.md).
    ``spinning=False`` for sessions timed side by side: each session's threads keep spinning
    after its run, so alternating sessions time their spinning against each other (on 2 cores a
    384 x 1536 MatMul at 1,024 rows measured 15-23 ms so, 7.4 ms alone or without spinning).
    """
    ort = onnxruntime()
    options = ort.SessionOptions()
    if fp8:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(data_folder)
        )
    # Fatal only: ONNX Runtime's failures reach the user as lrcompile's one line, not as logs.
    options.log_severity_level = 4
    if low_memory:
        # Calibration runs a model once per batch: no pre-packed copies of its weights, no arena
        # that keeps its peak.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if accuracy_level is not None:
        options.add_session_config_entry(ACCURACY_LEVEL_KEY, str(accuracy_level))
    return options


PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def onnxruntime():
    """The ``onnxruntime`` module, from exactly one of onnxruntime / onnxruntime-gpu.

    Raises:
        LrcompileError: Neither is installed, or both are (they ship the same module, and
            installing one over the other leaves a broken mix).
    """
    installed = [d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(d)]
    if len(installed) > 1:
        raise LrcompileError(
            "both onnxruntime and onnxruntime-gpu are installed; they provide the same module:"
            " pip uninstall -y onnxruntime onnxruntime-gpu, then install one of them"
        )
    try:
        import onnxruntime as ort
    except ImportError:
        raise LrcompileError(
            "ONNX Runtime is not installed: pip install 'lrcompile[cpu]' (or 'lrcompile[gpu]'"
            " on a CUDA machine, never both)"
        ) from None
    return ort


def resolve_providers(names: Sequence[str]) -> list[str]:
    """ONNX Runtime execution providers for ``["tensorrt", "cuda", "cpu"]`` (priority order).

    Raises:
        LrcompileError: An unknown name, or a provider this ONNX Runtime build lacks.
    """
    available = onnxruntime().get_available_providers()
    resolved = []
    for name in names:
        if name.lower() not in PROVIDERS:
            raise LrcompileError(
                f"unknown execution provider {name!r}: expected {', '.join(PROVIDERS)}"
            )
        provider = PROVIDERS[name.lower()]
        if provider not in available:
            raise LrcompileError(
                f"execution provider {name!r} ({provider}) is not in this ONNX Runtime build"
                f" (available: {', '.join(available)}); for CUDA/TensorRT install"
                " 'lrcompile[gpu]' instead of onnxruntime"
            )
        resolved.append(provider)
    return resolved


def create_session(
    model: str | Path | onnx.ModelProto,
    *,
    data_folder: str | Path | None = None,
    providers: Sequence[str] = ("cpu",),
    low_memory: bool = False,
    spinning: bool = True,
    written: Written | None = None,
    name: str | None = None,
    accuracy_level: int | None = None,
):
    """A session for a model file, or for an in-memory model whose external data lies in
    ``data_folder``, on ``providers`` (names of ``PROVIDERS``, in priority order); see
    ``session_options`` (``accuracy_level`` too). ``written``: lrcompile made the model (see
    ``runtime_errors``); ``name``: what the model is, for errors (its path by default)."""
    ort = onnxruntime()

    if isinstance(model, onnx.ModelProto):
        # Quantized weights run as deployed: ONNX Runtime's MatMulNBits computes its activations
        # in int8 (accuracy level 4) only from pre-packed weights; unpacked, it computes in float
        # (measured: a candidate's KL 8e-5 unpacked, 1.4e-4 as written and deployed).
        low_memory = low_memory and not has_integer_weights(model)
        options = session_options(
            fp8=has_fp8(model), data_folder=data_folder, low_memory=low_memory, spinning=spinning,
            accuracy_level=accuracy_level,
        )  # fmt: skip
        source: Any = model.SerializeToString()
    else:
        # Inline weights are read in place, as external data of the file itself: ONNX Runtime
        # then holds no protobuf copy of them beside its tensors.
        proto, mapped = inline.skeleton(Path(model))
        folder = Path(model).parent if mapped is not None else None
        options = session_options(
            fp8=has_fp8(proto), data_folder=folder, spinning=spinning,
            accuracy_level=accuracy_level,
        )  # fmt: skip
        source = proto.SerializeToString() if mapped is not None else str(model)
    if name is None:
        name = str(model) if not isinstance(model, onnx.ModelProto) else "the model"
    with runtime_errors(name, written):
        return ort.InferenceSession(
            source, sess_options=options, providers=resolve_providers(providers)
        )


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


@contextlib.contextmanager
def runtime_errors(what: str, written: Written | None = None) -> Iterator[None]:
    """Turns ONNX Runtime's (and Polygraphy's) failures to load or run a model into one line.

    A model the ONNX checker accepts can still be unrunnable (an operator version ONNX Runtime has
    no kernel for, inputs of the wrong shape): for the user's model that is the input's problem
    (``LrcompileError``). For a model lrcompile wrote (``written``: it, or its file) it is
    lrcompile's (``InternalError``), and the model is kept for a bug report.
    """
    from polygraphy.exception import PolygraphyException

    state = importlib.import_module("onnxruntime.capi.onnxruntime_pybind11_state")
    ort_errors = tuple(
        c for c in vars(state).values()
        if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == state.__name__
    )  # fmt: skip
    try:
        yield
    except (*ort_errors, PolygraphyException) as e:
        message = next((line.strip() for line in str(e).splitlines() if line.strip()), repr(e))
        if written is None:
            raise LrcompileError(f"{what}: ONNX Runtime failed: {message}") from None
        raise internal_error(what, f"ONNX Runtime failed on it: {message}", written) from e


def internal_error(what: str, failure: str, written: Written) -> InternalError:
    """The error for a model lrcompile wrote that was rejected, with the model kept."""
    name = "".join(c if c.isalnum() else "-" for c in what.lower()).strip("-")[:60] or "model"
    try:
        kept = f"kept for a bug report at {keep_for_bug_report(written, name)}"
    except Exception as e:  # keeping it must not hide the failure itself
        kept = f"not kept ({type(e).__name__}: {e})"
    return InternalError(
        f"{what}: a model lrcompile wrote was rejected: {failure}; the model is {kept}"
    )
