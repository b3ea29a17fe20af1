"""Builds the example model of the quick start: a 3-layer MLP with a dynamic batch, in code.

    python examples/build_mlp.py            # -> examples/mlp.onnx and examples/mlp_inputs.npz

x[N, 512] -> MatMul 512x2048 + bias -> Relu -> MatMul 2048x2048 + bias -> Relu
          -> Gemm 2048x512 (transB, bias) -> y[N, 512]

The weights are seeded and have the decaying singular-value spectra of trained layers
(sigma_i ~ exp(-i / 40) plus a small noise floor), so a rank that keeps half the parameters keeps
the outputs close. The ``.npz`` holds 256 input rows for ``lrcompile verify --data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent


def trained_like(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """A K x N weight with an exponentially decaying spectrum and a noise floor."""
    m = min(k, n)
    u, _ = np.linalg.qr(rng.standard_normal((k, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    sigma = np.exp(-np.arange(m) / 40.0) + 0.002
    return ((u * sigma) @ v.T * np.sqrt(k)).astype(np.float32) / 4


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    graph = onnx.parser.parse_graph(
        """
        mlp (float[N, 512] x) => (float[N, 512] y) {
            h1 = MatMul(x, fc1_weight)
            a1 = Add(h1, fc1_bias)
            r1 = Relu(a1)
            h2 = MatMul(r1, fc2_weight)
            a2 = Add(h2, fc2_bias)
            r2 = Relu(a2)
            y = Gemm <transB = 1> (r2, fc3_weight, fc3_bias)
        }"""
    )
    weights = {
        "fc1_weight": trained_like(rng, 512, 2048),
        "fc1_bias": rng.standard_normal(2048).astype(np.float32) * 0.1,
        "fc2_weight": trained_like(rng, 2048, 2048),
        "fc2_bias": rng.standard_normal(2048).astype(np.float32) * 0.1,
        "fc3_weight": trained_like(rng, 2048, 512).T.copy(),  # [out, in] with transB, as torch
        "fc3_bias": rng.standard_normal(512).astype(np.float32) * 0.1,
    }
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in weights.items())
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=HERE / "mlp.onnx")
    args = parser.parse_args()
    onnx.save(build(), str(args.output))
    inputs = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    np.savez(args.output.with_name(f"{args.output.stem}_inputs.npz"), x=inputs)
    print(f"wrote {args.output} and {args.output.stem}_inputs.npz")


if __name__ == "__main__":
    main()
