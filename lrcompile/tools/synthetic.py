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
    return _save(signature, lines, inits, folder / name)


def lm_like(
    folder: str | Path,
    layers: int,
    hidden: int,
    ffn: int,
    vocab: int,
    *,
    seed: int = 0,
    name: str = "lm.onnx",
    logit_scale: float = 1.0,
) -> Path:
    """Writes a causal-LM-shaped float32 model, ``folder/name`` (+ ``.data``):
    ``input_ids[B, S]`` (int64) -> ``logits[B, S, vocab]``, through a token embedding, per layer
    a residual attention-like block (q, k, v, o) and a residual gated MLP (gate, up, down), an RMS
    normalisation, and an untied ``[hidden, vocab]`` lm_head, so that with a large vocabulary the
    logits dominate the memory, as in real LMs. Weights have decaying spectra (as trained weights
    do), so that low rank is worth searching."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    inits = [_decaying(rng, (vocab, hidden), "embed")]
    lines, x = ["h = Gather(embed, input_ids)"], "h"
    for i in range(layers):
        for part, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)),
                            ("v", (hidden, hidden)), ("o", (hidden, hidden)),
                            ("gate", (hidden, ffn)), ("up", (hidden, ffn)),
                            ("down", (ffn, hidden))):  # fmt: skip
            inits.append(_decaying(rng, shape, f"l{i}_{part}"))
        lines += [
            f"q{i} = MatMul({x}, l{i}_q)", f"k{i} = MatMul({x}, l{i}_k)",
            f"v{i} = MatMul({x}, l{i}_v)", f"g{i} = Mul(q{i}, k{i})", f"t{i} = Tanh(g{i})",
            f"m{i} = Mul(t{i}, v{i})", f"o{i} = MatMul(m{i}, l{i}_o)", f"a{i} = Add({x}, o{i})",
            f"e{i} = MatMul(a{i}, l{i}_gate)", f"u{i} = MatMul(a{i}, l{i}_up)",
            f"c{i} = Tanh(e{i})", f"r{i} = Mul(c{i}, u{i})",
            f"d{i} = MatMul(r{i}, l{i}_down)", f"x{i} = Add(a{i}, d{i})",
        ]  # fmt: skip
        x = f"x{i}"
    head = _decaying(rng, (hidden, vocab), "lm_head")
    inits.append(numpy_helper.from_array(numpy_helper.to_array(head) * logit_scale, "lm_head"))
    lines += [
        f"sq = Mul({x}, {x})", "axes = Constant <value = int64[1] {-1}> ()",
        "ms = ReduceMean(sq, axes)", "rms = Sqrt(ms)",
        f"n = Div({x}, rms)", "logits = MatMul(n, lm_head)",
    ]  # fmt: skip
    signature = f"(int64[B, S] input_ids) => (float[B, S, {vocab}] logits)"
    return _save(signature, lines, inits, folder / name)


def _save(signature: str, lines: list[str], inits: list, path: Path) -> Path:
    """The graph of ``lines`` saved at ``path``, every weight in ``path.data``."""
    graph = onnx.parser.parse_graph(f"g {signature} {{ {' '.join(lines)} }}")
    graph.initializer.extend(inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # onnx.save appends to an existing file
    onnx.save(model, str(path), save_as_external_data=True, location=data.name, size_threshold=0)
    return path


def _decaying(rng: np.random.Generator, shape: tuple[int, int], name: str) -> onnx.TensorProto:
    """A Gaussian-factored weight whose singular values decay like ``1 / sqrt(1 + i / 8)``."""
    k, n = shape
    m = min(k, n)
    decay = 1.0 / np.sqrt(1.0 + np.arange(m, dtype=np.float32) / 8.0)
    left = rng.standard_normal((k, m), np.float32) / np.sqrt(k)
    right = rng.standard_normal((m, n), np.float32) / np.sqrt(m)
    return numpy_helper.from_array(((left * decay) @ right).astype(np.float32), name)
