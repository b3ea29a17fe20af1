"""Rank specs and the rank each spec gives a layer: plain numerics.

Per-layer override files are read by ``lrcompile.io.overrides``.

Specs, as the user writes them:

- ``64``: a fixed rank (rounded UP to the rank multiple, so never less accurate than asked);
- ``0.5``: the fraction of the layer's weight parameters kept, ``r = floor(f*K*N/(K+N))``
  (rounded DOWN to the multiple, so never over the budget);
- ``energy:0.95``: the smallest rank keeping that fraction of the squared singular values
  (rounded UP);
- ``auto``: the rank the calibrated search (``lrcompile.search.auto``) allocates to the layer;
- ``skip`` (overrides only): leave the layer dense;
- ``none`` (no spec given, with weight quantization): no low-rank correction.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import numpy as np

from lrcompile.errors import RankSpecError

SpecKind = Literal["fixed", "fraction", "energy", "auto", "skip", "none"]
SPEC_HELP = (
    "an integer rank (64), a fraction of parameters kept (0.5), energy:F (energy:0.95) or auto"
)
_ENERGY = re.compile(r"^energy:(.+)$")


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """How to choose one layer's rank."""

    kind: SpecKind
    value: float = 0.0

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.value))
        if self.kind == "energy":
            return f"energy:{self.value:g}"
        if self.kind in ("skip", "auto", "none"):
            return self.kind
        return f"{self.value:g}"

    @property
    def needs_spectrum(self) -> bool:
        """Whether choosing the rank needs every singular value of the weight."""
        return self.kind == "energy"

    @classmethod
    def parse(cls, text: str | float, *, allow_skip: bool = False) -> RankSpec:
        """Parses ``64``, ``0.5``, ``energy:0.95`` (and ``skip`` where allowed).

        Raises:
            RankSpecError: The text is none of those.
        """
        if isinstance(text, bool):
            raise RankSpecError(f"invalid rank spec {text!r}: expected {SPEC_HELP}")
        if isinstance(text, int):
            return cls._fixed(text, str(text))
        if isinstance(text, float):
            return cls._fraction(text, str(text))
        raw = str(text).strip()
        if raw == "auto":
            return cls("auto")
        if raw == "skip":
            if allow_skip:
                return cls("skip")
            raise RankSpecError("rank spec 'skip' is only valid in a per-layer override file")
        match = _ENERGY.match(raw)
        if match:
            return cls("energy", _unit_interval(match.group(1), raw))
        if re.fullmatch(r"[+-]?\d+", raw):
            return cls._fixed(int(raw), raw)
        try:
            return cls._fraction(float(raw), raw)
        except ValueError:
            raise RankSpecError(f"invalid rank spec {raw!r}: expected {SPEC_HELP}") from None

    @classmethod
    def _fixed(cls, rank: int, raw: str) -> RankSpec:
        if rank < 1:
            raise RankSpecError(f"invalid rank spec {raw!r}: a fixed rank must be >= 1")
        return cls("fixed", float(rank))

    @classmethod
    def _fraction(cls, fraction: float, raw: str) -> RankSpec:
        return cls("fraction", _unit_interval(fraction, raw))


def break_even_rank(k: int, n: int) -> float:
    """The rank at which ``r*(K+N) == K*N``: factoring at this rank or above saves nothing."""
    return k * n / (k + n)


def saves(rank: int, k: int, n: int) -> bool:
    """Whether rank ``rank`` stores (and computes) strictly less than the dense ``K x N``."""
    return rank * (k + n) < k * n


def choose_rank(
    spec: RankSpec,
    k: int,
    n: int,
    *,
    multiple: int = 16,
    spectrum: np.ndarray | None = None,
) -> int:
    """The rank ``spec`` gives a ``K x N`` weight, rounded to ``multiple`` and clamped to min(K, N);
    0 when a fraction's budget holds less than one ``multiple`` (the layer then stays dense).

    Args:
        spec: A fixed, fraction or energy spec.
        k: Rows of the weight (input features).
        n: Columns of the weight (output features).
        multiple: Ranks are multiples of this (1 disables rounding).
        spectrum: All singular values, largest first; required for energy specs.
    """
    full = min(k, n)
    if spec.kind == "fixed":
        rank = _round_up(int(spec.value), multiple)
    elif spec.kind == "fraction":
        # Never over the budget: 0 (stay dense) when not even one multiple fits in it.
        rank = _round_down(math.floor(spec.value * k * n / (k + n)), multiple)
        if rank == 0:
            return 0
    elif spec.kind == "energy":
        if spectrum is None:
            raise ValueError("an energy spec needs the singular values")
        energy = np.cumsum(np.square(spectrum, dtype=np.float64))
        if energy[-1] == 0.0:
            return min(full, multiple)
        needed = int(np.searchsorted(energy, spec.value * energy[-1] * (1 - 1e-12))) + 1
        rank = _round_up(needed, multiple)
    else:
        raise ValueError(f"spec {spec} gives no rank")
    return max(1, min(rank, full))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _round_down(value: int, multiple: int) -> int:
    return value // multiple * multiple


def _unit_interval(value: str | float, raw: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise RankSpecError(f"invalid rank spec {raw!r}: expected {SPEC_HELP}") from None
    if not 0.0 < number <= 1.0 or math.isnan(number):
        raise RankSpecError(f"invalid rank spec {raw!r}: the fraction must be in (0, 1]")
    return number
