"""Which layers' calibration statistics are gathered together: chunks whose Gram matrices fit a
memory budget, each gathered by one run of the original model."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from lrcompile.calibration.statistics import activation_key
from lrcompile.io import model as model_io
from lrcompile.passes.candidates import WeightGroup

# The Gram matrices of one chunk, up to this fraction of the model's weight bytes (but at least
# one layer's), are held at once: each is whitened, its layers factored (or, under auto, their
# factors cached), and it and its Cholesky factor freed in turn, so Cholesky factors do not pile
# up beside them. Each further chunk is one more pass of the original model over the calibration
# data.
CALIBRATION_MEMORY_FRACTION = 1.0


def memory_chunks(
    model: ir.Model,
    groups: Sequence[WeightGroup],
) -> tuple[tuple, ...]:
    """Groups of layers whose Gram matrices together fit ``CALIBRATION_MEMORY_FRACTION`` of the
    model's weight bytes (at least one layer each); layers reading one activation (Q, K, V)
    count it once.

    A Gram matrix is K x K float64: for a 4096 x 11008 down projection 970 MB, ten times its fp16
    weight, so holding every layer's at once would cost far more than the model.
    """
    budget = max(int(model_io.tensor_bytes(model) * CALIBRATION_MEMORY_FRACTION), 1)
    chunks: list[list] = [[]]
    used = 0
    counted: set[tuple[str, bool]] = set()
    for group in groups:
        reads = {activation_key(node) for node in group.nodes}
        cost = 8 * group.shape[0] ** 2 * len(reads - counted)
        counted |= reads
        if cost and chunks[-1] and used + cost > budget:
            chunks.append([])
            used = 0
            counted = set(reads)
        chunks[-1].append(group)
        used += cost
    return tuple(tuple(chunk) for chunk in chunks)


def blocks(model: ir.Model, groups: Sequence[WeightGroup], count: int) -> tuple[tuple, ...]:
    """``groups`` (in graph order) in ``count`` contiguous blocks of about equal size, each split
    further where its Gram matrices would not fit ``memory_chunks``'s budget."""
    size = -(-len(groups) // max(count, 1))
    pieces = [groups[start : start + size] for start in range(0, len(groups), size)]
    return tuple(chunk for piece in pieces for chunk in memory_chunks(model, piece))
