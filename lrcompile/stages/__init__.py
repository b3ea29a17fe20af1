"""The stages of ``compile_model`` (and ``inspect_model``), each a function of what came before.

    load -> calibrate (and cache the factors' SVDs) -> search (the plan) -> rewrite (fit, passes,
      report) -> save -> verify

``load``: the model and its candidates (``stages.load``); ``calibrate``: the original model run on
calibration data, chunk by chunk, each chunk's layers whitened and their factors cached
(``stages.calibrate``); ``search``: one decision per weight (``stages.search``); ``rewrite``: the
plan's factors fitted, the passes run, the report rendered (``stages.rewrite``,
``stages.report``). No stage reaches back into an earlier one.
"""
