"""The rewrite stage: the plan's factors fitted, the passes run, the per-layer report rendered.

    plan -> the provider's factors (spilled to the scratch folder for large models)
      -> pipeline: factor passes, FP8 ranges measured on the factored model, finish passes
      -> the report: the plan, the fitted factors, and which weights the written model still reads

With error compensation the layers go in blocks, in graph order, each calibrated on the model as
rewritten so far: the first block from the calibration's cache, each later one fitted to the
ORIGINAL outputs given the inputs the model compressed so far gives it
(``lrcompile.calibration.compensation``), then rewritten before the next is calibrated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from lrcompile import pipeline
from lrcompile.calibration.compensation import compensating_whitenings
from lrcompile.calibration.ranges import RangeCalibration
from lrcompile.check.layer_errors import measure_layer_errors
from lrcompile.config import CompileConfig
from lrcompile.factors.provider import FactorProvider, Fitted, ProgressCallback
from lrcompile.io.spill import Spill
from lrcompile.passes.candidates import has_live_readers
from lrcompile.passes.embeddings import embedding_tables
from lrcompile.passes.quantized import tensor_names
from lrcompile.pipeline import Fp8Report
from lrcompile.plan import Plan
from lrcompile.profile import Profile
from lrcompile.report import LayerReport
from lrcompile.search.sensitivity import SENSITIVITY_BATCHES
from lrcompile.stages.calibrate import Calibrated
from lrcompile.stages.load import Prepared
from lrcompile.stages.report import embedding_reports, layer_reports


@dataclasses.dataclass(frozen=True)
class Rewritten:
    """Every layer's report (weight bytes counted as written) and the FP8 report, if any."""

    layers: tuple[LayerReport, ...]
    fp8: Fp8Report | None = None

    @property
    def changed(self) -> bool:
        """Whether any weight was factored or quantized (else nothing is written)."""
        return any(layer.status in ("factored", "quantized") for layer in self.layers)


def rewrite(
    prepared: Prepared,
    calibrated: Calibrated,
    plan: Plan,
    config: CompileConfig,
    provider: FactorProvider,
    profile: Profile,
    scratch: Path | None = None,
    progress: ProgressCallback | None = None,
    predicted: Mapping[str, float] | None = None,
) -> Rewritten:
    """Rewrites ``prepared.model`` in place as ``plan`` says (see the module docstring).

    With a ``scratch`` folder (large models), each layer's factors are spilled there as they are
    made, so memory holds a few weights at a time, not the model. ``predicted``: auto's predicted
    own-output error of each layer it searched (``AutoResult.local``); each quantized one's is
    then measured on the batches auto held back (``check.layer_errors``), for the report.
    """
    model, spill = prepared.model, Spill(scratch) if scratch is not None else None
    names, quantized_names = tensor_names(model, prepared.groups, plan)
    if calibrated.blocks is not None and calibrated.source is not None:
        fitted = _compensated(prepared, calibrated, plan, provider, profile, spill, names, progress)
        quantized, errors = {}, {}
    else:
        with profile("factors"):
            fitted = provider.fit(prepared.groups, plan, names, spill=spill, progress=progress)
            quantized = provider.fit_quantized(prepared.groups, plan, quantized_names, spill=spill)
        errors = _layer_errors(prepared, calibrated, plan, quantized, predicted, profile)
        with profile("rewrite"):
            pipeline.factor_passes(plan, _pairs(fitted), quantized)(model)
    tables = embedding_tables(model.graph) if config.quantize is not None else []
    # A tied table the embedding pass takes is not kept beside its quantized MatMul.
    taken = {table.name for table in tables}
    kept = {group.key for group in prepared.groups
            if has_live_readers(group.weight) and group.weight.name not in taken}  # fmt: skip
    ranges = None
    if config.fp8:
        ranges = _Timed(RangeCalibration(calibrated.fitted_feeds(), config.fp8_calib), profile)
    with profile("rewrite"):
        fp8 = pipeline.finish(model, config, ranges)
    layers = layer_reports(prepared, plan, fitted, kept, fp8, quantized, errors)
    return Rewritten((*layers, *embedding_reports(tables)), fp8)


def _layer_errors(prepared, calibrated, plan, quantized, predicted, profile) -> dict:
    """(predicted, measured) own-output error of each quantized layer auto searched, by key;
    measured on the held-back batches (none without them)."""
    statistics = calibrated.statistics
    searched = {key: plan.quantized[key] for key in predicted or {} if key in plan.quantized}
    if not searched or statistics is None or not statistics.held_back:
        return {}
    feeds, _ = statistics.measured(SENSITIVITY_BATCHES)
    with profile("measure"):
        original = ir.serde.serialize_model(prepared.model)  # before the rewrite
        measured = measure_layer_errors(
            original, prepared.path.parent, prepared.groups, searched, quantized, feeds,
            calibrated.source.mask,
        )  # fmt: skip
        del original
    return {key: (predicted[key], measured.get(key)) for key in searched}


def _compensated(prepared, calibrated, plan, provider, profile, spill, names, progress):
    """The blocks in turn (see the module docstring); returns every block's factors."""
    model, blocks, fitted = prepared.model, calibrated.blocks, {}
    with profile("calibrate"):
        original = ir.serde.serialize_model(model)  # before any block is rewritten
    for index, block in enumerate(blocks):
        block_plan, whitenings = plan.only(group.key for group in block), None
        if index:
            if progress is not None:
                progress("compensating", index, len(blocks), f"{len(block)} layers")
            with profile("calibrate"):
                whitenings = compensating_whitenings(
                    original,
                    model,
                    block,
                    calibrated.fitted_feeds(),
                    data_folder=prepared.path.parent,
                    mask=calibrated.source.mask,
                )
        with profile("factors"):
            own = provider.fit(
                prepared.groups, block_plan, names, whitenings=whitenings, spill=spill
            )
        with profile("rewrite"):
            pipeline.factor_passes(block_plan, _pairs(own))(model)
        fitted |= own
    if progress is not None:
        progress("compensating", len(blocks), len(blocks), "")
    return fitted


def _pairs(fitted: Mapping[str, Fitted]) -> dict:
    return {key: each.pair for key, each in fitted.items()}


@dataclasses.dataclass(frozen=True)
class _Timed:
    """A range finder whose runs count as calibration in the profile."""

    finder: RangeCalibration
    profile: Profile

    def __call__(self, model, names):
        with self.profile("calibrate"):
            return self.finder(model, names)
