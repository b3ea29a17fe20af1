"""Integer inputs that index a table (token ids into an embedding): real data must stay inside
the table, or ONNX Runtime stops deep in the graph with a message about a Gather node."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lrcompile.errors import DataError


def check_index_values(
    source: str, feeds: Sequence[Mapping[str, np.ndarray]], limits: Mapping[str, tuple[int, int]]
) -> None:
    """Refuses data whose index inputs leave their tables: ``limits`` is ``{input: (0, largest
    valid index)}`` (``passes.inputs.index_ranges``); ONNX's Gather also takes ``-rows`` to -1.

    Raises:
        DataError: A value of such an input is outside ``[-rows, rows - 1]``.
    """
    for name, (_, high) in limits.items():
        for feed in feeds:
            values = np.asarray(feed.get(name, ()))
            if not values.size or not np.issubdtype(values.dtype, np.integer):
                continue
            worst = int(values.max()) if values.max() > high else int(values.min())
            if worst > high or worst < -(high + 1):
                raise DataError(
                    f"{source}: array {name!r} holds {worst}, outside the {high + 1} rows of the"
                    f" table it indexes (expected 0 to {high}: ids of this model's vocabulary)"
                )
