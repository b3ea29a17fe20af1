"""``--rank auto`` on a real 0.5B causal LM: held-out quality, kept parameters, time, CPU latency.

Qwen2.5-Coder-0.5B-Instruct from its GGUF file, prepared by ``examples/llm/prepare.py`` (ONNX
export with external data, 32 x 256 calibration tokens, 16 x 256 held-out tokens from disjoint
texts). It compiles every setting (KL tolerances, budgets) with ``--rank auto --metric kl
--batch-size 1`` in one ``lrcompile.compile_sweep`` (calibration, factors and sensitivities once,
then each setting's search, output and check) and prints: kept weight parameters, the compile
time of each setting alone (``min``, shared stages included) and what it added to the sweep
(``+min``; the first setting's includes the shared stages), held-out perplexity of the dense
and the compiled model, their KL and top-1 changes, and ONNX Runtime CPU prefill latency
(1 x 256). The shared stages take tens of minutes
on 2 cores, each setting several more; pick settings with the flags.

    python benchmarks/llm.py WORKDIR [--tolerances 0.02 0.05 0.1] [--budgets 0.9 0.8]
        [--latency-budgets 0.9 0.8 0.6]    # budgets of measured latency (--objective latency)

WORKDIR holds lm.onnx, calib.npz and heldout.npz (``examples/llm/prepare.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import tempfile
import time
from pathlib import Path

import numpy as np

import lrcompile

_EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "llm"


def example_module(name: str):
    """``examples/llm/NAME.py``, imported (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"llm_{name}", _EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_mib() -> tuple[int, int]:
    """(resident now, peak so far) of this process, MiB."""
    status = Path("/proc/self/status").read_text()
    return tuple(
        int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) // 1024 for key in ("VmRSS", "VmHWM")
    )


class StageMemory:
    """The peak resident memory when each stage of the compile began (a progress callback)."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float, int, int]] = []  # (stage, seconds, rss, peak)
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        if not self.stages or self.stages[-1][0] != stage:
            self.stages.append((stage, time.perf_counter() - self.start, *_peak_mib()))


def settings_of(tolerances, budgets, latency_budgets=()) -> dict[str, dict]:
    """Setting name -> the ``compile_sweep`` fields it varies."""
    settings = {f"kl{t:g}": {"tolerance": t} for t in tolerances}
    settings |= {f"budget{b:g}": {"budget": b, "tolerance": 1.0} for b in budgets}
    latency = {"tolerance": 1.0, "objective": "latency"}
    return settings | {f"latency{b:g}": {"budget": b} | latency for b in latency_budgets}


def report_compile(name: str, result, memory: StageMemory, shown: int) -> int:
    """Prints the stages (with peak memory) since the ``shown``-th, the seconds and the check;
    returns how many stages are shown now."""
    for stage, seconds, rss, peak in memory.stages[shown:]:
        print(
            f"  {name}: {stage:12s} from {seconds / 60:5.1f} min,"
            f" rss {rss} MiB, peak so far {peak} MiB"
        )
    print(f"  {name}: peak {_peak_mib()[1]} MiB so far; seconds {result.seconds}")
    print(f"  {name}: auto seconds {result.auto.seconds}")
    if result.auto.latency is not None:
        print(f"  {name}: latency {result.auto.latency.to_dict()}")
    if result.verification is not None:
        logits = result.verification.outputs[0]
        print(
            f"  {name}: held-out check KL {logits.kl}, top-1 {logits.top1}, passed {logits.passed}"
        )
    return len(memory.stages)


HEADER = (
    f"{'setting':10s} {'params':>6s} {'min':>5s} {'+min':>5s} {'ppl dense':>9s} {'ppl lr':>8s}"
    f" {'ratio':>6s} {'KL':>7s} {'top-1 chg':>9s} {'ms dense':>8s} {'ms lr':>7s}"
)


def row(name: str, result, wall: float, dense: dict, compiled: dict) -> str:
    """One line of the table: ``min`` is the compile alone (shared stages included), ``+min``
    what it added to the sweep."""
    alone = sum(result.seconds.values())
    return (
        f"{name:10s} {result.totals.params_ratio:6.3f} {alone / 60:5.1f} {wall / 60:5.1f}"
        f" {dense['perplexity']:9.3f} {compiled['perplexity']:8.3f}"
        f" {compiled['perplexity'] / dense['perplexity']:6.3f} {compiled['kl']:7.4f}"
        f" {compiled['top1_changed']:9.3f} {dense['latency_ms']:8.0f}"
        f" {compiled['latency_ms']:7.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--tolerances", type=float, nargs="*", default=[0.02, 0.05, 0.1])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.9, 0.8])
    parser.add_argument(
        "--latency-budgets", type=float, nargs="*", default=[], help="--objective latency"
    )
    args = parser.parse_args()
    evaluate, workdir = example_module("evaluate"), args.workdir
    settings = settings_of(args.tolerances, args.budgets, args.latency_budgets)
    ids = np.load(workdir / "heldout.npz")["input_ids"]
    with tempfile.TemporaryDirectory(prefix="lrcompile-eval-") as scratch:
        dense = evaluate.run(workdir / "lm.onnx", ids, Path(scratch), reference=True)
        memory, rows, shown = StageMemory(), [], 0
        start = mark = time.perf_counter()
        sweep = lrcompile.compile_sweep(
            workdir / "lm.onnx",
            {workdir / f"lm.{name}.onnx": options for name, options in settings.items()},
            rank="auto",
            calib=str(workdir / "calib.npz"),
            verify_data=str(workdir / "heldout.npz"),
            metric="kl",
            batch_size=1,
            progress=memory,
        )
        for name, (out, result) in zip(settings, sweep, strict=True):
            wall = time.perf_counter() - mark
            shown = report_compile(name, result, memory, shown)
            compiled = evaluate.run(out, ids, Path(scratch), reference=False)
            rows.append(row(name, result, wall, dense, compiled))
            print("\n".join([HEADER, *rows]), flush=True)  # the table so far
            mark = time.perf_counter()
    print(f"sweep: {(time.perf_counter() - start) / 60:.1f} min with the held-out evaluations")


if __name__ == "__main__":
    main()
