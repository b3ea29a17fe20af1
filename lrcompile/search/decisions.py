"""The plan from the rank specs: one decision per weight group, before anything is rewritten.

    rank spec per group (the default, or its first matching override)
      + facts about its weight (finite? its spectrum, for ``energy:``; whitened?)
      + ``auto``'s ranks (``lrcompile.search.auto``), for groups whose spec is ``auto``
      -> Keep(reason) | Factor(rank, fit)

A group stays dense when an override says ``skip``, when its weight has other readers (its
factors would be added beside it, unless ``allow_no_saving``), when its weight holds NaN or Inf,
when its rank saves nothing (``r*(K+N) >= K*N``), or when ``auto`` leaves it dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from lrcompile.factors.quantized import CORRECTION_CACHE_RANK
from lrcompile.io import overrides as override_files
from lrcompile.numerics import ranks
from lrcompile.numerics.ranks import RankSpec
from lrcompile.passes.candidates import WeightGroup
from lrcompile.plan import Decision, Factor, Fit, Keep, Plan, Quantize, WeightPlan


@dataclasses.dataclass(frozen=True)
class WeightFacts:
    """What a decision needs to know of a weight beyond its shape and spec."""

    finite: bool = True
    spectrum: np.ndarray | None = None  # every singular value (of the whitened SVD when whitened)
    fit: Fit = "svd"


def rank_specs(
    groups: Sequence[WeightGroup],
    rank: RankSpec,
    overrides: Sequence[override_files.Override] = (),
) -> dict[str, RankSpec]:
    """Each group's spec by key: its first matching override (by weight or node name), else
    ``rank``."""
    return {
        group.key: override_files.resolve_spec(
            rank, overrides, [group.name, *(node.name or "" for node in group.nodes)]
        )
        for group in groups
    }


def refusal(
    group: WeightGroup, allow_no_saving: bool = False, quantized: bool = False
) -> str | None:
    """Why ``group`` stays dense whatever its rank, or None: its weight has other readers, so its
    factors (``quantized``: its integers) would be added beside it (unless ``allow_no_saving``)."""
    if quantized and set(group.other_readers) == {"Gather"}:
        return None  # a tied embedding: its Gathers will read int8 rows (``passes.embeddings``)
    if group.other_readers and not allow_no_saving:
        readers = ", ".join(group.other_readers)
        what, verb = ("integers", "quantizes") if quantized else ("factors", "factors")
        return (
            f"weight also read by {readers}: its {what} would be added beside it and the"
            f" model would grow (`allow_no_saving` {verb} it anyway)"
        )
    return None


def plan_weights(
    groups: Sequence[WeightGroup],
    specs: Mapping[str, RankSpec],
    facts: Mapping[str, WeightFacts],
    *,
    multiple: int = 16,
    allow_no_saving: bool = False,
    auto_ranks: Mapping[str, int | str | None] | None = None,
    quantize: Quantize | None = None,
) -> Plan:
    """The decision for every group (see the module docstring); ``facts`` by key (a group without
    facts is finite, plain, with no spectrum), ``auto_ranks`` by key (None: dense); with
    ``quantize`` (a template, its correction rank 0) every group is quantized, its rank spec
    giving the correction's rank (``facts`` then hold the residual's spectrum)."""
    return Plan(
        tuple(
            WeightPlan(
                group.key,
                str(specs[group.key]),
                decide(
                    group,
                    specs[group.key],
                    facts.get(group.key, WeightFacts()),
                    multiple=multiple,
                    allow_no_saving=allow_no_saving,
                    auto_rank=(auto_ranks or {}).get(group.key),
                    quantize=quantize,
                ),
            )
            for group in groups
        )
    )


def decide(
    group: WeightGroup,
    spec: RankSpec,
    facts: WeightFacts,
    *,
    multiple: int = 16,
    allow_no_saving: bool = False,
    auto_rank: int | str | None = None,
    quantize: Quantize | None = None,
) -> Decision:
    """One group's decision."""
    if spec.kind == "skip":
        return Keep("override says skip")
    reason = refusal(group, allow_no_saving, quantized=quantize is not None)
    if reason is not None:
        return Keep(reason)
    if not facts.finite:
        return Keep("weight contains NaN or Inf")
    k, n = group.shape
    if quantize is not None:
        return _quantized(spec, facts, k, n, multiple, auto_rank, quantize)
    if spec.kind == "auto":
        if auto_rank is None:
            return Keep("its error costs more than it saves (auto)")
        rank = auto_rank
    else:
        rank = ranks.choose_rank(spec, k, n, multiple=multiple, spectrum=facts.spectrum)
    if rank == 0:
        return Keep(f"{spec} of the layer is less than one rank multiple")
    if not (allow_no_saving or ranks.saves(rank, k, n)):
        even = ranks.break_even_rank(k, n)
        return Keep(f"rank {rank} saves nothing (break-even {even:.0f})", rank=rank)
    return Factor(rank, facts.fit)


def _quantized(spec, facts, k, n, multiple, auto_rank, template: Quantize) -> Decision:
    """``template`` with its correction's rank from ``spec`` (none: no correction); under
    ``auto`` the search's choice: dense (None), a correction rank, ``"int8"`` alone, or
    ``"w8a8"`` (int8 per channel times dynamically quantized activations)."""
    if spec.kind == "auto" and auto_rank is None:
        return Keep("its quantization error costs more than it saves (auto)")
    if auto_rank in ("int8", "w8a8"):
        return dataclasses.replace(template, bits=8, group=None, dynamic=auto_rank == "w8a8")
    if spec.kind == "none":
        rank = 0
    elif spec.kind == "auto":
        rank = auto_rank
    else:
        rank = ranks.choose_rank(spec, k, n, multiple=multiple, spectrum=facts.spectrum)
    rank = min(rank, CORRECTION_CACHE_RANK, k, n)
    return dataclasses.replace(template, correction=rank, fit=facts.fit if rank else "svd")


def uses_auto(specs: Mapping[str, RankSpec]) -> bool:
    """Whether any group's spec is ``auto``."""
    return any(spec.kind == "auto" for spec in specs.values())


@dataclasses.dataclass(frozen=True)
class Planner:
    """The plan for any ``auto`` ranks: what the search's candidates and the output share."""

    groups: Sequence[WeightGroup]
    specs: Mapping[str, RankSpec]
    facts: Mapping[str, WeightFacts]
    multiple: int = 16
    allow_no_saving: bool = False
    quantize: Quantize | None = None

    def __call__(self, auto_ranks: Mapping[str, int | str | None] | None = None) -> Plan:
        return plan_weights(
            self.groups,
            self.specs,
            self.facts,
            multiple=self.multiple,
            allow_no_saving=self.allow_no_saving,
            auto_ranks=auto_ranks,
            quantize=self.quantize,
        )

    def only(self, key: str, rank: int) -> Plan:
        """The plan that factors the group ``key`` alone at ``rank`` (if it may be factored)."""
        return self({key: rank}).only([key])
