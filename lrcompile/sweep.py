"""``compile_sweep``: one model compiled with ``--rank auto`` at several settings, from one
calibration.

    load -> calibrate (and cache the SVDs) -> spectra and sensitivities (``search.measure``)
      -> per setting: search (``search.choose``) -> a fresh copy rewritten -> save -> verify
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lrcompile.compiler import CompileResult, calibration, checked, load_checked, rewrite_and_save
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError, OutputPathError
from lrcompile.factors.provider import ProgressCallback
from lrcompile.profile import Profile
from lrcompile.search.decisions import uses_auto
from lrcompile.stages import load as load_stage
from lrcompile.stages import search as search_stage

# What ``compile_sweep`` may vary between its outputs: only the choice of ranks and the final
# check read them, so the calibration, factors and sensitivities serve every setting.
SWEEP_FIELDS = ("tolerance", "budget", "headroom", "objective")


def compile_sweep(
    input_path: str | Path,
    settings: Mapping[str | Path, Mapping[str, Any]],
    config: CompileConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> Iterator[tuple[Path, CompileResult]]:
    """Compiles one model with ``rank="auto"`` at several tolerances, budgets or objectives.

    The calibration, the factors and the sensitivities are computed once; each setting then gets
    its own search, output and check. Each result is what ``compile_model`` gives with that
    setting alone (the same ranks and output); its ``seconds`` count the shared stages too.

    Example: ``compile_sweep("lm.onnx", {"a.onnx": {"tolerance": 0.05}, "b.onnx": {"budget":
    0.8}}, rank="auto", calib="calib.npz")``; nothing runs until it is iterated.

    Args:
        input_path: The ONNX model; never modified.
        settings: Output path -> the ``SWEEP_FIELDS`` whose values differ from ``config``'s.
        config: As for ``compile_model``; its rank spec must make some layer ``auto``.
        progress: As for ``compile_model``.

    Returns:
        An iterator of (output path, result), each yielded once its output is written and checked.

    Raises:
        LrcompileError: As ``compile_model`` (bad data while iterating), or a setting varies
            another field, or no layer is ``auto`` (raised by the call, before anything runs).
    """
    config = config if config is not None else CompileConfig(**options)
    resolved = [Path(output).resolve() for output in settings]
    twice = next(
        (o for o, r in zip(settings, resolved, strict=True) if resolved.count(r) > 1), None
    )
    if twice is not None:
        raise OutputPathError(f"{twice}: compile_sweep names this output for two settings")
    configs = {
        Path(output): _sweep_setting(config, output, setting)
        for output, setting in settings.items()
    }
    profile = Profile()
    with profile("load"):
        prepared, check_feeds = load_checked(Path(input_path), config, list(configs))
        if not configs:
            raise LrcompileError("compile_sweep: no settings given (output path -> fields)")
        if not uses_auto(prepared.specs):
            raise LrcompileError(
                f"compile_sweep: `rank` {config.rank!r} (with the overrides) makes no layer"
                " 'auto'; a sweep shares auto's measurements, so it needs `rank=auto`"
            )
    return _sweep(prepared, configs, config, check_feeds, profile, progress)


def _sweep_setting(config: CompileConfig, output, setting: Mapping[str, Any]) -> CompileConfig:
    if not isinstance(setting, Mapping):
        raise LrcompileError(
            f"compile_sweep: the setting for {output} is {setting!r}; expected a mapping of"
            f" fields ({', '.join(SWEEP_FIELDS)}) to values"
        )
    varied = sorted(set(setting) - set(SWEEP_FIELDS))
    if varied:
        raise LrcompileError(
            f"compile_sweep: the setting for {output} varies {', '.join(varied)}; only"
            f" {', '.join(SWEEP_FIELDS)} may differ between outputs (the rest is shared)"
        )
    return dataclasses.replace(config, **setting)


def _sweep(prepared, configs, config, check_feeds, profile, progress):
    """``compile_sweep`` once its inputs are checked: the shared stages, then each setting."""
    with calibration(prepared, config, profile, progress) as (provider, calibrated):
        with profile("search"):
            layers = search_stage.measure(prepared, calibrated, config, provider, progress)
        for output, setting in configs.items():
            own = profile.copy()  # the shared stages' profile, then this setting's
            with own("search"):  # on the original model, still unchanged
                searched = search_stage.choose(
                    prepared, calibrated, setting, provider, layers, progress
                )
            with own("load"):  # a fresh copy to rewrite in place
                fresh = load_stage.load(prepared.path, setting)
            auto = searched[1]
            rewritten = rewrite_and_save(
                fresh, calibrated, searched[0], setting, provider, output, own, progress,
                predicted=auto.local if auto is not None else None,
            )  # fmt: skip
            result = checked(
                fresh, calibrated, setting, searched, rewritten, output, own, check_feeds
            )
            del fresh, rewritten  # the rewritten model: not kept while the caller looks at it
            yield output, result
