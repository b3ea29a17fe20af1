"""``lrcompile inspect``: what could be factored, how compressible it is, and what auto would walk.

    candidates -> [spectra: plain SVD of each weight]
               -> [calibration: whitened spectra, per-layer sensitivity,
                   the allocation path measured end to end at a few points]

Nothing is written; the model is only read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrcompile import pipeline
from lrcompile.compiler import calibration
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError
from lrcompile.numerics.allocate import allocation_path
from lrcompile.numerics.ranks import break_even_rank
from lrcompile.passes.candidates import effective_weight, release_weight
from lrcompile.passes.factored_graph import factor_names
from lrcompile.profile import Profile
from lrcompile.runtime.metrics import measure_error
from lrcompile.stages import search as search_stage
from lrcompile.stages.calibrate import statistics_description
from lrcompile.stages.load import load


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One factorable weight: where, its shape, and (when computed) its spectra."""

    node: str
    weight: str
    op: str
    shape: tuple[int, int]
    nodes: int
    fused: str | None = None  # what the weight packs: "q/k/v"
    plain: np.ndarray | None = None
    whitened: np.ndarray | None = None
    sensitivity: float | None = None

    @property
    def break_even(self) -> float:
        return break_even_rank(*self.shape)

    def energy_rank(self, fraction: float, whitened: bool = False) -> int | None:
        """The smallest rank keeping ``fraction`` of the (whitened) squared singular values."""
        values = self.whitened if whitened else self.plain
        if values is None:
            return None
        energy = np.cumsum(np.square(values, dtype=np.float64))
        return int(np.searchsorted(energy, fraction * energy[-1] * (1 - 1e-12))) + 1


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """A point of the allocation path: its cost, predicted and measured output error."""

    cost_ratio: float
    predicted_error: float
    measured_error: float


@dataclasses.dataclass(frozen=True)
class Inspection:
    """The candidates, the nodes left alone with reasons, the ops lrcompile does not factor
    (``(op, why, count)``: already quantized, or not MatMul/Gemm), and the trade-off curve."""

    layers: tuple[LayerInfo, ...]
    skipped: tuple[tuple[str, str], ...]
    curve: tuple[CurvePoint, ...]
    calibration: str | None
    left_alone: tuple[tuple[str, str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "layers": [
                {
                    "node": layer.node,
                    "weight": layer.weight,
                    "op": layer.op,
                    "shape": list(layer.shape),
                    "nodes": layer.nodes,
                    "fused": layer.fused,
                    "break_even_rank": layer.break_even,
                    "rank_energy_0.99": layer.energy_rank(0.99),
                    "rank_whitened_energy_0.99": layer.energy_rank(0.99, whitened=True),
                    "sensitivity": layer.sensitivity,
                }
                for layer in self.layers
            ],
            "skipped": [{"node": node, "reason": reason} for node, reason in self.skipped],
            "left_alone": [
                {"op": op, "reason": why, "count": count} for op, why, count in self.left_alone
            ],
            "curve": [dataclasses.asdict(point) for point in self.curve],
        }


def inspect_model(
    path: str | Path,
    config: CompileConfig | None = None,
    *,
    spectra: bool = False,
    curve_points: int = 8,
) -> Inspection:
    """Lists the candidates of ``path``; with ``spectra`` their SVD spectra; with calibration in
    ``config`` (``calib``/``calib_script``) whitened spectra, sensitivities and the trade-off curve.

    Raises:
        LrcompileError: Bad model or calibration data, or the ``latency`` objective (the curve
            is of FLOPs or parameters; a compile measures latency).
    """
    config = dataclasses.replace(config or CompileConfig(rank="auto"), rank="auto", overrides=None)
    if config.objective == "latency":
        raise LrcompileError(
            "inspect's trade-off curve is of flops or params; `objective=latency` is measured"
            " by a compile with `rank=auto`"
        )
    path = Path(path)
    prepared = load(path, config)
    layers = [_layer_info(group, spectra) for group in prepared.groups]
    notes = tuple((s.node.name or "", s.reason) for s in prepared.skipped)
    left_alone = tuple(prepared.left_alone)
    if not config.calibrated:
        return Inspection(tuple(layers), notes, (), None, left_alone)
    # What a compile's search starts from: cached factors, spectra, sensitivities.
    with calibration(prepared, config, Profile()) as (provider, calibrated):
        measured = search_stage.measure(prepared, calibrated, config, provider)
        by_key = {spectrum.name: spectrum for spectrum in measured.spectra}
        for index, group in enumerate(prepared.groups):
            if group.key in by_key:
                layers[index] = dataclasses.replace(
                    layers[index],
                    whitened=provider.cached(group.key).spectrum,
                    sensitivity=by_key[group.key].sensitivity,
                )
        curve = _curve(prepared, calibrated, measured.spectra, provider, config, curve_points)
        description = statistics_description(calibrated.source)
    return Inspection(tuple(layers), notes, curve, description, left_alone)


def _layer_info(group, spectra: bool) -> LayerInfo:
    plain = None
    if spectra:
        weight = effective_weight(group)
        if np.all(np.isfinite(weight)):
            plain = np.linalg.svd(weight.astype(np.float32), compute_uv=False)
        del weight
        release_weight(group)
    return LayerInfo(
        node=group.nodes[0].name or "",
        weight=group.name,
        op=group.nodes[0].op_type,
        shape=group.shape,
        nodes=len(group.nodes),
        fused=group.fused,
        plain=plain,
    )


def _curve(prepared, calibrated, spectra: Sequence, provider, config, points: int):
    """The allocation path measured end to end at ``points`` costs spread over its range."""
    plans = search_stage.planner(prepared, calibrated, config)
    path = allocation_path(spectra, multiple=plans.multiple, objective=config.objective)
    if points <= 0 or len(path) < 2:
        return ()
    costs = np.array([allocation.cost_ratio for allocation in path])
    targets = np.linspace(costs[0], costs[-1], points)
    indices = sorted({int(np.argmin(np.abs(costs - target))) for target in targets})
    plain = dataclasses.replace(config, fp8=False, plugin=False)  # the factors alone
    curve = []
    for index in indices:
        candidate = prepared.model.clone()
        plan = plans(path[index].ranks)
        names = factor_names(candidate.graph, prepared.groups, plan.factored)
        fitted = provider.fit(prepared.groups, plan, names, weight_errors=False)
        pipeline.apply(candidate, plan, {key: f.pair for key, f in fitted.items()}, plain)
        measured = measure_error(candidate, *calibrated.statistics.measured())
        predicted = float(np.sqrt(path[index].predicted_error))
        curve.append(CurvePoint(path[index].cost_ratio, predicted, measured))
    return tuple(curve)
