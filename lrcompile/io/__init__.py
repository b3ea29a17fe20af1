"""Reading and writing: models (``model``: load with external-data checks, atomic save), the
factors' scratch file (``spill``), model inputs from ``.npz``, scripts or synthetic data
(``data``), and per-layer override files (``overrides``). Nothing here runs a model."""
