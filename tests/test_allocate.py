"""Global allocation: the sweep's order, monotonicity, and budget selection."""

import itertools

import numpy as np
import pytest

from lrcompile.numerics import allocate
from lrcompile.numerics.allocate import LayerSpectrum


def _layer(name, decay, k=64, n=64, nodes=1):
    return LayerSpectrum(name, k, n, decay ** (2 * np.arange(min(k, n))), nodes)


def test_path_starts_dense_ends_cheapest_and_is_monotone():
    layers = [_layer("a", 0.9), _layer("b", 0.5), _layer("c", 0.99, k=32, n=128)]
    path = allocate.allocation_path(layers, multiple=8)
    assert path[0].ranks == {"a": None, "b": None, "c": None}
    assert path[0].predicted_error == 0.0 and path[0].cost_ratio == 1.0
    assert path[-1].ranks == {"a": 8, "b": 8, "c": 8}
    costs = [p.cost for p in path]
    errors = [p.predicted_error for p in path]
    assert all(x >= y for x, y in itertools.pairwise(costs))
    assert all(x <= y + 1e-15 for x, y in itertools.pairwise(errors))
    # Each step changes exactly one layer.
    for before, after in itertools.pairwise(path):
        assert sum(before.ranks[n] != after.ranks[n] for n in before.ranks) == 1


def test_rank_goes_first_where_error_per_saved_cost_is_lower():
    steep, flat = _layer("steep", 0.5), _layer("flat", 0.98)
    path = allocate.allocation_path([flat, steep], multiple=8)
    first = next(p for p in path[1:])
    assert first.ranks["flat"] is None and first.ranks["steep"] is not None
    # The steep layer reaches its smallest rank before the flat layer is touched at all.
    touched_flat = next(i for i, p in enumerate(path) if p.ranks["flat"] is not None)
    assert path[touched_flat - 1].ranks["steep"] == 8


def test_relative_errors_make_scales_irrelevant():
    a, b = _layer("a", 0.7), _layer("b", 0.9)
    scaled = LayerSpectrum("b", 64, 64, b.energies * 1e6)
    same = [p.ranks for p in allocate.allocation_path([a, b], multiple=8)]
    assert [p.ranks for p in allocate.allocation_path([a, scaled], multiple=8)] == same


def test_layers_that_cannot_save_stay_dense():
    tiny = _layer("tiny", 0.5, k=8, n=8)  # rank 8 of 8x8 saves nothing
    path = allocate.allocation_path([tiny], multiple=8)
    assert len(path) == 1 and path[0].ranks == {"tiny": None}


def test_flops_objective_counts_shared_nodes():
    options = allocate.layer_options(_layer("s", 0.5, nodes=3), 16, "flops")
    assert options.costs[0] == 3 * 64 * 64 and options.costs[1] == 3 * 16 * 128
    params = allocate.layer_options(_layer("s", 0.5, nodes=3), 16, "params")
    assert params.costs[0] == 64 * 64
    assert params.errors[1] == pytest.approx(0.25**16)


def test_most_accurate_within_budget():
    path = allocate.allocation_path([_layer("a", 0.9), _layer("b", 0.6)], multiple=8)
    index = allocate.most_accurate_within(path, 0.5)
    assert path[index].cost_ratio <= 0.5 < path[index - 1].cost_ratio
    assert allocate.most_accurate_within(path, 0.0) == len(path) - 1
