"""TensorRT glue: profile shapes, provider choice, the ONNX Runtime packaging check, and the
missing-TensorRT errors. Engine building and engine verification need TensorRT (docker/)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from click.testing import CliRunner

from lrcompile import cli
from lrcompile.errors import DataError, LrcompileError
from lrcompile.runtime import sessions as runtime
from lrcompile.trt.build import ProfileShapes, parse_profile_shapes, uses_plugin

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes():
    shapes = parse_profile_shapes(["input_ids:1x1,8x128,32x512 attention_mask:1x1,8x128,32x512"])
    assert shapes["input_ids"] == ProfileShapes((1, 1), (8, 128), (32, 512))
    assert set(shapes) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x:1x1,8x128", "expected name:MIN,OPT,MAX"),
        ("x:1x1,8x128,4x512", "min <= opt <= max"),
        ("x:1,8x128,32x512", "differ in rank"),
    ],
)
def test_bad_profile_shapes(text, message):
    with pytest.raises(DataError, match=message):
        parse_profile_shapes([text])


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is absent")
def test_build_without_tensorrt_exits_2_with_how_to_get_it(mlp, tmp_path):
    engine = tmp_path / "m.engine"
    result = CliRunner().invoke(
        cli.main, ["build", str(mlp), "-o", str(engine), "--input-shapes", "x:1x64,8x64,64x64"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "lrcompile: error: TensorRT is not installed: build and verify engines inside the"
        " lrcompile TensorRT image (docker/README.md: docker build -f docker/Dockerfile -t"
        " lrcompile-trt .)"
    )
    assert not engine.exists()
    engine.write_bytes(b"not an engine")
    verify = CliRunner().invoke(cli.main, ["verify", str(mlp), str(engine)])
    assert verify.exit_code == 2 and "TensorRT is not installed" in verify.stderr


def test_build_checks_its_input_before_tensorrt(tmp_path):
    result = CliRunner().invoke(cli.main, ["build", str(tmp_path / "none.onnx")])
    assert result.exit_code == 2 and "none.onnx: no such file" in result.stderr
    missing = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "a.onnx"), "b.engine"])
    assert missing.exit_code == 2 and "b.engine: no such file, expected a TensorRT engine" in (
        missing.stderr
    )


def test_providers(mlp):
    assert runtime.resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    with pytest.raises(LrcompileError, match="unknown execution provider 'gpu'"):
        runtime.resolve_providers(["gpu"])
    result = CliRunner().invoke(cli.main, ["verify", str(mlp), str(mlp), "--providers", "cpu"])
    assert result.exit_code == 0, result.output
    if "CUDAExecutionProvider" not in runtime.onnxruntime().get_available_providers():
        cuda = CliRunner().invoke(cli.main, ["verify", str(mlp), str(mlp), "--providers", "cuda"])
        assert cuda.exit_code == 2 and "install 'lrcompile[gpu]'" in cuda.stderr


def test_both_onnxruntime_distributions_are_refused(monkeypatch):
    monkeypatch.setattr(runtime, "_installed", lambda name: True)
    with pytest.raises(LrcompileError, match="both onnxruntime and onnxruntime-gpu"):
        runtime.onnxruntime()


def test_uses_plugin(mlp, tmp_path, rng):
    import lrcompile

    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 64)).astype(np.float32))
    plain = lrcompile.compile_model(mlp, tmp_path / "p.onnx", rank="8", verify=False)
    fused = lrcompile.compile_model(mlp, tmp_path / "f.onnx", rank="8", plugin=True, verify=False)
    assert not uses_plugin(plain.output_path) and uses_plugin(fused.output_path)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT >= 10.15 and a GPU (docker/ image)")
def test_engine_from_plugin_model_matches_onnx_runtime(mlp, tmp_path, rng):
    import lrcompile
    from lrcompile.trt.build import build_engine

    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    fused = lrcompile.compile_model(
        mlp,
        tmp_path / "f.onnx",
        rank="16",
        plugin=True,
        calib=str(tmp_path / "c.npz"),
        verify=False,
    )
    shapes = parse_profile_shapes(["x:1x64,16x64,64x64"])
    engine = build_engine(fused.output_path, tmp_path / "f.engine", shapes)
    result = lrcompile.verify(mlp, engine, data=tmp_path / "c.npz", tolerance=0.5)
    assert result.passed
