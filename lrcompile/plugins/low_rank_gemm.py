"""Registers ``lrcompile::LowRankGemm`` with TensorRT; import it before parsing a --plugin model.

    import lrcompile.plugins.low_rank_gemm   # needs tensorrt >= 10.9 (tensorrt.plugin.aot_impl)

The ONNX parser maps each ``lrcompile.LowRankGemm`` call (``plugin_namespace="lrcompile"``,
``plugin_version="1"``) to this plugin. ``aot_impl`` returns the Triton kernel compiled to PTX
with symbolic launch parameters, embedded in the engine: the engine runs without Python.
Shape rules, tiles and the kernel signature are plain functions in ``lrcompile.plugins.launch``.
"""

from __future__ import annotations

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp

from lrcompile.plugins import launch
from lrcompile.plugins.aot import compile_kernel

PLUGIN_ID = "lrcompile::LowRankGemm"

_DTYPES = {
    trt.float32: "float32",
    trt.float16: "float16",
    trt.bfloat16: "bfloat16",
    trt.fp8: "float8_e4m3fn",
}


@trtp.register(PLUGIN_ID)
def low_rank_gemm_desc(
    x: trtp.TensorDesc,
    x_scale: trtp.TensorDesc,
    a: trtp.TensorDesc,
    a_scale: trtp.TensorDesc,
    mid_scale: trtp.TensorDesc,
    b: trtp.TensorDesc,
    b_scale: trtp.TensorDesc,
    bias: trtp.TensorDesc,
    rank: int,
    has_bias: int,
    fp8: int,
) -> trtp.TensorDesc:
    """``y[..., N]`` in x's dtype for ``x[..., K]``, ``a[K, r]``, ``b[r, N]``."""
    dims = trtp.ShapeExprs(x.ndim)
    for axis in range(x.ndim - 1):
        dims[axis] = x.shape_expr[axis]
    dims[x.ndim - 1] = b.shape_expr[1]
    output = x.like()
    output.shape_expr = dims
    return output


@trtp.autotune(PLUGIN_ID)
def low_rank_gemm_autotune(
    x: trtp.TensorDesc,
    x_scale: trtp.TensorDesc,
    a: trtp.TensorDesc,
    a_scale: trtp.TensorDesc,
    mid_scale: trtp.TensorDesc,
    b: trtp.TensorDesc,
    b_scale: trtp.TensorDesc,
    bias: trtp.TensorDesc,
    outputs: tuple[trtp.TensorDesc],
) -> list[trtp.AutoTuneCombination]:
    """The network is strongly typed: one type combination (the graph's), three tile tactics."""
    names = {trt.float32: "FP32", trt.float16: "FP16", trt.bfloat16: "BF16", trt.fp8: "FP8"}
    types = ", ".join(names[t.dtype] for t in (x, x_scale, a, a_scale, mid_scale, b, b_scale,
                                               bias, outputs[0]))  # fmt: skip
    return [trtp.AutoTuneCombination(types, "LINEAR", list(launch.TACTIC_ROWS))]


@trtp.aot_impl(PLUGIN_ID)
def low_rank_gemm_aot_impl(
    x: trtp.TensorDesc,
    x_scale: trtp.TensorDesc,
    a: trtp.TensorDesc,
    a_scale: trtp.TensorDesc,
    mid_scale: trtp.TensorDesc,
    b: trtp.TensorDesc,
    b_scale: trtp.TensorDesc,
    bias: trtp.TensorDesc,
    rank: int,
    has_bias: int,
    fp8: int,
    outputs: tuple[trtp.TensorDesc],
    tactic: int,
) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
    """The kernel for this instance's dtypes and flags, tiled for the tactic's row count."""
    tensors = dict(zip(launch.INPUTS, (x, x_scale, a, a_scale, mid_scale, b, b_scale, bias),
                       strict=True))  # fmt: skip
    k, r, n = int(a.shape[0]), int(a.shape[1]), int(b.shape[1])
    tiles = launch.choose_tiles(launch.TACTIC_ROWS.get(tactic, 16), n, k, r, fp8=bool(fp8))
    kernel = compile_kernel(
        {name: _DTYPES[t.dtype] for name, t in tensors.items()},
        tiles,
        has_bias=bool(has_bias),
        fp8=bool(fp8),
        a_per_channel=a_scale.ndim == 1,
        b_per_channel=b_scale.ndim == 1,
    )
    rows = x.shape_expr[0]
    for axis in range(1, x.ndim - 1):
        rows = rows * x.shape_expr[axis]
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(rows, tiles.block_m)
    params.grid_y = int(np.ceil(n / tiles.block_n))
    params.block_x = kernel.num_warps * 32
    params.shared_mem = kernel.shared_mem
    scalars = trtp.SymIntExprs(4)
    for index, value in enumerate((rows, n, k, r)):
        scalars[index] = trtp.SymInt32(value)
    return kernel.name, kernel.ptx, params, scalars
