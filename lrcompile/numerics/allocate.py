"""Global rank allocation across layers: which layer gives up how much rank, plain numerics.

Each layer has options: dense, or a rank r (a multiple of the rank multiple) that saves cost.
An option costs ``r*(K+N)`` (x the nodes sharing the weight, for FLOPs; x the element size for
bytes), or under the ``latency``
objective its measured seconds (x the nodes; a rank is an option only when measured faster than
dense, ``lrcompile.runtime.latency``), and adds
``sensitivity * e(r)``, where ``e(r) = sum_{i>r} s_i^2 / sum_i s_i^2`` is the layer's relative
squared error from its (whitened) spectrum and ``sensitivity`` converts it into squared relative
error of the MODEL's outputs (measured by ``lrcompile.search.auto``; 1 when unknown). Relative, not
absolute, energies: layers' output scales differ, so raw energies are not comparable (DESIGN.md
measured the absolute score far worse than a uniform ratio); and layers differ in how much of
their error reaches the outputs (on MiniLM's embeddings by ~300x, attention projections least).

For a price ``lam`` every layer independently takes the option minimizing
``cost / total_dense_cost + lam * e``. Sweeping ``lam`` from infinity to 0 moves each layer along
the lower convex hull of its (error, cost) options; ``allocation_path`` lists every allocation
on that sweep, from all-dense to the cheapest, so a search can bisect over it: the greedy "spend
error where it saves the most cost" across all layers.

A quantized layer (``QuantizedLayer``) has its options listed: dense, or a stored form (integers
with a correction of some rank, or a higher precision), each with its bytes (or, under the
``latency`` objective, its measured seconds x the nodes; a form slower than dense is never on the
hull) and its relative squared error in output space; the sweep is the same.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

Objective = Literal["flops", "params", "bytes", "latency"]
OBJECTIVES: tuple[str, ...] = ("flops", "params", "bytes", "latency")
# A layer's measured seconds per run: dense (None), factored at a rank, or (quantized) a
# ``Choice.label``.
Seconds = Callable[[int | str | None], float]


@dataclasses.dataclass(frozen=True)
class LayerSpectrum:
    """What the allocation needs of one weight: its shape, readers and squared singular values."""

    name: str
    k: int
    n: int
    energies: np.ndarray
    nodes: int = 1
    sensitivity: float = 1.0
    rows: int = 1  # rows of activation each node multiplies per calibration batch
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Choice:
    """A stored form of a quantized layer: its label (the correction's rank, 0 for none, or
    ``"int8"``), bytes, and relative squared error in output space (before sensitivity)."""

    label: int | str
    nbytes: int
    error: float


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
    """What the allocation needs of one weight that may be quantized: its dense bytes and the
    stored forms it may take instead."""

    name: str
    k: int
    n: int
    dense_bytes: int
    choices: tuple[Choice, ...]
    nodes: int = 1
    sensitivity: float = 1.0
    rows: int = 1  # rows of activation each node multiplies per calibration batch
    dtype: str = "float32"


Layer = LayerSpectrum | QuantizedLayer


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One point of the sweep: a choice per layer (None = dense; a rank; ``"int8"``), its cost
    and predicted error."""

    ranks: dict[str, int | str | None]
    cost: float
    dense_cost: float
    predicted_error: float
    # Each layer's part of ``predicted_error`` (squared relative output error, x sensitivity).
    errors: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def cost_ratio(self) -> float:
        return self.cost / self.dense_cost if self.dense_cost else 1.0


@dataclasses.dataclass(frozen=True)
class _Options:
    ranks: list[int | str | None]
    costs: np.ndarray
    errors: np.ndarray


def layer_options(
    layer: LayerSpectrum, multiple: int, objective: Objective, seconds: Seconds | None = None
) -> _Options:
    """Dense plus every rank multiple of ``multiple`` that saves cost, with costs and errors;
    ``seconds`` (the layer's measured latency) is the cost under the ``latency`` objective."""
    weight = 1 if objective in ("params", "bytes") else layer.nodes
    if objective == "bytes":
        weight = np.dtype(layer.dtype).itemsize
    full = min(layer.k, layer.n)
    ranks = [
        r
        for r in range(multiple, full + 1, multiple)
        if r * (layer.k + layer.n) < layer.k * layer.n
    ]
    if objective == "latency":
        if seconds is None:
            raise ValueError(f"{layer.name}: the latency objective needs measured seconds")
        dense, timed = seconds(None), {r: seconds(r) for r in ranks}
        ranks = [r for r in ranks if timed[r] < dense]  # only where it is faster
        unit = [dense, *(timed[r] for r in ranks)]
    else:
        unit = [layer.k * layer.n, *(r * (layer.k + layer.n) for r in ranks)]
    energies = np.asarray(layer.energies, dtype=np.float64)
    total = float(energies.sum())
    tail = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r}
    scale = layer.sensitivity / total if total else 0.0
    errors = [0.0] + [float(tail[min(r, len(energies))]) * scale for r in ranks]
    costs = [cost * weight for cost in unit]
    return _Options([None, *ranks], np.asarray(costs, float), np.asarray(errors, float))


def quantized_options(
    layer: QuantizedLayer, objective: Objective = "bytes", seconds: Seconds | None = None
) -> _Options:
    """Dense, then each stored form that is smaller, with its cost (bytes, or measured
    ``seconds`` x nodes under ``latency``) and error x sensitivity."""
    choices = [c for c in layer.choices if c.nbytes < layer.dense_bytes]
    labels = [None, *(c.label for c in choices)]
    if objective == "latency":
        if seconds is None:
            raise ValueError(f"{layer.name}: the latency objective needs measured seconds")
        costs = [seconds(label) * layer.nodes for label in labels]
    else:
        costs = [layer.dense_bytes, *(c.nbytes for c in choices)]
    return _Options(
        labels,
        np.asarray(costs, float),
        np.asarray([0.0, *(c.error * layer.sensitivity for c in choices)], float),
    )


def allocation_path(
    layers: Sequence[Layer],
    *,
    multiple: int = 16,
    objective: Objective = "flops",
    seconds: Mapping[str, Seconds] | None = None,
) -> list[Allocation]:
    """Every allocation of the price sweep, from all-dense (index 0) to the cheapest (last);
    ``seconds`` (by layer name) are the measured latencies the ``latency`` objective needs.

    Consecutive allocations differ in one layer's rank; cost never rises and the predicted error
    never falls along the path.
    """
    seconds = seconds or {}
    options = [
        quantized_options(layer, objective, seconds.get(layer.name))
        if isinstance(layer, QuantizedLayer)
        else layer_options(layer, multiple, objective, seconds.get(layer.name))
        for layer in layers
    ]
    dense_cost = float(sum(o.costs[0] for o in options))
    events = []
    for index, option in enumerate(options):
        hull = _lower_hull(option)
        for before, after in itertools.pairwise(hull):
            saved = option.costs[before] - option.costs[after]
            added = option.errors[after] - option.errors[before]
            # The price at which this step stops paying: error per unit of (relative) cost.
            price = added / (saved / dense_cost) if saved > 0 else np.inf
            events.append((price, index, after))
    events.sort(key=lambda event: (event[0], event[1], event[2]))
    choice = [0] * len(layers)
    path = [_allocation(layers, options, choice, dense_cost)]
    for _, index, after in events:
        choice[index] = after
        path.append(_allocation(layers, options, choice, dense_cost))
    return path


def most_accurate_within(path: Sequence[Allocation], budget: float) -> int:
    """Index of the first (least error) allocation costing at most ``budget`` of the dense cost;
    the last (cheapest) one when none does."""
    for index, allocation in enumerate(path):
        if allocation.cost_ratio <= budget + 1e-12:
            return index
    return len(path) - 1


def _lower_hull(option: _Options) -> list[int]:
    """Indices of the options on the lower convex hull of (error, cost), from dense onwards."""
    order = sorted(range(len(option.ranks)), key=lambda i: (option.errors[i], -option.costs[i]))
    hull: list[int] = []
    for i in order:
        if hull and option.costs[i] >= option.costs[hull[-1]]:
            continue  # more error for no saving: never chosen
        while len(hull) >= 2 and _turns_up(option, hull[-2], hull[-1], i):
            hull.pop()
        hull.append(i)
    return hull


def _turns_up(option: _Options, a: int, b: int, c: int) -> bool:
    # b is not on the lower hull when the a->c chord saves at least as much per unit error.
    ea, eb, ec = option.errors[a], option.errors[b], option.errors[c]
    ca, cb, cc = option.costs[a], option.costs[b], option.costs[c]
    return (cb - ca) * (ec - ea) >= (cc - ca) * (eb - ea)


def _allocation(layers, options, choice, dense_cost) -> Allocation:
    ranks = {layer.name: options[i].ranks[choice[i]] for i, layer in enumerate(layers)}
    cost = float(sum(options[i].costs[choice[i]] for i in range(len(layers))))
    errors = {layer.name: float(options[i].errors[choice[i]]) for i, layer in enumerate(layers)}
    return Allocation(ranks, cost, dense_cost, float(sum(errors.values())), errors)
