"""Scale: compile time and peak memory on a generated transformer-shaped model with external data,
and ONNX Runtime CPU latency of the result.

The model (built here, never checked in): per layer q, k, v, o (hidden x hidden) and up, down
(hidden x ffn) MatMuls, fp16, external data. The full size of the issue (32 layers, 4096/11008)
is ~13 GB and hours of exact SVDs on 2 cores; the default is scaled down to minutes.

    python benchmarks/scale.py                                 # 4 layers, 2048 / 5504 (~300 MB)
    python benchmarks/scale.py --layers 32 --hidden 4096 --ffn 11008     # the real thing

Tables: (1) compile at --rank 0.5: exact vs randomized SVD, 1 vs 2 jobs, and with calibration
(whitened SVD), each a fresh process (seconds, peak RSS from the kernel's VmHWM); (2) ORT CPU
latency of one layer in fp32, original vs compressed, at a few sequence lengths, next to the
predicted FLOP ratio.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lrcompile.runtime.latency import model_latencies
from lrcompile.tools import peak_memory
from lrcompile.tools.synthetic import transformer_like


def compile_table(folder: Path, layers: int, hidden: int, ffn: int) -> None:
    one = folder / "one"
    one.mkdir()
    single = transformer_like(one, 1, hidden, ffn)
    model = transformer_like(folder, layers, hidden, ffn)
    size = (folder / "model.onnx.data").stat().st_size / 2**20
    calib = folder / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.standard_normal((16, 8, hidden)).astype(np.float16))
    print(f"model: {layers} layers, hidden {hidden}, ffn {ffn}, fp16, {size:.0f} MiB external data")
    print("fixed overhead: the peak of compiling ONE such layer (libraries, BLAS buffers, the")
    print("largest layer's SVD working set); memory bound: peak - overhead < 0.25 x model")
    header = f"{'variant':<30} {'seconds':>8} {'peak MiB':>9} {'1-layer MiB':>11}"
    print(f"{header} {'(peak-1L)/model':>15}")
    variants = {
        "exact SVD, 1 job": ["--decomposition", "exact", "--jobs", "1"],
        "randomized SVD, 1 job": ["--decomposition", "randomized", "--jobs", "1"],
        "randomized SVD, 2 jobs": ["--decomposition", "randomized", "--jobs", "2"],
        "calibrated (whitened), 1 job": ["--calib", str(calib), "--jobs", "1"],
    }
    for name, extra in variants.items():
        out = folder / "out.onnx"
        base = ["--rank", "0.5", "--no-verify", *extra]
        _, overhead, _ = peak_memory.measure([str(single), "-o", str(one / "o.onnx"), *base])
        start = time.perf_counter()
        code, peak, stderr = peak_memory.measure([str(model), "-o", str(out), *base])
        seconds = time.perf_counter() - start
        assert code == 0, stderr
        share = (peak - overhead) / size
        print(
            f"{name:<30} {seconds:>8.1f} {peak:>9.0f} {overhead:>11.0f} {share:>15.2f}", flush=True
        )


def latency_table(folder: Path, hidden: int, ffn: int) -> None:
    model = transformer_like(folder, 1, hidden, ffn, dtype=np.float32, name="fp32.onnx")
    out = folder / "fp32.lr.onnx"
    code, _, stderr = peak_memory.measure([str(model), "--rank", "0.5", "--no-verify", "-o",
                                           str(out), "--decomposition", "randomized"])  # fmt: skip
    assert code == 0, stderr
    weights = 4 * hidden * hidden + 2 * hidden * ffn
    rank_hh, rank_hf = (0.5 * hidden * hidden / (2 * hidden), 0.5 * hidden * ffn / (hidden + ffn))
    factored = 4 * (rank_hh // 16 * 16) * 2 * hidden + 2 * (rank_hf // 16 * 16) * (hidden + ffn)
    print(
        f"\nORT CPU, one layer fp32, {hidden}/{ffn}; predicted FLOP ratio {weights / factored:.2f}"
    )
    print(f"{'batch x seq':>12} {'dense ms':>9} {'lr ms':>8} {'speedup':>8}")
    lengths = (1, 128, 512)
    feeds = [
        {"x": np.random.default_rng(1).standard_normal((1, seq, hidden)).astype(np.float32)}
        for seq in lengths
    ]
    for seq, (dense, lr) in zip(lengths, model_latencies([model, out], feeds), strict=True):
        print(f"{f'1 x {seq}':>12} {dense * 1e3:>9.2f} {lr * 1e3:>8.2f} {dense / lr:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5504)
    args = parser.parse_args()
    print(f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores")
    with tempfile.TemporaryDirectory() as tmp:
        compile_table(Path(tmp), args.layers, args.hidden, args.ffn)
        latency_table(Path(tmp), args.hidden, args.ffn)


if __name__ == "__main__":
    main()
