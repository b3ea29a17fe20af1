"""The per-layer report, rendered from the plan, the fitted factors and what was written.

each weight group: its shape and readers, its spec and decision (``lrcompile.plan``), its
  factors' fit (``Fitted``), whether the written model still reads the dense weight (a
  tied embedding's Gather: counted beside the factors, once per weight), FP8 bytes
each node left alone: why (``passes.candidates.Skipped``)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from lrcompile.factors.provider import Fitted
from lrcompile.factors.quantized import QuantizedFit
from lrcompile.passes.candidates import Skipped, WeightGroup
from lrcompile.passes.embeddings import Embedding
from lrcompile.pipeline import Fp8Report
from lrcompile.plan import Factor, Keep, Plan, Quantize
from lrcompile.report import LayerReport

KEPT_BESIDE = "weight also read by other nodes; kept beside its factors"


def layer_reports(
    prepared,
    plan: Plan,
    fitted: Mapping[str, Fitted],
    kept: Collection[str],
    fp8: Fp8Report | None = None,
    quantized: Mapping[str, QuantizedFit] | None = None,
    errors: Mapping[str, tuple[float, float | None]] | None = None,
) -> tuple[LayerReport, ...]:
    """One report per weight group of ``prepared`` (in graph order), then one per node left alone.

    Args:
        prepared: The model's groups and skipped nodes (``stages.load.Prepared``).
        plan: The decision of every group.
        fitted: The factors of the groups the plan factors.
        kept: Keys of the groups whose dense weight the written model still reads.
        fp8: The FP8 pass's report: quantized weights count one byte per element.
        quantized: The stored form of the groups the plan quantizes.
        errors: (predicted, measured) own-output error of quantized groups, by key.
    """
    quantized, errors = quantized or {}, errors or {}
    layers, counted = [], set()
    for group in prepared.groups:
        decision = plan.decision(group.key)
        layer = _base(group, plan.spec(group.key))
        if isinstance(decision, Factor | Quantize):
            if isinstance(decision, Factor):
                layer = _factored(layer, group, decision, fitted[group.key])
            else:
                layer = _quantized(layer, group, decision, quantized[group.key])
                if group.key in errors:
                    predicted, measured = errors[group.key]
                    layer = dataclasses.replace(
                        layer, predicted_output_error=predicted, output_error=measured
                    )
            if group.key in kept and id(group.weight) not in counted:
                counted.add(id(group.weight))
                layer = _kept_beside(layer, group)
        elif isinstance(decision, Keep):
            layer = dataclasses.replace(layer, reason=decision.reason, rank=decision.rank)
        layers.append(_fp8_bytes(layer, fp8) if fp8 is not None else layer)
    layers.extend(_skipped(skipped) for skipped in prepared.skipped)
    return tuple(layers)


def _base(group: WeightGroup, spec: str | None) -> LayerReport:
    k, n = group.shape
    size = int(k * n * group.tensor.dtype.itemsize)
    return LayerReport(
        nodes=tuple(node.name or "" for node in group.nodes),
        op=group.nodes[0].op_type,
        weight=group.weight.name,
        status="dense",
        shape=(k, n),
        fused=group.fused,
        spec=spec,
        params_before=k * n,
        params_after=k * n,
        flops_before=k * n * len(group.nodes),
        flops_after=k * n * len(group.nodes),
        bytes_before=size,
        bytes_after=size,
    )


def _factored(layer: LayerReport, group: WeightGroup, decision: Factor, fit: Fitted):
    k, n = group.shape
    params = decision.rank * (k + n)
    return dataclasses.replace(
        layer,
        status="factored",
        rank=decision.rank,
        method=fit.method,
        kept_energy=fit.kept_energy,
        relative_error=fit.relative_error,
        params_after=params,
        flops_after=params * len(group.nodes),
        bytes_after=int(params * group.tensor.dtype.itemsize),
        factors=(fit.left.name, fit.right.name),
        seconds=fit.seconds,
    )


def _quantized(layer: LayerReport, group: WeightGroup, decision: Quantize, fit: QuantizedFit):
    """The layer as integers (every byte: values, scales, zero points) and its correction."""
    k, n = group.shape
    params = k * n + decision.correction * (k + n)
    tensors = (fit.q, fit.scale, fit.zero, fit.left, fit.right)
    return dataclasses.replace(
        layer,
        status="quantized",
        rank=decision.correction or None,
        method=str(decision),
        relative_error=fit.relative_error,
        params_after=params,
        flops_after=params * len(group.nodes),
        bytes_after=fit.nbytes,
        factors=tuple(t.name for t in tensors if t is not None),
        seconds=fit.seconds,
    )


def embedding_reports(tables: Sequence[Embedding]) -> list[LayerReport]:
    """The embedding tables stored as int8 rows (``passes.embeddings``), every byte counted."""
    return [
        LayerReport(
            nodes=table.nodes,
            op="Gather",
            weight=table.name,
            status="quantized",
            shape=table.shape,
            method="int8 per-row (embedding)",
            params_before=table.shape[0] * table.shape[1],
            params_after=table.shape[0] * table.shape[1],
            bytes_before=table.bytes_before,
            bytes_after=table.bytes_after,
            factors=(f"{table.name}_q", f"{table.name}_q_scale"),
        )
        for table in tables
    ]


def _kept_beside(layer: LayerReport, group: WeightGroup) -> LayerReport:
    """The layer with its dense weight counted in its params and bytes."""
    k, n = group.shape
    return dataclasses.replace(
        layer,
        params_after=layer.params_after + k * n,
        bytes_after=layer.bytes_after + int(k * n * group.tensor.dtype.itemsize),
        reason=KEPT_BESIDE,
    )


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


def _skipped(skipped: Skipped) -> LayerReport:
    node = skipped.node
    weight = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return LayerReport(
        nodes=(node.name or "",),
        op=node.op_type,
        weight=weight,
        status="skipped",
        reason=skipped.reason,
    )
