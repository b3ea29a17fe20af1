"""Factoring time: exact SVD against randomized SVD, and the randomized error against the optimum.

The matrices have a power-law spectrum (sigma_i ~ (i+1)^-0.5 plus a noise floor), the shape real
trained weights show, so truncation errors are neither trivially zero nor flat. The error ratio is
||W - A B||_F of the randomized factors over the Eckart-Young optimum sqrt(sum_{i>r} sigma_i^2).

    python benchmarks/factor_time.py            # 4096x4096 and 4096x11008, ranks 256 and 1024
    python benchmarks/factor_time.py --quick    # 1024x1024 and 1024x2752
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lrcompile.numerics import decompose


def structured_matrix(k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = min(k, n)
    sigma = (np.arange(m) + 1.0) ** -0.5 + 0.02
    left = rng.standard_normal((k, m), np.float32) / np.sqrt(k)
    right = rng.standard_normal((m, n), np.float32) / np.sqrt(n)
    return (left * sigma.astype(np.float32)) @ right


def timed(func, *args, **kwargs):
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = [(1024, 1024), (1024, 2752)] if args.quick else [(4096, 4096), (4096, 11008)]
    ranks = [64, 256] if args.quick else [256, 1024]
    print(
        f"numpy {np.__version__}; float32; randomized: oversample"
        f" {decompose.DEFAULT_OVERSAMPLE}, {decompose.DEFAULT_POWER_ITERATIONS} power iterations"
    )
    header = f"{'K x N':>11} {'rank':>5} {'exact s':>8} {'rand s':>7}"
    print(f"{header} {'time ratio':>10} {'err ratio':>9}")
    for k, n in shapes:
        w = structured_matrix(k, n)
        (_, s, _), t_exact = timed(decompose.svd_exact, w)
        s64 = s.astype(np.float64)
        for rank in ranks:
            optimal = np.sqrt(np.sum(s64[rank:] ** 2))
            factors, t_rand = timed(decompose.factorize, w, rank, method="randomized", seed=0)
            error = decompose.relative_error(w, factors.left, factors.right) * np.linalg.norm(w)
            print(
                f"{f'{k}x{n}':>11} {rank:>5} {t_exact:>8.2f} {t_rand:>7.2f}"
                f" {t_exact / t_rand:>10.1f} {error / optimal:>9.4f}"
            )


if __name__ == "__main__":
    main()
