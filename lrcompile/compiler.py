"""``compile_model``: the library's main entry point, the stages of ``lrcompile.stages`` in order.

    load -> calibrate (and cache the SVDs) -> search (the plan) -> rewrite -> save (atomic)
      -> verify

``lrcompile.sweep.compile_sweep`` calibrates and measures once, then runs search -> ... -> verify
per setting, with the helpers here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lrcompile.check.verify import VerifyResult, verify, warn_if_synthetic
from lrcompile.config import CompileConfig
from lrcompile.errors import InternalError, LrcompileError
from lrcompile.factors.provider import FactorProvider, ProgressCallback
from lrcompile.io import data as data_lib
from lrcompile.io import model as model_io
from lrcompile.io import runtime_files
from lrcompile.io import shapes as shapes_lib
from lrcompile.pipeline import Fp8Report
from lrcompile.plan import Plan
from lrcompile.profile import Profile
from lrcompile.report import LayerReport, Totals, totals
from lrcompile.search.auto import AutoResult
from lrcompile.stages import load as load_stage
from lrcompile.stages import search as search_stage
from lrcompile.stages.calibrate import Calibrated, calibrate_and_cache, statistics_description
from lrcompile.stages.load import Prepared
from lrcompile.stages.rewrite import Rewritten, rewrite

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """What ``compile_model`` did: the output (None when nothing was factored), the plan and the
    per-layer report, and the verification verdict (None when verification was off or nothing
    was written)."""

    input_path: Path
    output_path: Path | None
    layers: tuple[LayerReport, ...]
    verification: VerifyResult | None
    config: CompileConfig
    auto: AutoResult | None = None
    calibration: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    fp8: Fp8Report | None = None
    left_alone: tuple[tuple[str, str, int], ...] = ()  # (op, why, count): not MatMul/Gemm
    plan: Plan | None = None
    peak_mib: dict[str, float] = dataclasses.field(default_factory=dict)  # per stage
    runtime_files: tuple[str, ...] = ()  # copied beside the output (``io.runtime_files``)

    @property
    def totals(self) -> Totals:
        return totals(self.layers)

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": str(self.input_path),
            "output": str(self.output_path) if self.output_path else None,
            "config": self.config.to_dict(),
            "totals": self.totals.to_dict(),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "layers": [layer.to_dict() for layer in self.layers],
            "verification": self.verification.to_dict() if self.verification else None,
            "calibration": self.calibration,
            "auto": self.auto.to_dict() if self.auto else None,
            "seconds": self.seconds,
            "peak_mib": self.peak_mib,
            "fp8": self.fp8.to_dict() if self.fp8 else None,
            "left_alone": [
                {"op": op, "reason": why, "count": count} for op, why, count in self.left_alone
            ],
            "runtime_files": list(self.runtime_files),
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
            (``calibrating``, ``sensitivity``, ``timing``, ``searching``, ``compensating``,
            ``factoring``).

    Returns:
        The result. ``output_path`` is None when no layer was factored (nothing is written).

    Raises:
        LrcompileError: Bad model, option, override file, calibration or verification data.
    """
    config = config if config is not None else CompileConfig(**options)
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path else default_output_path(input_path)
    profile = Profile()
    with profile("load"):
        prepared, check_feeds = load_checked(input_path, config, [output_path])
    with calibration(prepared, config, profile, progress) as (provider, calibrated):
        with profile("search"):
            plan, auto = search_stage.search(prepared, calibrated, config, provider, progress)
        rewritten = rewrite_and_save(
            prepared, calibrated, plan, config, provider, output_path, profile, progress,
            predicted=auto.local if auto is not None else None,
        )  # fmt: skip
    result = checked(
        prepared, calibrated, config, (plan, auto), rewritten, output_path, profile, check_feeds
    )
    if result.output_path is None:
        return result
    files = runtime_files.copy_beside(input_path, result.output_path)
    return dataclasses.replace(result, runtime_files=files)


def load_checked(input_path: Path, config: CompileConfig, outputs: list[Path]):
    """(prepared model, held-out check feeds or None), all checked up front."""
    load_stage.check_device(config.device)
    prepared = load_stage.load(input_path, config, outputs)
    return prepared, _verification_feeds(config, prepared)  # bad data fails early


@contextlib.contextmanager
def calibration(
    prepared: Prepared, config: CompileConfig, profile: Profile, progress=None
) -> Iterator[tuple[FactorProvider, Calibrated]]:
    """The factor provider and the calibration stage's result; their temporary files (the factor
    cache, the reference outputs) are removed on exit."""
    provider = factor_provider(config)
    with contextlib.ExitStack() as scratch:
        scratch.callback(provider.close)
        calibrated = calibrate_and_cache(prepared, config, provider, profile, progress)
        scratch.callback(calibrated.close)
        yield provider, calibrated


def factor_provider(config: CompileConfig) -> FactorProvider:
    """The provider of the factors ``config`` asks for."""
    return FactorProvider(
        decomposition=config.decomposition,
        seed=config.seed,
        jobs=config.jobs,
        device=config.device,
        allow_no_saving=config.allow_no_saving,
    )


def rewrite_and_save(
    prepared: Prepared,
    calibrated: Calibrated,
    plan: Plan,
    config: CompileConfig,
    provider: FactorProvider,
    output_path: Path,
    profile: Profile,
    progress: ProgressCallback | None,
    predicted: Mapping[str, float] | None = None,
) -> Rewritten:
    """Rewrites the model and saves it atomically, unless no layer was factored (``predicted``:
    see ``stages.rewrite.rewrite``).

    Each layer's factors are spilled to the staging folder as they are made, so memory holds a
    few layers, never the model's factors; saving then copies file to file (external data) or
    writes the model a tensor at a time (inline).
    """
    model = prepared.model
    external = config.external_data or model_io.needs_external_data(model)
    with model_io.write_errors(output_path), model_io.staging_folder(output_path.parent) as scratch:
        rewritten = rewrite(
            prepared, calibrated, plan, config, provider, profile, scratch, progress, predicted
        )
        if rewritten.changed:
            with profile("save"):
                model_io.save_model(model, output_path, external_data=external)
    return rewritten


def checked(
    prepared: Prepared,
    calibrated: Calibrated,
    config: CompileConfig,
    searched: tuple[Plan, AutoResult | None],
    rewritten: Rewritten,
    output_path: Path,
    profile: Profile,
    check_feeds: data_lib.FeedSource | None,
) -> CompileResult:
    """The result of a rewrite: verified (unless ``config`` says not to) when it factored any
    layer, else with no output."""
    (plan, auto), source = searched, calibrated.source
    described = statistics_description(source) if source is not None else None
    result = CompileResult(
        prepared.path, None, rewritten.layers, None, config, auto, described, profile.seconds,
        rewritten.fp8, tuple(prepared.left_alone), plan, profile.peaks,
    )  # fmt: skip
    if not rewritten.changed:
        logger.info("%s: nothing to compress; no output written", prepared.path)
        return result
    verification = None
    if config.verify:
        feeds = check_feeds or _calibration_or_synthetic(calibrated, config, prepared)
        with profile("verify"), _removed_on_error(output_path):
            verification = verify(
                prepared.path,
                output_path,
                tolerance=config.tolerance,
                metric=config.metric,
                feeds=feeds,
                labels=config.labels,
                written=True,
                accuracy_level=config.accuracy_level,
                gate_cache=config.gate_cache,
            )
    if config.objective == "latency":
        with profile("timing"):  # the latency table's prediction against a measurement
            auto = search_stage.timed(
                calibrated, prepared, auto, output_path, config.accuracy_level
            )
    return dataclasses.replace(
        result, output_path=output_path, verification=verification, auto=auto,
        seconds=profile.seconds, peak_mib=profile.peaks,
    )  # fmt: skip


@contextlib.contextmanager
def _removed_on_error(output_path: Path) -> Iterator[None]:
    """A check that cannot run leaves no output behind: bad data (exit 2), or an output that ONNX
    Runtime rejects (exit 3; the check kept a copy for a bug report)."""
    try:
        yield
    except (LrcompileError, InternalError):
        output_path.unlink(missing_ok=True)
        output_path.with_name(f"{output_path.name}.data").unlink(missing_ok=True)
        raise


def _verification_feeds(config: CompileConfig, prepared) -> data_lib.FeedSource | None:
    """The held-out feeds for the final check (None: use calibration or synthetic data).

    Checked before anything runs, so bad data fails before anything is written.
    """
    shapes_lib.resolve_shapes(prepared.inputs, config.input_shapes, config.batch_size)
    if not config.verify or config.verify_data is None:
        return None
    return load_stage.feeds(prepared, config, str(config.verify_data))


def _calibration_or_synthetic(
    calibrated: Calibrated, config: CompileConfig, prepared: Prepared
) -> data_lib.FeedSource:
    """Without ``verify_data``: the calibration batches auto held back from fitting (data the
    factors never saw), else all the calibration data, else synthetic data (warned)."""
    source = calibrated.source
    held = calibrated.held_back_feeds() if source is not None else []
    if held:
        what = f"{source.description} (the {len(held)} calibration batches held back from fitting)"
        return data_lib.FeedSource(held, what, source.synthetic)
    if source is not None:
        return data_lib.FeedSource(
            source.feeds, f"{source.description} (the calibration data)", source.synthetic
        )
    feeds = load_stage.feeds(prepared, config, None)
    warn_if_synthetic(feeds, "checking the output")
    return feeds
