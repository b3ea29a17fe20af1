"""``compile_model``: the library's main entry point, the stages of ``lrcompile.stages`` in order.

load -> find candidates -> calibrate -> search -> rewrite -> save (atomic) -> verify
(``compile_sweep``: calibrate and measure once, then search -> ... -> verify per setting)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lrcompile import stages
from lrcompile.check.verify import VerifyResult, verify, warn_if_synthetic
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError, OutputPathError
from lrcompile.io import data as data_lib
from lrcompile.io import model as model_io
from lrcompile.passes.low_rank import ProgressCallback
from lrcompile.pipeline import Fp8Report, factorize_pass
from lrcompile.report import LayerReport, Totals, totals
from lrcompile.search.auto import AutoResult

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
    auto: AutoResult | None = None
    calibration: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    fp8: Fp8Report | None = None
    left_alone: tuple[tuple[str, str, int], ...] = ()  # (op, why, count): not MatMul/Gemm

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
            "layers": [layer.to_dict() for layer in self.layers],
            "verification": self.verification.to_dict() if self.verification else None,
            "calibration": self.calibration,
            "auto": self.auto.to_dict() if self.auto else None,
            "seconds": self.seconds,
            "fp8": self.fp8.to_dict() if self.fp8 else None,
            "left_alone": [
                {"op": op, "reason": why, "count": count} for op, why, count in self.left_alone
            ],
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
    timer = _Timer()
    with timer("load"):
        factorize, prepared, check_feeds = _load(input_path, config, [output_path])
    with contextlib.ExitStack() as scratch:  # temporary files: reference outputs, factor cache
        with timer("calibrate"):
            plan = stages.plan_calibration(prepared, config, factorize, progress)
            scratch.callback(plan.close)
        with timer("auto search"):
            factorize, auto = stages.search(plan, config, factorize, progress)
        result = _rewrite_and_save(plan, config, factorize, output_path, timer, progress)
    return _checked(plan, config, auto, result, output_path, timer, check_feeds)


# What ``compile_sweep`` may vary between its outputs: only the choice of ranks and the final
# check read them, so the calibration, factors and sensitivities serve every setting.
SWEEP_FIELDS = ("tolerance", "budget", "headroom", "objective")


def compile_sweep(
    input_path: str | Path,
    settings: Mapping[str | Path, Mapping[str, Any]],
    config: CompileConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> Iterator[tuple[Path, CompileResult]]:
    """Compiles one model with ``--rank auto`` at several tolerances, budgets or objectives.

    The calibration, the factors and the sensitivities are computed once; each setting then gets
    its own search, output and check. Each result is what ``compile_model`` gives with that
    setting alone (the same ranks and output); its ``seconds`` count the shared stages too.

    Example: ``compile_sweep("lm.onnx", {"a.onnx": {"tolerance": 0.05}, "b.onnx": {"budget":
    0.8}}, rank="auto", calib="calib.npz")``; nothing runs until it is iterated.

    Args:
        input_path: The ONNX model; never modified.
        settings: Output path -> the ``SWEEP_FIELDS`` whose values differ from ``config``'s.
        config: As for ``compile_model``; its rank spec must make some layer ``auto``.
        progress: As for ``compile_model``.

    Returns:
        An iterator of (output path, result), each yielded once its output is written and checked.

    Raises:
        LrcompileError: As ``compile_model`` (bad data while iterating), or a setting varies
            another field, or no layer is ``auto`` (raised by the call, before anything runs).
    """
    config = config if config is not None else CompileConfig(**options)
    resolved = [Path(output).resolve() for output in settings]
    twice = next(
        (o for o, r in zip(settings, resolved, strict=True) if resolved.count(r) > 1), None
    )
    if twice is not None:
        raise OutputPathError(f"{twice}: compile_sweep names this output for two settings")
    configs = {
        Path(output): _sweep_setting(config, output, setting)
        for output, setting in settings.items()
    }
    timer = _Timer()
    with timer("load"):
        factorize, prepared, check_feeds = _load(Path(input_path), config, list(configs))
        if not configs:
            raise LrcompileError("compile_sweep: no settings given (output path -> fields)")
        if not stages.uses_auto(factorize, prepared.groups):
            raise LrcompileError(
                f"compile_sweep: rank {config.rank!r} (with the overrides) makes no layer"
                " 'auto'; a sweep shares auto's measurements, so it needs --rank auto"
            )
    return _sweep(prepared, configs, config, factorize, check_feeds, timer, progress)


def _load(input_path: Path, config: CompileConfig, outputs: list[Path]):
    """(factorize pass, prepared model, held-out check feeds or None), all checked up front."""
    factorize = factorize_pass(config)  # validates the spec and overrides first
    stages.check_device(config.device)
    prepared = stages.load(input_path, config, outputs)
    return factorize, prepared, _verification_feeds(config, prepared)  # bad data fails early


def _sweep_setting(config: CompileConfig, output, setting: Mapping[str, Any]) -> CompileConfig:
    if not isinstance(setting, Mapping):
        raise LrcompileError(
            f"compile_sweep: the setting for {output} is {setting!r}; expected a mapping of"
            f" fields ({', '.join(SWEEP_FIELDS)}) to values"
        )
    varied = sorted(set(setting) - set(SWEEP_FIELDS))
    if varied:
        raise LrcompileError(
            f"compile_sweep: the setting for {output} varies {', '.join(varied)}; only"
            f" {', '.join(SWEEP_FIELDS)} may differ between outputs (the rest is shared)"
        )
    return dataclasses.replace(config, **setting)


def _sweep(prepared, configs, config, factorize, check_feeds, timer, progress):
    """``compile_sweep`` once its inputs are checked: the shared stages, then each setting."""
    with contextlib.ExitStack() as scratch:  # temporary files: reference outputs, factor cache
        with timer("calibrate"):
            plan = stages.plan_calibration(prepared, config, factorize, progress)
            scratch.callback(plan.close)
        with timer("auto search"):
            factorize, layers = stages.measure(plan, factorize, progress)
        for output, setting in configs.items():
            own = _Timer(timer.seconds)  # the shared stages' seconds, then this setting's
            with own("auto search"):  # on the original model, still unchanged
                chosen, auto = stages.choose(plan, setting, factorize, layers, progress)
            with own("load"):  # a fresh copy to rewrite in place
                fresh = dataclasses.replace(plan, prepared=stages.load(prepared.path, setting))
            result = _rewrite_and_save(fresh, setting, chosen, output, own, progress)
            compiled = _checked(fresh, setting, auto, result, output, own, check_feeds)
            del fresh, result  # the rewritten model: not kept while the caller looks at it
            yield output, compiled


def _checked(plan, config, auto, result, output_path: Path, timer, check_feeds) -> CompileResult:
    """The result of a rewrite: verified (unless ``config`` says not to) when it factored any
    layer, else with no output."""
    prepared = plan.prepared
    source = stages.statistics_description(plan.source) if plan.source is not None else None
    compiled = CompileResult(
        prepared.path, None, result.layers, None, config, auto, source, timer.seconds, result.fp8,
        tuple(prepared.left_alone),
    )  # fmt: skip
    if not any(layer.status == "factored" for layer in result.layers):
        logger.info("%s: nothing to factor; no output written", prepared.path)
        return compiled
    verification = None
    if config.verify:
        feeds = check_feeds or _calibration_or_synthetic(plan, config, prepared)
        with timer("verify"), _removed_on_error(output_path):
            verification = _verify(prepared.path, output_path, config, feeds)
    if config.objective == "latency":
        with timer("timing"):  # the latency table's prediction against a measurement
            compiled = dataclasses.replace(compiled, auto=stages.timed(plan, auto, output_path))
    return dataclasses.replace(compiled, output_path=output_path, verification=verification)


def _verify(input_path: Path, output_path: Path, config: CompileConfig, feeds) -> VerifyResult:
    return verify(
        input_path,
        output_path,
        tolerance=config.tolerance,
        metric=config.metric,
        feeds=feeds,
        labels=config.labels,
    )


def _rewrite_and_save(plan, config, factorize, output_path: Path, timer, progress):
    """Rewrites the model and saves it atomically, unless no layer was factored.

    Large models (external data in or out) spill each layer's factors to the staging folder as
    they are made; saving then copies file to file.
    """
    model = plan.prepared.model
    external = config.external_data or model_io.needs_external_data(model)
    with model_io.write_errors(output_path), model_io.staging_folder(output_path.parent) as scratch:
        with timer("factorize"):
            result = stages.rewrite(
                plan, config, factorize, scratch if external else None, progress
            )
        if any(layer.status == "factored" for layer in result.layers):
            with timer("save"):
                model_io.save_model(model, output_path, external_data=external)
    return result


class _Timer:
    """Seconds spent in each stage (``with timer("load"): ...``), from ``seconds`` on."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def _removed_on_error(output_path: Path) -> Iterator[None]:
    """A check that cannot run (exit 2) leaves no output behind, as every exit 2 promises."""
    try:
        yield
    except LrcompileError:
        output_path.unlink(missing_ok=True)
        output_path.with_name(f"{output_path.name}.data").unlink(missing_ok=True)
        raise


def _verification_feeds(config: CompileConfig, prepared) -> data_lib.FeedSource | None:
    """The held-out feeds for the final check (None: use calibration or synthetic data).

    Checked before anything runs, so bad data fails before anything is written.
    """
    data_lib.resolve_shapes(prepared.inputs, config.input_shapes, config.batch_size)
    if not config.verify or config.verify_data is None:
        return None
    return stages.feeds(prepared, config, str(config.verify_data))


def _calibration_or_synthetic(plan, config: CompileConfig, prepared) -> data_lib.FeedSource:
    """Without ``--verify-data``: the calibration batches auto held back from fitting (data the
    factors never saw), else all the calibration data, else synthetic data (warned)."""
    source, held = plan.source, plan.held_back_feeds() if plan.source is not None else []
    if held:
        what = f"{source.description} (the {len(held)} calibration batches held back from fitting)"
        return data_lib.FeedSource(held, what, source.synthetic)
    if source is not None:
        return data_lib.FeedSource(
            source.feeds, f"{source.description} (the calibration data)", source.synthetic
        )
    feeds = stages.feeds(prepared, config, None)
    warn_if_synthetic(feeds, "checking the output")
    return feeds
