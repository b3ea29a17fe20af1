"""What the stages of a compile hand each other: the prepared model (``Prepared``) and the
calibration plan (``Calibrated``: the feeds, which layers' statistics are gathered together, and
the whitening each chunk of layers is factored with, ``Calibrated.whitened_chunks``).

Without error compensation every chunk is whitened from the ORIGINAL model's activations. With it
(``CompileConfig.compensate``) the layers go in blocks, in graph order: the first block from the
original model, each later one fitted to the original outputs given the inputs the model
rewritten so far gives it (``lrcompile.calibration.compensation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx_ir as ir

from lrcompile.calibration.compensation import compensating_whitenings
from lrcompile.calibration.statistics import Calibration, calibrate
from lrcompile.io import data as data_lib
from lrcompile.io.spill import OutputStore
from lrcompile.passes.candidates import Skipped, WeightGroup
from lrcompile.passes.factor_cache import FactorCache
from lrcompile.passes.low_rank import ProgressCallback
from lrcompile.pipeline import Chunk


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The model ready for the passes, its run-time inputs, and its candidates."""

    path: Path
    model: ir.Model
    inputs: list[data_lib.InputSpec]
    groups: list[WeightGroup]
    skipped: list[Skipped]
    left_alone: list[tuple[str, str, int]]  # (op, why, count) of ops lrcompile does not factor


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """The calibration plan: the feeds, and the chunks of layers whose statistics are gathered
    in one run of the original model, so that only one chunk's Gram matrices are ever in memory.
    Under ``auto`` the first chunk is gathered up front with the model's reference outputs
    (``statistics``) and the others by the search (``chunk_statistics``); otherwise each chunk is
    gathered when the rewrite reaches it."""

    prepared: Prepared
    source: data_lib.FeedSource | None
    chunks: tuple[tuple[WeightGroup, ...], ...]
    statistics: Calibration | None = None
    fitted: int | None = None  # auto: the statistics are of the first ``fitted`` batches
    blocks: tuple[tuple[WeightGroup, ...], ...] | None = None  # error compensation's, in order
    # Temporary files to remove with the plan (``close``): the auto search's factor cache.
    scratch: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def whitened_chunks(self, progress: ProgressCallback | None = None) -> Iterator[Chunk]:
        """Each chunk's group keys and, where this plan gathers it, its whitening.

        Without compensation every chunk is calibrated on the ORIGINAL model, serialized before
        the first chunk is factored (the caller rewrites the model in place between chunks).
        With it, each chunk is a block (``blocks``; see the module docstring).
        """
        if self.blocks is not None and self.source is not None:
            yield from self._compensated(progress)
            return
        if self.statistics is not None or self.source is None:
            # auto (the search set the factors and ranks) or uncalibrated: one chunk, the
            # factorize pass's own whitening, if any.
            yield frozenset(group.key for group in self.prepared.groups), None
            return
        for chunk, statistics in zip(self.chunks, self.chunk_statistics(progress), strict=True):
            # The layers reading one activation at a time: whitenings() frees each Gram matrix
            # once its readers have their Cholesky factor, which goes once they are factored.
            whitened: set[str] = set()
            for members, white in statistics.whitenings(chunk):
                keys = frozenset(group.key for group in members)
                whitened |= keys
                yield keys, dict.fromkeys(keys, white)
            rest = frozenset(group.key for group in chunk) - whitened  # without statistics
            if rest:
                yield rest, {}

    def _compensated(self, progress: ProgressCallback | None) -> Iterator[Chunk]:
        """The blocks in turn: the first as without compensation (under ``auto``, the search's
        cached factors), each later one compensating for the blocks rewritten before it."""
        report = _reporter(progress, "compensating")
        original = ir.serde.serialize_model(self.prepared.model)  # before any block is rewritten
        first = self.blocks[0]
        if self.statistics is not None:
            yield frozenset(group.key for group in first), None
        else:
            gathered = self._gather(first, keep_reference=False, model=original)
            yield frozenset(group.key for group in first), gathered.whitening(first)
        for index, block in enumerate(self.blocks[1:], start=1):
            report(index, len(self.blocks), f"{len(block)} layers")
            white = compensating_whitenings(
                original,
                self.prepared.model,
                block,
                self.fitted_feeds(),
                data_folder=self.prepared.path.parent,
                mask=self.source.mask,
            )
            yield frozenset(group.key for group in block), white
        report(len(self.blocks), len(self.blocks), "")

    def fitted_feeds(self) -> list:
        """The feeds factors and FP8 ranges may fit (under ``auto``, the first ``fitted``)."""
        return self.source.feeds if self.fitted is None else self.source.feeds[: self.fitted]

    def held_back_feeds(self) -> list:
        """The feeds ``auto`` held back from fitting, to measure on (none otherwise)."""
        return [] if self.fitted is None else self.source.feeds[self.fitted :]

    def close(self) -> None:
        """Removes the reference outputs' and the factor cache's files now (else when
        collected, or at exit)."""
        reference = self.statistics.reference if self.statistics is not None else None
        for closable in [reference, *self.scratch]:
            if isinstance(closable, OutputStore | FactorCache):
                closable.close()

    def chunk_statistics(self, progress: ProgressCallback | None = None) -> Iterator[Calibration]:
        """Each chunk's statistics in turn, each gathered by one run of the ORIGINAL model
        (serialized once, before the caller changes it); under ``auto`` the first chunk's are
        ``statistics``, gathered with the reference outputs."""
        report = _reporter(progress, "calibrating")
        gathered = self.chunks[1:] if self.statistics is not None else self.chunks
        original = ir.serde.serialize_model(self.prepared.model) if gathered else None
        for index, chunk in enumerate(self.chunks):
            if index == 0 and self.statistics is not None:
                yield self.statistics
                continue
            report(index, len(self.chunks), f"{len(chunk)} layers")
            yield self._gather(chunk, keep_reference=False, model=original)
        report(len(self.chunks), len(self.chunks), "")

    def _gather(self, groups, *, keep_reference: bool, on_batch=None, model=None) -> Calibration:
        prepared = self.prepared
        return calibrate(
            model if model is not None else ir.serde.serialize_model(prepared.model),
            groups,
            self.source,
            data_folder=prepared.path.parent,
            keep_reference=keep_reference,
            on_batch=on_batch,
            fitted=self.fitted,
        )


def stage_callback(progress: ProgressCallback | None, stage: str) -> Callable | None:
    """``report(done, total, detail)`` of ``stage`` (None without ``progress``)."""
    if progress is None:
        return None
    return lambda done, total, detail: progress(stage, done, total, detail)


def _reporter(progress: ProgressCallback | None, stage: str) -> Callable:
    """``stage_callback``, doing nothing without ``progress``."""
    return stage_callback(progress, stage) or (lambda done, total, detail: None)
