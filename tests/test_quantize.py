"""Weights as int8/int4 through DequantizeLinear, with a low-rank correction of the error: the
numerics against ONNX's definition, the emitted graphs, the correction's closed form, ONNX
Runtime's MatMulNBits fusion against exact execution, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import lrcompile
from lrcompile import cli
from lrcompile.factors import quantized as quantized_lib
from lrcompile.numerics import whiten
from lrcompile.numerics.quantize import quantize
from lrcompile.plan import Keep, Quantize
from lrcompile.runtime.sessions import create_session
from tests.conftest import low_rank_matrix, make_model, save


def _onnx_dequantize(q, scale, zero, axis, block):
    """DequantizeLinear as ONNX defines it, by onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    inputs = ["q", "s"] + (["z"] if zero is not None else [])
    attributes = {"axis": axis} | ({"block_size": block} if block else {})
    node = onnx.helper.make_node("DequantizeLinear", inputs, ["y"], **attributes)
    feeds = {"q": q, "s": scale} | ({"z": zero} if zero is not None else {})
    return ReferenceEvaluator(node).run(None, feeds)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 16, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_is_onnx_dequantize_linear(rng, bits, group, symmetric):
    w = rng.standard_normal((70, 24)).astype(np.float32)  # 70 rows: a short last block
    quantized = quantize(w, bits, group, symmetric=symmetric)
    q, scale, zero = quantized_lib.stored_arrays(quantized, group is None, np.dtype(np.float32))
    axis, block = (1, None) if group is None else (0, group)
    expected = _onnx_dequantize(q, scale, zero, axis, block)
    np.testing.assert_array_equal(quantized.dequantize(), expected)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert quantized.q.min() >= lo and quantized.q.max() <= hi
    # Round to nearest: no value is off by more than half a step of its block.
    steps = np.repeat(quantized.scale, quantized.group, axis=0)[:70]
    assert np.all(np.abs(quantized.dequantize() - w) <= steps / 2 + 1e-6)


def test_the_mse_base_has_no_more_error_than_round_to_nearest_block_by_block(rng):
    w = rng.standard_t(3, (256, 64)).astype(np.float32)  # heavy tails: clipping pays
    totals = {}
    for bits in (4, 8):
        rtn, mse = quantize(w, bits, 32), quantize(w, bits, 32, base="mse")
        errors = [np.square(q.dequantize() - w).reshape(8, 32, 64).sum(1) for q in (rtn, mse)]
        assert np.all(errors[1] <= errors[0] + 1e-9)
        totals[bits] = [float(np.sum(e)) for e in errors]
    assert totals[4][1] < 0.9 * totals[4][0]  # int4 of heavy tails: clearly better


def test_the_whitened_correction_is_its_closed_form_and_beats_the_plain_one(rng):
    # Correlated inputs: the whitened rank-r fit of the residual minimizes the OUTPUT error, which
    # is exactly the residual's discarded whitened singular values (QERA's closed form).
    k, n, r = 64, 48, 8
    mix = rng.standard_normal((k, k)) * np.logspace(0, -2, k)
    x = rng.standard_normal((2000, k)) @ mix.T
    w = rng.standard_normal((k, n)).astype(np.float32)
    _, residual = quantized_lib.quantized_with_residual(w, _template(4, 16), np.float32)
    white = whiten.whitening_from_gram(x.T @ x / len(x))
    whitened, spectrum = quantized_lib.residual_factors(residual, r, white)
    plain, _ = quantized_lib.residual_factors(residual, r, None)
    error = [np.linalg.norm(x @ (residual - f.left @ f.right)) for f in (whitened, plain)]
    closed = np.sqrt(np.sum(np.square(spectrum[r:])) * len(x))
    assert error[0] == pytest.approx(closed, rel=1e-3)
    assert error[0] < 0.9 * error[1]
    assert np.linalg.norm(x @ residual) > error[1]  # any correction helps


def _template(bits, group, **options):
    from lrcompile.plan import Quantize

    return Quantize(bits, group, **options)


def _compile(tmp_path, model, *args, name="q.onnx"):
    path = save(model, tmp_path / "m.onnx")
    out = tmp_path / name
    result = CliRunner().invoke(cli.main, [str(path), "-o", str(out), "--no-verify", *args])
    assert result.exit_code == 0, result.output
    return path, out


def _structure(path):
    model = onnx.load(str(path))
    inits = {t.name: (onnx.helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims))
             for t in model.graph.initializer}  # fmt: skip
    return [n.op_type for n in model.graph.node], inits, model


def test_a_matmul_becomes_dequantize_linear_and_its_correction(tmp_path, rng):
    w = low_rank_matrix(rng, 64, 48, decay=0.9)
    model = make_model("g (float[N, 64] x) => (float[N, 48] y) { y = MatMul(x, W) }", {"W": w})
    _, out = _compile(tmp_path, model, "--quantize", "int4", "--rank", "8", "--rank-multiple", "8")
    ops, inits, written = _structure(out)
    assert ops == ["DequantizeLinear", "Cast", "Cast", "MatMul", "MatMul", "MatMul", "Add"]
    assert (
        inits["W_q"][1] == (64, 48)
        and written.graph.initializer[0].data_type == onnx.TensorProto.INT4
    )
    assert inits["W_q_scale"] == (np.dtype(np.float32), (2, 48))  # 64 rows in blocks of 32
    assert inits["W_lr_A"] == (np.dtype(np.float16), (64, 8))
    assert inits["W_lr_B"] == (np.dtype(np.float16), (8, 48))
    dq = next(n for n in written.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {
        "axis": 0, "block_size": 32,
    }  # fmt: skip
    assert written.opset_import[0].version >= 21
    x = rng.standard_normal((5, 64)).astype(np.float32)
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    deq = _onnx_dequantize(arrays["W_q"], arrays["W_q_scale"], None, 0, 32)
    a, b = (arrays[name].astype(np.float32) for name in ("W_lr_A", "W_lr_B"))
    (exact,) = _basic_session(out).run(None, {"x": x})
    np.testing.assert_allclose(exact, x @ deq + (x @ a) @ b, rtol=1e-5, atol=1e-5)
    # The correction lowers the weight's error below the integers' alone.
    assert np.linalg.norm(deq + a @ b - w) < np.linalg.norm(deq - w)


def _basic_session(path):
    """ONNX Runtime without graph optimizations: DequantizeLinear and MatMul exactly."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_gemm_transb_alpha_and_bias_fold_into_the_dequantized_weight(tmp_path, rng):
    w = low_rank_matrix(rng, 48, 64)  # stored [N, K] with transB
    c = rng.standard_normal(48).astype(np.float32)
    model = make_model(
        "g (float[M, 64] a) => (float[M, 48] y) { y = Gemm <alpha = 0.5, transB = 1> (a, W, C) }",
        {"W": w, "C": c},
    )
    _, out = _compile(tmp_path, model, "--quantize", "int8")
    ops, inits, written = _structure(out)
    assert ops == ["DequantizeLinear", "Gemm"]
    gemm = written.graph.node[1]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute} == {
        "transA": 0, "beta": 1.0,
    }  # fmt: skip
    assert inits["W_q"] == (np.dtype(np.int8), (64, 48))  # the effective weight: 0.5 * W^T
    assert inits["W_q_scale"][1] == (48,)  # int8: per output channel
    a = rng.standard_normal((3, 64)).astype(np.float32)
    (got,) = _basic_session(out).run(None, {"a": a})
    np.testing.assert_allclose(got, a @ (0.5 * w.T) + c, rtol=0.02, atol=0.02)


def test_a_half_precision_weight_keeps_its_type_through_a_cast(tmp_path, rng):
    w = low_rank_matrix(rng, 64, 32).astype(np.float16)
    model = make_model(
        """g (float[N, 64] x) => (float[N, 32] y) { wf = Cast <to = 1> (W)  y = MatMul(x, wf) }""",
        {"W": w},
    )
    _, out = _compile(tmp_path, model, "--quantize", "int4", "--rank", "16")
    _ops, inits, _ = _structure(out)
    assert inits["W_q_scale"][0] == np.dtype(np.float32)  # the type the MatMul reads
    assert inits["W_lr_A"][0] == np.dtype(np.float16)
    assert "W" not in inits
    x = rng.standard_normal((4, 64)).astype(np.float32)
    (got,) = create_session(out).run(None, {"x": x})
    expected = x @ w.astype(np.float32)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.1


def test_onnx_runtime_fuses_the_pattern_and_its_accuracy_level_is_close_to_exact(tmp_path, rng):
    # The default optimisation level fuses DequantizeLinear -> MatMul into MatMulNBits, which
    # computes the activations in int8 (accuracy level 4): the check runs it as deployed.
    import onnxruntime as ort

    w = rng.standard_normal((256, 128)).astype(np.float32)
    model = make_model("g (float[N, 256] x) => (float[N, 128] y) { y = MatMul(x, W) }", {"W": w})
    _, out = _compile(tmp_path, model, "--quantize", "int4", "--rank", "16")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    fused = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
    x = rng.standard_normal((8, 256)).astype(np.float32)
    (got,), (exact,) = fused.run(None, {"x": x}), _basic_session(out).run(None, {"x": x})
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02


def test_the_report_counts_every_byte(tmp_path, rng):
    w = rng.standard_normal((128, 96)).astype(np.float32)
    model = make_model("g (float[N, 128] x) => (float[N, 96] y) { y = MatMul(x, W) }", {"W": w})
    path = save(model, tmp_path / "m.onnx")
    result = lrcompile.compile_model(
        path, tmp_path / "q.onnx", quantize="int4", rank="16", symmetric=False, verify=False
    )
    (layer,) = result.layers
    # int4 values (2 per byte), float32 scales and int4 zero points per 32 rows, fp16 A and B.
    expected = 128 * 96 // 2 + 4 * 96 * 4 + 4 * 96 // 2 + 16 * (128 + 96) * 2
    assert (layer.status, layer.rank, layer.bytes_after) == ("quantized", 16, expected)
    written = onnx.load(str(tmp_path / "q.onnx"))
    stored = sum(len(t.raw_data) for t in written.graph.initializer)
    assert stored == expected
    assert result.plan.decision(layer.weight).to_dict()["bits"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int4", "--group-size", "48"], "--group-size must be a power of 2"),
        (["--quantize", "int8", "--fp8", "--calib", "synthetic"], "--fp8 does not combine"),
        (["--quantize", "int4", "--fp8"], "--fp8 does not combine"),
        (["--quantize", "int4", "--calib", "missing.npz"], "missing.npz: no such file"),
        (["--rank", "8", "--group-size", "32"], "--group-size is a setting of --quantize"),
        (["--quantize", "int8", "--objective", "flops"], "prices factored layers"),
        ([], "--rank is required"),
    ],
)
def test_quantize_options_that_cannot_work_are_refused_in_one_line(tmp_path, rng, args, message):
    model = make_model(
        "g (float[N, 32] x) => (float[N, 32] y) { y = MatMul(x, W) }",
        {"W": rng.standard_normal((32, 32)).astype(np.float32)},
    )
    path = save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(cli.main, [str(path), "-o", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lrcompile: error: ") and message in line
    assert not (tmp_path / "o.onnx").exists()


def test_int4_tensors_round_trip_through_the_spill_file(tmp_path, rng):
    from lrcompile.io.spill import Spill

    q = rng.integers(-8, 8, (10, 7)).astype(ml_dtypes.int4)
    stored = Spill(tmp_path).store(q, "q")
    assert stored.dtype == ir.DataType.INT4
    np.testing.assert_array_equal(stored.numpy().astype(np.int8), q.astype(np.int8))


def test_a_quantized_layers_options_are_the_forms_smaller_than_dense_and_the_path_falls():
    from lrcompile.numerics.allocate import Choice, QuantizedLayer, allocation_path

    layers = [
        QuantizedLayer("a", 64, 64, 16384, (Choice(0, 2560, 0.04), Choice(16, 6656, 0.01),
                                            Choice("int8", 4352, 0.001),
                                            Choice(256, 70000, 0.0))),
        QuantizedLayer("b", 64, 64, 16384, (Choice(0, 2560, 0.02), Choice(16, 6656, 0.015)),
                       sensitivity=3.0),
    ]  # fmt: skip
    path = allocation_path(layers)
    assert path[0].ranks == {"a": None, "b": None} and path[0].cost_ratio == 1.0
    assert path[-1].ranks == {"a": 0, "b": 0} and path[-1].cost == 2 * 2560
    costs = [step.cost for step in path]
    errors = [step.predicted_error for step in path]
    assert costs == sorted(costs, reverse=True) and errors == sorted(errors)
    assert all(256 not in step.ranks.values() for step in path)  # more bytes than dense
    # b's error counts x3: its sensitivity. Every step's error is the sum of its layers'.
    options = {"a": {None: 0, 0: 0.04, 16: 0.01, "int8": 0.001},
               "b": {None: 0, 0: 0.06, 16: 0.045}}  # fmt: skip
    for step in path:
        expected = sum(options[name][label] for name, label in step.ranks.items())
        assert step.predicted_error == pytest.approx(expected)


def test_the_perturbed_probe_adds_x_a_b_to_the_layer_it_selects(rng):
    from lrcompile.passes.probe_graph import PROBE_INPUT, probe_model

    w1, w2 = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    model = make_model(
        "g (float[N, 16] x) => (float[N, 16] y) { h = MatMul(x, W1)\n y = MatMul(h, W2) }",
        {"W1": w1, "W2": w2},
    )
    a, b = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal((4, 16))
    pair = (ir.tensor(a, name="A"), ir.tensor(b.astype(np.float32), name="B"))
    probe = probe_model(ir.serde.deserialize_model(model), {"W1": pair}, ["W1"], perturb=True)
    import onnxruntime as ort

    session = ort.InferenceSession(
        ir.serde.serialize_model(probe).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal((3, 16)).astype(np.float32)
    for index, delta in ((0, a @ b), (1, 0.0)):  # 1 selects no layer: the model as it was
        (y,) = session.run(None, {"x": x, PROBE_INPUT: np.array(index, np.int64)})
        np.testing.assert_allclose(y, x @ (w1 + delta) @ w2, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def quantizable_lm(tmp_path_factory):
    from lrcompile.tools.synthetic import lm_like

    folder = tmp_path_factory.mktemp("qlm")
    path = lm_like(folder, layers=2, hidden=64, ffn=128, vocab=300, logit_scale=4.0)
    ids = np.random.default_rng(3).integers(0, 300, (32, 12))
    np.savez(folder / "calib.npz", input_ids=ids)
    return path, folder / "calib.npz"


def test_auto_with_quantize_chooses_a_form_per_layer_within_the_tolerance(quantizable_lm, tmp_path):
    model, calib = quantizable_lm
    options = {"quantize": "int4", "group_size": 16, "rank": "auto", "calib": str(calib),
               "metric": "kl", "batch_size": 8}  # fmt: skip
    results = {
        tolerance: lrcompile.compile_model(
            model, tmp_path / f"{tolerance}.onnx", tolerance=tolerance, **options
        )
        for tolerance in (0.002, 0.05)
    }
    for tolerance, result in results.items():
        assert result.config.objective == "bytes"
        assert result.auto.measured_error <= 0.8 * tolerance
        assert result.verification.passed
        # What auto measured is what the written model does on the held-back batches.
        assert "held back from fitting" in result.verification.data_source
        assert result.verification.outputs[0].error == pytest.approx(
            result.auto.measured_error, rel=1e-3, abs=1e-7
        )
        decisions = [w.decision for w in result.plan]
        assert all(isinstance(d, (Quantize, Keep)) for d in decisions) and len(decisions) == 15
        # Each layer's predicted share of the output error: they add up to the allocation's.
        auto = result.auto
        chosen = next(step for step in auto.steps if step.measured_error == auto.measured_error)
        assert set(auto.predicted) == {w.key for w in result.plan}
        total = sum(error**2 for error in auto.predicted.values())
        assert math.sqrt(total) == pytest.approx(chosen.predicted_error, rel=1e-9)
        assert all(
            auto.predicted[w.key] == 0.0 for w in result.plan if isinstance(w.decision, Keep)
        )
    tight, loose = (results[t] for t in (0.002, 0.05))
    assert loose.auto.cost_ratio <= tight.auto.cost_ratio < 1.0
    labels = {str(d) for d in (w.decision for w in tight.plan)}
    assert len(labels) >= 2, labels  # the tight tolerance buys different forms per layer


def test_a_correction_has_fewer_parameters_than_its_weight():
    from lrcompile.search.sensitivity import correction_ranks

    assert correction_ranks(64, 128, 64) == (16, 32)  # 64 x 192 > 64 x 128: the weight again
    assert correction_ranks(64, 64, 64) == (16,)
    assert correction_ranks(896, 4864, 256) == (16, 32, 64, 128, 256)
    assert correction_ranks(896, 4864, 100) == (16, 32, 64)  # as many as were fitted


def test_a_budget_with_quantize_is_a_fraction_of_the_dense_bytes(quantizable_lm, tmp_path):
    model, calib = quantizable_lm
    result = lrcompile.compile_model(
        model, tmp_path / "b.onnx", quantize="int8", rank="auto", calib=str(calib), budget=0.3,
        verify=False,
    )  # fmt: skip
    searched = [layer for layer in result.layers if layer.status in ("quantized", "dense")
                and layer.op != "Gather"]  # fmt: skip
    before = sum(layer.bytes_before for layer in searched)
    after = sum(layer.bytes_after for layer in searched)
    assert after <= 0.3 * before and result.auto.cost_ratio == pytest.approx(after / before)


def test_an_embedding_table_becomes_int8_rows_gathered_with_their_scales(tmp_path, rng):
    table = rng.standard_normal((50, 32)).astype(np.float32) * rng.uniform(0.1, 3, (50, 1))
    w = rng.standard_normal((32, 32)).astype(np.float32)
    model = make_model(
        """g (int64[B, S] ids) => (float[B, S, 32] y) {
            h = Gather(T, ids)
            y = MatMul(h, W)
        }""",
        {"T": table.astype(np.float32), "W": w},
    )
    path = save(model, tmp_path / "m.onnx")
    result = lrcompile.compile_model(path, tmp_path / "q.onnx", quantize="int8", verify=False)
    ops, inits, written = _structure(tmp_path / "q.onnx")
    assert ops == ["Gather", "Gather", "Cast", "Mul", "DequantizeLinear", "MatMul"]
    assert inits["T_q"] == (np.dtype(np.int8), (50, 32))
    assert inits["T_q_scale"] == (np.dtype(np.float32), (50, 1)) and "T" not in inits
    (layer,) = [layer for layer in result.layers if layer.op == "Gather"]
    assert (layer.status, layer.bytes_before, layer.bytes_after) == (
        "quantized", 50 * 32 * 4, 50 * 32 + 50 * 4,
    )  # fmt: skip
    # Each row is its int8 values times its own scale: round(row / (max|row| / 127)).
    scale = np.abs(table).max(1, keepdims=True) / 127
    expected_rows = np.round(table / scale) * scale
    ids = rng.integers(0, 50, (3, 7))
    (y,) = _basic_session(tmp_path / "q.onnx").run(None, {"ids": ids})
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    dq = arrays["W_q"].astype(np.float32) * arrays["W_q_scale"]
    np.testing.assert_allclose(y, expected_rows[ids] @ dq, rtol=1e-5, atol=1e-5)


def test_a_tied_embedding_is_stored_as_int8_rows_and_as_its_lm_heads_integers(tmp_path, rng):
    table = rng.standard_normal((40, 32)).astype(np.float32)
    model = make_model(
        """g (int64[B, S] ids) => (float[B, S, 40] y) {
            h = Gather(T, ids)
            Tt = Transpose <perm = [1, 0]> (T)
            y = MatMul(h, Tt)
        }""",
        {"T": table},
    )
    path = save(model, tmp_path / "m.onnx")
    result = lrcompile.compile_model(path, tmp_path / "q.onnx", quantize="int4", verify=False)
    head, rows = result.layers
    assert (head.op, head.status, rows.op, rows.status) == ("MatMul", "quantized", "Gather",
                                                            "quantized")  # fmt: skip
    assert head.reason is None  # not "kept beside": the float table is gone
    ops, inits, written = _structure(tmp_path / "q.onnx")
    assert "T" not in inits and "Transpose" not in ops
    assert inits["T_q"][1] == (32, 40)  # the lm_head's int4 integers, [K, N]
    assert inits["T_q_1"] == (np.dtype(np.int8), (40, 32))  # the Gather's rows
    stored = sum(len(t.raw_data) for t in written.graph.initializer)
    assert stored == head.bytes_after + rows.bytes_after < table.nbytes
    ids = rng.integers(0, 40, (2, 5))
    (y,) = _basic_session(tmp_path / "q.onnx").run(None, {"ids": ids})
    expected = table[ids] @ table.T
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 0.1


def test_the_check_and_the_search_run_the_accuracy_level_asked_for(quantizable_lm, tmp_path):
    model, calib = quantizable_lm
    levels = {}
    for level in (None, 1):
        result = lrcompile.compile_model(
            model, tmp_path / f"{level}.onnx", quantize="int4", group_size=16, rank="auto",
            calib=str(calib), metric="kl", tolerance=0.05, accuracy_level=level,
        )  # fmt: skip
        check = result.verification
        assert check.integer_weights is not None
        assert ("level 1, fp32" if level else "default level (4), int8") in check.integer_weights
        # The search measured the written model as the check runs it, at the same level.
        assert check.outputs[0].error == pytest.approx(result.auto.measured_error, rel=1e-3)
        levels[level] = check.outputs[0].error
    assert levels[1] != levels[None]  # int8 activations change the numbers
    plain = CliRunner().invoke(cli.main, [str(model), "--rank", "8", "--accuracy-level", "1"])
    assert plain.exit_code == 2 and "--accuracy-level is a setting of --quantize" in plain.output


def test_a_sweep_with_quantize_writes_what_each_compile_would(quantizable_lm, tmp_path):
    model, calib = quantizable_lm
    options = {"quantize": "int4", "group_size": 16, "rank": "auto", "calib": str(calib),
               "metric": "kl", "batch_size": 8}  # fmt: skip
    settings = {tmp_path / "a.onnx": {"tolerance": 0.002}, tmp_path / "b.onnx": {"budget": 0.3}}
    swept = dict(lrcompile.compile_sweep(model, settings, **options))
    for path, setting in settings.items():
        alone = tmp_path / f"alone-{path.name}"
        result = lrcompile.compile_model(model, alone, **options, **setting)
        assert swept[path].plan == result.plan
        # The same model (its external data file is named after it).
        assert Path(f"{path}.data").read_bytes() == Path(f"{alone}.data").read_bytes()
        assert _structure(path)[:2] == _structure(alone)[:2]


def test_corrections_of_layers_reading_one_input_share_their_first_matmul(tmp_path, rng):
    weights = {name: rng.standard_normal((64, n)).astype(np.float32)
               for name, n in (("Wq", 64), ("Wk", 32), ("Wv", 32), ("Wo", 64))}  # fmt: skip
    model = make_model(
        """g (float[N, 64] x) => (float[N, 64] q, float[N, 32] k, float[N, 32] v, float[N, 64] o) {
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
            t = Tanh(q)
            o = MatMul(t, Wo)
        }""",
        weights,
    )
    args = ["--quantize", "int4", "--rank", "8", "--rank-multiple", "8"]
    _, plain = _compile(tmp_path, model, *args, name="plain.onnx")
    assert "Split" not in _structure(plain)[0]  # off by default
    _, out = _compile(tmp_path, model, *args, "--share-first-factor")
    ops, inits, written = _structure(out)
    assert ops.count("Split") == 1 and ops.count("MatMul") == 4 + 1 + 4 + 1
    # q, k, v: one x @ [A_q A_k A_v] (fp16, read through one Cast), split into rank-8 pieces.
    assert inits["x_lr_A_shared"] == (np.dtype(np.float16), (64, 24))
    assert not {"Wq_lr_A", "Wk_lr_A", "Wv_lr_A"} & set(inits) and "Wo_lr_A" in inits
    readers = [n for n in written.graph.node if "x" in n.input and n.op_type == "MatMul"]
    assert len(readers) == 4  # three dequantized bases and the shared first factor
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    shared = arrays["x_lr_A_shared"].astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    got = dict(zip(["q", "k", "v", "o"], _basic_session(out).run(None, {"x": x}), strict=True))
    for index, name in enumerate(["q", "k", "v"]):
        w = f"W{name}"
        deq = _onnx_dequantize(arrays[f"{w}_q"], arrays[f"{w}_q_scale"], None, 0, 32)
        a = shared[:, 8 * index : 8 * index + 8]
        expected = x @ deq + (x @ a) @ arrays[f"{w}_lr_B"].astype(np.float32)
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-4)


def test_each_quantized_layers_own_error_is_measured_on_the_held_back_batches(tmp_path, rng):
    # One MatMul: its own output error is the model's, which the check measures on the same
    # held-back batches (float32 compute, accuracy level 1, so both compute the same numbers).
    w = rng.standard_normal((64, 48)).astype(np.float32)
    model = make_model("g (float[N, 64] x) => (float[N, 48] y) { y = MatMul(x, W) }", {"W": w})
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((128, 64)).astype(np.float32))
    result = lrcompile.compile_model(
        path, tmp_path / "q.onnx", quantize="int4", group_size=16, rank="auto",
        calib=str(tmp_path / "calib.npz"), batch_size=16, tolerance=0.5, accuracy_level=1,
    )  # fmt: skip
    (layer,) = [layer for layer in result.layers if layer.status == "quantized"]
    assert result.verification.data_source.endswith("held back from fitting)")
    assert layer.output_error == pytest.approx(result.verification.outputs[0].error, rel=1e-3)
    # The prediction, from the fitted batches' statistics, is of the same size.
    assert 0.5 < layer.predicted_output_error / layer.output_error < 2.0
    assert result.to_dict()["layers"][0]["output_error"] == layer.output_error
