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


def test_whitened_factors_are_balanced_and_signed(rng):
    # Activations of scale 30 (as in real hidden states): L^-T alone would shrink the left factor.
    x = _activations(rng, 2000, 48) * 30
    w = rng.standard_normal((48, 40)).astype(np.float32) * 0.05
    white = whiten.whitening_from_gram(whiten.accumulate_gram(None, x) / len(x))
    f = whiten.factorize_whitened(w, 16, white)
    np.testing.assert_allclose(
        np.linalg.norm(f.left, axis=0), np.linalg.norm(f.right, axis=1), rtol=1e-5
    )
    ratio = np.abs(f.left).max() / np.abs(f.right).max()
    assert 0.1 < ratio < 10
    u, _, _ = whiten.whitened_svd(w, white)
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])] > 0)


def test_whitened_factors_do_not_depend_on_the_number_of_calibration_rows(tmp_path, rng):
    import onnx
    from onnx import numpy_helper

    import lrcompile
    from tests.conftest import make_model, save

    model = make_model(
        "g (float[N, 48] x) => (float[N, 40] y) { y = MatMul(x, W) }",
        {"W": rng.standard_normal((48, 40)).astype(np.float32)},
    )
    path = save(model, tmp_path / "m.onnx")
    x = _activations(rng, 256, 48)
    factors = []
    for copies in (1, 4):
        np.savez(tmp_path / "c.npz", x=np.concatenate([x] * copies))
        out = tmp_path / f"o{copies}.onnx"
        lrcompile.compile_model(path, out, rank="16", calib=str(tmp_path / "c.npz"), verify=False)
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        factors.append((inits["W_lr_A"], inits["W_lr_B"]))
    for once, four_times in zip(*factors, strict=True):
        np.testing.assert_allclose(once, four_times, rtol=1e-4, atol=1e-6)


def test_numerical_rank_from_the_whitening_equals_the_direct_count(rng):
    full = _activations(rng, 300, 48).astype(np.float64)
    low = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 48))
    for x, expected in ((full, 48), (low, 5)):
        gram = x.T @ x
        white = whiten.whitening_from_gram(gram / len(x))
        assert whiten.numerical_rank(gram) == expected
        assert whiten.numerical_rank(gram, whitening=white) == expected


def _shifted(rng, rows=400, k=48, n=40):
    """Original inputs ``X``, the inputs ``X'`` a compressed model gives (X plus a structured
    error), and a weight."""
    x = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) * np.logspace(0, -1, k))
    shifted = x + 0.3 * x @ rng.standard_normal((k, k)) / np.sqrt(k)
    return x, shifted, rng.standard_normal((k, n))


@pytest.mark.parametrize("rank", [4, 16])
def test_compensated_factors_fit_the_original_outputs_from_the_shifted_inputs(rng, rank):
    x, shifted, w = _shifted(rng)
    white = whiten.compensating_whitening(shifted.T @ shifted, shifted.T @ x)
    factors = whiten.factorize_whitened(w, rank, white)
    error = np.linalg.norm(x @ w - shifted @ factors.left @ factors.right) ** 2
    # The closed form: what no W' on X' can reach, plus the discarded energy.
    q, _ = np.linalg.qr(shifted)
    unreachable = np.linalg.norm(x @ w - q @ (q.T @ (x @ w))) ** 2
    _, s, _ = whiten.whitened_svd(w, white)
    assert error == pytest.approx(unreachable + np.sum(s[rank:] ** 2), rel=1e-9)
    # Beats the whitened factors fitted to either input alone, on the original outputs.
    for inputs in (x, shifted):
        plain = whiten.factorize_whitened(w, rank, whiten.whitening_from_gram(inputs.T @ inputs))
        assert error < np.linalg.norm(x @ w - shifted @ plain.left @ plain.right) ** 2


def test_compensation_without_a_shift_is_the_whitened_svd(rng):
    x, _, w = _shifted(rng)
    gram = x.T @ x
    compensated = whiten.factorize_whitened(w, 8, whiten.compensating_whitening(gram, gram))
    whitened = whiten.factorize_whitened(w, 8, whiten.whitening_from_gram(gram))
    np.testing.assert_allclose(compensated.left @ compensated.right, whitened.left @ whitened.right)


def test_compensated_wide_weights_take_the_gram_route_to_the_same_factors(rng, monkeypatch):
    x, shifted, _ = _shifted(rng, k=24)
    w = rng.standard_normal((24, 3000))
    white = whiten.compensating_whitening(shifted.T @ shifted, shifted.T @ x)
    direct = whiten.factorize_whitened(w, 6, white)  # LAPACK's SVD of L'^-1 C W
    monkeypatch.setattr(whiten, "is_wide", lambda shape: True)  # as for an lm_head
    wide = whiten.factorize_whitened(w, 6, white)
    np.testing.assert_allclose(wide.left @ wide.right, direct.left @ direct.right, atol=1e-8)
