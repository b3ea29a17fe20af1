"""``--quantize`` with ``--objective latency``: each stored form timed as written, and the W8A8
form (int8 weights, activations quantized at run time) the latency objective may choose."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lrcompile
from lrcompile.calibration.statistics import ActivationStats
from lrcompile.numerics.allocate import Choice, QuantizedLayer, allocation_path
from lrcompile.plan import Quantize
from lrcompile.runtime import latency
from lrcompile.runtime.latency_models import Form, layer_model
from tests.conftest import low_rank_matrix, make_model, save

FAKE = {"dense": 1.0, "int4": 0.9, "per correction rank": 0.001, "int8": 1.3, "w8a8": 0.25}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test's own latency cache (never the user's)."""
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency.json"


def _fake_measure(shape, budget_s=0.0):
    """Seconds per form as in ``FAKE``: weight-only int8 slower than dense, W8A8 the fastest."""
    form = shape.form
    if form is None:
        return latency.Curve(FAKE["dense"], shape.ranks, tuple(0.5 for _ in shape.ranks))
    if form.bits == 8:
        return latency.Curve(FAKE["dense"], (0,), (FAKE["w8a8" if form.dynamic else "int8"],))
    step = FAKE["per correction rank"]
    return latency.Curve(
        FAKE["dense"], shape.ranks, tuple(FAKE["int4"] + step * r for r in shape.ranks)
    )


@pytest.fixture
def matmul_then_gemm(mlp, tmp_path, rng):
    """conftest's ``mlp`` (a MatMul 64x96, Relu, a Gemm 96x48 with bias) and calibration data."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((96, 64)).astype(np.float32))
    return mlp, calib


def _emulated_w8a8(x, q, scale):
    """ONNX DynamicQuantizeLinear (uint8, per tensor, range including 0, round half to even)
    then the exact integer product, scaled: what ``MatMulInteger`` computes."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = np.float32((high - low) / 255)
    zero = np.clip(np.round(-low / step), 0, 255)
    xq = np.clip(np.round(x / step) + zero, 0, 255)
    product = (xq - zero).astype(np.int64) @ q.astype(np.int64)
    return product.astype(np.float32) * (step * scale)


def test_the_latency_objective_takes_w8a8_for_float_matmuls_and_emits_its_pattern(
    matmul_then_gemm, tmp_path, monkeypatch, rng
):
    import onnxruntime as ort

    monkeypatch.setattr(latency, "measure", _fake_measure)
    path, calib = matmul_then_gemm
    result = lrcompile.compile_model(
        path, tmp_path / "q.onnx", quantize="int4", rank="auto", calib=str(calib),
        objective="latency", tolerance=1.0, group_size=16, batch_size=32,
    )  # fmt: skip
    # The MatMul runs W8A8 (the fastest); a Gemm cannot (MatMulInteger has no bias or
    # transposes): it takes its fastest weight-only form, int4 without a correction.
    assert result.auto.ranks == {"W1": "w8a8", "W2": 0}
    decisions = {w.key: w.decision for w in result.plan}
    assert decisions["W1"] == Quantize(8, None, dynamic=True)
    assert str(decisions["W1"]) == "int8 per-channel rtn, dynamic int8 activations"
    estimate = result.auto.latency
    assert estimate.layers_dense == 2 * FAKE["dense"]
    assert estimate.layers == pytest.approx(FAKE["w8a8"] + FAKE["int4"])
    assert estimate.shapes == 5  # W1: int4 and both int8 forms; W2 (a Gemm): int4 and int8
    written = onnx.load(str(result.output_path))
    ops = [n.op_type for n in written.graph.node]
    dynamic = ["DynamicQuantizeLinear", "Mul", "MatMulInteger", "Cast", "Mul"]
    assert ops == [*dynamic, "Relu", "DequantizeLinear", "Gemm"]
    # The table timed the pattern the rewrite wrote.
    timed = layer_model(64, 96, "float32", 0, Form(8, None, True, None, (0,), dynamic=True))
    assert [n.op_type for n in timed.graph.node] == dynamic
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert arrays["W1_q"].dtype == np.int8 and arrays["W1_q_scale"].shape == (96,)
    # ONNX Runtime fuses it as it does quantize_dynamic's, and computes what ONNX defines.
    exposed = onnx.load(str(result.output_path))
    exposed.graph.output.append(onnx.ValueInfoProto(name="h"))
    save(exposed, tmp_path / "exposed.onnx")
    fusing = ort.SessionOptions()
    fusing.optimized_model_filepath = str(tmp_path / "fused.onnx")
    fused = _session(tmp_path / "exposed.onnx", fusing)
    fused_ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert "DynamicQuantizeMatMul" in fused_ops and "MatMulInteger" not in fused_ops
    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = rng.standard_normal((7, 64)).astype(np.float32)
    emulated = _emulated_w8a8(x, arrays["W1_q"], arrays["W1_q_scale"])
    for session in (fused, _session(tmp_path / "exposed.onnx", unfused)):
        _, h = session.run(["y", "h"], {"x": x})
        np.testing.assert_allclose(h, emulated, rtol=1e-5, atol=1e-4)
    # The report's measured error of W1's own output: its input is the model's, so it is the
    # error of h on the batch auto held back (the last of 96 rows in batches of 32).
    held_back = np.load(calib)["x"][64:]
    w1 = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    exact = held_back @ w1
    error = np.linalg.norm(_emulated_w8a8(held_back, arrays["W1_q"], arrays["W1_q_scale"]) - exact)
    # The verdict says how each kind of integer weight runs.
    note = result.verification.integer_weights
    assert "fused MatMulNBits" in note and "1 MatMulInteger on activations quantized" in note
    (report,) = [layer for layer in result.layers if layer.weight == "W1"]
    assert report.output_error == pytest.approx(error / np.linalg.norm(exact), rel=1e-4)
    assert report.predicted_output_error == pytest.approx(result.auto.local["W1"])


def _session(path, options):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_the_dynamic_noise_is_the_variance_dynamic_quantize_linear_adds(rng):
    stats = ActivationStats()
    batches = [rng.standard_normal((40, 32)).astype(np.float32) * scale for scale in (0.5, 2.0)]
    for x in batches:
        stats.add(x)
    rounding = [_emulated_w8a8(x, np.eye(32, dtype=np.int8), np.ones(32, np.float32)) - x
                for x in batches]  # fmt: skip
    measured = np.mean(np.square(np.concatenate(rounding)))
    # step^2 / 12 per batch, each batch's own range: the two differ 16x in variance.
    steps = [(max(x.max(), 0) - min(x.min(), 0)) / 255 for x in batches]
    assert stats.dynamic_noise == pytest.approx(np.mean(np.square(steps)) / 12, rel=1e-6)
    assert stats.dynamic_noise == pytest.approx(measured, rel=0.1)


def test_bytes_never_buy_w8a8_and_latency_buys_it_where_it_is_faster():
    choices = (Choice(0, 1200, 0.02), Choice("int8", 4352, 0.001), Choice("w8a8", 4352, 0.004))
    layer = QuantizedLayer("a", 64, 64, 16384, choices)
    by_bytes = allocation_path([layer])
    assert all(step.ranks["a"] != "w8a8" for step in by_bytes)  # the int8 bytes, more error
    seconds = {None: 1.0, 0: 0.9, "int8": 1.2, "w8a8": 0.3}
    by_time = allocation_path([layer], objective="latency", seconds={"a": seconds.__getitem__})
    assert [step.ranks["a"] for step in by_time] == [None, "w8a8"]  # int4 and int8 are slower
    assert by_time[-1].cost == 0.3 and by_time[-1].predicted_error == pytest.approx(0.004)


def test_a_real_table_times_each_form_once_and_a_second_compile_reads_it(tmp_path):
    from lrcompile.tools.synthetic import lm_like

    model = lm_like(tmp_path, layers=1, hidden=64, ffn=128, vocab=200, logit_scale=4.0)
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(3).integers(0, 200, (24, 8)))
    options = {
        "quantize": "int8", "rank": "auto", "calib": str(tmp_path / "calib.npz"),
        "objective": "latency", "tolerance": 0.5, "metric": "kl", "batch_size": 8,
    }  # fmt: skip
    first = lrcompile.compile_model(model, tmp_path / "a.onnx", **options)
    second = lrcompile.compile_model(model, tmp_path / "b.onnx", **options)
    # Shapes 64x64, 64x128, 128x64, 64x200, each in its int8 and W8A8 forms.
    assert first.auto.latency.shapes == 8 and first.auto.latency.measured == 8
    assert second.auto.latency.measured == 0 and first.auto.ranks == second.auto.ranks
    assert first.auto.latency.layers <= first.auto.latency.layers_dense
    assert first.verification.passed and first.config.objective == "latency"
    if first.output_path is not None:
        graphs = (first.output_path.read_bytes(), second.output_path.read_bytes())
        assert graphs[0].replace(b"a.onnx.data", b"b.onnx.data") == graphs[1]
        data = [Path(f"{path.output_path}.data").read_bytes() for path in (first, second)]
        assert data[0] == data[1]
    labels = collections.Counter(str(d) for d in (w.decision for w in first.plan))
    assert sum(labels.values()) == 8  # 7 searched layers and the embedding table


def test_a_weight_two_matmuls_read_is_stored_once_under_w8a8(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(latency, "measure", _fake_measure)
    model = make_model(
        "g (float[N, 64] x) => (float[N, 64] y) {h = MatMul(x, W)\nr = Relu(h)\ny = MatMul(r, W)}",
        {"W": low_rank_matrix(rng, 64, 64, 0.95) * 4},
    )
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((96, 64)).astype(np.float32))
    result = lrcompile.compile_model(
        path, tmp_path / "q.onnx", quantize="int8", rank="auto", calib=str(tmp_path / "calib.npz"),
        objective="latency", tolerance=1.0, batch_size=32,
    )  # fmt: skip
    assert result.auto.ranks == {"W": "w8a8"}
    written = onnx.load(str(result.output_path))
    assert [n.op_type for n in written.graph.node].count("MatMulInteger") == 2
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert sorted(arrays) == ["W_q", "W_q_scale"]  # once, for both readers
    x = rng.standard_normal((5, 64)).astype(np.float32)
    first = _emulated_w8a8(x, arrays["W_q"], arrays["W_q_scale"])
    expected = _emulated_w8a8(np.maximum(first, 0), arrays["W_q"], arrays["W_q_scale"])
    (got,) = _session(result.output_path, _unfused()).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _unfused():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options
