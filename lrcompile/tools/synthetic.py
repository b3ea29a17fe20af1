"""Transformer-shaped models built in code, with external data, for scale tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def transformer_like(
    folder: str | Path,
    layers: int,
    hidden: int,
    ffn: int,
    *,
    dtype: type = np.float16,
    seed: int = 0,
    name: str = "model.onnx",
) -> Path:
    """Writes ``folder/name`` (+ ``.data``): per layer q, k, v, o (hidden x hidden) and up, down
    (hidden x ffn, ffn x hidden) MatMuls on ``x[B, S, hidden]``; Gaussian weights."""
    folder = Path(folder)
    onnx_type = "float16" if dtype == np.float16 else "float"
    rng = np.random.default_rng(seed)
    lines, inits, x = [], [], "x"
    for i in range(layers):
        shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
                  "o": (hidden, hidden), "up": (hidden, ffn), "down": (ffn, hidden)}  # fmt: skip
        for part, shape in shapes.items():
            weight = rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
            inits.append(numpy_helper.from_array(weight.astype(dtype), f"l{i}_{part}"))
        lines += [
            f"q{i} = MatMul({x}, l{i}_q)", f"k{i} = MatMul({x}, l{i}_k)",
            f"v{i} = MatMul({x}, l{i}_v)", f"s{i} = Sum(q{i}, k{i}, v{i})",
            f"o{i} = MatMul(s{i}, l{i}_o)", f"u{i} = MatMul(o{i}, l{i}_up)",
            f"h{i} = MatMul(u{i}, l{i}_down)",
        ]  # fmt: skip
        x = f"h{i}"
    signature = f"({onnx_type}[B, S, {hidden}] x) => ({onnx_type}[B, S, {hidden}] {x})"
    graph = onnx.parser.parse_graph(f"g {signature} {{ {' '.join(lines)} }}")
    graph.initializer.extend(inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, location=f"{name}.data",
              size_threshold=0)  # fmt: skip
    return path
