"""The plugin pass: LowRankGemm calls to model-local functions that ONNX Runtime inlines."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lrcompile
from lrcompile.passes.plugin import EmitLowRankGemmPass
from lrcompile.runtime.sessions import create_session
from tests.conftest import factorize, low_rank_matrix, make_model, save


@pytest.fixture
def mlp3d(tmp_path, rng):
    """x[B, S, 64] -> MatMul + Add bias -> Relu -> MatMul (no bias) -> y, and calibration."""
    model = make_model(
        """g (float[B, S, 64] x) => (float[B, S, 32] y) {
            h = MatMul(x, W1)
            a = Add(h, b1)
            r = Relu(a)
            y = MatMul(r, W2)
        }""",
        {
            "W1": low_rank_matrix(rng, 64, 96, 0.8),
            "b1": rng.standard_normal(96).astype(np.float32),
            "W2": low_rank_matrix(rng, 96, 32, 0.8),
        },
    )
    path = save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((8, 4, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    return path, tmp_path / "c.npz", x


def _compile(path, calib, name, **options):
    result = lrcompile.compile_model(
        path, path.with_name(name), rank="16", calib=str(calib), verify=False, **options
    )
    return onnx.load(str(result.output_path))


@pytest.mark.parametrize(
    "options",
    [{}, {"fp8": True}, {"fp8": True, "fp8_weights": "per-channel"}],
    ids=["fp32", "fp8", "fp8-per-channel"],
)
def test_plugin_model_equals_the_plain_model(mlp3d, options):
    path, calib, x = mlp3d
    plain = _compile(path, calib, "plain.onnx", **options)
    fused = _compile(path, calib, "fused.onnx", plugin=True, **options)
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == ["LowRankGemm", "Relu", "LowRankGemm"]
    expected = create_session(plain).run(None, {"x": x})[0]
    got = create_session(fused).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)


def test_call_attributes_and_functions(mlp3d):
    path, calib, _ = mlp3d
    fused = _compile(path, calib, "fused.onnx", plugin=True, fp8=True)
    assert {(o.domain, o.version) for o in fused.opset_import} >= {("", 19), ("lrcompile", 1)}
    first, _, second = fused.graph.node
    for call, has_bias in ((first, 1), (second, 0)):
        assert (call.domain, call.op_type, len(call.input)) == ("lrcompile", "LowRankGemm", 8)
        attrs = {a.name: a for a in call.attribute}
        assert {n: attrs[n].type for n in attrs} == {
            "rank": onnx.AttributeProto.INT,
            "has_bias": onnx.AttributeProto.INT,
            "fp8": onnx.AttributeProto.INT,
            "plugin_namespace": onnx.AttributeProto.STRING,
            "plugin_version": onnx.AttributeProto.STRING,
        }
        assert (attrs["rank"].i, attrs["has_bias"].i, attrs["fp8"].i) == (16, has_bias, 1)
        assert (attrs["plugin_namespace"].s, attrs["plugin_version"].s) == (b"lrcompile", b"1")
    # One function per signature: with and without bias.
    assert sorted(f.overload for f in fused.functions) == ["fp8_bias", "fp8_nobias"]
    body = {f.overload: [n.op_type for n in f.node] for f in fused.functions}
    assert body["fp8_nobias"] == [
        "Constant",
        "Constant",
        "QuantizeLinear",
        "DequantizeLinear",
        "Constant",
        "DequantizeLinear",
        "Constant",
        "DequantizeLinear",
        "MatMul",
        "QuantizeLinear",
        "DequantizeLinear",
        "MatMul",
    ]
    assert body["fp8_bias"][-1] == "Add"
    # The bias input of the call without one is a shared zero vector.
    inits = {t.name: t for t in fused.graph.initializer}
    assert not onnx.numpy_helper.to_array(inits[second.input[7]]).any()


def test_float_call_reuses_one_function_across_ranks(mlp3d):
    path, calib, _ = mlp3d
    fused = _compile(path, calib, "fused.onnx", plugin=True)
    assert sorted(f.overload for f in fused.functions) == ["float_bias", "float_nobias"]
    assert [n.op_type for n in fused.functions[0].node] in (
        ["MatMul", "MatMul", "Add"],
        ["MatMul", "MatMul"],
    )


def test_intermediate_read_elsewhere_is_left_alone(rng):
    model = make_model(
        """g (float[N, 64] x) => (float[N, 64] y) { y = MatMul(x, W) }""",
        {"W": low_rank_matrix(rng, 64, 64, 0.5)},
    )
    ir_model = ir.serde.deserialize_model(model)
    factorize(ir_model, "8", rank_multiple=8)
    mid = next(n for n in ir_model.graph if n.name.endswith("_lr_A")).outputs[0]
    ir_model.graph.outputs.append(mid)  # now the intermediate is a model output too
    result = EmitLowRankGemmPass()(ir_model)
    assert not result.modified
    assert result.skipped == [("y_lr_B", "the intermediate is read elsewhere")]


def test_blocks_sharing_a_quantized_input(tmp_path, rng):
    """Q, K and V read one input: its shared Q/DQ stays until every block is fused."""
    model = make_model(
        """g (float[N, 64] x) => (float[N, 32] q, float[N, 32] k, float[N, 32] v) {
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
        }""",
        {n: low_rank_matrix(rng, 64, 32, 0.7) for n in ("Wq", "Wk", "Wv")},
    )
    path = save(model, tmp_path / "qkv.onnx")
    x = rng.standard_normal((16, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    plain = _compile(path, tmp_path / "c.npz", "p.onnx", rank_multiple=8, fp8=True)
    fused = _compile(path, tmp_path / "c.npz", "f.onnx", rank_multiple=8, fp8=True, plugin=True)
    assert [n.op_type for n in fused.graph.node] == ["LowRankGemm"] * 3
    for got, expected in zip(
        create_session(fused).run(None, {"x": x}),
        create_session(plain).run(None, {"x": x}),
        strict=True,
    ):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("opset", "fp8"), [(21, True), (12, False)])
def test_function_bodies_use_the_models_opset(tmp_path, rng, opset, fp8):
    model = make_model(
        "g (float[N, 64] x) => (float[N, 48] y) { y = MatMul(x, W) }",
        {"W": low_rank_matrix(rng, 64, 48, 0.8)},
        opset=opset,
    )
    path = save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((16, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    options = {"fp8": True} if fp8 else {}
    plain = _compile(path, tmp_path / "c.npz", "plain.onnx", **options)
    fused = _compile(path, tmp_path / "c.npz", "fused.onnx", plugin=True, **options)
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == ["LowRankGemm"]
    (function,) = fused.functions
    assert {o.domain: o.version for o in function.opset_import}[""] == opset
    np.testing.assert_array_equal(
        create_session(fused).run(None, {"x": x})[0], create_session(plain).run(None, {"x": x})[0]
    )


@pytest.mark.parametrize("c_shape", [(1, 48), (), (48,)])
def test_gemm_beta_and_broadcast_bias_reach_the_plugin_as_one_vector(tmp_path, rng, c_shape):
    model = make_model(
        "g (float[N, 64] x) => (float[N, 48] y) { y = Gemm<beta = 0.5>(x, W, C) }",
        {
            "W": low_rank_matrix(rng, 64, 48, 0.8),
            "C": rng.standard_normal(c_shape).astype(np.float32),
        },
    )
    path = save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((16, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    plain = _compile(path, tmp_path / "c.npz", "plain.onnx")
    fused = _compile(path, tmp_path / "c.npz", "fused.onnx", plugin=True)
    onnx.checker.check_model(fused, full_check=True)
    (call,) = fused.graph.node
    assert call.op_type == "LowRankGemm"
    bias = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}[call.input[7]]
    c = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["C"]
    np.testing.assert_array_equal(bias, np.broadcast_to(c * np.float32(0.5), (1, 48))[0])
    np.testing.assert_allclose(
        create_session(fused).run(None, {"x": x})[0],
        create_session(plain).run(None, {"x": x})[0],
        rtol=1e-6,
        atol=1e-6,
    )


def test_a_full_matrix_gemm_bias_is_left_unfused_with_a_reason(rng):
    model = make_model(
        "g (float[4, 64] x) => (float[4, 48] y) { y = Gemm(x, W, C) }",
        {
            "W": low_rank_matrix(rng, 64, 48, 0.8),
            "C": rng.standard_normal((4, 48)).astype(np.float32),
        },
    )
    ir_model = ir.serde.deserialize_model(model)
    factorize(ir_model, "16")
    result = EmitLowRankGemmPass()(ir_model)
    assert not result.modified
    assert result.skipped == [
        ("y_lr_B", "its Gemm bias C of shape [4, 48] is not one value per output ([48])")
    ]
