"""The one place that chooses and orders the passes.

    drop initializers from graph inputs -> factorize -> cleanup

Old exporters (``keep_initializers_as_inputs``) list weights as optional graph inputs; ONNX Runtime
lets a caller override them, so they are not constants until they are removed from the inputs.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass, RemoveUnusedNodesPass

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
        RemoveInitializersFromInputsPass(),
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
