"""The fused low-rank GEMM in Triton: ``y = (x @ a) @ b + bias`` with the [M, r] product on chip.

    for each (M tile, N tile):
        acc = 0
        for each r chunk:            t = x[M tile, :] @ a[:, r chunk]     (on chip, fp32)
                                     acc += t @ b[r chunk, N tile]
        y[M tile, N tile] = acc + bias

fp16/bf16: ``t`` is rounded to the input dtype before the second product, as the unfused graph
stores it. FP8 (e4m3 ``a``/``b``, fp32 accumulation): ``x`` and ``t`` are quantized with their
per-tensor scales exactly as ONNX QuantizeLinear does (round half to even, saturate at +-448), and
the weight scales (per-tensor, or per-channel over r for ``a`` and over N for ``b``) applied to
the fp32 accumulators, so the kernel computes what the ONNX function body computes.

Runs on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (the tests). Needs triton and torch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lrcompile.plugins.launch import Tiles, choose_tiles, launch_params, rows

FP8_MAX = 448.0
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds an fp32 half to even


@triton.jit
def _e4m3_grid(v):
    """``v`` rounded to the nearest E4M3 value (half to even), saturated at +-448.

    Explicit, because a plain ``.to(float8e4nv)`` of a value that rounds up into the next binade
    is mishandled by Triton's CPU interpreter; the cast of an on-grid value is exact everywhere.
    """
    exponent = tl.floor(tl.log2(tl.maximum(tl.abs(v), 0.015625)))  # 2**-6: subnormals below
    step = tl.exp2(exponent - 3.0)  # 3 mantissa bits
    q = (v / step + _ROUND) - _ROUND
    return tl.minimum(tl.maximum(q * step, -FP8_MAX), FP8_MAX)


@triton.jit
def low_rank_gemm_kernel(
    # TensorRT's AOT convention: input pointers (in the ONNX call's order), scalars, outputs.
    x_ptr, x_scale_ptr, a_ptr, a_scale_ptr, mid_scale_ptr, b_ptr, b_scale_ptr, bias_ptr,
    M, N, K, R,
    y_ptr,
    HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
    A_PER_CHANNEL: tl.constexpr, B_PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # All operands are contiguous: x[M, K], a[K, R], b[R, N], y[M, N].
    stride_xm, stride_ak, stride_br, stride_ym = K, R, N, N
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        x_scale = tl.load(x_scale_ptr).to(tl.float32)
        mid_scale = tl.load(mid_scale_ptr).to(tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :],
                mask=m_ok[:, None] & k_ok[None, :], other=0.0,
            )  # fmt: skip
            a = tl.load(
                a_ptr + rk[:, None] * stride_ak + rr[None, :],
                mask=k_ok[:, None] & r_ok[None, :], other=0.0,
            )  # fmt: skip
            if FP8:
                x = _e4m3_grid(x.to(tl.float32) / x_scale).to(tl.float8e4nv)
            t += tl.dot(x, a)
        b = tl.load(
            b_ptr + rr[:, None] * stride_br + rn[None, :],
            mask=r_ok[:, None] & n_ok[None, :], other=0.0,
        )  # fmt: skip
        if FP8:
            if A_PER_CHANNEL:
                a_scale = tl.load(a_scale_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
                t = t * (x_scale * a_scale)[None, :]
            else:
                t = t * (x_scale * tl.load(a_scale_ptr).to(tl.float32))
            acc += tl.dot(_e4m3_grid(t / mid_scale).to(tl.float8e4nv), b)
        else:
            acc += tl.dot(t.to(b.dtype), b)
    if FP8:
        if B_PER_CHANNEL:
            b_scale = tl.load(b_scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc * (mid_scale * b_scale)[None, :]
        else:
            acc = acc * (mid_scale * tl.load(b_scale_ptr).to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def low_rank_gemm(x, a, b, bias=None, *, scales=None, tiles: Tiles | None = None):
    """Runs the kernel on torch tensors (GPU, or CPU under ``TRITON_INTERPRET=1``).

    Args:
        x: ``[..., K]`` fp16/bf16 (fp32 accepted for testing).
        a: ``[K, r]`` in x's dtype, or float8_e4m3fn with ``scales``.
        b: ``[r, N]`` likewise.
        bias: ``[N]`` or None.
        scales: For FP8: ``(x_scale, a_scale, mid_scale, b_scale)`` as tensors (scalars, or
            ``[r]`` / ``[N]`` for per-channel weight scales).
        tiles: Tile sizes; ``choose_tiles`` by default.

    Returns:
        ``y[..., N]`` in x's dtype.
    """
    import torch

    a, b = a.contiguous(), b.contiguous()
    k, r = a.shape
    n = b.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    fp8 = scales is not None
    tiles = tiles or choose_tiles(m, n, k, r, fp8=fp8)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    x_scale, a_scale, mid_scale, b_scale = scales if fp8 else (one, one, one, one)
    params = launch_params(m, n, tiles)
    low_rank_gemm_kernel[params.grid[:2]](
        x2, x_scale, a, a_scale, mid_scale, b, b_scale,
        bias if bias is not None else y,
        m, n, k, r,
        y,
        HAS_BIAS=bias is not None, FP8=fp8,
        A_PER_CHANNEL=fp8 and a_scale.dim() == 1, B_PER_CHANNEL=fp8 and b_scale.dim() == 1,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_R=tiles.block_r,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


__all__ = ["low_rank_gemm", "low_rank_gemm_kernel", "rows"]
