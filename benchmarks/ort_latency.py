"""ONNX Runtime CPU latency: one dense MatMul against the factored model lrcompile writes for it.

For each weight shape K x N and each rank (1/8, 1/4, 1/2 of the break-even rank K*N/(K+N)) and
each number of activation rows M, the dense and the factored model run in their own sessions
(a session runs every node even when one output is fetched), interleaved, and the median time of
each is taken. The measured speedup is printed beside the predicted FLOP ratio K*N / (r*(K+N)).

    python benchmarks/ort_latency.py               # the full table (a few minutes on 2 cores)
    python benchmarks/ort_latency.py --quick       # smaller shapes, a smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import lrcompile
from lrcompile.numerics.ranks import break_even_rank
from lrcompile.runtime.timing import interleaved_medians


def dense_model(path: Path, k: int, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    graph = onnx.parser.parse_graph(
        f"g (float[M, {k}] x) => (float[M, {n}] y) {{ y = MatMul(x, W) }}"
    )
    graph.initializer.append(numpy_helper.from_array(rng.standard_normal((k, n), np.float32), "W"))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # timed side by side
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per measurement")
    args = parser.parse_args()
    shapes = [(256, 1024)] if args.quick else [(1024, 4096), (4096, 4096)]
    rows = [1, 32] if args.quick else [1, 32, 512]
    budget = 0.2 if args.quick else args.budget
    print(
        f"onnxruntime {ort.__version__}, {args.threads} threads, fp32, median of interleaved runs"
    )
    header = f"{'K x N':>11} {'rank':>5} {'r/r_be':>6} {'M':>4} {'dense ms':>9} {'lr ms':>8}"
    print(f"{header} {'speedup':>8} {'FLOP ratio':>10} {'meas/pred':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for k, n in shapes:
            dense = dense_model(Path(folder) / f"d{k}x{n}.onnx", k, n)
            be = break_even_rank(k, n)
            for fraction in (1 / 8, 1 / 4, 1 / 2):
                rank = int(be * fraction) // 16 * 16
                out = Path(folder) / f"lr{k}x{n}r{rank}.onnx"
                lrcompile.compile_model(dense, out, rank=str(rank), verify=False)
                predicted = k * n / (rank * (k + n))
                for m in rows:
                    x = np.random.default_rng(1).standard_normal((m, k), np.float32)
                    sessions = [session(dense, args.threads), session(out, args.threads)]
                    t_dense, t_lr = interleaved_medians(
                        [lambda s=s, x=x: s.run(None, {"x": x}) for s in sessions], budget_s=budget
                    )
                    speedup = t_dense / t_lr
                    print(
                        f"{f'{k}x{n}':>11} {rank:>5} {fraction:>6.3f} {m:>4} {t_dense * 1e3:>9.3f}"
                        f" {t_lr * 1e3:>8.3f} {speedup:>8.2f} {predicted:>10.2f}"
                        f" {speedup / predicted:>9.2f}"
                    )


if __name__ == "__main__":
    main()
