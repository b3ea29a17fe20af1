"""The factor provider: the factors a plan asks for, computed outside the passes.

    weight (+ its whitening) -> (whitened) SVD, at most once
      -> cached: the factors at the largest saving rank, and the spectrum (``FactorCache``)
    Factor(rank, fit) -> left [K, r], right [r, N] in the weight's dtype, as named tensors,
      in memory or spilled to a scratch file (``Spill``)

A layer is cached when its rank is read off its spectrum (``auto``, ``energy:``) or its fit is
whitened (its whitening exists only while its calibration chunk is in memory); the factors at the
planned rank are then the cached ones' leading components, the same bytes as factoring at that
rank (truncation keeps the leading components; balancing and signs are per component). Other
layers are factored at their planned rank directly: exact, randomized (seeded per weight) or on
the GPU. A layer given its own whitening (error compensation) is factored afresh with it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lrcompile.factors import quantized as quantized_lib
from lrcompile.factors.cache import CachedFactors, FactorCache
from lrcompile.factors.quantized import QuantizedFit
from lrcompile.io.spill import Spill
from lrcompile.numerics import decompose, whiten
from lrcompile.numerics.whiten import Whitening
from lrcompile.passes.candidates import WeightGroup, effective_weight, release_weight
from lrcompile.plan import Factor, Plan, Quantize

logger = logging.getLogger(__name__)

# progress(stage, done, total, detail), e.g. ("factoring", 3, 36, "fc1_weight")
ProgressCallback = Callable[[str, int, int, str], None]


@dataclasses.dataclass(frozen=True)
class Fitted:
    """One weight's factors, named as the rewrite will store them, and what the report says."""

    left: ir.TensorProtocol
    right: ir.TensorProtocol
    method: str
    kept_energy: float
    relative_error: float | None
    seconds: float

    @property
    def pair(self) -> tuple[ir.TensorProtocol, ir.TensorProtocol]:
        return self.left, self.right


class FactorProvider:
    """Computes factors: the numerics, the cache of (whitened) SVDs, and where and how factors are
    made (``jobs`` threads, SVDs on ``device``)."""

    def __init__(
        self,
        *,
        decomposition: str = "auto",
        seed: int = 0,
        jobs: int = 1,
        device: str = "cpu",
        allow_no_saving: bool = False,
    ) -> None:
        if decomposition not in decompose.METHODS:
            raise ValueError(f"decomposition must be one of {decompose.METHODS}")
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.decomposition, self.seed, self.jobs, self.device = decomposition, seed, jobs, device
        self.allow_no_saving = allow_no_saving
        self._cache: FactorCache | None = None

    def close(self) -> None:
        """Removes the cache's files now (else when collected, or at exit)."""
        if self._cache is not None:
            self._cache.close()

    def cached(self, key: str) -> CachedFactors | None:
        """The cached factors of the group ``key``, if any."""
        return self._cache.get(key) if self._cache is not None else None

    def cache(self, group: WeightGroup, whitening: Whitening | None = None) -> CachedFactors | None:
        """``group``'s factors at its largest saving rank and its spectrum (of the whitened SVD with
        ``whitening``), computed on first use; None when its weight holds NaN or Inf. The weight
        is read once and unmapped."""
        entry = self.cached(group.key)
        if entry is not None:
            return entry
        weight = _finite_weight(group)
        if weight is None:
            return None
        k, n = weight.shape
        top = min(k, n) if self.allow_no_saving else max(1, min(k, n, (k * n - 1) // (k + n)))
        factors, spectrum = whiten.factorize_top(weight, top, whitening)
        del weight
        release_weight(group)
        if self._cache is None:
            self._cache = FactorCache()
        return self._cache.put(group.key, factors, spectrum)

    def cache_quantized(
        self,
        group: WeightGroup,
        template: Quantize,
        whitening: Whitening | None = None,
        top: int = quantized_lib.CORRECTION_CACHE_RANK,
    ) -> CachedFactors | None:
        """``group``'s weight quantized as ``template`` says, and its residual's (whitened) factors
        up to rank ``top`` and spectrum (``factors.quantized``; none at ``top`` 0), computed on
        first use; None when the weight holds NaN or Inf."""
        key = quantized_lib.cache_key(group.key, template)
        entry = self.cached(key)
        if entry is not None:
            return entry
        weight = _finite_weight(group)
        if weight is None:
            return None
        read = (group.cast or group.tensor.dtype).numpy()
        quantized, residual = quantized_lib.quantized_with_residual(weight, template, read)
        energy = whiten.whitened_energy(weight, whitening)
        plain = whiten.whitened_energy(weight, None) if whitening is not None else energy
        del weight
        release_weight(group)
        k, n = residual.shape
        residual_energy = whiten.whitened_energy(residual, whitening)
        factors, spectrum = quantized_lib.residual_factors(residual, min(k, n, top), whitening)
        extra = {
            "q": quantized.q,
            "scale": quantized.scale,
            # Output-space energies (whitened): the weight's and its quantization error's; and
            # the weight's plain ``||W||^2`` (what white noise on its input reaches).
            "energies": np.array([energy, residual_energy, plain], np.float64),
        }
        if quantized.zero is not None:
            extra["zero"] = quantized.zero
        if self._cache is None:
            self._cache = FactorCache()
        return self._cache.put(key, factors, spectrum, extra)

    def quantized_energies(self, key: str, template: Quantize) -> tuple[float, float] | None:
        """The output-space energies of the group ``key``'s weight and of its quantization error
        under ``template`` (whitened when cached with a whitening), if cached."""
        cache_key = quantized_lib.cache_key(key, template)
        if self.cached(cache_key) is None:
            return None
        weight, residual, _ = np.asarray(self._cache.extra(cache_key)["energies"], np.float64)
        return float(weight), float(residual)

    def plain_energy(self, key: str, template: Quantize) -> float:
        """``||W||^2`` of the group ``key``'s weight (cached with its quantized form)."""
        return float(self._cache.extra(quantized_lib.cache_key(key, template))["energies"][2])

    def finite(self, group: WeightGroup) -> bool:
        """Whether ``group``'s weight holds no NaN or Inf (read once and unmapped)."""
        if self.cached(group.key) is not None:
            return True
        weight = _finite_weight(group)
        finite = weight is not None
        del weight  # no view of the mapped file may outlive it
        release_weight(group)
        return finite

    def fit(
        self,
        groups: Sequence[WeightGroup],
        plan: Plan,
        names: Mapping[str, tuple[str, str]],
        *,
        whitenings: Mapping[str, Whitening] | None = None,
        spill: Spill | None = None,
        weight_errors: bool = True,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Fitted]:
        """The factors of every group ``plan`` factors, by group key, in ``jobs`` threads (NumPy and
        LAPACK release the GIL; the result does not depend on ``jobs``).

        Args:
            groups: The model's candidate groups.
            plan: The decisions; groups it does not factor are left out.
            names: The factors' initializer names by group key (``factored_graph.factor_names``).
            whitenings: A group's own whitening, fitted afresh instead of from the cache.
            spill: Write each layer's factors to this scratch file as they are made (memory then
                holds a few layers, not the model's factors).
            weight_errors: Compute the report's ``||W - AB|| / ||W||`` (``auto``'s probes skip it:
                for a 896 x 151936 lm_head at rank 800 it is ~100 GFLOP).
            progress: Called as ``progress("factoring", done, total, layer)``.
        """
        factored = plan.factored
        todo = [group for group in groups if group.key in factored]
        whitenings = whitenings or {}

        def one(group: WeightGroup) -> Fitted:
            key = group.key
            return self._fit(group, factored[key], whitenings.get(key), names[key], spill,
                             weight_errors)  # fmt: skip

        results: dict[str, Fitted] = {}
        # ``map`` keeps at most the running jobs' weights in memory.
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for index, (group, fitted) in enumerate(zip(todo, pool.map(one, todo), strict=True)):
                if progress is not None:
                    progress("factoring", index, len(todo), group.name)
                results[group.key] = fitted
        if progress is not None and todo:
            progress("factoring", len(todo), len(todo), "")
        return results

    def fit_quantized(
        self,
        groups: Sequence[WeightGroup],
        plan: Plan,
        names: Mapping[str, tuple[str, ...]],
        *,
        spill: Spill | None = None,
        weight_errors: bool = True,
    ) -> dict[str, QuantizedFit]:
        """The stored form of every group ``plan`` quantizes, by group key, from the cache
        (``cache_quantized`` first); ``names`` are (integers, scale, zero, A, B) per group."""
        decisions = plan.quantized
        todo = [group for group in groups if group.key in decisions]

        def one(group: WeightGroup) -> QuantizedFit:
            return self._fit_quantized(group, decisions[group.key], names[group.key], spill,
                                       weight_errors)  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return {g.key: fit for g, fit in zip(todo, pool.map(one, todo), strict=True)}

    def _fit_quantized(self, group, decision: Quantize, names, spill, weight_errors):
        start = time.perf_counter()
        template = dataclasses.replace(decision, correction=0, fit="svd", dynamic=False)
        key = quantized_lib.cache_key(group.key, template)
        entry, arrays = self.cached(key), self._cache.extra(key) if self._cache else {}
        if entry is None:
            raise ValueError(f"{group.key}: no cached quantized form (cache_quantized first)")
        read = (group.cast or group.tensor.dtype).numpy()
        stored = quantized_lib.QuantizedWeight(
            np.asarray(arrays["q"]), np.asarray(arrays["scale"]), arrays.get("zero"),
            decision.bits, decision.group or group.shape[0],
        )  # fmt: skip
        q, scale, zero = quantized_lib.stored_arrays(stored, decision.group is None, read)
        parts = [q, scale, zero]
        if decision.correction:
            correction = entry.at_rank(decision.correction)
            dtype = quantized_lib.CORRECTION_DTYPE
            parts += [correction.left.astype(dtype), correction.right.astype(dtype)]
        error = self._quantized_error(group, stored, parts[3:]) if weight_errors else None
        tensors = [
            None if array is None else self._tensor(array, name, spill)
            for array, name in zip([*parts, None, None][:5], names, strict=True)
        ]
        nbytes = quantized_lib.stored_bytes(group, decision)
        return QuantizedFit(*tensors, nbytes, error, time.perf_counter() - start)

    @staticmethod
    def _tensor(array: np.ndarray, name: str, spill: Spill | None) -> ir.TensorProtocol:
        return spill.store(array, name) if spill is not None else ir.tensor(array, name=name)

    @staticmethod
    def _quantized_error(group: WeightGroup, stored, correction) -> float:
        """``||W - DQ(Q(W)) - A B|| / ||W||``, the residual read as stored."""
        weight = np.asarray(effective_weight(group), dtype=np.float32)
        residual = weight - stored.dequantize()
        norm = float(np.linalg.norm(weight))
        del weight
        release_weight(group)
        if not norm:
            return 0.0
        if not correction:
            return float(np.linalg.norm(residual)) / norm
        left, right = (np.asarray(part, dtype=np.float32) for part in correction)
        return (
            decompose.relative_error(residual, left, right) * float(np.linalg.norm(residual)) / norm
        )

    def _fit(self, group, decision: Factor, whitening, names, spill, weight_errors) -> Fitted:
        start = time.perf_counter()
        weight = effective_weight(group)
        factors = self._factorize(group, weight, decision, whitening)
        dtype = group.tensor.dtype.numpy()
        left = factors.left.astype(dtype, copy=False)  # no second copy of a cached slice
        right = factors.right.astype(dtype, copy=False)
        error = decompose.relative_error(weight, left, right) if weight_errors else None
        del weight
        release_weight(group)
        tensors = [
            spill.store(array, name) if spill is not None else ir.tensor(array, name=name)
            for array, name in zip((left, right), names, strict=True)
        ]
        seconds = time.perf_counter() - start
        return Fitted(*tensors, factors.method, factors.kept_energy, error, seconds)

    def _factorize(
        self, group: WeightGroup, weight: np.ndarray, decision: Factor, whitening: Whitening | None
    ) -> decompose.Factorization:
        """The factorization ``decision`` asks for (see the module docstring for the sources)."""
        rank, cached = decision.rank, self.cached(group.key)
        if whitening is not None:
            return whiten.factorize_whitened(weight, rank, whitening)
        plain = decision.fit == "svd"
        if cached is not None and not (plain and self.decomposition == "randomized"):
            if (cached.method == "whitened") == plain:
                raise ValueError(f"{group.key}: a {decision.fit} fit from a {cached.method} cache")
            return cached.at_rank(rank)
        if not plain:
            raise ValueError(f"{group.key}: a whitened fit needs a whitening or a cached one")
        k, n = weight.shape
        method = self.decomposition
        if method == "auto":
            method = decompose.choose_method((k, n), rank)
        # A per-weight seed keeps each layer's randomized SVD independent of the order of layers.
        seed = zlib.crc32(group.key.encode()) ^ self.seed
        # The GPU serves a plain SVD only where no spectrum was computed on the CPU first.
        device = self.device if cached is None else "cpu"
        factors = decompose.factorize(weight, rank, method=method, seed=seed, device=device)
        logger.debug("%s: rank %d of %dx%d by %s SVD", group.name, rank, k, n, factors.method)
        return factors


def _finite_weight(group: WeightGroup) -> np.ndarray | None:
    """``group``'s effective weight, or None (and the weight unmapped) when it holds NaN or Inf."""
    weight = effective_weight(group)
    if np.all(np.isfinite(weight)):
        return weight
    del weight
    release_weight(group)
    return None
