"""Decompositions: Eckart-Young error, balanced factors, randomized SVD quality and determinism."""

import numpy as np
import pytest

from lrcompile.numerics import decompose
from tests.conftest import low_rank_matrix


@pytest.mark.parametrize("shape", [(64, 96), (96, 40), (50, 50)])
@pytest.mark.parametrize("rank", [1, 7, 32])
def test_exact_error_is_eckart_young(rng, shape, rank):
    w = rng.standard_normal(shape).astype(np.float32)
    sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    f = decompose.factorize(w, rank, method="exact")
    error = np.linalg.norm(w.astype(np.float64) - f.left.astype(np.float64) @ f.right)
    optimal = np.sqrt(np.sum(sigma[rank:] ** 2))
    assert error == pytest.approx(optimal, rel=1e-5)
    assert f.kept_energy == pytest.approx(np.sum(sigma[:rank] ** 2) / np.sum(sigma**2), rel=1e-5)
    assert f.left.shape == (shape[0], rank) and f.right.shape == (rank, shape[1])


def test_factors_are_balanced(rng):
    w = rng.standard_normal((80, 120)).astype(np.float32) * 10
    f = decompose.factorize(w, 16)
    # Each factor carries sqrt(S): column norms of A equal row norms of B equal sqrt(sigma).
    np.testing.assert_allclose(
        np.linalg.norm(f.left, axis=0), np.sqrt(f.singular_values), rtol=1e-4
    )
    np.testing.assert_allclose(
        np.linalg.norm(f.right, axis=1), np.sqrt(f.singular_values), rtol=1e-4
    )


def test_full_rank_reconstructs(rng):
    w = rng.standard_normal((40, 30)).astype(np.float32)
    f = decompose.factorize(w, 30)
    assert decompose.relative_error(w, f.left, f.right) < 1e-6


def test_randomized_is_close_to_optimal_and_seeded(rng):
    w = low_rank_matrix(rng, 600, 700, decay=0.99) + 0.01 * rng.standard_normal((600, 700)).astype(
        np.float32
    )
    rank = 64
    sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(sigma[rank:] ** 2))
    f = decompose.factorize(w, rank, method="randomized", seed=3)
    error = np.linalg.norm(w.astype(np.float64) - f.left.astype(np.float64) @ f.right)
    assert optimal <= error <= 1.05 * optimal
    again = decompose.factorize(w, rank, method="randomized", seed=3)
    assert np.array_equal(f.left, again.left) and np.array_equal(f.right, again.right)
    other = decompose.factorize(w, rank, method="randomized", seed=4)
    assert not np.array_equal(f.left, other.left)


def test_randomized_kept_energy_matches_its_error(rng):
    w = rng.standard_normal((300, 520)).astype(np.float32)
    f = decompose.factorize(w, 40, method="randomized")
    rel = decompose.relative_error(w, f.left, f.right)
    # The randomized result is an orthogonal projection, so error^2 = 1 - kept energy.
    assert rel**2 == pytest.approx(1 - f.kept_energy, rel=1e-4)


def test_choose_method():
    assert decompose.choose_method((4096, 4096), 256) == "randomized"
    assert decompose.choose_method((4096, 4096), 2048) == "exact"
    assert decompose.choose_method((256, 4096), 16) == "exact"


def test_rejects_bad_rank(rng):
    w = rng.standard_normal((8, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="outside"):
        decompose.factorize(w, 7)


def test_fp16_and_float64_compute_dtypes(rng):
    assert decompose.compute_dtype(np.float16) == np.float32
    assert decompose.compute_dtype(np.float64) == np.float64
    w = rng.standard_normal((20, 30)).astype(np.float16)
    assert decompose.factorize(w, 4).left.dtype == np.float32


@pytest.mark.gpu
def test_cuda_svd_matches_the_cpu(rng):
    torch = pytest.importorskip("torch", reason="needs torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = low_rank_matrix(rng, 300, 400, decay=0.95)
    sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    for method in ("exact", "randomized"):
        f = decompose.factorize(w, 32, method=method, device="cuda")
        error = np.linalg.norm(w.astype(np.float64) - f.left.astype(np.float64) @ f.right)
        assert error <= 1.05 * np.sqrt(np.sum(sigma[32:] ** 2))
