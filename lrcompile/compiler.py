"""``compile_model``: load -> passes -> atomic save -> verify, the library's main entry point."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from lrcompile import data as data_lib
from lrcompile import model_io
from lrcompile.config import CompileConfig
from lrcompile.passes.low_rank import FactorizeResult, ProgressCallback
from lrcompile.pipeline import build_pipeline
from lrcompile.report import LayerReport, Totals, totals
from lrcompile.verify import VerifyResult, verify

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """What ``compile_model`` did: the output (None when nothing was factored), the per-layer
    report, and the verification verdict (None when verification was off or nothing was written)."""

    input_path: Path
    output_path: Path | None
    layers: tuple[LayerReport, ...]
    verification: VerifyResult | None
    config: CompileConfig

    @property
    def totals(self) -> Totals:
        return totals(self.layers)

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        config = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(self.config).items()
        }
        return {
            "input": str(self.input_path),
            "output": str(self.output_path) if self.output_path else None,
            "config": config,
            "totals": self.totals.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "verification": self.verification.to_dict() if self.verification else None,
        }

    def write_report(self, path: str | Path) -> None:
        """Writes the report as JSON (atomically)."""
        path = Path(path)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        staging.replace(path)


def default_output_path(input_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.lr.onnx`` beside the input."""
    path = Path(input_path)
    return path.with_name(f"{path.stem}.lr.onnx")


def compile_model(
    input_path: str | Path,
    output_path: str | Path | None = None,
    config: CompileConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> CompileResult:
    """Factors the weights of an ONNX model and writes the compressed model.

    Example::

        result = lrcompile.compile_model("model.onnx", rank="0.5")
        print(result.output_path, result.totals.params_ratio, result.verification.passed)

    Args:
        input_path: The ONNX model; never modified.
        output_path: Where to write; ``<input>.lr.onnx`` by default. Must differ from the input.
        config: The options; alternatively pass ``CompileConfig`` fields as keyword arguments.
        progress: Called as ``progress(done, total, weight_name)`` while factoring.

    Returns:
        The result. ``output_path`` is None when no layer was factored (nothing is written).

    Raises:
        LrcompileError: Bad model, option, override file or verification data.
    """
    config = config if config is not None else CompileConfig(**options)
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else default_output_path(input_path)
    passes = build_pipeline(config, progress=progress)
    model = model_io.load_model(input_path)
    model_io.check_output_path(input_path, output_path)
    shapes = _check_verification_inputs(model, config)
    layers: list[LayerReport] = []
    for pass_ in passes:
        result = pass_(model)
        if isinstance(result, FactorizeResult):
            layers.extend(result.layers)
    if not any(layer.status == "factored" for layer in layers):
        logger.info("%s: nothing to factor; no output written", input_path)
        return CompileResult(input_path, None, tuple(layers), None, config)
    model_io.save_model(model, output_path, external_data=config.external_data or None)
    verification = None
    if config.verify:
        verification = verify(
            input_path,
            output_path,
            data=config.verify_data,
            tolerance=config.tolerance,
            input_shapes=shapes,
            batch_size=config.batch_size,
            seed=config.seed,
        )
    return CompileResult(input_path, output_path, tuple(layers), verification, config)


def _check_verification_inputs(model, config: CompileConfig) -> dict[str, tuple[int, ...]]:
    """Fails on bad verification data or shapes before anything is written."""
    shapes = data_lib.parse_input_shapes(config.input_shapes)
    if config.verify:
        inputs = data_lib.model_inputs(model)
        if config.verify_data is not None:
            data_lib.load_npz(config.verify_data, inputs)
        else:
            data_lib.resolve_shapes(inputs, shapes, config.batch_size)
    return shapes
