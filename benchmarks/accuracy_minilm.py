"""Accuracy on the real all-MiniLM-L6-v2 at equal weight-parameter budgets.

For each budget (0.9, 0.75, 0.5 of the factorable weights' parameters):

- plain SVD, the same fraction for every layer (``--rank F``);
- activation-whitened SVD, the same fraction (``--rank F --calib calib.npz``);
- whitened SVD with the auto allocation at the same total parameters (``--rank auto --budget``
  with ``--objective params``, the budget being what the uniform model actually kept);
- with ``--compensate N``, the two whitened ones again with error compensation in N blocks
  (``+ comp``; auto's ranks are searched without it, then refitted).

Columns: held-out embedding cosine (mean, min), nearest-neighbour agreement among the held-out
sentences (excluding self), and the ONNX Runtime CPU speed ratio at batch 32 (interleaved
medians). Needs the demo extra.

    python benchmarks/accuracy_minilm.py [--budgets 0.9 0.75 0.5] [--compensate 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import lrcompile
from lrcompile.demo import metrics
from lrcompile.demo.minilm import embed, prepare
from lrcompile.runtime.sessions import create_session
from lrcompile.runtime.timing import interleaved_medians


def speed_ratio(original: Path, candidate: Path, heldout: dict[str, np.ndarray]) -> float:
    feed = {name: array[:32] for name, array in heldout.items()}
    sessions = [create_session(m, spinning=False) for m in (original, candidate)]
    dense, factored = interleaved_medians(
        [lambda s=s: s.run(None, feed) for s in sessions], budget_s=2.0
    )
    return dense / factored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    parser.add_argument("--compensate", type=int, default=0, metavar="BLOCKS")
    args = parser.parse_args()
    methods = ["plain uniform", "whitened uniform", "whitened auto"]
    if args.compensate:
        methods += ["whitened uniform + comp", "whitened auto + comp"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepared = prepare(folder)
        original, calib, heldout = prepared.model, prepared.calib, prepared.heldout_feeds()
        reference = embed(original, heldout)
        header = f"{'budget':>6} {'method':<22} {'params':>7} {'cos mean':>8} {'cos min':>8}"
        print(f"{header} {'NN agree':>8} {'speed':>6} {'compile s':>9}")
        for budget in args.budgets:
            uniform = None
            for method in methods:
                options = {"rank": str(budget), "verify": False}
                if method != "plain uniform":
                    options["calib"] = str(calib)
                if method.endswith("+ comp"):
                    options["compensate"] = args.compensate
                if method.startswith("whitened auto"):
                    options |= {
                        "rank": "auto",
                        "budget": uniform.totals.params_ratio,
                        "objective": "params",
                    }
                start = time.perf_counter()
                out = folder / f"{method.replace(' ', '_').replace('+', 'c')}_{budget}.onnx"
                result = lrcompile.compile_model(original, out, **options)
                seconds = time.perf_counter() - start
                if method == "whitened uniform":
                    uniform = result
                candidate = embed(out, heldout)
                cos = metrics.cosines(reference, candidate)
                agree = metrics.neighbour_agreement(reference, candidate)
                print(
                    f"{budget:>6.2f} {method:<22} {result.totals.params_ratio:>7.3f}"
                    f" {cos.mean():>8.4f} {cos.min():>8.4f} {agree:>8.3f}"
                    f" {speed_ratio(original, out, heldout):>6.2f} {seconds:>9.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
