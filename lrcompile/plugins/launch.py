"""What the LowRankGemm plugin needs besides the kernel: shape rules, tiles, launch parameters.

Plain functions on shapes, no TensorRT, no GPU: the TensorRT descriptor and ``aot_impl`` call
them, and the tests check them directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# The plugin's inputs, in the order the ONNX call node passes them (lrcompile.passes.plugin).
INPUTS = ("x", "x_scale", "a", "a_scale", "mid_scale", "b", "b_scale", "bias")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and warps of one kernel launch."""

    block_m: int
    block_n: int
    block_r: int
    block_k: int
    num_warps: int
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class LaunchParams:
    """Grid and block of a launch (what ``tensorrt.plugin.KernelLaunchParams`` holds)."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0


def output_shape(x: Sequence[int], a: Sequence[int], b: Sequence[int], bias: Sequence[int]):
    """``x[..., K] -> y[..., N]`` for ``a[K, r]``, ``b[r, N]``, ``bias[N]``.

    Raises:
        ValueError: The shapes do not chain (symbolic dimensions, as strings, are accepted).
    """
    if len(x) < 1 or len(a) != 2 or len(b) != 2 or len(bias) != 1:
        raise ValueError(f"LowRankGemm expects x[..., K], a[K, r], b[r, N], bias[N]: {x} {a} {b}")
    for left, right, what in ((x[-1], a[0], "K"), (a[1], b[0], "r"), (b[1], bias[0], "N")):
        if isinstance(left, int) and isinstance(right, int) and left != right:
            raise ValueError(f"LowRankGemm {what} mismatch: {left} != {right}")
    return (*x[:-1], b[1])


def rows(x: Sequence[int]) -> int:
    """M: the activation rows the kernel sees (all leading dimensions flattened)."""
    return math.prod(x[:-1])


def choose_tiles(m: int, n: int, k: int, r: int, *, fp8: bool = False) -> Tiles:
    """Tiles for ``y[M, N] = (x[M, K] @ a[K, r]) @ b[r, N]``.

    Small M (decode, serving) is bandwidth-bound: the thinnest M tile (16, the smallest dot) and
    wide N tiles so that each weight tile is reused across many outputs. Large M is compute-bound:
    square 128x128 output tiles. The r chunk stays on chip between the two products; FP8 doubles
    the K depth per step (one byte per element).
    """
    if m <= 16:
        block_m, block_n = 16, 64
    elif m <= 64:
        block_m, block_n = 64, 64
    else:
        block_m, block_n = 128, 128
    block_r = 32 if r <= 32 else 64
    block_k = 128 if fp8 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Tiles(block_m, block_n, block_r, block_k, num_warps)


def launch_params(m: int, n: int, tiles: Tiles, shared_mem: int = 0) -> LaunchParams:
    """One program per (M tile, N tile); ``num_warps`` warps of 32 threads each."""
    grid = (math.ceil(m / tiles.block_m), math.ceil(n / tiles.block_n), 1)
    return LaunchParams(grid, (tiles.num_warps * 32, 1, 1), shared_mem)


# Tactics TensorRT times at build time (the rows M are dynamic): tiles for decode-sized M,
# mid-sized M and prefill-sized M.
TACTIC_ROWS = {1: 16, 2: 64, 3: 256}

_TRITON_POINTERS = {
    "float32": "*fp32",
    "float16": "*fp16",
    "bfloat16": "*bf16",
    "float8_e4m3fn": "*fp8e4nv",
}


def kernel_signature(dtypes: dict[str, str]) -> dict[str, str]:
    """Triton's signature of the kernel for the given input dtypes (numpy-style names).

    The parameters are in TensorRT's AOT order: the eight inputs, the scalars M, N, K, R, then
    the output ``y`` (in x's dtype).

    Raises:
        ValueError: A dtype the kernel has no path for.
    """
    for name in INPUTS:
        if dtypes[name] not in _TRITON_POINTERS:
            raise ValueError(f"LowRankGemm has no kernel for {name} of dtype {dtypes[name]}")
    pointers = {f"{name}_ptr": _TRITON_POINTERS[dtypes[name]] for name in INPUTS}
    scalars = dict.fromkeys(("M", "N", "K", "R"), "i32")
    return {**pointers, **scalars, "y_ptr": _TRITON_POINTERS[dtypes["x"]]}


def kernel_constexprs(tiles: Tiles, *, has_bias: bool, fp8: bool, a_per_channel: bool,
                      b_per_channel: bool) -> dict[str, int | bool]:  # fmt: skip
    """The compile-time constants of one kernel variant."""
    return {
        "HAS_BIAS": has_bias,
        "FP8": fp8,
        "A_PER_CHANNEL": a_per_channel,
        "B_PER_CHANNEL": b_per_channel,
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "BLOCK_R": tiles.block_r,
        "BLOCK_K": tiles.block_k,
    }
