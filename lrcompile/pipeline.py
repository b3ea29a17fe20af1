"""The one place that chooses and orders the passes.

    factorize (plain, whitened, or with the ranks ``auto`` chose) -> cleanup

Before the passes, ``compile_model`` drops initializers from the graph inputs (old exporters list
weights as optional inputs, which ONNX Runtime lets a caller override, so they are no constants
until removed) and, when calibrating, gathers the statistics and runs the ``auto`` search that
configure the factorize pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrcompile import ranks
from lrcompile.config import CompileConfig
from lrcompile.passes.low_rank import FactorizeLowRankPass, ProgressCallback, SvdCache
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


def build_pipeline(factorize: FactorizeLowRankPass) -> list[ir.passes.PassBase]:
    """The passes in the order they must run, around the configured factorize pass."""
    return [factorize, RemoveUnusedNodesPass()]
