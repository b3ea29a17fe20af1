"""Accuracy per cost: plain SVD, whitened uniform, and auto (FLOPs, measured latency) at budgets.

For each budget B (default 0.9, 0.8, 0.6):

- ``plain uniform``: plain SVD, the same fraction for every layer (``--rank B``);
- ``whitened uniform``: activation-whitened SVD, the same fraction (``--rank B --calib``);
- ``auto flops``: ``--rank auto`` (whitened, sensitivity-scaled allocation, measured end to end)
  at the FLOPs the whitened uniform model actually kept (MiniLM; B on the LM), ``--budget``;
- ``auto latency``: ``--rank auto --objective latency --budget B``: B of the searched layers'
  latency measured on ONNX Runtime CPU at the calibration batches' rows; layers whose factored
  form is not faster stay dense;
- ``auto flops, all rows`` (MiniLM, whose batches are padded): ``auto flops`` with
  ``--padding-mask ""``, the statistics of every row, padding included, as before padding was
  left out;
- MiniLM with ``--compensate N``: the whitened ones again with error compensation in N blocks.

Every row is measured on held-out data: MiniLM's held-out sentences (embedding cosine mean and
min, nearest-neighbour agreement among them, excluding self), the LM's held-out texts (perplexity
ratio, mean KL of the next-token distributions, nats). ``speed`` is the whole model on ONNX
Runtime CPU, original over compiled (median of interleaved runs without thread spinning), on one
calibration-shaped batch (MiniLM 8 x 24 tokens, the LM 1 x 256), the rows the latency table is
measured at. ``flops`` is the predicted FLOP ratio of the factorable weights.

    python benchmarks/accuracy.py minilm [--budgets 0.9 0.8 0.6] [--compensate 6]
    python benchmarks/accuracy.py lm WORKDIR [--budgets ...] [--methods "plain uniform" ...]

The LM (WORKDIR from ``examples/llm/prepare.py``) takes hours on 2 cores: each uniform method is a
compile per budget; the auto ones share one ``compile_sweep``.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np

import lrcompile
from lrcompile.demo import metrics
from lrcompile.demo.minilm import embed, prepare
from lrcompile.runtime.latency import model_latencies

METHODS = ("plain uniform", "whitened uniform", "auto flops", "auto latency")
EVERY_ROW = "auto flops, all rows"  # MiniLM only: the LM has no padding
HEADER = f"{'budget':>6} {'method':<24} {'params':>6} {'flops':>6}"


def speed(original: Path, candidate: Path, feed: dict[str, np.ndarray]) -> float:
    [[dense, compiled]] = model_latencies([original, candidate], [feed], budget_s=3.0)
    return dense / compiled


def options_for(method: str, budget: float, calib: Path) -> dict:
    """The ``compile_model`` options of ``method`` at ``budget``."""
    if method == "plain uniform":
        return {"rank": str(budget)}
    options = {"rank": str(budget), "calib": str(calib)}
    auto = {"rank": "auto", "budget": budget, "tolerance": 1.0}
    extra = {
        "auto flops": auto | {"objective": "flops"},
        "auto latency": auto | {"objective": "latency"},
        EVERY_ROW: auto | {"objective": "flops", "padding_mask": ""},
    }
    return options | extra.get(method, {})


def minilm(args) -> None:
    methods = list(args.methods or [*METHODS, EVERY_ROW])
    if args.compensate:
        methods += ["whitened uniform + comp", "auto flops + comp"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepared = prepare(folder)
        original, calib, heldout = prepared.model, prepared.calib, prepared.heldout_feeds()
        feed = {name: array[:8] for name, array in np.load(calib).items()}
        reference = embed(original, heldout)
        print(f"{HEADER} {'cos mean':>8} {'cos min':>8} {'NN agree':>8} {'speed':>6} {'s':>5}")
        for budget in args.budgets:
            uniform_flops = budget
            for method in methods:
                options = options_for(method.removesuffix(" + comp"), budget, calib)
                if method.startswith("auto flops"):
                    options["budget"] = uniform_flops  # equal FLOPs to whitened uniform
                if method.endswith("+ comp"):
                    options["compensate"] = args.compensate
                start = time.perf_counter()
                out = folder / f"{method.replace(' ', '_').replace('+', 'c')}_{budget}.onnx"
                result = lrcompile.compile_model(original, out, verify=False, **options)
                seconds = time.perf_counter() - start
                if method == "whitened uniform":
                    uniform_flops = result.totals.flop_ratio
                candidate = embed(out, heldout)
                cos = metrics.cosines(reference, candidate)
                agree = metrics.neighbour_agreement(reference, candidate)
                print(
                    f"{budget:>6.2f} {method:<24} {result.totals.params_ratio:>6.3f}"
                    f" {result.totals.flop_ratio:>6.3f} {cos.mean():>8.4f} {cos.min():>8.4f}"
                    f" {agree:>8.3f} {speed(original, out, feed):>6.2f} {seconds:>5.0f}",
                    flush=True,
                )


def _example(name: str):
    path = Path(__file__).resolve().parents[1] / "examples" / "llm" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"llm_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lm(args) -> None:
    evaluate, workdir = _example("evaluate"), args.workdir
    original, calib = workdir / "lm.onnx", workdir / "calib.npz"
    ids = np.load(workdir / "heldout.npz")["input_ids"]
    feed = {"input_ids": np.load(calib)["input_ids"][:1]}
    print(f"{HEADER} {'ppl':>6} {'KL':>7} {'top-1 chg':>9} {'speed':>6} {'min':>5}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lrcompile-eval-") as scratch:
        dense = evaluate.run(original, ids, Path(scratch), reference=True)

        def report(budget, method, out, result, seconds):
            compiled = evaluate.run(out, ids, Path(scratch), reference=False)
            print(
                f"{budget:>6.2f} {method:<24} {result.totals.params_ratio:>6.3f}"
                f" {result.totals.flop_ratio:>6.3f}"
                f" {compiled['perplexity'] / dense['perplexity']:>6.3f} {compiled['kl']:>7.4f}"
                f" {compiled['top1_changed']:>9.3f} {speed(original, out, feed):>6.2f}"
                f" {seconds / 60:>5.1f}",
                flush=True,
            )

        uniform = [m for m in args.methods if not m.startswith("auto")]
        for budget in args.budgets:
            for method in uniform:
                out = workdir / f"lm.{method.replace(' ', '_')}{budget:g}.onnx"
                start = time.perf_counter()
                options = options_for(method, budget, calib) | {"batch_size": 1}
                result = lrcompile.compile_model(original, out, verify=False, **options)
                report(budget, method, out, result, time.perf_counter() - start)
        automatic = [m for m in args.methods if m.startswith("auto")]
        if not automatic:
            return
        settings = {
            workdir / f"lm.{m.replace(' ', '_')}{b:g}.onnx": (b, m, options_for(m, b, calib))
            for b in args.budgets
            for m in automatic
        }
        varied = {
            out: {"budget": o["budget"], "objective": o["objective"]}
            for out, (*_, o) in settings.items()
        }
        sweep = lrcompile.compile_sweep(
            original, varied, rank="auto", calib=str(calib), tolerance=1.0, metric="kl",
            batch_size=1, verify=False,
        )  # fmt: skip
        mark = time.perf_counter()
        for out, result in sweep:
            budget, method, _ = settings[out]
            report(budget, method, out, result, time.perf_counter() - mark)
            mark = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "lm"))
    parser.add_argument("workdir", type=Path, nargs="?", help="lm: from examples/llm/prepare.py")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, EVERY_ROW])
    parser.add_argument("--compensate", type=int, default=0, metavar="BLOCKS", help="minilm")
    args = parser.parse_args()
    if args.model == "lm" and args.workdir is None:
        parser.error("lm needs WORKDIR (examples/llm/prepare.py writes it)")
    if args.model == "lm":
        args.methods = args.methods or list(METHODS)
    (minilm if args.model == "minilm" else lm)(args)


if __name__ == "__main__":
    main()
