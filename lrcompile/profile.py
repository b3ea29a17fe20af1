"""Where a compile spends its time and memory: seconds and peak resident memory per stage.

``with profile("calibrate"): ...`` adds the stage's wall-clock seconds, exclusive of the stages
nested in it (a nested stage pauses the one around it), and its peak resident memory: on Linux
the kernel's high-water mark (``VmHWM``) is reset when a stage starts (``/proc/self/clear_refs``)
and read when it ends, so each stage reports its own peak, not the process's so far. Elsewhere
the peaks are left out. ``process_peak_kib`` is the whole process's peak despite the resets.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PEAK = [0]  # the highest VmHWM read before any reset, in KiB


def _high_water_kib() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_high_water() -> None:
    peak = _high_water_kib()
    if peak is None:
        return
    _PEAK[0] = max(_PEAK[0], peak)
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size


def process_peak_kib() -> int | None:
    """This process's peak resident memory in KiB, across the stages' resets (None off Linux)."""
    peak = _high_water_kib()
    return None if peak is None else max(peak, _PEAK[0])


class Profile:
    """Seconds and peak resident MiB per stage, from ``seconds`` and ``peaks`` on."""

    def __init__(
        self, seconds: dict[str, float] | None = None, peaks: dict[str, float] | None = None
    ) -> None:
        self.seconds: dict[str, float] = dict(seconds or {})
        self.peaks: dict[str, float] = dict(peaks or {})  # MiB
        self._stack: list[str] = []
        self._since = 0.0

    def copy(self) -> Profile:
        return Profile(self.seconds, self.peaks)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.seconds and stage not in self._stack:
            logger.info("%s ...", stage)  # with -v, a long compile says where it is
        self._pause()
        self._stack.append(stage)
        try:
            yield
        finally:
            self._pause()
            self._stack.pop()

    def _pause(self) -> None:
        """Credits the running stage (if any) with its time and peak since it last resumed."""
        now = time.perf_counter()
        if self._stack:
            stage = self._stack[-1]
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._since
            peak = _high_water_kib()
            if peak is not None:
                self.peaks[stage] = max(self.peaks.get(stage, 0.0), peak / 1024)
        _reset_high_water()
        self._since = time.perf_counter()

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"seconds": dict(self.seconds), "peak_mib": dict(self.peaks)}
