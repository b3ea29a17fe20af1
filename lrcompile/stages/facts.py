"""What the search needs to know of each weight: the provider's cache, filled as calibration goes.

a weight whose rank is read off a spectrum (``auto``, ``energy:``) or whose fit is whitened
  -> its (whitened) factors at every rank and its spectrum (``FactorProvider.cache``)
with ``quantize``: every weight that may be quantized
  -> its integers and its residual's (whitened) factors and spectrum (``cache_quantized``);
     under ``auto`` with int4 also its int8 form, which the search may keep instead
-> WeightFacts: finite? its spectrum, its fit (``search.decisions``)
"""

from __future__ import annotations

import dataclasses

from lrcompile.config import CompileConfig
from lrcompile.factors.cache import CachedFactors
from lrcompile.factors.provider import FactorProvider
from lrcompile.factors.quantized import CORRECTION_CACHE_RANK
from lrcompile.numerics import ranks
from lrcompile.numerics.whiten import Whitening
from lrcompile.passes.candidates import WeightGroup
from lrcompile.search.decisions import WeightFacts, refusal, uses_auto
from lrcompile.stages.load import Prepared, quantize_template

__all__ = ["WeightFacts", "calibrated_facts", "needs_cache", "plain_facts", "store"]


def store(
    provider: FactorProvider,
    group: WeightGroup,
    prepared: Prepared,
    config: CompileConfig,
    whitening: Whitening | None = None,
) -> CachedFactors | None:
    """Caches ``group`` (its quantized form under ``quantize``); None for a non-finite weight."""
    template = quantize_template(config)
    if template is None:
        return provider.cache(group, whitening)
    spec, (k, n) = prepared.specs[group.key], group.shape
    if spec.kind == "none":
        top = 0  # no correction: the integers alone
    elif spec.kind in ("fixed", "fraction"):
        top = ranks.choose_rank(spec, k, n, multiple=config.rank_multiple)
    else:
        top = CORRECTION_CACHE_RANK  # auto, energy: any rank up to the cache's
    if spec.kind == "auto" and template.bits == 4:  # auto may keep it in int8 instead
        higher = dataclasses.replace(template, bits=8, group=None)
        if provider.cache_quantized(group, higher, whitening, top=0) is None:
            return None
    return provider.cache_quantized(group, template, whitening, min(top, CORRECTION_CACHE_RANK))


def needs_cache(group: WeightGroup, prepared: Prepared, config, compensated: bool) -> bool:
    """Whether ``group`` is cached: its spec is ``auto`` (searched, refused or not, as the search
    prices every ``auto`` layer), or it may be quantized, or factored and its rank needs its
    spectrum or its fit is whitened (calibration data given) without compensation."""
    spec = prepared.specs[group.key]
    if spec.kind == "auto":
        return True
    if (
        spec.kind == "skip"
        or refusal(group, config.allow_no_saving, config.quantize is not None) is not None
    ):
        return False
    if config.quantize is not None:
        return True  # its integers, and its residual's factors for a correction
    calibrating = config.calibrated or uses_auto(prepared.specs)
    whitened = calibrating and _whitened(group, prepared)
    return spec.needs_spectrum or (whitened and not compensated)


def calibrated_facts(
    group, prepared, config, provider: FactorProvider, compensated: bool
) -> WeightFacts:
    """A calibrated compile's facts of ``group``: a cached layer's spectrum and fit (a layer
    without statistics, whose inputs are constants, is cached plain now); the others are fitted
    whitened when their activations are calibrated (error compensation's blocks)."""
    if needs_cache(group, prepared, config, compensated):
        entry = store(provider, group, prepared, config)
        if entry is None:
            return WeightFacts(finite=False)
        fit = "whitened" if entry.method == "whitened" else "svd"
        return WeightFacts(True, entry.spectrum, fit)
    fit = "whitened" if _whitened(group, prepared) else "svd"
    return WeightFacts(_finite(group, prepared, config, provider), None, fit)


def plain_facts(group, prepared, config, provider: FactorProvider) -> WeightFacts:
    """An uncalibrated compile's facts of ``group``: the spectrum of an ``energy:`` layer."""
    if needs_cache(group, prepared, config, compensated=False):
        entry = store(provider, group, prepared, config)
        return WeightFacts(entry is not None, entry.spectrum if entry is not None else None)
    return WeightFacts(_finite(group, prepared, config, provider))


def _finite(group, prepared: Prepared, config, provider: FactorProvider) -> bool:
    """Whether the weight is finite; not read for a layer that stays dense anyway."""
    spec = prepared.specs[group.key]
    if (
        spec.kind == "skip"
        or refusal(group, config.allow_no_saving, config.quantize is not None) is not None
    ):
        return True
    return provider.finite(group)


def _refused(group: WeightGroup, config: CompileConfig) -> bool:
    return refusal(group, config.allow_no_saving, config.quantize is not None) is not None


def _whitened(group: WeightGroup, prepared: Prepared) -> bool:
    """Whether calibration gives ``group`` a whitening: none of its nodes multiplies a constant
    (its statistics are of computed activations)."""
    constants = prepared.model.graph.initializers
    return not any(node.inputs[0].name in constants for node in group.nodes)
