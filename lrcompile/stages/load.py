"""The load stage: the model read, checked and prepared for the passes, its candidates found.

file -> ir.Model (external weights memory-mapped) -> initializers dropped from the inputs,
  opset >= 19 under FP8 -> candidate weight groups, the nodes left alone -> rank spec per group
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from lrcompile.check.gate import check_labels
from lrcompile.config import DEFAULT_ITERATIONS, CompileConfig
from lrcompile.errors import DataError, LrcompileError
from lrcompile.io import data as data_lib
from lrcompile.io import model as model_io
from lrcompile.io import overrides as override_files
from lrcompile.io.indices import check_index_values
from lrcompile.numerics.ranks import RankSpec
from lrcompile.passes.candidates import Skipped, WeightGroup, find_candidates, ops_left_alone
from lrcompile.passes.inputs import index_ranges, synthetic_ranges
from lrcompile.passes.opset import with_opset
from lrcompile.passes.quantized import MIN_OPSET as QUANTIZED_OPSET
from lrcompile.plan import Quantize
from lrcompile.search.decisions import rank_specs


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The model ready for the passes, its run-time inputs, its candidates and their specs."""

    path: Path
    model: ir.Model
    inputs: list[data_lib.InputSpec]
    groups: list[WeightGroup]
    skipped: list[Skipped]
    left_alone: list[tuple[str, str, int]]  # (op, why, count) of ops lrcompile does not factor
    specs: dict[str, RankSpec]  # by group key: the default spec or the group's override


def load(path: Path, config: CompileConfig, outputs: Sequence[Path] = ()) -> Prepared:
    """The model at ``path``, prepared: initializers dropped from the graph inputs (old exporters
    list weights as optional inputs, which are no constants until removed), opset >= 19 under
    FP8, its candidates found and their rank specs resolved (the graph is unchanged).

    Raises:
        LrcompileError: The model or the rank spec or override file is invalid, or one of
            ``outputs`` is not usable.
    """
    rank = RankSpec.parse(config.rank) if config.rank is not None else RankSpec("none")
    overrides = override_files.load_overrides(config.overrides) if config.overrides else ()
    model = model_io.load_model(path)
    for output_path in outputs:
        model_io.check_output_path(path, output_path)
    check_labels(path, model, config.labels)
    for data in (config.calib, config.verify_data):  # before any work or warning
        if data is not None and str(data) != "synthetic" and not Path(data).is_file():
            raise DataError(f"{data}: no such file, expected an .npz of model inputs")
    inputs = data_lib.model_inputs(model)
    RemoveInitializersFromInputsPass()(model)
    if config.fp8:
        model = with_opset(model, path)
    if config.quantize:
        model = with_opset(model, path, QUANTIZED_OPSET, f"`quantize={config.quantize}`")
    groups, skipped = find_candidates(model.graph, model.functions.values())
    specs = rank_specs(groups, rank, overrides)
    return Prepared(path, model, inputs, groups, skipped, ops_left_alone(model), specs)


def quantize_template(config: CompileConfig) -> Quantize | None:
    """The quantized form ``config`` asks of every weight (its correction rank 0), if any."""
    if config.quantize is None:
        return None
    return Quantize(config.bits, config.group, config.symmetric, config.quant_base)


def check_device(device: str) -> None:
    """Checks that torch can reach a GPU when ``device`` is ``cuda``."""
    if device == "cuda":
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise LrcompileError(
                "`device=cuda` needs torch with a CUDA GPU; none is available here"
                " (the CPU path, `device=cpu`, needs no torch)"
            )


def feeds(
    prepared: Prepared, config: CompileConfig, npz: str | None, script: str | None = None
) -> data_lib.FeedSource:
    """Feeds from an ``.npz``, a script, or synthetic (``npz`` None or ``synthetic``), with
    ``config``'s shapes and value ranges (index inputs kept within their tables).

    Raises:
        DataError: The data does not fit the model.
    """
    limits = index_ranges(prepared.model.graph)
    source = data_lib.input_feeds(
        npz,
        script,
        prepared.inputs,
        shapes=config.input_shapes,
        batch_size=config.batch_size,
        iterations=DEFAULT_ITERATIONS,
        seed=config.seed,
        val_ranges=synthetic_ranges(prepared.model.graph) | dict(config.val_ranges),
    )
    if not source.synthetic:
        check_index_values(source.description, source.feeds, limits)
    return source
