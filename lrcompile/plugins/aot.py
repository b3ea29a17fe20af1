"""Ahead-of-time compilation of the kernel to PTX: what ``aot_impl`` returns to TensorRT.

Needs triton and a CUDA GPU (Triton compiles for the device it finds). Shared by the TensorRT
plugin and by the GPU test that launches the same PTX with the same parameters through CuPy.
"""

from __future__ import annotations

import dataclasses

from lrcompile.plugins.launch import Tiles, kernel_constexprs, kernel_signature


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """The kernel's entry name, its PTX, and the shared memory it needs per block."""

    name: str
    ptx: str
    shared_mem: int
    num_warps: int


def compile_kernel(
    dtypes: dict[str, str],
    tiles: Tiles,
    *,
    has_bias: bool,
    fp8: bool,
    a_per_channel: bool,
    b_per_channel: bool,
) -> CompiledKernel:
    """Compiles one variant of ``low_rank_gemm_kernel`` to PTX for the current GPU."""
    import triton

    from lrcompile.plugins.kernel import low_rank_gemm_kernel

    constexprs = kernel_constexprs(
        tiles, has_bias=has_bias, fp8=fp8, a_per_channel=a_per_channel, b_per_channel=b_per_channel
    )
    signature = kernel_signature(dtypes) | dict.fromkeys(constexprs, "constexpr")
    source = triton.compiler.ASTSource(
        fn=low_rank_gemm_kernel, signature=signature, constexprs=constexprs
    )
    compiled = triton.compile(
        source, options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    )
    return CompiledKernel(
        compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.shared, tiles.num_warps
    )
