"""The FP8 pass: TensorRT's placement rules, E4M3 numerics against ml_dtypes, ORT vs numpy."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import lrcompile
from lrcompile import cli
from lrcompile.calibration.ranges import activation_ranges
from lrcompile.config import CompileConfig
from lrcompile.numerics.ranges import ActivationRange
from lrcompile.passes.fp8 import QuantizeFp8Pass
from lrcompile.pipeline import finish_passes
from lrcompile.runtime.sessions import create_session
from tests.conftest import factorize, held_back, low_rank_matrix, make_model, save

E4M3 = ml_dtypes.float8_e4m3fn
FLOAT8 = onnx.TensorProto.FLOAT8E4M3FN


@pytest.fixture
def layer(tmp_path, rng):
    """One 3-D MatMul with a dynamic batch and sequence, and calibration rows."""
    w = low_rank_matrix(rng, 48, 64, decay=0.8) * 4
    model = make_model(
        "g (float[B, S, 48] x) => (float[B, S, 64] y) { y = MatMul(x, W) }", {"W": w}
    )
    path = save(model, tmp_path / "layer.onnx")
    x = rng.standard_normal((16, 5, 48)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return path, tmp_path / "calib.npz", x


def _quantized(path, calib, **options):
    model = lrcompile.compile_model(
        path,
        path.with_name("q.onnx"),
        rank="8",
        rank_multiple=8,
        fp8=True,
        calib=str(calib),
        verify=False,
        **options,
    )
    return model, onnx.load(str(model.output_path))


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if name in node.input]


@pytest.mark.parametrize("weights", ["per-tensor", "per-channel"])
def test_qdq_follow_tensorrt_rules(layer, weights):
    path, calib, _ = layer
    result, model = _quantized(path, calib, fp8_weights=weights)
    onnx.checker.check_model(model, full_check=True)
    inits = _initializers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 2 * 2 + 2  # two activations (x, mid) with Q+DQ, two weights with DQ
    for node in qdq:
        scale, zero = node.input[1], node.input[2]
        assert scale in inits and zero in inits  # constant scale and zero point
        assert inits[zero].data_type == FLOAT8
        assert not numpy_helper.to_array(inits[zero]).astype(np.float32).any()
        if inits[scale].dims:  # per-channel: explicit axis over the output channels
            assert weights == "per-channel" and node.op_type == "DequantizeLinear"
            assert [a.i for a in node.attribute if a.name == "axis"] == [1]
        else:
            assert all(a.name != "axis" for a in node.attribute)
    # Q/DQ sit on MatMul inputs only: each DQ feeds MatMuls, at input 0 (activation) or 1 (weight).
    for node in qdq:
        if node.op_type == "DequantizeLinear":
            users = _consumers(model, node.output[0])
            assert users and all(u.op_type == "MatMul" for u in users)
            is_weight = node.input[0] in inits
            assert all(u.input[1 if is_weight else 0] == node.output[0] for u in users)
        else:
            assert [u.op_type for u in _consumers(model, node.output[0])] == ["DequantizeLinear"]
    # Weights are stored in E4M3 only; the fp32 factors are gone.
    assert {t.data_type for t in inits.values() if t.name.endswith("_fp8")} == {FLOAT8}
    assert not any(n.endswith(("_lr_A", "_lr_B")) for n in inits)
    # The report counts one byte per factor element.
    (factored,) = [layer for layer in result.layers if layer.status == "factored"]
    assert factored.bytes_after == factored.params_after == 8 * (48 + 64)


def test_dequantized_weights_are_the_factors_rounded_to_e4m3(layer, rng):
    path, _, _ = layer
    model = ir.serde.deserialize_model(onnx.load(str(path)))
    factorize(model, "8", rank_multiple=8)
    factors = {
        name: value.const_value.numpy().copy()
        for name, value in model.graph.initializers.items()
        if name.endswith(("_lr_A", "_lr_B"))
    }
    ranges = {"x": ActivationRange(1.0, 1.0), "y_lr_mid": ActivationRange(1.0, 1.0)}
    QuantizeFp8Pass(weights="per-channel", ranges=ranges)(model)
    for name, factor in factors.items():
        fp8 = model.graph.initializers[f"{name}_fp8"].const_value.numpy()
        scale = model.graph.initializers[f"{name}_fp8_scale"].const_value.numpy()
        np.testing.assert_allclose(scale, np.abs(factor).max(axis=0) / 448, rtol=1e-6)
        expected = (factor / scale).astype(E4M3).astype(np.float32) * scale
        dequantized = fp8.astype(np.float32) * scale
        np.testing.assert_allclose(dequantized, expected, rtol=1e-6, atol=1e-6)
        # E4M3 keeps 3 mantissa bits: relative rounding error <= 2**-4 for normal values.
        normal = np.abs(factor / scale) >= 2**-6
        rel = np.abs(dequantized - factor)[normal] / np.abs(factor)[normal]
        assert rel.max() <= 2**-4 + 1e-6


@pytest.mark.parametrize("weights", ["per-tensor", "per-channel"])
def test_onnxruntime_equals_numpy_emulation(layer, weights):
    path, calib, x = layer
    _, model = _quantized(path, calib, fp8_weights=weights)
    inits = {name: numpy_helper.to_array(t) for name, t in _initializers(model).items()}

    def q_dq(v, scale):
        return (v / scale).clip(-448, 448).astype(E4M3).astype(np.float32) * scale

    def weight(name):
        return inits[f"{name}_fp8"].astype(np.float32) * inits[f"{name}_fp8_scale"]

    mid = q_dq(x, inits["x_fp8_scale"]) @ weight("W_lr_A")
    expected = q_dq(mid, inits["y_lr_mid_fp8_scale"]) @ weight("W_lr_B")
    (got,) = create_session(path.with_name("q.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_scales_come_from_the_calibration_amax(layer):
    path, calib, x = layer
    _, model = _quantized(path, calib)
    inits = {name: numpy_helper.to_array(t) for name, t in _initializers(model).items()}
    assert inits["x_fp8_scale"] == pytest.approx(np.abs(x).max() / 448, rel=1e-6)


def test_dynamic_dimensions_stay_dynamic(layer, rng):
    path, calib, _ = layer
    _, model = _quantized(path, calib)
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["B", "S"]
    session = create_session(path.with_name("q.onnx"))
    for shape in [(1, 1, 48), (3, 7, 48)]:
        out = session.run(None, {"x": rng.standard_normal(shape).astype(np.float32)})[0]
        assert out.shape == (*shape[:2], 64)


def test_the_finish_passes_run_fp8_then_the_plugin_then_cleanup(layer):
    path, calib, _ = layer
    config = CompileConfig(rank="8", fp8=True, calib=str(calib), plugin=True)
    assert [type(p).__name__ for p in finish_passes(config).passes] == [
        "QuantizeFp8Pass",
        "EmitLowRankGemmPass",
        "RemoveUnusedNodesPass",
    ]
    # What that order leaves in a written model: the plugin's function body holds the FP8 Q/DQ
    # (FP8 ran first), and no initializer is left unread (cleanup ran last).
    out = path.with_name("ordered.onnx")
    lrcompile.compile_model(path, out, config)
    model = onnx.load(str(out))
    (function,) = model.functions
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in function.node}
    read = {name for node in model.graph.node for name in node.input}
    assert {init.name for init in model.graph.initializer} <= read


def test_the_fp8_pass_runs_no_model_it_needs_the_ranges_as_data(layer):
    model = ir.load(str(layer[0]))
    factorize(model, "8", rank_multiple=8)
    quantize = QuantizeFp8Pass()
    names = quantize.activation_names(model)
    assert names == ["x", "y_lr_mid"]
    with pytest.raises(ir.passes.PreconditionError, match="no calibrated range for"):
        quantize(model)
    ranges = {name: ActivationRange(1.0, 1.0) for name in names}
    tensors, skipped = QuantizeFp8Pass(ranges=ranges).report(model)
    assert {t.name for t in tensors} == {"x", "y_lr_mid", "W_lr_A", "W_lr_B"} and not skipped
    result = QuantizeFp8Pass(ranges=ranges)(model)
    assert result.modified
    scales = {t.name: t.scale_max for t in tensors}
    for name, scale in scales.items():  # the report's scales are the ones written
        written = model.graph.initializers[f"{name}_fp8_scale"].const_value.numpy()
        assert float(written.max()) == pytest.approx(scale, rel=1e-7)


def test_opset_below_19_is_upgraded_with_a_warning(tmp_path, rng, caplog):
    w = low_rank_matrix(rng, 32, 32, decay=0.7)
    path = save(
        make_model(
            "g (float[N, 32] x) => (float[N, 32] y) { y = MatMul(x, W) }", {"W": w}, opset=17
        ),
        tmp_path / "old.onnx",
    )
    with caplog.at_level(logging.WARNING):
        result = lrcompile.compile_model(
            path,
            tmp_path / "o.onnx",
            rank="8",
            rank_multiple=8,
            fp8=True,
            calib="synthetic",
            tolerance=0.5,
        )
    assert "upgraded the default opset 17 -> 19 for FP8" in caplog.text
    model = onnx.load(str(result.output_path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 19
    assert model.ir_version == 10
    assert result.verification.passed


def test_scope_all_quantizes_dense_layers_and_refuses_quantized_ones(tmp_path, rng):
    w = rng.standard_normal((32, 32)).astype(np.float32)  # full rank: stays dense
    wq = rng.integers(-100, 100, (32, 32)).astype(np.int8)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "W"], ["h"], name="dense"),
            onnx.helper.make_node("DequantizeLinear", ["Wq", "s"], ["wd"], name="dq"),
            onnx.helper.make_node("MatMul", ["h", "wd"], ["y"], name="int8_weight"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(wq, "Wq"),
            numpy_helper.from_array(np.array(0.01, np.float32), "s"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 32)).astype(np.float32))
    result = lrcompile.compile_model(
        path,
        tmp_path / "o.onnx",
        rank="16",
        fp8=True,
        fp8_scope="all",
        calib=str(tmp_path / "c.npz"),
        allow_no_saving=False,
        verify=False,
    )
    assert result.output_path is None  # nothing factored: nothing written
    # Write it anyway at a rank that factors nothing but with scope all on a saved model:
    ir_model = ir.serde.deserialize_model(model)
    ranges = {"x": ActivationRange(3.0, 3.0), "h": ActivationRange(3.0, 3.0)}
    quantize = QuantizeFp8Pass(scope="all", ranges=ranges)
    tensors, skipped = quantize.report(ir_model)
    assert [t.name for t in tensors] == ["x", "W"]
    assert skipped == [
        ("int8_weight", "weight is already quantized (produced by DequantizeLinear)")
    ]
    assert quantize(ir_model).modified
    assert ir_model.graph.node(0).op_type == "QuantizeLinear"  # x, then W's DQ, then the MatMul


def test_nodes_fed_by_dequantize_are_left_alone(rng):
    text = """g (float[N, 16] x) => (float[N, 16] y) {
        q = QuantizeLinear(x, s)
        d = DequantizeLinear(q, s)
        y = MatMul(d, W)
    }"""
    weights = {
        "W": rng.standard_normal((16, 16)).astype(np.float32),
        "s": np.array(0.1, np.float32),
    }
    model = ir.serde.deserialize_model(make_model(text, weights))
    quantize = QuantizeFp8Pass(scope="all", ranges={"d": ActivationRange(1.0, 1.0)})
    _, skipped = quantize.report(model)
    assert [reason for _, reason in skipped] == ["input is already quantized (DequantizeLinear)"]
    assert not quantize(model).modified


def test_percentile_ranges_and_the_outlier_warning(tmp_path, rng, caplog):
    model = make_model("g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }", {})
    values = np.arange(1, 10001, dtype=np.float32)
    feeds = [{"x": values[i : i + 1000].repeat(4).reshape(-1, 4)} for i in range(0, 10000, 1000)]
    (r,) = activation_ranges(model, ["y"], feeds, data_folder=None, percentile=99.0).values()
    assert r.amax == 10000
    assert 9899 <= r.value <= 9905 and r.clipped == pytest.approx(0.01, abs=5e-4)
    exact = activation_ranges(model, ["y"], feeds, data_folder=None)["y"]
    assert (exact.amax, exact.value, exact.clipped) == (10000, 10000, 0.0)
    # An outlier far beyond the chosen range is warned about, naming the tensor.
    graph = ir.serde.deserialize_model(
        make_model(
            "g (float[N, 8] x) => (float[N, 8] y) { y = MatMul(x, W) }",
            {"W": np.eye(8, dtype=np.float32)},
        )
    )
    with caplog.at_level(logging.WARNING):
        QuantizeFp8Pass(scope="all", ranges={"x": ActivationRange(50.0, 5.0, 0.001)})(graph)
    assert "x: calibration values reach 50, 10.0x beyond the FP8 range" in caplog.text


def test_fp8_without_calibration_exits_2(layer, tmp_path):
    path, _, _ = layer
    result = CliRunner().invoke(
        cli.main, [str(path), "--rank", "8", "--fp8", "-o", str(tmp_path / "o.onnx")]
    )
    assert result.exit_code == 2
    assert "--fp8 needs calibration data for its scales" in result.stderr
    bad = CliRunner().invoke(
        cli.main, [str(path), "--rank", "8", "--fp8", "--calib", "synthetic", "--fp8-calib", "p:9"]
    )
    assert bad.exit_code == 2 and "expected max or percentile:P" in bad.stderr


def test_auto_with_fp8_meets_the_tolerance(layer, tmp_path):
    path, calib, x = layer
    result = lrcompile.compile_model(
        path,
        tmp_path / "a.onnx",
        rank="auto",
        fp8=True,
        calib=str(calib),
        tolerance=0.1,
        rank_multiple=8,
    )
    assert result.auto.measured_error <= 0.08
    x = held_back(x, result.auto)  # what the search measured on
    ref = create_session(path).run(None, {"x": x})[0]
    got = create_session(result.output_path).run(None, {"x": x})[0]
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert error == pytest.approx(result.auto.measured_error, rel=1e-4)
    assert result.verification.passed and result.fp8 is not None


def test_auto_with_fp8_on_a_model_with_external_data(tmp_path, rng):
    # The FP8 ranges of the final model are measured with its factors in the scratch folder and
    # the other weights beside the input: both must be found, and the model must equal the
    # one compiled from the same model stored inline.
    model = make_model(
        """g (float[N, 64] x) => (float[N, 64] y) {
            h = MatMul(x, W1)
            r = Relu(h)
            y = Gemm(r, W2, C)
        }""",
        {
            "W1": low_rank_matrix(rng, 64, 128, decay=0.8),
            "W2": low_rank_matrix(rng, 128, 64, decay=0.8),
            "C": rng.standard_normal(64).astype(np.float32),
        },
    )
    inline = save(model, tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()
    external = save(
        model,
        tmp_path / "ext" / "m.onnx",
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    x = rng.standard_normal((160, 64)).astype(np.float32)  # 120 fitted rows: rank 64 of 128
    np.savez(tmp_path / "calib.npz", x=x)
    results = [
        lrcompile.compile_model(
            path,
            path.with_name("o.onnx"),
            rank="auto",
            calib=str(tmp_path / "calib.npz"),
            fp8=True,
            tolerance=0.2,
        )
        for path in (inline, external)
    ]
    assert all(r.passed and r.totals.factored == 2 for r in results)
    assert results[0].auto.ranks == results[1].auto.ranks
    assert (tmp_path / "ext" / "o.onnx.data").is_file()
    assert not any(p.name.startswith(".lrcompile") for p in (tmp_path / "ext").iterdir())
    outputs = [create_session(r.output_path).run(None, {"x": x})[0] for r in results]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert {t.name for t in results[0].fp8.tensors} == {t.name for t in results[1].fp8.tensors}


def test_fp8_scope_all_quantizes_constant_node_and_transposed_gemm_weights(tmp_path, rng):
    # A dense weight held by a Constant node, and a dense Gemm(transB=1) weight [N, K] quantized
    # per output channel: axis 0 there (axis 1 would be per input channel).
    w0 = low_rank_matrix(rng, 64, 64, decay=0.8)
    w1 = rng.standard_normal((64, 8)).astype(np.float32)
    w2 = (rng.standard_normal((8, 8)) * np.linspace(0.1, 10, 8)[:, None]).astype(np.float32)
    values = ", ".join(f"{v:.9g}" for v in w1.ravel())
    text = """g (float[N, 64] x) => (float[N, 8] y) {
        h0 = MatMul(x, W0)
        w1 = Constant<value = float[64, 8] {VALUES}>()
        h = MatMul(h0, w1)
        y = Gemm<transB = 1>(h, W2)
    }"""
    model = make_model(text.replace("VALUES", values), {"W0": w0, "W2": w2})
    path = save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((64, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    result = lrcompile.compile_model(
        path, tmp_path / "q.onnx", rank="16", calib=str(tmp_path / "c.npz"), fp8=True,
        fp8_scope="all", fp8_weights="per-channel", verify=False,
    )  # fmt: skip
    assert [layer.status for layer in result.layers] == ["factored", "dense", "dense"]
    out = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    (gemm_dq,) = [
        n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W2_fp8"
    ]
    assert {a.name: a.i for a in gemm_dq.attribute}["axis"] == 0
    np.testing.assert_allclose(inits[gemm_dq.input[1]], np.abs(w2).max(axis=1) / 448, rtol=1e-6)
    assert len([t for t in result.fp8.tensors if t.kind == "weight"]) == 4  # A, B, w1, W2
    y_ref = create_session(path).run(None, {"x": x})[0]
    y = create_session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.15
