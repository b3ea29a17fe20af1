"""The Triton kernel on the CPU (TRITON_INTERPRET=1) against numpy and against ONNX Runtime."""

from __future__ import annotations

import importlib.util
import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

if importlib.util.find_spec("triton") is None and not os.environ.get("CI"):
    pytest.skip("needs the kernel extra: pip install -e '.[kernel]'", allow_module_level=True)
import torch  # torch does not import triton: the interpreter switch below still works

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run kernels on the CPU

import lrcompile
from lrcompile.plugins.kernel import low_rank_gemm
from lrcompile.plugins.launch import Tiles
from lrcompile.runtime.sessions import create_session
from tests.conftest import low_rank_matrix, make_model, save

SMALL = Tiles(block_m=16, block_n=32, block_r=16, block_k=32, num_warps=4)
SHAPES = [(1, 32, 32, 16), (5, 40, 33, 20), (17, 64, 70, 48), (40, 96, 64, 32)]  # M, K, N, r


def _e4m3(v: np.ndarray) -> np.ndarray:
    return np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _data(rng, m, k, n, r):
    return (
        rng.standard_normal((m, k)).astype(np.float32),
        (rng.standard_normal((k, r)) / np.sqrt(k)).astype(np.float32),
        (rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32),
        rng.standard_normal(n).astype(np.float32),
    )


def _half_precision_error(rng, m, k, n, r, dtype, with_bias, device="cpu"):
    x, a, b, bias = _data(rng, m, k, n, r)
    xt, at, bt, biast = (torch.tensor(v, dtype=dtype, device=device) for v in (x, a, b, bias))
    y = low_rank_gemm(xt, at, bt, biast if with_bias else None, tiles=SMALL).cpu()
    assert y.dtype == dtype and y.shape == (m, n)
    # Reference: the inputs as rounded to dtype, the intermediate stored in dtype, float64 sums.
    xd, ad, bd = (v.double().cpu().numpy() for v in (xt, at, bt))
    mid = torch.tensor(xd @ ad).to(dtype).double().numpy()
    expected = mid @ bd + (biast.double().cpu().numpy() if with_bias else 0.0)
    return np.abs(y.double().numpy() - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize(("m", "k", "n", "r"), SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp16_matches_numpy(rng, m, k, n, r, with_bias):
    # bfloat16 is checked on a GPU only: Triton 3.9's CPU interpreter computes tl.dot on bf16
    # operands wrongly (a 16x16 bf16 dot is off by ~1e10 there; loads and casts are right).
    assert _half_precision_error(rng, m, k, n, r, torch.float16, with_bias) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_a_gpu(rng, dtype):
    for m, k, n, r in [*SHAPES, (16, 4096, 4096, 256), (128, 1024, 2048, 512)]:
        error = _half_precision_error(rng, m, k, n, r, dtype, True, device="cuda")
        assert error < (2e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize(("m", "k", "n", "r"), SHAPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_matches_the_onnx_qdq_semantics(rng, m, k, n, r, per_channel):
    x, a, b, bias = _data(rng, m, k, n, r)
    axis = 0 if per_channel else None
    a_scale = (np.abs(a).max(axis=axis) / 448).astype(np.float32)
    b_scale = (np.abs(b).max(axis=axis) / 448).astype(np.float32)
    x_scale, mid_scale = np.float32(np.abs(x).max() / 448), np.float32(0.005)
    a8, b8 = _e4m3(a / a_scale), _e4m3(b / b_scale)
    scales = tuple(torch.tensor(s) for s in (x_scale, a_scale, mid_scale, b_scale))
    y = low_rank_gemm(
        torch.tensor(x),
        torch.tensor(a8).to(torch.float8_e4m3fn),
        torch.tensor(b8).to(torch.float8_e4m3fn),
        torch.tensor(bias),
        scales=scales,
        tiles=SMALL,
    )
    mid = (_e4m3(x / x_scale) * x_scale) @ (a8 * a_scale)
    expected = (_e4m3(mid / mid_scale) * mid_scale) @ (b8 * b_scale) + bias
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_fp8_rounding_carries_into_the_next_binade():
    # -1.974 rounds to -2.0 in E4M3; Triton's interpreter cast alone would give -1.0.
    x = torch.tensor([[-1.974, 1.9739, 0.0019, 460.0] * 4], dtype=torch.float32).repeat(16, 1)
    eye = torch.eye(16).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    y = low_rank_gemm(x, eye, eye, scales=(one, one, torch.tensor(1.0), one), tiles=SMALL)
    np.testing.assert_array_equal(y[0, :4].numpy(), [-2.0, 2.0, 0.001953125, 448.0])


def test_kernel_computes_what_the_onnx_function_computes(tmp_path, rng):
    """Feed the kernel the initializers of a --plugin --fp8 model; ORT runs the function body."""
    model = make_model(
        """g (float[N, 64] x) => (float[N, 48] y) {
            h = MatMul(x, W)
            y = Add(h, c)
        }""",
        {"W": low_rank_matrix(rng, 64, 48, 0.8), "c": rng.standard_normal(48).astype(np.float32)},
    )
    path = save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((24, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    result = lrcompile.compile_model(
        path,
        tmp_path / "p.onnx",
        rank="16",
        fp8=True,
        fp8_weights="per-channel",
        plugin=True,
        calib=str(tmp_path / "c.npz"),
        verify=False,
    )
    proto = onnx.load(str(result.output_path))
    (call,) = proto.graph.node
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    values = dict(
        zip(
            ("x", "x_scale", "a", "a_scale", "mid_scale", "b", "b_scale", "bias"),
            call.input,
            strict=True,
        )
    )
    tensor = {
        name: torch.tensor(np.asarray(inits[v]).astype(np.float32))
        for name, v in values.items()
        if name != "x"
    }
    y = low_rank_gemm(
        torch.tensor(x),
        tensor["a"].to(torch.float8_e4m3fn),
        tensor["b"].to(torch.float8_e4m3fn),
        tensor["bias"],
        scales=(tensor["x_scale"], tensor["a_scale"], tensor["mid_scale"], tensor["b_scale"]),
        tiles=SMALL,
    )
    (expected,) = create_session(result.output_path).run(None, {"x": x})
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
