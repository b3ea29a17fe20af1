"""Error statistics of a candidate's outputs against reference outputs, accumulated over batches.

Per output, over all data: the relative L2 error ``||y - y_ref|| / ||y_ref||`` (every gate in
lrcompile), the cosine similarity of the flattened outputs, and the max absolute error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lrcompile.runtime.sessions import create_session, runtime_errors


@dataclasses.dataclass(frozen=True)
class OutputMetrics:
    """How far one candidate output is from the reference over all data."""

    name: str
    relative_l2: float  # inf when the candidate's output is not finite
    cosine: float
    max_abs_error: float
    passed: bool

    @property
    def finite(self) -> bool:
        return math.isfinite(self.relative_l2)

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite candidate output gives nulls and ``"non_finite": true``."""
        data = dataclasses.asdict(self)
        if not self.finite:
            data.update(relative_l2=None, cosine=None, max_abs_error=None)
        return data | {"non_finite": not self.finite}


@dataclasses.dataclass
class ErrorAccumulator:
    """Running sums for the relative L2 error, cosine and max abs error of one output."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    ref_finite: bool = True
    cand_finite: bool = True

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        cand = np.asarray(candidate, dtype=np.float64).ravel()
        self.ref_finite = self.ref_finite and bool(np.all(np.isfinite(ref)))
        self.cand_finite = self.cand_finite and bool(np.all(np.isfinite(cand)))
        if self.ref_finite:
            self.ref_sq += float(ref @ ref)  # judged on its own: is the reference usable
        if not (self.ref_finite and self.cand_finite):
            return
        diff = cand - ref
        self.diff_sq += float(diff @ diff)
        self.cand_sq += float(cand @ cand)
        self.dot += float(ref @ cand)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def reference_problem(self) -> str | None:
        """Why the reference cannot support a verdict (None when it can)."""
        if not self.ref_finite:
            return "not finite (NaN or Inf)"
        if self.ref_sq == 0:
            return "identically zero"
        return None

    def metrics(self, name: str, tolerance: float) -> OutputMetrics:
        if not self.cand_finite:
            return OutputMetrics(name, math.inf, math.nan, math.inf, False)
        if self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq / self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else math.inf
        norms = math.sqrt(self.ref_sq * self.cand_sq)
        cosine = self.dot / norms if norms > 0 else float(self.diff_sq == 0)
        passed = math.isfinite(rel) and rel <= tolerance
        return OutputMetrics(name, rel, cosine, self.max_abs, passed)


def measure_error(
    model: ir.Model,
    model_folder: str | Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
) -> float:
    """Largest relative L2 error of any output of ``model`` (external data in ``model_folder``)
    on ``feeds`` against the ``reference`` outputs, one per feed."""
    session = create_session(ir.serde.serialize_model(model), data_folder=model_folder)
    names = list(reference[0])
    sums = {name: ErrorAccumulator() for name in names}
    with runtime_errors("a candidate model"):
        for feed, expected in zip(feeds, reference, strict=True):
            for name, value in zip(names, session.run(names, feed), strict=True):
                sums[name].add(expected[name], value)
    return max(sums[name].metrics(name, 0.0).relative_l2 for name in names)
