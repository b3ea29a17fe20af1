"""Helpers for benchmarks and tests, outside the compile data flow: transformer-shaped models built
in code (``synthetic``), interleaved timing (``timing``), peak memory of a run (``peak_memory``)."""
