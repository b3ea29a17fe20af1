"""Factor constant MatMul/Gemm weights into two low-rank factors.

    MatMul(x, W[K,N])        -> MatMul(MatMul(x, A[K,r]), B[r,N])
    Gemm(a, W, C; alpha, tA, tB) -> Gemm(Gemm(a, A; tA), B, C; beta)   (A B ~= alpha * op(W))

``A = U_r sqrt(S_r)`` and ``B = sqrt(S_r) V_r^T`` (balanced factors), stored in the weight's
dtype as initializers ``<weight>_lr_A`` and ``<weight>_lr_B``. Nodes sharing a weight share the
factors. The last node keeps the original output name, so the model's signature is unchanged.

Preconditions: the candidates of ``lrcompile.passes.candidates``. A layer stays dense when its rank
saves nothing (``r*(K+N) >= K*N``), when its weight holds NaN/Inf, or when an override says
``skip``. Runs first in the pipeline; the cleanup pass then drops the dense weights left unused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from lrcompile.io import overrides as override_files
from lrcompile.io.spill import Spill
from lrcompile.numerics import decompose, ranks, whiten
from lrcompile.numerics.whiten import Whitening
from lrcompile.passes.candidates import Skipped, WeightGroup, find_candidates, has_live_readers
from lrcompile.passes.factor_cache import CachedFactors, FactorCache
from lrcompile.passes.factored_graph import rewrite_group
from lrcompile.report import LayerReport

logger = logging.getLogger(__name__)

# progress(stage, done, total, detail), e.g. ("factoring", 3, 36, "fc1_weight")
ProgressCallback = Callable[[str, int, int, str], None]


@dataclasses.dataclass
class FactorizeResult(ir.passes.PassResult):
    """The pass result, with one report entry per weight group and per skipped node."""

    layers: list[LayerReport] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class FactorizeLowRankPass(ir.passes.InPlacePass):
    """Replaces ``MatMul(x, W)`` by ``MatMul(MatMul(x, A), B)``, ``A @ B`` a rank-r fit of W.

    Without ``whitening`` the fit is the SVD of ``W`` (best for the weight); with it, the
    whitened SVD (best for the outputs on the calibration data). Under the ``auto`` spec the ranks
    come from ``chosen_ranks`` (None: stay dense), which the search (``lrcompile.search.auto``)
    fills.
    ``cache`` (keyed like the groups) lets repeated runs reuse each ``auto`` layer's factors.
    """

    rank: ranks.RankSpec
    overrides: tuple[override_files.Override, ...] = ()
    rank_multiple: int = 16
    decomposition: str = "auto"
    seed: int = 0
    allow_no_saving: bool = False
    whitening: Mapping[str, Whitening] = dataclasses.field(default_factory=dict, repr=False)
    chosen_ranks: Mapping[str, int | None] = dataclasses.field(default_factory=dict, repr=False)
    cache: FactorCache | None = dataclasses.field(default=None, compare=False, repr=False)
    spill: Spill | None = dataclasses.field(default=None, compare=False, repr=False)
    jobs: int = 1
    device: str = "cpu"
    only: frozenset[str] | None = dataclasses.field(default=None, repr=False)
    progress: ProgressCallback | None = dataclasses.field(default=None, compare=False, repr=False)
    # The report's weight error ||W - AB|| / ||W||: auto's probes skip it (for a 896 x 151936
    # lm_head at rank 800 it is ~100 GFLOP, and no probe reports it).
    weight_errors: bool = True

    def __post_init__(self) -> None:
        if self.rank.kind == "skip":
            raise ValueError("the default rank spec cannot be 'skip'")
        if self.rank_multiple < 1:
            raise ValueError(f"rank_multiple must be >= 1, got {self.rank_multiple}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if self.decomposition not in decompose.METHODS:
            raise ValueError(
                f"decomposition must be one of {decompose.METHODS}, got {self.decomposition!r}"
            )

    def call(self, model: ir.Model) -> FactorizeResult:
        groups, skipped = find_candidates(model.graph, model.functions.values())
        if self.only is not None:
            # A chunked compile: each chunk factors its groups; the final, empty-``only`` run
            # reports the nodes left alone.
            groups = [group for group in groups if group.key in self.only]
            skipped = [] if self.only else skipped
        layers: list[LayerReport] = []
        # Factoring (read, SVD, error, spill) runs in ``jobs`` threads -- NumPy and LAPACK release
        # the GIL -- and the graph is rewritten here, in group order: the output does not depend
        # on the number of jobs. ``map`` keeps at most the running jobs' weights in memory.
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            computed = pool.map(self.compute, groups)
            for index, (group, (report, factors)) in enumerate(zip(groups, computed, strict=True)):
                if self.progress is not None:
                    self.progress("factoring", index, len(groups), group.name)
                layers.append(self._apply(model.graph, group, report, factors))
        if self.progress is not None and groups:
            self.progress("factoring", len(groups), len(groups), "")
        layers = _count_kept_weights(groups, layers)
        layers.extend(_skipped_report(s) for s in skipped)
        modified = any(layer.status == "factored" for layer in layers)
        return FactorizeResult(model, modified, layers)

    def spec_for(self, group: WeightGroup) -> ranks.RankSpec:
        """The spec that applies to ``group``: its first matching override, else ``rank``."""
        names = [group.name, *(node.name or "" for node in group.nodes)]
        return override_files.resolve_spec(self.rank, self.overrides, names)

    def svd(self, group: WeightGroup, weight: np.ndarray) -> tuple[np.ndarray, ...]:
        """The full (whitened when calibrated) SVD of ``group``'s effective weight."""
        white = self.whitening.get(group.key)
        return whiten.whitened_svd(weight, white) if white else decompose.svd_exact(weight)

    def cached(self, group: WeightGroup, weight: np.ndarray | None = None) -> CachedFactors:
        """``group``'s factors at every rank (``cache`` needed), computed on first use: the
        whitened ones when the group has a whitening."""
        entry = self.cache.get(group.key)
        if entry is not None:
            return entry
        weight = effective_weight(group) if weight is None else weight
        k, n = weight.shape
        top = min(k, n) if self.allow_no_saving else max(1, min(k, n, (k * n - 1) // (k + n)))
        svd = self.svd(group, weight)
        white = self.whitening.get(group.key)
        if white is not None:
            factors = whiten.factorize_whitened(weight, top, white, svd=svd, overwrite=True)
        else:
            factors = decompose.factorize(weight, top, svd=svd, overwrite=True)
        spectrum = svd[1]
        del svd
        return self.cache.put(group.key, factors, spectrum)

    def cache_finite(self, group: WeightGroup) -> CachedFactors | None:
        """``cached(group)`` when its weight is finite, else None; a weight not yet cached is
        read once and unmapped (the cache serves the search; the rewrite maps it again)."""
        entry = self.cache.get(group.key)
        if entry is not None:
            return entry
        weight = effective_weight(group)
        entry = self.cached(group, weight) if np.all(np.isfinite(weight)) else None
        del weight
        release_weight(group)
        return entry

    def compute(self, group: WeightGroup) -> tuple[LayerReport, tuple | None]:
        """The group's report and its factors (None when it stays dense); no graph changes."""
        start = time.perf_counter()
        k, n = group.shape
        spec = self.spec_for(group)
        base = _base_report(group, spec)
        if spec.kind == "skip":
            return dataclasses.replace(base, status="dense", reason="override says skip"), None
        reason = self.refusal(group)
        if reason is not None:
            return dataclasses.replace(base, reason=reason), None
        weight = effective_weight(group)
        if not np.all(np.isfinite(weight)):
            return dataclasses.replace(base, reason="weight contains NaN or Inf"), None
        factors, rank = self._decompose(weight, spec, group)
        if factors is None:
            reason = "its error costs more than it saves (auto)"
            if rank == 0:
                rank, reason = None, f"{spec} of the layer is less than one rank multiple"
            elif rank is not None:
                reason = f"rank {rank} saves nothing (break-even {ranks.break_even_rank(k, n):.0f})"
            return dataclasses.replace(base, rank=rank, reason=reason), None
        dtype = group.tensor.dtype.numpy()
        left, right = factors.left.astype(dtype), factors.right.astype(dtype)
        error = decompose.relative_error(weight, left, right) if self.weight_errors else None
        del weight
        release_weight(group)
        if self.spill is not None:
            left = self.spill.store(left, f"{group.name}_lr_A")
            right = self.spill.store(right, f"{group.name}_lr_B")
        report = dataclasses.replace(
            base,
            status="factored",
            rank=factors.rank,
            method=factors.method,
            kept_energy=factors.kept_energy,
            relative_error=error,
            flops_after=factors.rank * (k + n) * len(group.nodes),
            seconds=time.perf_counter() - start,
        )
        return report, (left, right)

    def refusal(self, group: WeightGroup) -> str | None:
        """Why ``group`` stays dense whatever its rank, or None: its weight has other readers, so
        its factors would be added beside it (unless ``allow_no_saving``)."""
        if group.other_readers and not self.allow_no_saving:
            readers = ", ".join(group.other_readers)
            return (
                f"weight also read by {readers}: its factors would be added beside it and the"
                " model would grow (--allow-no-saving factors it anyway)"
            )
        return None

    def _apply(
        self, graph: ir.Graph, group: WeightGroup, report: LayerReport, factors: tuple | None
    ) -> LayerReport:
        """Rewrites the group's nodes with its factors and completes its report."""
        if factors is None:
            return report
        k, n = group.shape
        factor_names = rewrite_group(graph, group, *factors)
        params = report.rank * (k + n)
        return dataclasses.replace(
            report,
            params_after=params,
            bytes_after=int(params * group.tensor.dtype.itemsize),
            factors=factor_names,
        )

    def _decompose(
        self, weight: np.ndarray, spec: ranks.RankSpec, group: WeightGroup
    ) -> tuple[decompose.Factorization | None, int | None]:
        """The rank for ``group`` and its factors (None when it stays dense)."""
        k, n = weight.shape
        white = self.whitening.get(group.key)
        svd = None
        if spec.kind == "auto":
            rank = self.chosen_ranks.get(group.key)
            if rank is None:
                return None, None
            if self.cache is not None:
                if rank == 0 or not (self.allow_no_saving or ranks.saves(rank, k, n)):
                    return None, rank
                return self.cached(group, weight).at_rank(rank), rank
        else:
            # Whitened or energy specs need the whole spectrum: one SVD serves rank and factors.
            if white is not None or spec.needs_spectrum:
                svd = self.svd(group, weight)
            spectrum = svd[1] if svd is not None else None
            rank = ranks.choose_rank(spec, k, n, multiple=self.rank_multiple, spectrum=spectrum)
        if rank == 0 or not (self.allow_no_saving or ranks.saves(rank, k, n)):
            return None, rank
        if white is not None:
            svd = svd if svd is not None else self.svd(group, weight)
            return whiten.factorize_whitened(weight, rank, white, svd=svd), rank
        method = self.decomposition
        if method == "auto":
            method = "exact" if svd is not None else decompose.choose_method((k, n), rank)
        # A per-weight seed keeps each layer's randomized SVD independent of the order of layers.
        seed = zlib.crc32(group.key.encode()) ^ self.seed
        factors = decompose.factorize(
            weight, rank, method=method, seed=seed, svd=svd, device=self.device
        )
        logger.debug("%s: rank %d of %dx%d by %s SVD", group.name, rank, k, n, factors.method)
        return factors, rank


def effective_weight(group: WeightGroup) -> np.ndarray:
    """``[K, N]`` with ``y = x @ W``: transposed under Gemm's transB, scaled by its alpha."""
    weight = group.tensor.numpy()
    if group.transposed:
        weight = weight.T
    if group.alpha != 1.0:
        weight = weight.astype(decompose.compute_dtype(weight.dtype)) * group.alpha
    return weight


def release_weight(group: WeightGroup) -> None:
    """Unmaps ``group``'s weight, once read, when it lies in external data: its pages would stay
    resident for as long as the model lives (for a 0.5B LM, 2.4 GB through a whole search).
    No view of it may be alive (the map refuses to close under one)."""
    if isinstance(group.tensor, ir.ExternalTensor):
        group.tensor.release()


def _count_kept_weights(groups: list[WeightGroup], layers: list[LayerReport]) -> list[LayerReport]:
    """Each factored layer whose weight something still reads (a tied embedding's Gather, a
    group left dense) with that weight counted in its params and bytes, once per weight."""
    counted: set[int] = set()
    result = []
    for group, layer in zip(groups, layers, strict=True):
        factored = layer.status == "factored" and id(group.weight) not in counted
        if factored and has_live_readers(group.weight):
            counted.add(id(group.weight))
            k, n = group.shape
            layer = dataclasses.replace(
                layer,
                params_after=layer.params_after + k * n,
                bytes_after=layer.bytes_after + int(k * n * group.tensor.dtype.itemsize),
                reason="weight also read by other nodes; kept beside its factors",
            )
        result.append(layer)
    return result


def _base_report(group: WeightGroup, spec: ranks.RankSpec) -> LayerReport:
    k, n = group.shape
    return LayerReport(
        nodes=tuple(node.name or "" for node in group.nodes),
        op=group.nodes[0].op_type,
        weight=group.weight.name,
        status="dense",
        shape=(k, n),
        spec=str(spec),
        params_before=k * n,
        params_after=k * n,
        flops_before=k * n * len(group.nodes),
        flops_after=k * n * len(group.nodes),
        bytes_before=int(k * n * group.tensor.dtype.itemsize),
        bytes_after=int(k * n * group.tensor.dtype.itemsize),
    )


def _skipped_report(skipped: Skipped) -> LayerReport:
    node = skipped.node
    weight = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return LayerReport(
        nodes=(node.name or "",),
        op=node.op_type,
        weight=weight,
        status="skipped",
        reason=skipped.reason,
    )
