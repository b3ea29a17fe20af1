"""Tiny seeded models built in code, and helpers to run them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper


def make_model(
    graph_text: str, weights: Mapping[str, np.ndarray], *, opset: int = 19, ir_version: int = 10
) -> onnx.ModelProto:
    """A checked model from ONNX text (a ``graph`` block) and named numpy initializers."""
    graph = onnx.parser.parse_graph(graph_text)
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in weights.items())
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir_version
    )
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path, **kwargs) -> Path:
    onnx.save(model, str(path), **kwargs)
    return path


def run(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def held_back(rows: np.ndarray, auto, batch_size: int = 8) -> np.ndarray:
    """The calibration rows ``auto`` measured its candidates on: its last held-back batches."""
    return rows[(auto.batches - auto.held_back) * batch_size :]


def low_rank_matrix(rng: np.random.Generator, k: int, n: int, decay: float = 0.7) -> np.ndarray:
    """A K x N float32 matrix with a known, geometrically decaying spectrum."""
    u, _ = np.linalg.qr(rng.standard_normal((k, min(k, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(k, n))))
    s = decay ** np.arange(min(k, n))
    return ((u * s) @ v.T).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def mlp(tmp_path: Path, rng: np.random.Generator) -> Path:
    """x[N, 64] -> MatMul(64x96) -> Relu -> Gemm(96x48, bias) -> y, with a dynamic batch."""
    model = make_model(
        """
        mlp (float[N, 64] x) => (float[N, 48] y) {
            h = MatMul(x, W1)
            r = Relu(h)
            y = Gemm(r, W2, C)
        }""",
        {
            "W1": low_rank_matrix(rng, 64, 96),
            "W2": low_rank_matrix(rng, 96, 48),
            "C": rng.standard_normal(48).astype(np.float32),
        },
    )
    return save(model, tmp_path / "mlp.onnx")


@pytest.fixture
def deep(tmp_path, rng):
    """Four 64x64 layers with different spectra (one steep, one flat), tanh between them."""
    decays = {"W1": 0.9, "W2": 0.6, "W3": 0.97, "W4": 0.8}
    weights = {name: low_rank_matrix(rng, 64, 64, decay) * 3 for name, decay in decays.items()}
    model = make_model(
        """g (float[N, 64] x) => (float[N, 64] y) {
            h1 = MatMul(x, W1)
            a1 = Tanh(h1)
            h2 = MatMul(a1, W2)
            a2 = Tanh(h2)
            h3 = MatMul(a2, W3)
            a3 = Tanh(h3)
            y = MatMul(a3, W4)
        }""",
        weights,
    )
    return save(model, tmp_path / "deep.onnx")


@dataclasses.dataclass(frozen=True)
class Factored:
    """What ``factorize`` did to an in-memory model: the plan, the report, whether it changed."""

    plan: object
    layers: tuple
    modified: bool


def factorize(ir_model, spec: str = "16", *, overrides=(), **options) -> Factored:
    """Runs the compile's stages on an in-memory ``onnx_ir`` model (no calibration data): load's
    candidates and specs (``overrides``: ``Override`` objects), calibrate (spectra of ``energy:``
    specs), search, rewrite (factor passes, then cleanup). ``options`` are ``CompileConfig``
    fields."""
    from lrcompile.compiler import factor_provider
    from lrcompile.config import CompileConfig
    from lrcompile.io.data import model_inputs
    from lrcompile.numerics.ranks import RankSpec
    from lrcompile.passes.candidates import find_candidates
    from lrcompile.profile import Profile
    from lrcompile.search.decisions import rank_specs
    from lrcompile.stages.calibrate import calibrate_and_cache
    from lrcompile.stages.load import Prepared
    from lrcompile.stages.rewrite import rewrite
    from lrcompile.stages.search import search

    config = CompileConfig(rank=spec, verify=False, **options)
    groups, skipped = find_candidates(ir_model.graph, ir_model.functions.values())
    specs = rank_specs(groups, RankSpec.parse(spec), overrides)
    prepared = Prepared(Path("model.onnx"), ir_model, model_inputs(ir_model), groups, skipped,
                        [], specs)  # fmt: skip
    provider = factor_provider(config)
    try:
        calibrated = calibrate_and_cache(prepared, config, provider, Profile())
        plan, _ = search(prepared, calibrated, config, provider)
        rewritten = rewrite(prepared, calibrated, plan, config, provider, Profile())
    finally:
        provider.close()
    return Factored(plan, rewritten.layers, rewritten.changed)
