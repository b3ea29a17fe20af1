"""Whitened SVD: the output-error identity, never worse than plain SVD, streaming Gram, jitter."""

import numpy as np
import pytest

from lrcompile.numerics import decompose, whiten


def _activations(rng, rows: int, k: int) -> np.ndarray:
    # Correlated features with very different scales, as real activations have.
    mix = rng.standard_normal((k, k)) * np.logspace(0, -2, k)
    return (rng.standard_normal((rows, k)) @ mix.T).astype(np.float32)


@pytest.mark.parametrize("rank", [1, 8, 24])
def test_output_error_equals_discarded_whitened_energy(rng, rank):
    x = _activations(rng, 500, 48)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    white = whiten.whitening_from_gram(whiten.accumulate_gram(None, x))
    assert white.jitter == 0.0
    _, s, _ = whiten.whitened_svd(w, white)
    f = whiten.factorize_whitened(w, rank, white)
    x64 = x.astype(np.float64)
    error = np.linalg.norm(x64 @ w - x64 @ f.left.astype(np.float64) @ f.right)
    assert error == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-5)
    assert f.total_energy == pytest.approx(np.linalg.norm(x64 @ w) ** 2, rel=1e-9)
    assert f.method == "whitened"


@pytest.mark.parametrize("rank", [2, 8, 16, 32])
def test_never_worse_than_plain_svd_on_the_activations(rng, rank):
    x = _activations(rng, 300, 64)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    white = whiten.whitening_from_gram(whiten.accumulate_gram(None, x))
    plain = decompose.factorize(w, rank)
    whitened = whiten.factorize_whitened(w, rank, white)
    x64 = x.astype(np.float64)

    def out_error(f):
        return np.linalg.norm(x64 @ w - x64 @ f.left.astype(np.float64) @ f.right)

    assert out_error(whitened) <= out_error(plain) * (1 + 1e-9)


def test_streaming_gram_equals_direct(rng):
    batches = [rng.standard_normal((b, 5, 16)).astype(np.float32) for b in (3, 1, 7)]
    gram = None
    for batch in batches:
        gram = whiten.accumulate_gram(gram, batch)
    stacked = np.concatenate([b.reshape(-1, 16) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(gram, stacked.T @ stacked, rtol=1e-12)
    assert gram.dtype == np.float64


def test_singular_gram_gets_jitter(rng):
    x = rng.standard_normal((4, 10))  # 4 samples, 10 features: rank-4 Gram
    white = whiten.whitening_from_gram(x.T @ x)
    assert white.jitter > 0
    # Rank 4 spans the 4 samples' outputs up to the jitter: near-zero error on them.
    w = rng.standard_normal((10, 6))
    f = whiten.factorize_whitened(w, 4, white)
    assert np.linalg.norm(x @ w - x @ f.left @ f.right) < 1e-3 * np.linalg.norm(x @ w)


def test_bad_grams_are_refused():
    with pytest.raises(ValueError, match="square"):
        whiten.whitening_from_gram(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        whiten.whitening_from_gram(np.full((2, 2), np.nan))
