"""The search along allocation paths: each candidate compiled like the output and measured end
to end on the batches held back from the statistics (``lrcompile.search.auto`` builds the paths).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lrcompile.calibration.ranges import RangeCalibration
from lrcompile.io.spill import Spill
from lrcompile.numerics.allocate import Allocation, most_accurate_within
from lrcompile.pipeline import build_pipeline
from lrcompile.runtime.metrics import measure_error

logger = logging.getLogger(__name__)

# The bisection stops when the cheapest allocation measured within the tolerance and the most
# expensive one measured over it differ by at most this fraction of the dense cost: the last
# halvings of a 4,000-point path (a 0.5B LM) would each cost a full run over the calibration data
# to gain less than this.
RESOLUTION = 0.005


@dataclasses.dataclass(frozen=True)
class SearchStep:
    """One probe of the bisection: a point on the path and its measured output error."""

    index: int
    cost_ratio: float
    predicted_error: float  # the allocation's predicted relative L2 (sqrt of its squared error)
    measured_error: float
    passed: bool
    pricing: str = "fitted"  # the path's (``numerics.allocate.PRICINGS``)


def search(
    paths: Mapping[str, Sequence[Allocation]], probe: Prober, budget: float | None
) -> tuple[str, int]:
    """``(pricing, index)`` of the allocation to write, every candidate measured by ``probe``.

    Within a ``budget``: each path's most accurate allocation costing at most it, the one of
    least measured error. Else the cheapest allocation within the tolerance: the first path
    bisected; each further one probed at the cost found so far and, when within it there,
    bisected towards cheaper (ties: the lesser measured error).
    """
    if budget is not None:
        chosen = [(pricing, most_accurate_within(path, budget)) for pricing, path in paths.items()]
        for pricing, index in chosen:
            probe(pricing, index)
        return min(chosen, key=lambda choice: _finite(probe.error(*choice)))
    found = []
    for pricing, path in paths.items():
        costs = [allocation.cost_ratio for allocation in path]
        start = most_accurate_within(path, found[0][0]) if found else 0
        if start and not probe(pricing, start):
            continue  # over the tolerance at the cost already found: nothing cheaper here
        index = start + bisect(costs[start:], lambda i, p=pricing, s=start: probe(p, s + i))
        found.append((costs[index], _finite(probe.error(pricing, index)), pricing, index))
        found.sort()
    return found[0][2], found[0][3]


def _finite(error: float) -> float:
    return error if math.isfinite(error) else math.inf


class Prober:
    """Compiles the allocation at an index of a pricing's path like the output, measures it,
    records the step."""

    def __init__(self, model, factorize, calibration, config, paths, on_step) -> None:
        self.model, self.factorize = model, factorize
        self.calibration, self.config, self.paths, self.on_step = (
            calibration,
            config,
            paths,
            on_step,
        )
        self.tolerance = config.tolerance * (1.0 - config.headroom)
        # FP8 ranges from the fitted batches only, as in the output (``stages.rewrite``).
        self.ranges = RangeCalibration(calibration.fitted_feeds(), config.fp8_calib)
        path = next(iter(paths.values()))
        span = path[0].cost_ratio - path[-1].cost_ratio if path else 0.0
        per_path = int(np.ceil(np.log2(max(min(len(path), span / RESOLUTION), 2)))) + 1
        self.expected = len(paths) * (1 if config.budget is not None else per_path)
        self.steps: list[SearchStep] = []
        self.measured: dict[tuple, float] = {}  # by ``_ranks``

    def error(self, pricing: str, index: int) -> float:
        """The measured error at ``index`` of ``pricing``'s path (0 for all-dense, unmeasured)."""
        return self.measured.get(_ranks(self.paths[pricing][index]), 0.0)

    def __call__(self, pricing: str, index: int) -> bool:
        """Whether the allocation is within the tolerance; measured once per distinct ranks
        (pricings' paths share allocations)."""
        allocation = self.paths[pricing][index]
        if _ranks(allocation) in self.measured:
            return self.measured[_ranks(allocation)] <= self.tolerance
        if self.on_step is not None:
            self.on_step(len(self.steps), self.expected, f"cost x{allocation.cost_ratio:.3f}")
        predicted = math.sqrt(allocation.predicted_error)  # relative L2, as measured (rel-l2)
        calibration = self.calibration
        # The probe's factors wait on disk, and its unchanged weights stay where they are (the
        # clone shares them): the session holds about one copy of the model.
        with tempfile.TemporaryDirectory(prefix="lrcompile-probe-") as folder:
            candidate = self.model.clone()
            probe = dataclasses.replace(
                self.factorize,
                chosen_ranks=allocation.ranks,
                progress=None,
                spill=Spill(folder),
                weight_errors=False,
            )
            build_pipeline(probe, self.config).run(candidate, ranges=self.ranges)
            feeds, reference = calibration.measured()  # batches the factors were not fitted to
            config = self.config
            error = measure_error(candidate, feeds, reference, config.metric, labels=config.labels)
            del candidate
        passed = error <= self.tolerance
        step = SearchStep(index, allocation.cost_ratio, predicted, error, passed, pricing)
        self.steps.append(step)
        self.measured[_ranks(allocation)] = error
        logger.info(
            "auto probe %s %d/%d: cost x%.3f, predicted %.3g, measured %.4f (%s)",
            pricing,
            index,
            len(self.paths[pricing]) - 1,
            allocation.cost_ratio,
            predicted,
            error,
            "within" if passed else "over",
        )
        return passed

    def done(self) -> None:
        if self.on_step is not None:
            self.on_step(self.expected, self.expected, "done")


def bisect(costs: Sequence[float], passes: Callable[[int], bool]) -> int:
    """The largest index in [0, len(costs)) with ``passes(index)``, index 0 assumed to pass,
    to within ``RESOLUTION`` of the cost: it stops once the passing and failing ends of the
    bracket differ by at most that (``costs`` falls along the path)."""
    low, high = 0, len(costs) - 1
    if high == 0 or passes(high):
        return high
    while high - low > 1 and costs[low] - costs[high] > RESOLUTION:
        middle = (low + high) // 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


def _ranks(allocation: Allocation) -> tuple:
    return tuple(sorted(allocation.ranks.items()))
