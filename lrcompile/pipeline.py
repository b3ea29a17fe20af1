"""The one place that chooses and orders the passes.

    factorize (chunk by chunk of layers) -> [FP8: ranges measured, then Q/DQ] -> [plugin calls]
      -> cleanup

``compile_model`` runs it once to write the model, the ``auto`` search once per probe (so what is
measured is what is written) and ``inspect`` once per point of its trade-off curve. The FP8 pass
needs the activation ranges of the model as it is after factoring: the pipeline asks the pass
which tensors (``activation_names``), has the caller's range finder (the calibration stage,
``lrcompile.calibration.ranges``) measure them, and hands the pass the result as data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrcompile.config import CompileConfig
from lrcompile.io import overrides as override_files
from lrcompile.numerics import ranks
from lrcompile.numerics.ranges import ActivationRange
from lrcompile.numerics.whiten import Whitening
from lrcompile.passes.fp8 import QuantizedTensor, QuantizeFp8Pass, QuantizeResult
from lrcompile.passes.low_rank import FactorizeLowRankPass, FactorizeResult
from lrcompile.passes.plugin import EmitLowRankGemmPass
from lrcompile.report import LayerReport

# range_finder(model, names) -> {name: range}, measured on the model as it is when called.
RangeFinder = Callable[[ir.Model, Sequence[str]], Mapping[str, ActivationRange]]
# (group keys, their whitening or None for the pass's own): layers factored together.
Chunk = tuple[frozenset[str], Mapping[str, Whitening] | None]


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
class PipelineResult:
    """Every layer's report (weight bytes counted as written) and the FP8 report, if any."""

    layers: tuple[LayerReport, ...]
    fp8: Fp8Report | None = None


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The passes for one configuration, in order."""

    factorize: FactorizeLowRankPass
    quantize: QuantizeFp8Pass | None = None
    plugin: bool = False

    @property
    def passes(self) -> list[ir.passes.PassBase]:
        """The passes in the order ``run`` applies them."""
        passes: list[ir.passes.PassBase] = [self.factorize]
        if self.quantize is not None:
            passes.append(self.quantize)
        if self.plugin:
            passes.append(EmitLowRankGemmPass())
        passes.append(RemoveUnusedNodesPass())
        return passes

    def run(
        self,
        model: ir.Model,
        *,
        ranges: RangeFinder | None = None,
        chunks: Iterable[Chunk] | None = None,
    ) -> PipelineResult:
        """Rewrites ``model`` in place.

        Args:
            model: The prepared model.
            ranges: Measures activation ranges for the FP8 pass (required with FP8).
            chunks: Factor these groups of layers one after another, each with its whitening
                (calibrated just before it is needed; such a chunk bypasses the pass's factor
                cache); by default every layer at once with the factorize pass's own whitening.
        """
        layers = list(self._factorize(model, chunks))
        fp8 = None
        if self.quantize is not None:
            if ranges is None:
                raise ValueError("the FP8 pass needs a range finder")
            measured = ranges(model, self.quantize.activation_names(model))
            result = dataclasses.replace(self.quantize, ranges=measured)(model)
            assert isinstance(result, QuantizeResult)
            fp8 = Fp8Report(tuple(result.tensors), tuple(result.skipped))
            layers = [_fp8_bytes(layer, fp8) for layer in layers]
        if self.plugin:
            EmitLowRankGemmPass()(model)
        RemoveUnusedNodesPass()(model)
        return PipelineResult(tuple(layers), fp8)

    def _factorize(self, model: ir.Model, chunks: Iterable[Chunk] | None) -> list[LayerReport]:
        if chunks is None:
            return _layers(self.factorize(model))
        layers = []
        for keys, whitening in chunks:
            # A chunk with its own whitening (calibrated chunk by chunk, or compensated) is
            # factored afresh, not from auto's cached factors.
            own = whitening is not None
            chunk = dataclasses.replace(
                self.factorize,
                only=keys,
                whitening=whitening if own else self.factorize.whitening,
                cache=None if own else self.factorize.cache,
            )
            layers.extend(_layers(chunk(model)))
        # Factors nothing: reports the nodes left alone, after every chunk's layers.
        layers.extend(_layers(dataclasses.replace(self.factorize, only=frozenset())(model)))
        return layers


def build_pipeline(
    factorize: FactorizeLowRankPass, config: CompileConfig | None = None
) -> Pipeline:
    """The pipeline for ``factorize`` and what ``config`` adds (FP8, plugin); factorize and
    cleanup alone without a config."""
    if config is None:
        return Pipeline(factorize)
    quantize = None
    if config.fp8:
        quantize = QuantizeFp8Pass(scope=config.fp8_scope, weights=config.fp8_weights)
    return Pipeline(factorize, quantize, plugin=config.plugin)


def factorize_pass(config: CompileConfig) -> FactorizeLowRankPass:
    """The factorize pass ``config`` describes, before calibration and search configure it.

    Raises:
        RankSpecError: The rank spec or the override file is invalid.
    """
    overrides = override_files.load_overrides(config.overrides) if config.overrides else ()
    return FactorizeLowRankPass(
        rank=ranks.RankSpec.parse(config.rank),
        overrides=overrides,
        rank_multiple=config.rank_multiple,
        decomposition=config.decomposition,
        seed=config.seed,
        allow_no_saving=config.allow_no_saving,
    )


def _layers(result: ir.passes.PassResult) -> list[LayerReport]:
    assert isinstance(result, FactorizeResult)
    return list(result.layers)


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
