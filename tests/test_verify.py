"""verify(): Polygraphy comparison with ONNX Runtime, metrics, and input data checks."""

from __future__ import annotations

import numpy as np
import pytest

import lrcompile
from lrcompile.errors import DataError, LrcompileError
from lrcompile.io import data as data_lib
from lrcompile.io import shapes as shapes_lib
from lrcompile.io.model import load_model
from tests.conftest import make_model, run, save


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_identical_models_pass_with_zero_error(mlp):
    result = lrcompile.verify(mlp, mlp, tolerance=0.0)
    (out,) = result.outputs
    assert result.passed and out.relative_l2 == 0.0 and out.max_abs_error == 0.0
    assert out.cosine == pytest.approx(1.0)


def test_metrics_equal_numpy_over_all_batches(mlp, tmp_path, rng):
    compressed = lrcompile.compile_model(mlp, tmp_path / "c.onnx", rank="8", verify=False)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    data = _npz(tmp_path / "d.npz", x=x)
    result = lrcompile.verify(mlp, compressed.output_path, data=data, batch_size=6, tolerance=1.0)
    assert result.batches == 4  # 6 + 6 + 6 + 2 rows
    (ref,) = run(mlp, {"x": x})
    (got,) = run(compressed.output_path, {"x": x})
    diff = got.astype(np.float64) - ref
    (out,) = result.outputs
    assert out.relative_l2 == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(ref), rel=1e-6)
    assert out.max_abs_error == pytest.approx(np.abs(diff).max(), rel=1e-6)
    cos = np.dot(got.ravel(), ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref))
    assert out.cosine == pytest.approx(cos, rel=1e-6)


def test_gate_passes_and_fails_at_the_tolerance(mlp, tmp_path):
    compressed = lrcompile.compile_model(mlp, tmp_path / "c.onnx", rank="8", verify=False)
    error = lrcompile.verify(mlp, compressed.output_path).outputs[0].relative_l2
    assert error > 0
    assert lrcompile.verify(mlp, compressed.output_path, tolerance=error * 1.001).passed
    assert not lrcompile.verify(mlp, compressed.output_path, tolerance=error * 0.999).passed


def test_synthetic_inputs_use_input_shapes_and_are_seeded(mlp):
    inputs = data_lib.model_inputs(load_model(mlp))
    shapes = shapes_lib.resolve_shapes(inputs, shapes_lib.parse_input_shapes(["x:3x64"]), 8)
    assert shapes == {"x": (3, 64)}
    assert shapes_lib.resolve_shapes(inputs, {}, 5) == {"x": (5, 64)}
    first = list(data_lib.synthetic_feeds(inputs, shapes, 2, seed=1))
    again = list(data_lib.synthetic_feeds(inputs, shapes, 2, seed=1))
    assert [f["x"].shape for f in first] == [(3, 64), (3, 64)]
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.zeros((4, 64), np.float32), "bogus": np.zeros(4)},
            "array 'bogus' is not a model input \\(inputs: x\\)",
        ),
        ({}, "holds no arrays"),
        (
            {"x": np.zeros((4, 64), np.float64)},
            "array 'x' has dtype float64, the model expects float32",
        ),
        ({"x": np.zeros((4, 63), np.float32)}, "axis 1 must be 64"),
        ({"x": np.zeros((4, 2, 64), np.float32)}, "the model expects rank 2"),
        ({"x": np.zeros((0, 64), np.float32)}, "no samples"),
    ],
)
def test_bad_data_files(mlp, tmp_path, arrays, message):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        lrcompile.verify(mlp, mlp, data=path)


def test_not_an_npz(mlp, tmp_path):
    path = tmp_path / "bad.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        lrcompile.verify(mlp, mlp, data=path)


def test_static_batch_dimension_sets_the_batch(tmp_path, rng):
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = save(
        make_model("g (float[2, 8] x) => (float[2, 8] y) { y = MatMul(x, W) }", {"W": w}),
        tmp_path / "s.onnx",
    )
    path = _npz(tmp_path / "d.npz", x=np.ones((6, 8), np.float32))
    assert lrcompile.verify(model, model, data=path, batch_size=5).batches == 3
    odd = _npz(tmp_path / "odd.npz", x=np.zeros((5, 8), np.float32))
    with pytest.raises(DataError, match="not a multiple of the model's static batch dimension 2"):
        lrcompile.verify(model, model, data=odd)


def test_bad_input_shapes(mlp):
    with pytest.raises(DataError, match="expected name:DxDx"):
        shapes_lib.parse_input_shapes(["x=3x64"])
    with pytest.raises(DataError, match="'y' is not a model input"):
        lrcompile.verify(mlp, mlp, input_shapes={"y": (1, 2)})
    with pytest.raises(DataError, match="does not fit the model's input shape"):
        lrcompile.verify(mlp, mlp, input_shapes={"x": (1, 3)})


def test_models_with_different_signatures_are_refused(mlp, tmp_path, rng):
    w = rng.standard_normal((64, 48)).astype(np.float32)
    other = save(
        make_model("g (float[N, 64] x) => (float[N, 48] z) { z = MatMul(x, W) }", {"W": w}),
        tmp_path / "o.onnx",
    )
    with pytest.raises(LrcompileError, match="outputs \\['z'\\] differ"):
        lrcompile.verify(mlp, other)


def _fp8_qdq_model(path, rng):
    """x -> Q/DQ (FP8) -> MatMul(DequantizeLinear(W_fp8))."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    w = (rng.standard_normal((16, 16)) * 10).astype(ml_dtypes.float8_e4m3fn)
    zero = numpy_helper.from_array(np.zeros((), ml_dtypes.float8_e4m3fn), "zp")
    nodes = [
        onnx.helper.make_node("QuantizeLinear", ["x", "xs", "zp"], ["xq"]),
        onnx.helper.make_node("DequantizeLinear", ["xq", "xs", "zp"], ["xd"]),
        onnx.helper.make_node("DequantizeLinear", ["W", "ws", "zp"], ["wd"]),
        onnx.helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "fp8",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array(0.01, np.float32), "xs"),
            numpy_helper.from_array(np.array(0.1, np.float32), "ws"),
            zero,
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_fp8_models_run_at_the_basic_optimisation_level(tmp_path, rng):
    # Whatever the installed ONNX Runtime does at its default level, the sessions lrcompile
    # creates for FP8 models use BASIC (exact Q/DQ semantics) and run.
    import ml_dtypes
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from lrcompile.runtime.sessions import create_session

    path = _fp8_qdq_model(tmp_path / "fp8.onnx", rng)
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for model in (path, onnx.load(str(path))):
        session = create_session(model)
        assert session.get_session_options().graph_optimization_level == basic
    x = rng.standard_normal((4, 16)).astype(np.float32)
    (y,) = create_session(path).run(None, {"x": x})
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    xq = np.clip(x / 0.01, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.01
    expected = xq @ (weights["W"].astype(np.float32) * np.float32(0.1))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    result = lrcompile.verify(path, path, tolerance=0.0)
    assert result.passed and result.outputs[0].relative_l2 == 0.0


def test_input_shapes_are_one_mapping_type_in_config_and_verify(mlp, tmp_path):
    config = lrcompile.CompileConfig(rank="16", input_shapes={"x": [3, 64]}, verify=True)
    assert config.input_shapes == {"x": (3, 64)}
    result = lrcompile.compile_model(mlp, tmp_path / "o.onnx", config, tolerance=1.0)
    assert result.verification.batches == 8  # synthetic batches of the given shape
    check = lrcompile.verify(mlp, result.output_path, input_shapes=config.input_shapes)
    assert check.outputs[0].relative_l2 == pytest.approx(result.verification.worst_relative_l2)
    for bad in ({"x": (0, 64)}, {"x": "3x64"}, {"x": (3.0, 64)}):
        with pytest.raises(LrcompileError, match="must be a sequence of positive integers"):
            lrcompile.CompileConfig(rank="16", input_shapes=bad)
        with pytest.raises(LrcompileError, match="must be a sequence of positive integers"):
            lrcompile.verify(mlp, mlp, input_shapes=bad)


def test_a_given_shape_sizes_the_dimensions_it_names_in_other_inputs():
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    inputs = [
        data_lib.InputSpec("input_ids", i64, ("batch_size", "sequence_length")),
        data_lib.InputSpec("past.0.key", f32, ("batch_size", 2, "past_length", 16)),
        data_lib.InputSpec("past.0.value", f32, ("batch_size", 2, "past_length", 16)),
    ]
    shapes = shapes_lib.resolve_shapes(inputs, {"past.0.key": (4, 2, 0, 16)}, 8)
    assert shapes == {
        "input_ids": (4, 1),
        "past.0.key": (4, 2, 0, 16),
        "past.0.value": (4, 2, 0, 16),
    }
    with pytest.raises(DataError, match="'batch_size' two sizes \\(4 and 3\\)"):
        shapes_lib.resolve_shapes(inputs, {"past.0.key": (4, 2, 0, 16), "input_ids": (3, 5)}, 8)
