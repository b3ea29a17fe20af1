"""Graph passes, one transformation per module; ``lrcompile.pipeline`` orders them."""

from lrcompile.passes.low_rank import FactorizeLowRankPass

__all__ = ["FactorizeLowRankPass"]
