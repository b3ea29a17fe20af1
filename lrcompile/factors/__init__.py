"""The factors a plan asks for, computed outside the passes (``provider``), and the on-disk cache
of each layer's factors at every rank (``cache``)."""
