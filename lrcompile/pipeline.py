"""The one place that chooses and orders the passes, run by onnx_ir's pass manager.

    factor_passes:  FactorizeLowRankPass (the plan's Factor decisions, the provider's factors)
                    -> [QuantizeWeightsPass] (its Quantize decisions, the provider's integers)
    finish_passes:  [ShareFirstFactorPass] -> [QuantizeEmbeddingsPass] -> [QuantizeFp8Pass]
                    -> [EmitLowRankGemmPass] -> RemoveUnusedNodesPass

``apply`` runs both: the compile once to write the model, the ``auto`` search once per probe (so
what is measured is what is written), ``inspect`` once per point of its trade-off curve. Between
the two the FP8 pass's activation ranges are measured on the model as it is then (factored, not
yet quantized): the pipeline asks the pass which tensors (``activation_names``), has the caller's
range finder (the calibration stage, ``lrcompile.calibration.ranges``) measure them, and gives the
pass the result as data. Error compensation rewrites block by block with ``factor_passes``, then
runs ``finish`` once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrcompile.config import CompileConfig
from lrcompile.numerics.ranges import ActivationRange
from lrcompile.passes.embeddings import QuantizeEmbeddingsPass
from lrcompile.passes.fp8 import QuantizedTensor, QuantizeFp8Pass
from lrcompile.passes.low_rank import FactorizeLowRankPass, FactorPair
from lrcompile.passes.plugin import EmitLowRankGemmPass
from lrcompile.passes.quantized import QuantizeWeightsPass
from lrcompile.passes.shared import ShareFirstFactorPass
from lrcompile.plan import Plan

# range_finder(model, names) -> {name: range}, measured on the model as it is when called.
RangeFinder = Callable[[ir.Model, Sequence[str]], Mapping[str, ActivationRange]]


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


def factor_passes(
    plan: Plan, factors: Mapping[str, FactorPair], quantized: Mapping[str, object] | None = None
) -> ir.passes.PassManager:
    """The rewrite of the plan's decisions, in order (``quantized``: the provider's
    ``QuantizedFit`` per quantized group)."""
    passes: list[ir.passes.PassBase] = [FactorizeLowRankPass(plan, factors)]
    if plan.quantized:
        passes.append(QuantizeWeightsPass(plan, quantized or {}))
    return ir.passes.PassManager(passes)


def finish_passes(
    config: CompileConfig, ranges: Mapping[str, ActivationRange] | None = None
) -> ir.passes.PassManager:
    """What ``config`` adds to a rewritten model (int8 embedding tables under ``quantize``, FP8
    with ``ranges``, the plugin), then cleanup."""
    passes: list[ir.passes.PassBase] = []
    if config.share_first_factor:
        passes.append(ShareFirstFactorPass())
    if config.quantize is not None:
        passes.append(QuantizeEmbeddingsPass())
    if config.fp8:
        passes.append(_quantize(config, ranges or {}))
    if config.plugin:
        passes.append(EmitLowRankGemmPass())
    passes.append(RemoveUnusedNodesPass())
    return ir.passes.PassManager(passes)


def apply(
    model: ir.Model,
    plan: Plan,
    factors: Mapping[str, FactorPair],
    config: CompileConfig,
    ranges: RangeFinder | None = None,
    quantized: Mapping[str, object] | None = None,
) -> Fp8Report | None:
    """Rewrites ``model`` in place: the plan with its factors (and quantized weights), then
    ``finish``."""
    factor_passes(plan, factors, quantized)(model)
    return finish(model, config, ranges)


def finish(
    model: ir.Model, config: CompileConfig, ranges: RangeFinder | None = None
) -> Fp8Report | None:
    """Runs ``finish_passes`` on a rewritten model, first measuring the FP8 ranges with
    ``ranges`` (required under FP8); returns the FP8 report (None without FP8)."""
    if not config.fp8:
        finish_passes(config)(model)
        return None
    if ranges is None:
        raise ValueError("the FP8 pass needs a range finder")
    measured = ranges(model, _quantize(config, {}).activation_names(model))
    tensors, skipped = _quantize(config, measured).report(model)
    finish_passes(config, measured)(model)
    return Fp8Report(tuple(tensors), tuple(skipped))


def _quantize(config: CompileConfig, ranges: Mapping[str, ActivationRange]) -> QuantizeFp8Pass:
    return QuantizeFp8Pass(scope=config.fp8_scope, weights=config.fp8_weights, ranges=ranges)
