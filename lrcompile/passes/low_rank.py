"""Factor the weights the plan factors: each group's nodes read two low-rank factors instead.

    MatMul(x, W[K,N])        -> MatMul(MatMul(x, A[K,r]), B[r,N])
    Gemm(a, W, C; alpha, tA, tB) -> Gemm(Gemm(a, A; tA), B, C; beta)   (A B ~= alpha * op(W))

The pass takes the plan (``lrcompile.plan``: its ``Factor`` decisions) and the factors the provider
computed (``lrcompile.factors.provider``: named tensors, in the weight's dtype, in memory or
spilled), and only rewrites the graph (``lrcompile.passes.factored_graph``). Nodes sharing a weight
share its factors; the last node keeps the original output name, so the model's signature is
unchanged. Other decisions (``Keep``) leave their nodes as they are.

Preconditions: every factored group is a candidate of the model (``passes.candidates``) with
factors of its shape, whose names the graph does not hold yet. Runs first in the pipeline; the
cleanup pass then drops the dense weights left unused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import onnx_ir as ir

from lrcompile.passes.candidates import WeightGroup, find_candidates
from lrcompile.passes.factored_graph import rewrite_group
from lrcompile.plan import Plan

# (A, B): the factor tensors of one group, named as they are stored.
FactorPair = tuple[ir.TensorProtocol, ir.TensorProtocol]


@dataclasses.dataclass(frozen=True)
class FactorizeLowRankPass(ir.passes.InPlacePass):
    """Replaces ``MatMul(x, W)`` by ``MatMul(MatMul(x, A), B)`` for each weight ``plan`` factors."""

    plan: Plan
    factors: Mapping[str, FactorPair] = dataclasses.field(repr=False)

    def requires(self, model: ir.Model) -> None:
        groups = {group.key: group for group in _candidates(model)}
        names = set(model.graph.initializers)
        for key, decision in self.plan.factored.items():
            if key not in groups:
                raise ir.passes.PreconditionError(f"the plan factors {key!r}, not in the model")
            if key not in self.factors:
                raise ir.passes.PreconditionError(f"no factors given for {key!r}")
            left, right = self.factors[key]
            k, n = groups[key].shape
            shapes = (tuple(left.shape), tuple(right.shape))
            if shapes != ((k, decision.rank), (decision.rank, n)):
                raise ir.passes.PreconditionError(
                    f"factors of {key!r} are {shapes}, expected rank {decision.rank} of {k}x{n}"
                )
            taken = {left.name, right.name} & names
            if taken:
                raise ir.passes.PreconditionError(f"initializer names {taken} already exist")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        factored = self.plan.factored
        targets = [group for group in _candidates(model) if group.key in factored]
        for group in targets:
            rewrite_group(model.graph, group, *self.factors[group.key])
        return ir.passes.PassResult(model, modified=bool(targets))

    def ensures(self, model: ir.Model) -> None:
        left = {group.key for group in _candidates(model)} & set(self.plan.factored)
        if left:
            raise ir.passes.PostconditionError(f"groups {sorted(left)} still read their weight")


def _candidates(model: ir.Model) -> list[WeightGroup]:
    groups, _ = find_candidates(model.graph, model.functions.values())
    return groups
