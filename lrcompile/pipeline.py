"""The one place that chooses and orders the passes: factorize -> cleanup."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from lrcompile import ranks
from lrcompile.config import CompileConfig
from lrcompile.passes.low_rank import FactorizeLowRankPass, ProgressCallback


def build_pipeline(
    config: CompileConfig, *, progress: ProgressCallback | None = None
) -> list[ir.passes.PassBase]:
    """The passes ``config`` asks for, in the order they must run.

    Raises:
        RankSpecError: The rank spec or the override file is invalid.
    """
    overrides = ranks.load_overrides(config.overrides) if config.overrides else ()
    return [
        FactorizeLowRankPass(
            rank=ranks.RankSpec.parse(config.rank),
            overrides=overrides,
            rank_multiple=config.rank_multiple,
            decomposition=config.decomposition,
            seed=config.seed,
            allow_no_saving=config.allow_no_saving,
            progress=progress,
        ),
        RemoveUnusedNodesPass(),
    ]
