"""``--rank auto`` on a real 0.5B causal LM: held-out quality, kept parameters, time, CPU latency.

Qwen2.5-Coder-0.5B-Instruct from its GGUF file, prepared by ``examples/llm/prepare.py`` (ONNX
export with external data, 32 x 256 calibration tokens, 16 x 256 held-out tokens from disjoint
texts). For each setting (KL tolerances, budgets) it compiles with ``--rank auto --metric kl
--batch-size 1`` and prints: kept weight parameters, compile time, held-out perplexity of the
dense and the compiled model, their KL and top-1 changes, and ONNX Runtime CPU prefill latency
(1 x 256). Each compile takes tens of minutes on 2 cores; pick settings with the flags.

    python benchmarks/llm.py WORKDIR [--tolerances 0.02 0.05 0.1] [--budgets 0.9 0.8]

WORKDIR holds lm.onnx, calib.npz and heldout.npz (``examples/llm/prepare.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import time
from pathlib import Path

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


def compile_one(workdir: Path, name: str, **options) -> tuple[Path, float, float]:
    """Compiles ``lm.onnx`` with ``options``: (output, kept parameter ratio, seconds); prints the
    stages' times and peak memory."""
    out = workdir / f"lm.{name}.onnx"
    start = time.perf_counter()
    memory = StageMemory()
    result = lrcompile.compile_model(
        workdir / "lm.onnx",
        out,
        rank="auto",
        calib=str(workdir / "calib.npz"),
        verify_data=str(workdir / "heldout.npz"),
        metric="kl",
        batch_size=1,
        progress=memory,
        **options,
    )
    for stage, seconds, rss, peak in memory.stages:
        print(
            f"  {name}: {stage:12s} from {seconds / 60:5.1f} min,"
            f" rss {rss} MiB, peak so far {peak} MiB"
        )
    print(f"  {name}: end, peak {_peak_mib()[1]} MiB; seconds {result.seconds}")
    print(f"  {name}: auto seconds {result.auto.seconds if result.auto else None}")
    if result.verification is not None:
        logits = result.verification.outputs[0]
        print(
            f"  {name}: held-out check KL {logits.kl}, top-1 {logits.top1}, passed {logits.passed}"
        )
    return out, result.totals.params_ratio, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--tolerances", type=float, nargs="*", default=[0.02, 0.05, 0.1])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.9, 0.8])
    args = parser.parse_args()
    evaluate = example_module("evaluate")
    settings = [(f"kl{t:g}", {"tolerance": t}) for t in args.tolerances]
    settings += [(f"budget{b:g}", {"budget": b, "tolerance": 1.0}) for b in args.budgets]
    header = f"{'setting':10s} {'params':>6s} {'min':>5s} {'ppl dense':>9s} {'ppl lr':>8s}"
    header += f" {'ratio':>6s} {'KL':>7s} {'top-1 chg':>9s} {'ms dense':>8s} {'ms lr':>7s}"
    rows = []
    for name, options in settings:
        out, kept, seconds = compile_one(args.workdir, name, **options)
        dense, compiled = evaluate.evaluate(
            args.workdir / "lm.onnx", out, args.workdir / "heldout.npz"
        )
        ratio = compiled["perplexity"] / dense["perplexity"]
        rows.append(
            f"{name:10s} {kept:6.3f} {seconds / 60:5.1f} {dense['perplexity']:9.3f}"
            f" {compiled['perplexity']:8.3f} {ratio:6.3f} {compiled['kl']:7.4f}"
            f" {compiled['top1_changed']:9.3f} {dense['latency_ms']:8.0f}"
            f" {compiled['latency_ms']:7.0f}"
        )
        print("\n".join([header, *rows]), flush=True)  # the table so far


if __name__ == "__main__":
    main()
