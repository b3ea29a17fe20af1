"""Peak resident memory of a command-line run, measured by the process itself.

``getrusage(...).ru_maxrss`` of a child counts the forking parent's memory too (the high-water
mark survives exec), so a child run through ``python -m lrcompile.tools.peak_memory ARGS...``
reports its own ``VmHWM`` (Linux; reset at exec) on stderr as ``lrcompile-peak-rss-kib N`` after
running ``lrcompile ARGS...``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lrcompile.profile import process_peak_kib

MARKER = "lrcompile-peak-rss-kib"


def own_peak_kib() -> int:
    """This process's peak resident memory (VmHWM, across the resets of the compile's per-stage
    profile), in KiB."""
    peak = process_peak_kib()
    if peak is None:
        status = Path("/proc/self/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    return peak


def measure(args: list[str]) -> tuple[int, float, str]:
    """Runs ``lrcompile ARGS`` in a fresh process: (exit code, peak MiB, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "lrcompile.tools.peak_memory", *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(rf"{MARKER} (\d+)", result.stderr)
    peak = int(match.group(1)) / 1024 if match else float("nan")
    return result.returncode, peak, result.stderr


def main() -> None:
    from lrcompile.cli import main as cli

    code = 0
    try:
        cli(sys.argv[1:], prog_name="lrcompile")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    print(f"{MARKER} {own_peak_kib()}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
