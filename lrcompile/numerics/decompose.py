"""Low-rank decompositions of weight matrices: plain functions on arrays, no ONNX.

``W[K, N] ~= left[K, r] @ right[r, N]`` with balanced factors: the square roots of the singular
values go to each side, so both factors have similar ranges (FP8 quantization depends on it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Method = Literal["exact", "randomized", "whitened"]
METHODS: tuple[str, ...] = ("auto", "exact", "randomized")

# Randomized SVD pays off once the rank is well below the dimension; below this size an exact
# SVD takes milliseconds anyway.
# A matrix at least this much wider than tall (or taller than wide) with at least WIDE_MIN_SIZE
# entries gets its SVD through the Gram matrix of its smaller side (``svd_wide``).
WIDE_RATIO = 16
WIDE_MIN_SIZE = 1 << 24
RANDOMIZED_MIN_DIM = 512
RANDOMIZED_MAX_RANK_FRACTION = 0.25
DEFAULT_OVERSAMPLE = 16
DEFAULT_POWER_ITERATIONS = 2


@dataclasses.dataclass(frozen=True)
class Factorization:
    """A rank-r factorization ``W ~= left @ right`` and what it keeps of ``W``."""

    left: np.ndarray
    right: np.ndarray
    singular_values: np.ndarray
    total_energy: float
    method: Method

    @property
    def rank(self) -> int:
        return int(self.singular_values.shape[0])

    @property
    def kept_energy(self) -> float:
        """Fraction of ``||W||_F^2`` kept: kept squared singular values over their total."""
        if self.total_energy == 0.0:
            return 1.0
        kept = float(np.sum(np.square(self.singular_values, dtype=np.float64)))
        return min(1.0, kept / self.total_energy)


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype decompositions run in: float64 stays float64, everything else is float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def choose_method(shape: tuple[int, int], rank: int) -> Method:
    """Randomized SVD for large matrices at ranks well below their dimension, exact otherwise."""
    small = min(shape)
    if small >= RANDOMIZED_MIN_DIM and rank <= RANDOMIZED_MAX_RANK_FRACTION * small:
        return "randomized"
    return "exact"


def svd_exact(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``w = u @ diag(s) @ vt`` in the compute dtype, with deterministic signs."""
    if is_wide(w.shape):
        return svd_wide(w, dtype=compute_dtype(w.dtype))
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=compute_dtype(w.dtype)), full_matrices=False)
    return fix_signs(u, s, vt)


def is_wide(shape: tuple[int, ...]) -> bool:
    """Whether ``svd_wide`` serves a matrix of ``shape`` better than LAPACK's SVD."""
    small, large = sorted(shape)
    return large >= WIDE_RATIO * small and small * large >= WIDE_MIN_SIZE


def svd_wide(
    w: np.ndarray, left: np.ndarray | None = None, *, dtype=np.float64, block: int = 8192
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``A = left @ W`` (``W`` when None; whitening passes ``L^T``) with one
    working copy.

    For a ``[640, 262144]`` lm_head LAPACK's SVD holds several K x N float64 copies (its input,
    ``vt``, its workspace). Here ``A`` is formed column block by column block into one K x N array,
    ``A A^T = U S^2 U^T`` (K x K) gives ``U`` and ``S``, and ``V^T = S^-1 U^T A`` overwrites ``A``
    block by block. Singular values below ``sqrt(eps)`` of the largest lose relative accuracy
    (squared in the Gram matrix; those below ``eps`` of it get zero singular vectors): they carry
    no energy worth keeping. A tall ``W`` (K >> N, no ``left``) is done through its transpose,
    with a second copy to make ``u`` contiguous.
    """
    if left is None and w.shape[0] > w.shape[1]:
        vt, s, u = svd_wide(w.T, dtype=dtype, block=block)
        return fix_signs(np.ascontiguousarray(u.T), s, np.ascontiguousarray(vt.T))
    k, n = w.shape
    a = np.empty((k, n), dtype=dtype)
    gram = np.zeros((k, k))  # float64 whatever ``dtype``: small singular values need it
    for start in range(0, n, block):
        columns = np.asarray(w[:, start : start + block], dtype=np.float64)
        columns = columns if left is None else left @ columns
        gram += columns @ columns.T
        a[:, start : start + block] = columns
    eigenvalues, u = np.linalg.eigh(gram)
    eigenvalues, u = eigenvalues[::-1], np.ascontiguousarray(u[:, ::-1])
    s = np.sqrt(np.maximum(eigenvalues, 0.0))
    inverse = np.divide(1.0, s, out=np.zeros_like(s), where=s > s[0] * np.finfo(dtype).eps)
    u = u.astype(dtype)
    for start in range(0, n, block):
        a[:, start : start + block] = (u.T @ a[:, start : start + block]) * inverse[:, np.newaxis]
    return fix_signs(u, s.astype(dtype), a)


def svd_randomized(
    w: np.ndarray,
    rank: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``rank`` truncated SVD by randomized range finding (Halko, Martinsson, Tropp 2011).

    Sketches the range of ``w`` with ``rank + oversample`` Gaussian test vectors, sharpens it with
    ``power_iterations`` rounds of subspace iteration (re-orthonormalized each half step, which
    keeps small singular values from drowning in rounding), then takes an exact SVD of the small
    projected matrix. The same ``seed`` gives the same result.
    """
    m, n = w.shape
    sketch = min(rank + oversample, m, n)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n, sketch)).astype(w.dtype, copy=False)
    q, _ = np.linalg.qr(w @ omega)
    for _ in range(power_iterations):
        z, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ z)
    ub, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    u, s, vt = fix_signs(q @ ub[:, :rank], s[:rank], vt[:rank])
    return u, s, vt


def factorize(
    w: np.ndarray,
    rank: int,
    *,
    method: Method = "exact",
    seed: int = 0,
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Factorization:
    """Best rank-``rank`` approximation of ``w`` as balanced factors in ``w``'s compute dtype.

    Args:
        w: A 2-D weight ``[K, N]``.
        rank: Rank to keep, ``1 <= rank <= min(K, N)``.
        method: ``"exact"`` (LAPACK SVD) or ``"randomized"`` (seeded randomized SVD).
        seed: Seed of the randomized method.
        svd: ``svd_exact(w)``, when already computed, for the exact method to reuse.
        device: ``cpu`` (NumPy/LAPACK) or ``cuda`` (torch on the GPU; needs torch with CUDA).
        overwrite: ``svd``'s ``vt`` may be overwritten (it becomes the right factor).

    Returns:
        The factorization; ``left`` is ``[K, rank]`` and ``right`` is ``[rank, N]``.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(w.shape)}] for shape {w.shape}")
    work = np.asarray(w, dtype=compute_dtype(w.dtype))
    total = float(np.sum(np.square(work, dtype=np.float64)))
    if device == "cuda" and svd is None:
        u, s, vt = _svd_cuda(work, rank, method, seed)
    elif method == "randomized":
        u, s, vt = svd_randomized(work, rank, seed=seed)
    else:
        u, s, vt = svd if svd is not None else svd_exact(work)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    root = np.sqrt(s)
    left = np.ascontiguousarray(u * root[np.newaxis, :])
    if overwrite and vt.dtype == work.dtype:
        right = vt  # scaled in place: for an lm_head ``vt`` is as large as the weight
        right *= root[:, np.newaxis]
    else:
        right = root[:, np.newaxis] * vt
    return Factorization(left, np.ascontiguousarray(right), s, total, method)


def relative_error(
    w: np.ndarray, left: np.ndarray, right: np.ndarray, *, block: int = 1 << 20
) -> float:
    """``||w - left @ right||_F / ||w||_F`` in float64 (0 for an all-zero ``w``).

    Expands ``||W||^2 - 2<W, AB> + ||AB||^2`` over tiles of about ``block`` entries of ``W`` (and
    the matching rows of ``left`` and columns of ``right``), with ``||AB||^2 = <A^T A, B B^T>``,
    so memory stays at a tile: never a float64 copy of ``W``, of a factor, or the K x N product.
    """
    k, n = w.shape
    columns = max(1, min(n, block // max(k, 1) or 1, block))
    rows = max(1, block // columns)
    w_sq = cross = 0.0
    gram_left = np.zeros((left.shape[1],) * 2)
    gram_right = np.zeros_like(gram_left)
    for start in range(0, k, rows):
        part = np.asarray(left[start : start + rows], dtype=np.float64)
        gram_left += part.T @ part
    for col in range(0, n, columns):
        part = np.asarray(right[:, col : col + columns], dtype=np.float64)
        gram_right += part @ part.T
        for start in range(0, k, rows):
            tile = np.asarray(w[start : start + rows, col : col + columns], dtype=np.float64)
            w_sq += float(np.sum(tile * tile))
            piece = np.asarray(left[start : start + rows], dtype=np.float64).T @ tile
            cross += float(np.sum(piece * part))
    if w_sq == 0.0:
        return 0.0
    ab_sq = float(np.sum(gram_left * gram_right))
    return float(np.sqrt(max(w_sq - 2.0 * cross + ab_sq, 0.0) / w_sq))


def fix_signs(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SVD with each pair of singular vectors signed so that ``u``'s largest entry is > 0."""
    # Singular vectors are defined up to sign; pinning the sign of each column's largest entry
    # makes the factors independent of LAPACK's internal choices.
    pivot = u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])]
    signs = np.where(pivot < 0, -1.0, 1.0).astype(u.dtype)
    vt = vt if vt.flags.writeable else vt.copy()
    np.multiply(vt, signs[:, np.newaxis], out=vt)  # in place: ``vt`` can be as large as the weight
    return u * signs, s, vt


def _svd_cuda(
    w: np.ndarray, rank: int, method: Method, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rank-``rank`` SVD on the GPU with torch (randomized: ``torch.svd_lowrank``)."""
    import torch

    matrix = torch.from_numpy(w).cuda()
    if method == "randomized":
        torch.manual_seed(seed)
        sketch = min(rank + DEFAULT_OVERSAMPLE, *w.shape)
        u, s, v = torch.svd_lowrank(matrix, q=sketch, niter=DEFAULT_POWER_ITERATIONS)
        u, s, vt = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vh[:rank]
    return fix_signs(u.cpu().numpy(), s.cpu().numpy(), vt.contiguous().cpu().numpy())
