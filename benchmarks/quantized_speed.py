"""What the correction costs at run time, and what sharing its first MatMul saves.

    python benchmarks/quantized_speed.py [--layers 4] [--hidden 896] [--ffn 4864]

An LM-shaped model built in code (``lrcompile.tools.synthetic.lm_like``: the 0.5B LM's layer
widths, fewer layers, a small vocabulary) compiled four ways: dense fp32, ``--quantize int4``
alone, int4 with a rank-16 correction per layer, and the same with the first MatMuls of the
corrections that read one input shared (``--share-first-factor``). Timed on ONNX Runtime CPU at
its default optimisation (MatMulNBits), 1 x 1 tokens (decode-sized, no KV cache) and 1 x 256
(prefill), interleaved medians, no thread spinning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import lrcompile
from lrcompile.runtime.sessions import create_session
from lrcompile.tools.synthetic import lm_like

VOCAB = 2000


def compile_all(folder: Path, args) -> dict[str, Path]:
    model = lm_like(folder, layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=VOCAB)
    calib = folder / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, VOCAB, (8, 32)))
    options = {"quantize": "int4", "calib": str(calib), "verify": False}
    paths = {"dense fp32": model}
    paths["int4 g32"] = lrcompile.compile_model(model, folder / "q.onnx", **options).output_path
    paths["int4 g32 + r16"] = lrcompile.compile_model(
        model, folder / "u.onnx", rank="16", **options
    ).output_path
    paths["int4 g32 + r16, --share-first-factor"] = lrcompile.compile_model(
        model, folder / "s.onnx", rank="16", share_first_factor=True, **options
    ).output_path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--ffn", type=int, default=4864)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrcompile-qspeed-") as folder:
        paths = compile_all(Path(folder), args)
        sessions = {name: create_session(path, spinning=False) for name, path in paths.items()}
        print("| variant | 1 x 1 ms | x | 1 x 256 ms | x |\n|---|---|---|---|---|")
        medians = {}
        for length, repeats in ((1, 200), (256, 10)):
            feed = {"input_ids": np.ones((1, length), np.int64)}
            times = {name: [] for name in sessions}
            for session in sessions.values():
                session.run(None, feed)
            for _ in range(repeats):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[name].append(time.perf_counter() - start)
            medians[length] = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        for name in sessions:
            row = [
                (medians[n][name], medians[n]["dense fp32"] / medians[n][name]) for n in (1, 256)
            ]
            print(f"| {name} | {row[0][0]:.2f} | x{row[0][1]:.2f} | {row[1][0]:.1f} |"
                  f" x{row[1][1]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
