"""The calibration stage: the original model run on calibration data, finished before the search.

    calibration feeds (``--calib``, a script, or synthetic) -> chunks of layers whose Gram
      matrices fit the memory budget (``calibration.chunks``), for each chunk:
        one run of the ORIGINAL model -> each activation's Gram matrix -> its whitening
          -> the provider caches each layer's (whitened) factors at every rank, and its spectrum
          -> the Gram matrix and Cholesky factor are freed

Under ``auto`` the first run also keeps the model's outputs (the reference the search measures
against) and the last ``validation`` share of the batches stays out of the statistics. A layer
is cached when its rank is read off its spectrum (``auto``, ``energy:``) or its fit is whitened,
unless error compensation fits it afresh later (a block after the first). Without calibration
data only ``energy:`` layers are cached (plain SVDs). Nothing here rewrites the model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import onnx_ir as ir

from lrcompile.calibration import chunks as calibration_chunks
from lrcompile.calibration import refusals
from lrcompile.calibration.statistics import Calibration, calibrate, padding_share
from lrcompile.config import DEFAULT_PADDING_MASK, CompileConfig
from lrcompile.errors import DataError
from lrcompile.factors.provider import FactorProvider, ProgressCallback
from lrcompile.io import data as data_lib
from lrcompile.io.spill import OutputStore
from lrcompile.passes.candidates import WeightGroup
from lrcompile.profile import Profile
from lrcompile.search.decisions import uses_auto
from lrcompile.stages.facts import WeightFacts, calibrated_facts, needs_cache, plain_facts, store
from lrcompile.stages.load import Prepared, feeds

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """What calibration leaves the later stages: the feeds, the first chunk's statistics with the
    reference outputs (``auto``), each layer's facts and rows per batch, and the blocks of error
    compensation (None without it)."""

    source: data_lib.FeedSource | None
    statistics: Calibration | None
    facts: dict[str, WeightFacts]
    rows: dict[str, int]
    fitted: int | None = None  # auto: the statistics are of the first ``fitted`` batches
    blocks: tuple[tuple[WeightGroup, ...], ...] | None = None
    # Per layer, the rounding noise DynamicQuantizeLinear would add to its input
    # (``Calibration.dynamic_noise``): what a W8A8 option of ``--quantize`` costs in error.
    noise: dict[str, float | None] = dataclasses.field(default_factory=dict)

    def fitted_feeds(self) -> list:
        """The feeds factors and FP8 ranges may fit (under ``auto``, the first ``fitted``)."""
        return self.source.feeds if self.fitted is None else self.source.feeds[: self.fitted]

    def held_back_feeds(self) -> list:
        """The feeds ``auto`` held back from fitting, to measure on (none otherwise)."""
        return [] if self.fitted is None else self.source.feeds[self.fitted :]

    def close(self) -> None:
        """Removes the reference outputs' files now (else when collected, or at exit)."""
        if self.statistics is not None and isinstance(self.statistics.reference, OutputStore):
            self.statistics.reference.close()


def calibrate_and_cache(
    prepared: Prepared,
    config: CompileConfig,
    provider: FactorProvider,
    profile: Profile,
    progress: ProgressCallback | None = None,
) -> Calibrated:
    """Calibrates (see the module docstring) and fills the provider's cache; returns what the
    search and the rewrite need of it."""
    auto = uses_auto(prepared.specs)
    if not (config.calibrated or auto):
        with profile("factors"):
            facts = {g.key: plain_facts(g, prepared, config, provider) for g in prepared.groups}
        return Calibrated(None, None, facts, {})
    source = calibration_source(prepared, config)
    if not auto:
        _warn_if_synthetic(source)
    blocks = None
    if config.compensate and prepared.groups:
        blocks = calibration_chunks.blocks(prepared.model, prepared.groups, config.compensate)
    later = {g.key for block in (blocks or ())[1:] for g in block}
    cached = [g for g in prepared.groups if needs_cache(g, prepared, config, g.key in later)]
    fitted = fitted_batches(source, config.validation) if auto else None
    run = _Run(prepared, config, source, provider, profile, auto, fitted, progress)
    chunks = calibration_chunks.memory_chunks(prepared.model, prepared.groups if auto else cached)
    statistics, rows, noise = run.chunks(chunks, cached)
    if auto:
        _warn_if_synthetic(source)  # after the checks: a refusal is the one line the user sees
    facts = {}
    with profile("factors"):
        for group in prepared.groups:
            later_block = group.key in later
            facts[group.key] = calibrated_facts(group, prepared, config, provider, later_block)
    return Calibrated(source, statistics, facts, rows, fitted, blocks, noise)


@dataclasses.dataclass
class _Run:
    """The chunk loop: one run of the original model per chunk, then its layers cached."""

    prepared: Prepared
    config: CompileConfig
    source: data_lib.FeedSource
    provider: FactorProvider
    profile: Profile
    auto: bool
    fitted: int | None
    progress: ProgressCallback | None

    def chunks(self, chunks, cached) -> tuple[Calibration | None, dict[str, int], dict]:
        """The first chunk's statistics (with the reference outputs under ``auto``), and each
        gathered layer's rows per batch and dynamic-quantization noise."""
        prepared, first, rows, noise = self.prepared, None, {}, {}
        with self.profile("calibrate"):
            original = ir.serde.serialize_model(prepared.model)  # serialized once, for every run
        wanted = {group.key for group in cached}
        for index, chunk in enumerate(chunks):
            with self.profile("calibrate"):
                statistics = self._gather(original, chunk, keep_reference=self.auto and not index)
            if first is None:
                first = statistics
                if self.auto:
                    refusals.refuse_degenerate_output(statistics, prepared.path, self.source)
            rows |= {group.key: statistics.batch_rows(group) for group in chunk}
            noise |= {group.key: statistics.dynamic_noise(group) for group in chunk}
            with self.profile("factors"):
                self._cache(statistics, chunk, wanted)
        return first, rows, noise

    def _gather(self, original, chunk, *, keep_reference: bool) -> Calibration:
        on_batch = None
        if self.progress is not None:
            on_batch = lambda done, total, detail: self.progress("calibrating", done, total, "")  # noqa: E731
        return calibrate(
            original,
            chunk,
            self.source,
            data_folder=self.prepared.path.parent,
            keep_reference=keep_reference,
            on_batch=on_batch,
            fitted=self.fitted,
        )

    def _cache(self, statistics: Calibration, chunk, wanted: set[str]) -> None:
        """Whitens the chunk one activation at a time (Q, K and V share one) and caches its layers;
        ``auto`` first refuses degenerate activations."""
        for members, white in statistics.whitenings(chunk):
            if self.auto:
                whitening = {group.key: white for group in members}
                refusals.refuse_degenerate_input(
                    statistics, self.prepared.path, self.source, members, whitening
                )
            for group in members:
                if group.key in wanted:
                    store(self.provider, group, self.prepared, self.config, white)


def fitted_batches(source: data_lib.FeedSource, validation: float) -> int | None:
    """Batches auto fits to: all but ceil(validation x batches); None: no split (0, or 1 batch)."""
    batches = len(source.feeds)
    if not validation:
        return None
    if batches < 2:
        logger.warning(
            "auto: one calibration batch (%s), nothing to hold back: candidates are measured on"
            " the data their factors were fitted to, which flatters them; give more rows or a"
            " smaller `batch_size`",
            source.description,
        )
        return None
    held = math.ceil(round(validation * batches, 9))  # 0.07 x 100 is 7.000000000000001
    return batches - min(held, batches - 1)


def calibration_source(prepared: Prepared, config: CompileConfig) -> data_lib.FeedSource:
    """The calibration feeds ``config`` names (synthetic when it names none).

    Its ``mask`` is ``config.padding_mask`` when the model has that input as ``[batch,
    sequence]``, the data is not synthetic, and the mask holds padding (zeros; only 0 and 1).

    Raises:
        DataError: The data does not fit the model, or ``padding_mask`` names an input it
            lacks (the default name is used only where it exists).
    """
    source = feeds(prepared, config, config.calib, config.calib_script)
    mask = padding_mask(prepared.inputs, config.padding_mask)
    if mask is None or source.synthetic:
        return source  # a synthetic mask's zeros are random, not padding
    padding = padding_share(source.feeds, mask)
    if padding is None:
        if config.padding_mask != DEFAULT_PADDING_MASK:
            raise DataError(
                f"`padding_mask` {mask!r}: the calibration data holds values other than 0 and 1"
                ' in it; expected 1 at real tokens and 0 at padding (pass "" to count every row)'
            )
        logger.warning(
            "%s holds values other than 0 and 1 (an additive mask?): padding is not left out of"
            " the calibration statistics; `padding_mask` names a 0/1 mask",
            mask,
        )
        return source
    if padding >= 1.0:
        raise DataError(
            f"`padding_mask` {mask!r}: every position of the calibration data is padding (0):"
            ' no rows to fit the factors to; pass "" to count every row'
        )
    return dataclasses.replace(source, mask=mask, padding=padding) if padding else source


def statistics_description(source: data_lib.FeedSource) -> str:
    """What calibration statistics of ``source``'s feeds are of: its description, and the
    padding they leave out where activations line up with the mask."""
    if source.mask is None:
        return source.description
    return (
        f"{source.description} (its padding, {source.mask} == 0 at {source.padding:.0%} of"
        " positions, left out of the statistics of activations that line up with it)"
    )


def padding_mask(inputs: Sequence[data_lib.InputSpec], name: str) -> str | None:
    """``name`` when it is a 2-D model input (a ``[batch, sequence]`` padding mask), else None.

    Raises:
        DataError: ``name`` is not the default and not a 2-D input.
    """
    spec = next((spec for spec in inputs if spec.name == name), None)
    if spec is not None and len(spec.shape) == 2:
        return name
    if name and name != DEFAULT_PADDING_MASK:
        found = f"of shape {list(spec.shape)}" if spec is not None else "not an input"
        raise DataError(
            f"`padding_mask` {name!r}: {found} of the model; expected a [batch, sequence] input"
            f' (inputs: {", ".join(s.name for s in inputs)}), or "" to count every row'
        )
    return None


def _warn_if_synthetic(source: data_lib.FeedSource) -> None:
    data_lib.warn_if_synthetic(
        source,
        "calibrating",
        "random data makes a weak calibration and an untrustworthy 'auto' search",
        "`calib` FILE.npz or `calib_script` FILE.py",
    )
