"""Each layer's factors at every rank, on disk: what the provider slices a planned rank from.

``auto`` compiles many candidates from the same decompositions, and a rank chosen from a
spectrum (``energy:``, ``auto``) needs the decomposition before the rank. For each layer the cache
holds,
once, its factors at the largest rank that saves (``left [K, m]``, ``right [m, N]``, balanced per
component) and its whole spectrum. The factors at rank ``r`` are their first ``r`` columns and
rows: truncating a (whitened) SVD keeps the leading components, and balancing scales each
component on its own. The arrays wait in ``.npy`` files of a temporary folder, memory-mapped, so
that a probe reads the slices it needs and memory holds about one layer at a time, not a second
copy of the model.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from lrcompile.io.spill import OutputStore
from lrcompile.numerics.decompose import Factorization


@dataclasses.dataclass(frozen=True)
class CachedFactors:
    """One layer's factors at its largest rank (memory-mapped) and its full spectrum."""

    left: np.ndarray
    right: np.ndarray
    spectrum: np.ndarray  # float64, every singular value
    method: str

    def at_rank(self, rank: int) -> Factorization:
        """The factorization at ``rank`` (at most the cached width)."""
        if not 1 <= rank <= self.left.shape[1]:
            raise ValueError(f"rank {rank} is outside [1, {self.left.shape[1]}] of the cache")
        total = float(np.sum(np.square(self.spectrum)))
        return Factorization(
            np.ascontiguousarray(self.left[:, :rank]),
            np.ascontiguousarray(self.right[:rank]),
            self.spectrum[:rank].astype(self.left.dtype),
            total,
            self.method,
        )


class FactorCache:
    """Cached factors by group key, in a private temporary folder removed with the cache."""

    def __init__(self) -> None:
        self._store = OutputStore(prefix="lrcompile-factors-", mmap=True)
        self._index: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()  # the provider factors layers in threads

    def close(self) -> None:
        """Removes the files now (else when the cache is collected, or at exit)."""
        self._store.close()

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> CachedFactors | None:
        if key not in self._index:
            return None
        index, method = self._index[key]
        arrays = self._store[index]
        return CachedFactors(arrays["left"], arrays["right"], arrays["spectrum"], method)

    def put(
        self,
        key: str,
        factors: Factorization,
        spectrum: np.ndarray,
        extra: dict[str, np.ndarray] | None = None,
    ) -> CachedFactors:
        """Stores ``factors`` (at the largest rank any candidate may use), the spectrum, and
        ``extra`` arrays that go with them (a quantized weight's integers and scales)."""
        arrays = {
            "left": factors.left,
            "right": factors.right,
            "spectrum": np.asarray(spectrum, dtype=np.float64),
            **(extra or {}),
        }
        with self._lock:
            self._index[key] = (self._store.append(arrays), factors.method)
        return self.get(key)

    def extra(self, key: str) -> dict[str, np.ndarray]:
        """The ``extra`` arrays stored with ``key``'s factors (memory-mapped)."""
        index, _ = self._index[key]
        arrays = self._store[index]
        return {k: v for k, v in arrays.items() if k not in ("left", "right", "spectrum")}
