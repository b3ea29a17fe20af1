"""Pricing truncation by the held-back batches: each component's energy on data the factors were
not fitted to, so that the allocation sees the error a layer will have on other data."""

from __future__ import annotations

import numpy as np
import pytest

from lrcompile import stages
from lrcompile.config import CompileConfig
from lrcompile.numerics import whiten
from lrcompile.pipeline import factorize_pass
from tests.conftest import make_model, save


def _shifted(rng, rows: int, k: int, directions: int, rest: float) -> np.ndarray:
    """Rows strong in ``directions`` features, ``rest`` as strong in the others."""
    scale = np.where(np.arange(k) < directions, 1.0, rest)
    return (rng.standard_normal((rows, k)) * scale).astype(np.float32)


@pytest.mark.parametrize("wide", [False, True])
def test_held_out_tail_is_the_truncation_error_on_the_other_rows(rng, wide):
    k, n, top = (24, 600, 23) if wide else (48, 40, 20)
    w = rng.standard_normal((k, n)).astype(np.float32)
    fitted, other = _shifted(rng, 400, k, 8, 0.05), _shifted(rng, 300, k, k, 1.0)
    white = whiten.whitening_from_gram(whiten.accumulate_gram(None, fitted))
    factors = whiten.factorize_whitened(w, top, white)
    gram = whiten.accumulate_gram(None, other)
    energies = whiten.held_out_energies(w, factors.left, factors.right, gram)
    assert energies.shape == (top + 1,)
    x, w64 = other.astype(np.float64), w.astype(np.float64)
    assert energies.sum() == pytest.approx(np.linalg.norm(x @ w64) ** 2, rel=1e-9)
    for rank in (1, 8, top):
        approx = factors.left[:, :rank].astype(np.float64) @ factors.right[:rank]
        error = np.linalg.norm(x @ (w64 - approx)) ** 2
        assert energies[rank:].sum() == pytest.approx(error, rel=1e-6)


def test_allocation_prices_a_layer_by_its_error_on_the_held_back_batches(tmp_path, rng):
    # The fitted batches excite 8 of 32 input features; the held-back ones all of them. Fitted
    # energies call rank 8 almost exact; on the held-back rows it loses most of the output.
    w = rng.standard_normal((32, 32)).astype(np.float32)
    model = make_model("g (float[N, 32] x) => (float[N, 32] y) { y = MatMul(x, W) }", {"W": w})
    path = save(model, tmp_path / "m.onnx")
    x = np.concatenate([_shifted(rng, 96, 32, 8, 0.01), _shifted(rng, 32, 32, 32, 1.0)])
    np.savez(tmp_path / "c.npz", x=x)
    config = CompileConfig(rank="auto", calib=str(tmp_path / "c.npz"), batch_size=32)
    prepared = stages.load(path, config)
    factorize = factorize_pass(config)
    plan = stages.plan_calibration(prepared, config, factorize)
    assert plan.fitted == 3  # of 4 batches: the last held back
    factorize, measured = stages.measure(plan, factorize)
    [layer] = measured.spectra
    cached = factorize.cache.get(layer.name)
    held = x[96:].astype(np.float64)
    left, right = cached.at_rank(8).left.astype(np.float64), cached.at_rank(8).right
    error = np.linalg.norm(held @ (w - left @ right)) ** 2 / np.linalg.norm(held @ w) ** 2
    share = layer.energies[8:].sum() / layer.energies.sum()
    assert share == pytest.approx(error, rel=1e-5)
    fitted = np.square(cached.spectrum)
    assert share > 0.5 and fitted[8:].sum() / fitted.sum() < 1e-3
    plan.close()
