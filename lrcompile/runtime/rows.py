"""Model runs in pieces of rows, so that one run's outputs stay within a memory budget.

    batch of 8 x 256 tokens -> an LM's logits [8, 256, 262144] in float32: 2 GiB per run
    the same batch in pieces of 1 row -> 256 MiB per run, the same rows, the same sums

A batch is split along axis 0 (every fed array alike) when one row's outputs times its rows would
pass ``OUTPUT_BUDGET``; how many rows a run may take is measured on one row of the first batch.
Errors and statistics are sums over rows, so a batch run in pieces gives the same verdict; only
the order of floating-point additions changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

OUTPUT_BUDGET = 128 << 20  # bytes of outputs one run may hold

Feed = dict[str, np.ndarray]


def split_rows(feed: Mapping[str, np.ndarray], rows: int | None) -> list[Feed]:
    """``feed`` in pieces of at most ``rows`` rows along axis 0; ``[feed]`` when ``rows`` is None
    or covers it."""
    total = _rows(feed)
    if rows is None or total is None or total <= rows:
        return [dict(feed)]
    return [{name: value[start : start + rows] for name, value in feed.items()}
            for start in range(0, total, rows)]  # fmt: skip


def rows_per_run(
    feeds: Sequence[Mapping[str, np.ndarray]],
    run_one_row: Callable[[Feed], Sequence[np.ndarray]],
    budget: int = OUTPUT_BUDGET,
) -> int | None:
    """The rows one run may take to keep its outputs within ``budget`` (at least one), measured
    by ``run_one_row`` on the first row of the first feed; None when whole batches fit (or the
    feeds cannot be split: arrays of different lengths, or a single row)."""
    if not feeds:
        return None
    largest = max(_rows(feed) or 0 for feed in feeds)
    if largest < 2 or _rows(feeds[0]) is None:
        return None
    per_row = sum(np.asarray(value).nbytes for value in run_one_row(split_rows(feeds[0], 1)[0]))
    rows = max(1, budget // max(per_row, 1))
    return rows if rows < largest else None


def splittable(first_dimensions: Iterable[int | str | None]) -> bool:
    """Whether a model whose fed inputs have these first dimensions may run a batch in pieces:
    none of them is static (a fixed batch size)."""
    return not any(isinstance(dim, int) for dim in first_dimensions)


def _rows(feed: Mapping[str, np.ndarray]) -> int | None:
    """The common length of the feed's arrays along axis 0 (None: they differ, or are scalars)."""
    lengths = {np.shape(value)[0] if np.ndim(value) else None for value in feed.values()}
    if len(lengths) != 1 or None in lengths:
        return None
    return lengths.pop()
