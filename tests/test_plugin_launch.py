"""Plugin shape rules, tiles, launch parameters and kernel signature: no TensorRT, no GPU."""

from __future__ import annotations

import importlib.util

import pytest

from lrcompile.plugins import launch


def test_output_shape_and_rows():
    assert launch.output_shape(("B", "S", 384), (384, 64), (64, 1536), (1536,)) == ("B", "S", 1536)
    assert launch.output_shape((7, 96), (96, 16), (16, 32), (32,)) == (7, 32)
    assert launch.rows((2, 5, 384)) == 10 and launch.rows((384,)) == 1


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((7, 95), (96, 16), (16, 32), (32,)), "K mismatch: 95 != 96"),
        (((7, 96), (96, 16), (17, 32), (32,)), "r mismatch: 16 != 17"),
        (((7, 96), (96, 16), (16, 32), (31,)), "N mismatch: 32 != 31"),
        (((7, 96), (96, 16, 1), (16, 32), (32,)), "expects x"),
    ],
)
def test_output_shape_rejects_mismatches(shapes, message):
    with pytest.raises(ValueError, match=message):
        launch.output_shape(*shapes)


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        (1, (16, 64)),
        (16, (16, 64)),
        (17, (64, 64)),
        (64, (64, 64)),
        (65, (128, 128)),
        (4096, (128, 128)),
    ],
)
def test_tiles_follow_the_rows(m, expected):
    tiles = launch.choose_tiles(m, 4096, 4096, 512)
    assert (tiles.block_m, tiles.block_n) == expected
    assert tiles.num_warps == (8 if expected == (128, 128) else 4)
    assert tiles.block_r == 64 and tiles.block_k == 64
    assert launch.choose_tiles(m, 4096, 4096, 512, fp8=True).block_k == 128
    assert launch.choose_tiles(m, 64, 64, 32).block_r == 32


def test_launch_grid_covers_every_output_tile():
    tiles = launch.choose_tiles(100, 1000, 512, 64)
    params = launch.launch_params(100, 1000, tiles, shared_mem=4096)
    assert params.grid == (1, 8, 1)  # ceil(100/128), ceil(1000/128)
    assert params.block == (256, 1, 1) and params.shared_mem == 4096
    small = launch.launch_params(33, 70, launch.Tiles(16, 32, 16, 32, 4))
    assert small.grid == (3, 3, 1) and small.block == (128, 1, 1)
    # Every (row, column) of y lies in exactly one program's tile.
    covered = {
        (i, j)
        for pm in range(small.grid[0])
        for pn in range(small.grid[1])
        for i in range(pm * 16, min(pm * 16 + 16, 33))
        for j in range(pn * 32, min(pn * 32 + 32, 70))
    }
    assert len(covered) == 33 * 70


def test_kernel_signature_follows_tensorrt_aot_order():
    dtypes = dict.fromkeys(launch.INPUTS, "float16")
    dtypes |= {"a": "float8_e4m3fn", "b": "float8_e4m3fn", "x_scale": "float32"}
    signature = launch.kernel_signature(dtypes)
    assert list(signature) == [
        "x_ptr",
        "x_scale_ptr",
        "a_ptr",
        "a_scale_ptr",
        "mid_scale_ptr",
        "b_ptr",
        "b_scale_ptr",
        "bias_ptr",
        "M",
        "N",
        "K",
        "R",
        "y_ptr",
    ]
    assert (signature["a_ptr"], signature["x_ptr"], signature["y_ptr"]) == (
        "*fp8e4nv",
        "*fp16",
        "*fp16",
    )
    assert signature["M"] == "i32"
    with pytest.raises(ValueError, match="no kernel for x of dtype int8"):
        launch.kernel_signature(dtypes | {"x": "int8"})


def test_kernel_signature_matches_the_kernel_parameters():
    pytest.importorskip("triton", reason="needs the kernel extra")
    from lrcompile.plugins.kernel import low_rank_gemm_kernel

    tiles = launch.choose_tiles(16, 64, 64, 32)
    constexprs = launch.kernel_constexprs(
        tiles, has_bias=True, fp8=False, a_per_channel=False, b_per_channel=False
    )
    parameters = low_rank_gemm_kernel.arg_names
    assert parameters == [*launch.kernel_signature(dict.fromkeys(launch.INPUTS, "float16")),
                          *constexprs]  # fmt: skip


@pytest.mark.tensorrt
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT (docker/ image)"
)
def test_plugin_registers_with_tensorrt():
    import tensorrt.plugin as trtp

    import lrcompile.plugins.low_rank_gemm  # noqa: F401  (registers on import)

    assert hasattr(trtp.op.lrcompile, "LowRankGemm")
