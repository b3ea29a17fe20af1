"""Side-by-side timing: interleaved runs, median per variant (benchmarks, the latency table)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def interleaved_medians(
    runs: Sequence[Callable[[], object]], *, budget_s: float = 1.0, min_runs: int = 5
) -> list[float]:
    """Median seconds of each callable, called in turn until ``budget_s`` has passed.

    Interleaving makes machine noise (another process, frequency changes) hit every variant
    alike, so their ratio is trustworthy even when the absolute times drift.
    """
    for run in runs:
        run()  # warm up
    samples: list[list[float]] = [[] for _ in runs]
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(samples[0]) < min_runs:
        for run, times in zip(runs, samples, strict=True):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return [statistics.median(times) for times in samples]
