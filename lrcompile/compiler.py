"""``compile_model``: load -> passes -> atomic save -> verify, the library's main entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from lrcompile import data as data_lib
from lrcompile import model_io
from lrcompile.auto import AutoResult, search_ranks
from lrcompile.calibrate import Calibration, calibrate, calibration_source
from lrcompile.candidates import find_candidates
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError
from lrcompile.passes.fp8 import MIN_OPSET, QuantizedTensor, QuantizeResult, upgrade_opset
from lrcompile.passes.low_rank import FactorizeLowRankPass, FactorizeResult, ProgressCallback
from lrcompile.pipeline import build_pipeline, factorize_pass, fp8_pass
from lrcompile.report import LayerReport, Totals, totals
from lrcompile.spill import Spill
from lrcompile.verify import DEFAULT_ITERATIONS, VerifyResult, verify

logger = logging.getLogger(__name__)

# Calibrating without auto holds the Gram matrices of at most this fraction of the model's weight
# bytes at a time (but at least one layer's).
CALIBRATION_MEMORY_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Fp8Report:
    """The tensors given FP8 Q/DQ (with scales and ranges), and the nodes left alone."""

    tensors: tuple[QuantizedTensor, ...]
    skipped: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
            "skipped": [{"node": node, "reason": reason} for node, reason in self.skipped],
        }


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """What ``compile_model`` did: the output (None when nothing was factored), the per-layer
    report, and the verification verdict (None when verification was off or nothing was written)."""

    input_path: Path
    output_path: Path | None
    layers: tuple[LayerReport, ...]
    verification: VerifyResult | None
    config: CompileConfig
    auto: AutoResult | None = None
    calibration: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    fp8: Fp8Report | None = None

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
            "calibration": self.calibration,
            "auto": self.auto.to_dict() if self.auto else None,
            "seconds": self.seconds,
            "fp8": self.fp8.to_dict() if self.fp8 else None,
        }

    def write_report(self, path: str | Path) -> None:
        """Writes the report as JSON (atomically)."""
        path = Path(path)
        staging = path.with_name(f".{path.name}.tmp")
        try:
            staging.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            staging.replace(path)
        finally:
            staging.unlink(missing_ok=True)


def _checked_device(device: str) -> str:
    """``device``, after checking that torch can reach a GPU when it is ``cuda``."""
    if device == "cuda":
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise LrcompileError(
                "--device cuda needs torch with a CUDA GPU; none is available here"
                " (the CPU path, --device cpu, needs no torch)"
            )
    return device


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

        result = lrcompile.compile_model("model.onnx", rank="auto", calib="calib.npz")
        print(result.output_path, result.totals.flop_ratio, result.verification.passed)

    Args:
        input_path: The ONNX model; never modified.
        output_path: Where to write; ``<input>.lr.onnx`` by default. Must differ from the input.
        config: The options; alternatively pass ``CompileConfig`` fields as keyword arguments.
        progress: Called as ``progress(stage, done, total, detail)`` during long stages
            (``calibrating``, ``searching``, ``factoring``).

    Returns:
        The result. ``output_path`` is None when no layer was factored (nothing is written).

    Raises:
        LrcompileError: Bad model, option, override file, calibration or verification data.
    """
    config = config if config is not None else CompileConfig(**options)
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else default_output_path(input_path)
    seconds: dict[str, float] = {}
    with _timed(seconds, "load"):
        factorize = factorize_pass(config)  # validates the spec and overrides first
        _checked_device(config.device)
        model = model_io.load_model(input_path)
        model_io.check_output_path(input_path, output_path)
        inputs = data_lib.model_inputs(model)
        check_feeds = _verification_feeds(config, inputs)
        RemoveInitializersFromInputsPass()(model)
        if config.fp8:
            model = _with_fp8_opset(model, input_path)
        groups, _ = find_candidates(model.graph)  # the graph is unchanged until factoring
    chunks = _calibration_chunks(model, config, factorize, groups)
    chunk_layers: list[LayerReport] = []
    if chunks is not None:  # calibrated, no auto: calibrate and factor a chunk of layers at a time
        auto, calibration = None, None
        feeds = calibration_source(config, inputs)
        with _timed(seconds, "calibrate + factorize"):
            chunk_layers = _factor_in_chunks(model, input_path, factorize, feeds, chunks, progress)
        factorize = dataclasses.replace(factorize, only=frozenset())  # reports the rest
    else:
        with _timed(seconds, "calibrate"):
            calibration = _calibrate(input_path, model, config, factorize, groups, inputs, progress)
        with _timed(seconds, "auto search"):
            factorize, auto = _configure(
                model, input_path, config, factorize, groups, calibration, progress
            )
        feeds = calibration.feeds_source() if calibration is not None else None
    quantize = fp8_pass(config, feeds.feeds if feeds else (), input_path.parent)
    # Large models (external data in, external data out) spill each layer's factors to a scratch
    # file as they are made, so memory holds a few weights at a time, not the model.
    external = config.external_data or model_io.needs_external_data(model)
    with model_io.write_errors(output_path), model_io.staging_folder(output_path.parent) as scratch:
        factorize = dataclasses.replace(
            factorize, progress=progress, jobs=config.jobs,
            device=config.device,
            spill=Spill(scratch) if external else None,
        )  # fmt: skip
        with _timed(seconds, "factorize"):
            layers, fp8 = _run_passes(model, factorize, quantize, config.plugin)
        layers = (*chunk_layers, *layers)
        if fp8 is not None:
            layers = tuple(_fp8_bytes(layer, fp8) for layer in layers)
        source = feeds.description if feeds is not None else None
        result = CompileResult(input_path, None, layers, None, config, auto, source, seconds, fp8)
        if not any(layer.status == "factored" for layer in layers):
            logger.info("%s: nothing to factor; no output written", input_path)
            return result
        with _timed(seconds, "save"):
            model_io.save_model(model, output_path, external_data=external)
    verification = None
    if config.verify:
        if check_feeds is None and feeds is not None:
            check_feeds = data_lib.FeedSource(
                feeds.feeds, f"{feeds.description} (the calibration data)", feeds.synthetic
            )
        with _timed(seconds, "verify"), _removed_on_error(output_path):
            verification = verify(
                input_path,
                output_path,
                tolerance=config.tolerance,
                batch_size=config.batch_size,
                feeds=check_feeds or _synthetic(config, inputs),
            )
    return dataclasses.replace(result, output_path=output_path, verification=verification)


def _configure(model, input_path, config, factorize, groups, calibration, progress):
    """The factorize pass with whitening and, under ``auto``, the searched ranks."""
    if calibration is None:
        return factorize, None
    factorize = dataclasses.replace(factorize, whitening=calibration.whitening(groups))
    if not _uses_auto(factorize, groups):
        return factorize, None
    # auto compiles many candidates from the same SVDs: cache them (memory grows with the model).
    factorize = dataclasses.replace(factorize, cache={})
    auto = search_ranks(
        model,
        input_path.parent,
        groups,
        factorize,
        calibration,
        tolerance=config.tolerance * (1.0 - config.headroom),
        objective=config.objective,
        budget=config.budget,
        then=[q for q in [fp8_pass(config, calibration.feeds, input_path.parent)] if q],
        on_step=_stage(progress, "searching"),
        on_sensitivity=_stage(progress, "sensitivity"),
    )
    return dataclasses.replace(factorize, chosen_ranks=auto.ranks), auto


def _calibration_chunks(model, config: CompileConfig, factorize, groups) -> list[list] | None:
    """Groups of layers whose Gram matrices together fit a quarter of the model's weight bytes
    (at least one layer each), when calibrating without ``auto``; None otherwise.

    A Gram matrix is K x K float64: for a 4096 x 11008 down projection 970 MB, ten times its fp16
    weight, so holding every layer's at once would cost far more than the model.
    """
    calibrated = config.calib is not None or config.calib_script is not None
    if not calibrated or _uses_auto(factorize, groups):
        return None
    budget = max(int(model_io.tensor_bytes(model) * CALIBRATION_MEMORY_FRACTION), 1)
    chunks: list[list] = [[]]
    used = 0
    for group in groups:
        cost = 8 * group.shape[0] ** 2 * 2  # its Gram and its Cholesky factor, float64
        if chunks[-1] and used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += cost
    return chunks


def _factor_in_chunks(model, input_path, factorize, feeds, chunks, progress) -> list[LayerReport]:
    """Calibrates (one ONNX Runtime pass of the original model) and factors each chunk."""
    original = ir.serde.serialize_model(model)  # every chunk calibrates the unfactored model
    layers: list[LayerReport] = []
    for index, chunk in enumerate(chunks):
        if progress is not None:
            progress("calibrating", index, len(chunks), f"{len(chunk)} layers")
        calibration = calibrate(
            original, chunk, feeds, data_folder=input_path.parent, keep_reference=False
        )
        chunk_pass = dataclasses.replace(
            factorize,
            whitening=calibration.whitening(chunk),
            only=frozenset(group.key for group in chunk),
        )
        del calibration  # the Gram matrices: only the Cholesky factors are needed now
        layers.extend(chunk_pass(model).layers)
    if progress is not None:
        progress("calibrating", len(chunks), len(chunks), "")
    return layers


def _run_passes(
    model, factorize, quantize, plugin: bool
) -> tuple[tuple[LayerReport, ...], Fp8Report | None]:
    layers: list[LayerReport] = []
    fp8 = None
    for pass_ in build_pipeline(factorize, quantize, plugin=plugin):
        result = pass_(model)
        if isinstance(result, FactorizeResult):
            layers.extend(result.layers)
        if isinstance(result, QuantizeResult):
            fp8 = Fp8Report(tuple(result.tensors), tuple(result.skipped))
    return tuple(layers), fp8


def _fp8_bytes(layer: LayerReport, fp8: Fp8Report) -> LayerReport:
    """The layer's weight bytes once its (factor) weights are one byte per element."""
    quantized = {t.name for t in fp8.tensors if t.kind == "weight"}
    names = layer.factors if layer.status == "factored" else (layer.weight,)
    if not names or not set(names) & quantized:
        return layer
    elements = layer.params_after
    itemsize = layer.bytes_before // max(layer.params_before, 1)
    kept = layer.bytes_after - elements * itemsize  # a dense weight kept for other readers
    return dataclasses.replace(layer, bytes_after=elements + kept)


def _with_fp8_opset(model: ir.Model, input_path: Path) -> ir.Model:
    """The model at opset >= 19 (FP8 Q/DQ needs it), upgraded by ONNX's converter if lower."""
    opset = model.opset_imports.get("", 1)
    if opset >= MIN_OPSET:
        return model
    try:
        upgraded = upgrade_opset(model, MIN_OPSET)
    except ValueError as e:
        raise LrcompileError(
            f"{input_path}: FP8 needs opset >= {MIN_OPSET}, the model has {opset} and {e}"
        ) from None
    logger.warning("%s: upgraded the default opset %d -> %d for FP8", input_path, opset, MIN_OPSET)
    return upgraded


@contextlib.contextmanager
def _removed_on_error(output_path: Path) -> Iterator[None]:
    """A check that cannot run (exit 2) leaves no output behind, as every exit 2 promises."""
    try:
        yield
    except LrcompileError:
        output_path.unlink(missing_ok=True)
        output_path.with_name(f"{output_path.name}.data").unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _verification_feeds(config: CompileConfig, inputs) -> data_lib.FeedSource | None:
    """The held-out feeds for the final check (None: use calibration or synthetic data).

    Checked before anything runs, so bad data fails before anything is written.
    """
    shapes = data_lib.parse_input_shapes(config.input_shapes)
    data_lib.resolve_shapes(inputs, shapes, config.batch_size)
    if not config.verify or config.verify_data is None:
        return None
    return data_lib.input_feeds(
        str(config.verify_data),
        None,
        inputs,
        shapes=shapes,
        batch_size=config.batch_size,
        iterations=DEFAULT_ITERATIONS,
        seed=config.seed,
    )


def _synthetic(config: CompileConfig, inputs) -> data_lib.FeedSource:
    return data_lib.input_feeds(
        None,
        None,
        inputs,
        shapes=data_lib.parse_input_shapes(config.input_shapes),
        batch_size=config.batch_size,
        iterations=DEFAULT_ITERATIONS,
        seed=config.seed,
    )


def _calibrate(
    input_path, model, config, factorize, groups, inputs, progress
) -> Calibration | None:
    """Calibration statistics when ``--calib``/``--calib-script`` or ``auto`` ask for them."""
    wanted = config.calib is not None or config.calib_script is not None
    if not (wanted or _uses_auto(factorize, groups)):
        return None
    source = calibration_source(config, inputs)
    return calibrate(
        ir.serde.serialize_model(model),
        groups,
        source,
        data_folder=input_path.parent,
        on_batch=_stage(progress, "calibrating"),
    )


def _uses_auto(factorize: FactorizeLowRankPass, groups) -> bool:
    return any(factorize.spec_for(group).kind == "auto" for group in groups)


def _stage(progress: ProgressCallback | None, stage: str):
    if progress is None:
        return None
    return lambda done, total, detail: progress(stage, done, total, detail)
