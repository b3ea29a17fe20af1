"""The one place that chooses and orders the passes.

    factorize (plain, whitened, or with the ranks ``auto`` chose) -> [FP8 Q/DQ] -> [plugin calls]
      -> cleanup

Before the passes, ``compile_model`` drops initializers from the graph inputs (old exporters list
weights as optional inputs, which ONNX Runtime lets a caller override, so they are no constants
until removed) and, when calibrating, gathers the statistics and runs the ``auto`` search that
configure the factorize pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrcompile import ranks
from lrcompile.config import CompileConfig
from lrcompile.data import Feed
from lrcompile.passes.fp8 import QuantizeFp8Pass
from lrcompile.passes.low_rank import FactorizeLowRankPass, ProgressCallback, SvdCache
from lrcompile.passes.plugin import EmitLowRankGemmPass
from lrcompile.whiten import Whitening


def factorize_pass(
    config: CompileConfig,
    *,
    whitening: Mapping[str, Whitening] | None = None,
    chosen_ranks: Mapping[str, int | None] | None = None,
    cache: SvdCache | None = None,
    progress: ProgressCallback | None = None,
) -> FactorizeLowRankPass:
    """The factorize pass ``config`` describes, with what calibration and search found.

    Raises:
        RankSpecError: The rank spec or the override file is invalid.
    """
    overrides = ranks.load_overrides(config.overrides) if config.overrides else ()
    return FactorizeLowRankPass(
        rank=ranks.RankSpec.parse(config.rank),
        overrides=overrides,
        rank_multiple=config.rank_multiple,
        decomposition=config.decomposition,
        seed=config.seed,
        allow_no_saving=config.allow_no_saving,
        whitening=dict(whitening or {}),
        chosen_ranks=dict(chosen_ranks or {}),
        cache=cache,
        progress=progress,
    )


def fp8_pass(
    config: CompileConfig, feeds: Sequence[Feed], data_folder: Path
) -> QuantizeFp8Pass | None:
    """The FP8 pass ``config`` asks for (None without ``--fp8``), scaled on ``feeds``."""
    if not config.fp8:
        return None
    return QuantizeFp8Pass(
        scope=config.fp8_scope,
        weights=config.fp8_weights,
        calibration=config.fp8_calib,
        feeds=tuple(feeds),
        data_folder=data_folder,
    )


def build_pipeline(
    factorize: FactorizeLowRankPass,
    quantize: QuantizeFp8Pass | None = None,
    *,
    plugin: bool = False,
) -> list[ir.passes.PassBase]:
    """The passes in the order they must run: factorize, FP8 and plugin (when asked), cleanup."""
    passes: list[ir.passes.PassBase] = [factorize]
    if quantize is not None:
        passes.append(quantize)
    if plugin:
        passes.append(EmitLowRankGemmPass())
    passes.append(RemoveUnusedNodesPass())
    return passes
