"""Activation-whitened SVD (truncation-aware data whitening, as in SVD-LLM): plain numerics.

With calibration activations ``X`` (rows are samples) and their Gram matrix
``G = X^T X = L L^T`` (Cholesky), the output error of a replacement ``W'`` is

    ||X W - X W'||_F = ||L^T (W - W')||_F

so the best rank-r ``W'`` for the OUTPUTS is ``L^{-T} [L^T W]_r``: factor ``L^T W``, truncate,
unwhiten. The discarded squared singular values of ``L^T W`` are exactly the squared output error
on the calibration data.

When ``G`` is not positive definite (fewer samples than features, dead features), a jitter
``eps * mean(diag G) * I`` is added, ``eps`` from 1e-8 up by factors of 10 until the Cholesky
succeeds; the identity then holds for the jittered ``G``.

Error compensation (SVD-LLM's closed-form update): when earlier layers are already compressed,
a layer sees inputs ``X'`` instead of the original ``X``. The best rank-r ``W'`` for the ORIGINAL
outputs given the inputs it will see minimizes ``||X W - X' W'||_F``. With
``G' = X'^T X' = L' L'^T`` and ``C = X'^T X``, writing ``X' = Q L'^T`` (``Q`` orthonormal),

    ||X W - X' W'||_F^2 = ||(I - Q Q^T) X W||_F^2 + ||L'^{-1} C W - L'^T W'||_F^2

so ``W' = L'^{-T} [L'^{-1} C W]_r``: the same factor-truncate-unwhiten with ``L'^{-1} C W`` in
place of ``L^T W`` (``compensating_whitening``). With ``X' = X`` it is the plain whitening.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lrcompile.numerics.decompose import (
    Factorization,
    compute_dtype,
    factorize,
    fix_signs,
    is_wide,
    svd_exact,
    svd_wide,
)

_JITTER_START = 1e-8
_JITTER_TRIES = 12


@dataclasses.dataclass(frozen=True)
class Whitening:
    """The Cholesky factor ``L`` (float64, lower) of a Gram matrix, and the jitter it needed.

    ``transform``, when set, is ``L^{-1} C`` of error compensation: the SVD is then of
    ``transform @ W`` instead of ``L^T W`` (see the module docstring).
    """

    lower: np.ndarray
    jitter: float
    transform: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def target(self) -> np.ndarray:
        """The matrix the weight is multiplied by before its SVD: ``L^T``, or ``L^{-1} C``."""
        return self.lower.T if self.transform is None else self.transform


def factorize_top(
    matrix: np.ndarray, top: int, whitening: Whitening | None = None
) -> tuple[Factorization, np.ndarray]:
    """``matrix``'s rank-``top`` factors (whitened with ``whitening``, else by exact SVD) and its
    whole spectrum, from one SVD (whose ``vt`` becomes the right factor)."""
    if whitening is not None:
        svd = whitened_svd(matrix, whitening)
        factors = factorize_whitened(matrix, top, whitening, svd=svd, overwrite=True)
    else:
        svd = svd_exact(matrix)
        factors = factorize(matrix, top, svd=svd, overwrite=True)
    return factors, svd[1]


def accumulate_gram(gram: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """Adds ``X^T X`` of one batch (``x`` reshaped to ``[-1, K]``) to ``gram`` (float64, updated
    in place) and returns it."""
    rows = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    update = rows.T @ rows
    if gram is None:
        return update
    gram += update  # in place: a new K x K array per batch costs as much as the product
    return gram


def whitening_from_gram(gram: np.ndarray) -> Whitening:
    """Cholesky ``G = L L^T``, with the documented jitter fallback when ``G`` is singular.

    Raises:
        ValueError: ``G`` is not square, holds NaN/Inf, or stays indefinite under the jitter.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {gram.shape}")
    if not np.all(np.isfinite(gram)):
        raise ValueError("the Gram matrix holds NaN or Inf")
    gram = (gram + gram.T) / 2
    scale = float(np.mean(np.diag(gram))) or 1.0
    jitters = [0.0] + [scale * _JITTER_START * 10**i for i in range(_JITTER_TRIES)]
    for jitter in jitters:
        lower = _cholesky(gram + jitter * np.eye(len(gram)))
        if lower is not None:
            return Whitening(lower, jitter)
    raise ValueError("the Gram matrix is not positive definite even with jitter")


def compensating_whitening(gram: np.ndarray, cross: np.ndarray) -> Whitening:
    """The whitening of inputs ``X'`` (``gram = X'^T X'``) that fits the outputs of the original
    inputs ``X`` (``cross = X'^T X``, same scale): ``L'`` with ``transform = L'^{-1} C``.

    Raises:
        ValueError: As ``whitening_from_gram``, or ``cross`` is not of ``gram``'s shape.
    """
    cross = np.asarray(cross, dtype=np.float64)
    if cross.shape != np.shape(gram):
        raise ValueError(f"cross term of shape {cross.shape} for a Gram matrix {np.shape(gram)}")
    white = whitening_from_gram(gram)
    return dataclasses.replace(white, transform=np.linalg.solve(white.lower, cross))


def balance(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``left @ right`` unchanged, each column of ``left`` with the norm of its row of ``right``."""
    scale = balance_scale(left, right)
    return left * scale, right / scale[:, np.newaxis]


def balance_scale(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The per-component scale of ``balance``: multiply ``left``'s columns, divide ``right``'s
    rows."""
    left_norms = np.linalg.norm(left, axis=0)
    right_norms = _row_norms(right)
    scale = np.sqrt(np.where(left_norms > 0, right_norms / np.maximum(left_norms, 1e-300), 1.0))
    return np.where(scale > 0, scale, 1.0)


def _row_norms(matrix: np.ndarray, block: int = 64) -> np.ndarray:
    """``np.linalg.norm(matrix, axis=1)``, the same numbers, a block of rows at a time: for an
    lm_head's right factor (r x 262,144) the whole product would be another copy of it."""
    norms = np.empty(len(matrix), dtype=np.result_type(matrix.dtype, np.float32))
    for start in range(0, len(matrix), block):
        norms[start : start + block] = np.linalg.norm(matrix[start : start + block], axis=1)
    return norms


def whitened_energy(matrix: np.ndarray, whitening: Whitening | None, block: int = 4096) -> float:
    """``||L^T M||_F^2`` (``||M||_F^2`` without a whitening): the output-space energy of ``M``
    on the calibration activations, a block of columns at a time (an lm_head's whitened copy
    would be another K x N float64 array)."""
    if whitening is None:
        return float(np.sum(np.square(matrix, dtype=np.float64)))
    target = whitening.target()
    return float(
        sum(
            np.sum(np.square(target @ np.asarray(matrix[:, start : start + block], np.float64)))
            for start in range(0, matrix.shape[1], block)
        )
    )


def numerical_rank(
    gram: np.ndarray, tolerance: float = 1e-12, *, whitening: Whitening | None = None
) -> int:
    """The number of eigenvalues of the Gram matrix above ``tolerance`` times the largest.

    A Cholesky factor without jitter gives it from its pivots (``L_ii^2``, the Schur
    complements), at a third of an eigendecomposition's cost: ``whitening``'s own, when it is the
    factor of this Gram matrix (at any scale) and needed no jitter; a singular matrix, whose
    Cholesky fails, is counted from its eigenvalues.
    """
    gram = np.asarray(gram, dtype=np.float64)
    if not gram.size or float(np.max(np.diag(gram))) <= 0.0:
        return 0
    lower = whitening.lower if whitening is not None and not whitening.jitter else None
    if lower is None:
        lower = _cholesky((gram + gram.T) / 2)
    if lower is not None:
        top = float(np.max(np.sum(np.square(lower), axis=1)))  # the largest diagonal of L L^T
        return int(np.sum(np.square(np.diag(lower)) > tolerance * top))
    eigenvalues = np.linalg.eigvalsh((gram + gram.T) / 2)
    return int(np.sum(eigenvalues > tolerance * eigenvalues[-1]))


def _cholesky(matrix: np.ndarray) -> np.ndarray | None:
    try:
        return np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        return None


def whitened_svd(w: np.ndarray, whitening: Whitening) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of ``L^T W`` (``L^{-1} C W`` when compensating; float64), with deterministic
    signs."""
    if is_wide(w.shape) and w.shape[0] < w.shape[1]:
        return svd_wide(w, whitening.target())
    u, s, vt = np.linalg.svd(
        whitening.target() @ np.asarray(w, dtype=np.float64), full_matrices=False
    )
    return fix_signs(u, s, vt)


def factorize_whitened(
    w: np.ndarray,
    rank: int,
    whitening: Whitening,
    *,
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    overwrite: bool = False,
) -> Factorization:
    """Rank-``rank`` factors minimizing the output error on the calibration activations.

    ``left = L^{-T} U_r sqrt(S_r)`` and ``right = sqrt(S_r) V_r^T``, then balanced: each rank
    component's column of ``left`` and row of ``right`` get the same norm (``L^{-T}`` scales the
    left side by the activations' scale, which would put it orders of magnitude below the right
    side, below fp16's normal range). ``kept_energy`` and ``total_energy`` are in output space:
    ``total_energy = ||X W||_F^2`` for ``G = X^T X``.

    Args:
        w: The weight ``[K, N]``.
        rank: Rank to keep, ``1 <= rank <= min(K, N)``.
        whitening: From ``whitening_from_gram`` of the activations feeding ``w`` (or
            ``compensating_whitening``; ``total_energy`` is then the reachable part,
            ``||Q^T X W||_F^2``).
        svd: ``whitened_svd(w, whitening)`` when already computed.
        overwrite: ``svd``'s ``vt`` may be overwritten (it becomes the right factor).
    """
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(w.shape)}] for shape {w.shape}")
    u, s, vt = svd if svd is not None else whitened_svd(w, whitening)
    total = float(np.sum(np.square(s)))
    root = np.sqrt(s[:rank])
    left = np.linalg.solve(whitening.lower.T, u[:, :rank] * root)
    if overwrite:
        right = vt[:rank]  # scaled in place: for an lm_head ``vt`` is as large as the weight
        right *= root[:, np.newaxis]
    else:
        right = root[:, np.newaxis] * vt[:rank]
    scale = balance_scale(left, right)
    left *= scale
    right /= scale[:, np.newaxis]
    dtype = compute_dtype(w.dtype)
    return Factorization(
        np.ascontiguousarray(left, dtype=dtype),
        np.ascontiguousarray(right, dtype=dtype),
        s[:rank].astype(dtype),
        total,
        "whitened",
    )
