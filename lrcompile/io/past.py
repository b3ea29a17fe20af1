"""Empty KV-cache inputs for language-model exports that carry one.

    input_ids[b, s] (+ masks, positions) given, past_key_values.*[b, heads, past, d] not
      -> each past input supplied as zeros with past = 0 (a prompt without history)

Optimum and most ONNX LM exports take ``past_key_values.*`` inputs and return ``present.*``.
Calibration and check data usually hold only the prompt: the past is then empty. A past
dimension that another fed input names (``batch_size``) takes that input's size; any other
dynamic dimension is the past length, 0. Static dimensions (heads, head size) stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PAST_PREFIXES = ("past_key_values", "past.", "past_key", "past_value")
PRESENT_PREFIX = "present"  # Optimum's present.N.key, genai's present.N.key, present_key_values


def is_past(name: str) -> bool:
    """Whether the input ``name`` is a KV-cache input."""
    return name.startswith(PAST_PREFIXES)


def is_present(name: str) -> bool:
    """Whether the output ``name`` is a KV cache: keys and values, never class scores (its last
    axis is the head size), so the checks gate it on ``rel-l2`` under ``kl`` and ``top1``."""
    return name.startswith(PRESENT_PREFIX)


def with_empty_past(feed: Mapping[str, np.ndarray], inputs: Sequence) -> dict[str, np.ndarray]:
    """``feed`` with every missing KV-cache input of ``inputs`` supplied empty."""
    known: dict[str, int] = {}
    for spec in inputs:
        if spec.name in feed:
            for dim, size in zip(spec.shape, feed[spec.name].shape, strict=False):
                if isinstance(dim, str):
                    known[dim] = int(size)
    batch = next((int(array.shape[0]) for array in feed.values() if array.ndim), 1)
    result = dict(feed)
    for spec in inputs:
        if spec.name in feed or not is_past(spec.name):
            continue
        shape = [_size(dim, axis, known, batch) for axis, dim in enumerate(spec.shape)]
        result[spec.name] = np.zeros(shape, spec.dtype)
    return result


def _size(dim, axis: int, known: Mapping[str, int], batch: int) -> int:
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and dim in known:
        return known[dim]
    if dim is None and axis == 0:
        return batch
    return 0  # the past length
