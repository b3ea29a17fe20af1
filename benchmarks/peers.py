"""Peers: lrcompile beside ONNX Runtime's own ``quantize_dynamic``, same data, machine and process.

    python benchmarks/peers.py minilm                    # the demo's model, ~5 minutes
    python benchmarks/peers.py lm lm/ [--compiled lm/lm.lr.onnx]   # the 0.5B LM of examples/llm

MiniLM: the demo's export, calibration and held-out sentences (``lrcompile.demo.minilm``);
``lrcompile demo`` (``--quantize int8 --rank auto``, tolerance 0.1) against ``quantize_dynamic``
(int8 weights, per channel, its default ops: the embedding Gather too); held-out embedding
cosine to the original (mean / min), file MB, ONNX Runtime CPU latency at batch 1 and 32
(interleaved medians, sessions without thread spinning).

LM: the dense ``lm/lm.onnx`` of ``examples/llm/prepare.py``, a compiled one (by default lrcompile
``--rank auto --budget 0.9`` at the LM benchmark's options, compiled here), and ``quantize_dynamic``
(int8 weights, per channel, its default ops: the embedding Gather too);
held-out perplexity ratio to the dense model, mean KL, top-1 changes, weight bytes, prefill
latency at 1 x 256 (``examples/llm/evaluate.py``'s measures).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from lrcompile.demo.minilm import megabytes
from lrcompile.demo.minilm import quantize_dynamic as quantize

HERE = Path(__file__).resolve().parent


def minilm(workdir: Path) -> None:
    from lrcompile.demo import metrics
    from lrcompile.demo.minilm import embed, run_demo
    from lrcompile.runtime.latency import model_latencies

    demo = run_demo(workdir, tolerance=0.1, latency_budget_s=0.2)
    dense, compiled = workdir / "minilm.onnx", demo.compile.output_path
    int8 = quantize(dense, workdir / "minilm.int8.onnx")
    heldout = dict(np.load(workdir / "heldout.npz"))
    reference = embed(dense, heldout)
    feeds = [{k: v[:batch] for k, v in heldout.items()} for batch in (1, 32)]
    times = model_latencies([dense, compiled, int8], feeds, budget_s=3.0)
    print(f"{'variant':<34} {'cos mean':>8} {'cos min':>8} {'MB':>6} {'x b1':>5} {'x b32':>5}")
    rows = [("dense fp32", dense), ("lrcompile demo (int8 auto, tol 0.1)", compiled),
            ("quantize_dynamic int8 per-channel", int8)]  # fmt: skip
    for index, (name, path) in enumerate(rows):
        cos = metrics.cosines(reference, embed(path, heldout))
        speed = [row[0] / row[index] for row in times]
        print(f"{name:<34} {cos.mean():8.4f} {cos.min():8.4f} {megabytes(path):6.1f}"
              f" {speed[0]:5.2f} {speed[1]:5.2f}")  # fmt: skip


def lm(folder: Path, compiled: Path | None, workdir: Path) -> None:
    import lrcompile

    sys.path.insert(0, str(HERE.parent / "examples" / "llm"))
    from evaluate import evaluate

    dense = folder / "lm.onnx"
    if compiled is None:
        compiled = workdir / "lm.lr.onnx"
        lrcompile.compile_model(
            dense, compiled, rank="auto", budget=0.9, calib=str(folder / "calib.npz"),
            batch_size=1, metric="kl", tolerance=1.0, verify=False,
        )  # fmt: skip
    int8 = quantize(dense, workdir / "lm.int8.onnx", external=True)
    heldout = folder / "heldout.npz"
    print(f"{'variant':<34} {'ppl':>8} {'ratio':>6} {'KL':>7} {'top1 chg':>8} {'GB':>5} {'ms':>7}")
    reference = None
    for name, path in (("dense fp32", dense), ("lrcompile auto, budget 0.9", compiled),
                       ("quantize_dynamic int8 per-channel", int8)):  # fmt: skip
        ref, row = evaluate(dense, path, heldout)
        reference = reference or ref
        print(f"{name:<34} {row['perplexity']:8.3f} {row['perplexity'] / ref['perplexity']:6.3f}"
              f" {row['kl']:7.4f} {row['top1_changed']:8.3f} {megabytes(path) / 1e3:5.2f}"
              f" {row['latency_ms']:7.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "lm"))
    parser.add_argument("folder", nargs="?", type=Path, help="lm: examples/llm/prepare.py's folder")
    parser.add_argument("--compiled", type=Path, help="lm: an lrcompile output to compare")
    args = parser.parse_args()
    import onnxruntime

    print(
        f"{platform.machine()}, {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="lrcompile-peers-") as workdir:
        if args.model == "minilm":
            minilm(Path(workdir))
        else:
            lm(args.folder, args.compiled, Path(workdir))


if __name__ == "__main__":
    main()
