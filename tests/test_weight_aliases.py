"""Weights as exporters store them: Before/Expected graphs for Identity, Transpose and Cast chains,
shared aliases, tied weights, functions and ops left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import lrcompile
from lrcompile.passes.candidates import find_candidates, ops_left_alone
from tests.conftest import factorize, low_rank_matrix, make_model, run, save


def _factor(model: onnx.ModelProto, spec: str = "8", **options):
    ir_model = ir.serde.deserialize_model(model)
    result = factorize(ir_model, spec, rank_multiple=8, **options)
    out = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(out, full_check=True)
    return result, out


def _structure(model: onnx.ModelProto):
    """The op sequence and the initializers (name, dtype, shape) of a model."""
    ops = [node.op_type for node in model.graph.node]
    inits = sorted((t.name, t.data_type, tuple(t.dims)) for t in model.graph.initializer)
    return ops, inits


def _same_outputs(tmp_path, before, after, feeds, tolerance):
    ref = run(save(before, tmp_path / "before.onnx"), feeds)
    out = run(save(after, tmp_path / "after.onnx"), feeds)
    for r, o in zip(ref, out, strict=True):
        assert np.linalg.norm(o - r) / np.linalg.norm(r) < tolerance


F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def test_identity_aliases_share_one_factorization(tmp_path, rng):
    before = make_model(
        """g (float[N, 32] x) => (float[N, 48] y) {
            a = Identity(W)
            b = Identity(a)
            y1 = MatMul(x, W)
            y2 = MatMul(x, a)
            y3 = MatMul(x, b)
            s = Add(y1, y2)
            y = Add(s, y3)
        }""",
        {"W": low_rank_matrix(rng, 32, 48, decay=0.3)},
    )
    (group,), _ = find_candidates(ir.serde.deserialize_model(before).graph)
    assert len(group.nodes) == 3 and group.other_readers == ()
    result, after = _factor(before)
    expected = (
        ["MatMul", "MatMul", "MatMul", "MatMul", "MatMul", "MatMul", "Add", "Add"],
        [("W_lr_A", F32, (32, 8)), ("W_lr_B", F32, (8, 48))],
    )
    assert _structure(after) == expected
    (layer,) = result.layers
    assert layer.params_after == 8 * (32 + 48) and layer.flops_after == 3 * 8 * (32 + 48)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    _same_outputs(tmp_path, before, after, {"x": x}, 1e-3)


def test_a_transposed_weight_is_factored_as_the_matrix_the_node_reads(tmp_path, rng):
    stored = low_rank_matrix(rng, 48, 32, decay=0.3)  # [N, K], as TF/JAX exports store it
    before = make_model(
        """g (float[N, 32] x) => (float[N, 48] y) {
            t = Transpose<perm = [1, 0]>(Wt)
            y = MatMul(x, t)
        }""",
        {"Wt": stored},
    )
    result, after = _factor(before)
    assert _structure(after) == (
        ["MatMul", "MatMul"],
        [("Wt_lr_A", F32, (32, 8)), ("Wt_lr_B", F32, (8, 48))],
    )
    assert result.layers[0].shape == (32, 48)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    _same_outputs(tmp_path, before, after, {"x": x}, 1e-3)


def test_a_cast_weight_keeps_factors_in_the_stored_dtype_behind_the_cast(tmp_path, rng):
    before = make_model(
        """g (float[N, 32] x) => (float[N, 48] y) {
            c = Cast<to = 1>(W16)
            y = MatMul(x, c)
        }""",
        {"W16": low_rank_matrix(rng, 32, 48, decay=0.3).astype(np.float16)},
    )
    result, after = _factor(before)
    assert _structure(after) == (
        ["Cast", "Cast", "MatMul", "MatMul"],
        [("W16_lr_A", F16, (32, 8)), ("W16_lr_B", F16, (8, 48))],
    )
    assert result.layers[0].bytes_after == 2 * 8 * (32 + 48)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    _same_outputs(tmp_path, before, after, {"x": x}, 1e-2)


def test_chains_combine_and_aliases_of_one_matrix_share_factors(tmp_path, rng):
    # MatMul(x, Identity(Cast(Transpose(W16)))) and Gemm(x, Cast(W16), transB=1) read the same
    # matrix: one group, one pair of factors.
    stored = low_rank_matrix(rng, 48, 32, decay=0.3).astype(np.float16)
    before = make_model(
        """g (float[N, 32] x) => (float[N, 48] y) {
            t = Transpose(W16)
            c = Cast<to = 1>(t)
            i = Identity(c)
            y1 = MatMul(x, i)
            c2 = Cast<to = 1>(W16)
            y2 = Gemm<transB = 1>(x, c2)
            y = Add(y1, y2)
        }""",
        {"W16": stored},
    )
    (group,), _ = find_candidates(ir.serde.deserialize_model(before).graph)
    assert [n.op_type for n in group.nodes] == ["MatMul", "Gemm"]
    assert group.shape == (32, 48) and group.cast == ir.DataType.FLOAT
    _, after = _factor(before)
    ops, inits = _structure(after)
    assert ops == ["Cast", "Cast", "MatMul", "MatMul", "Gemm", "Gemm", "Add"]
    assert inits == [("W16_lr_A", F16, (32, 8)), ("W16_lr_B", F16, (8, 48))]
    x = rng.standard_normal((5, 32)).astype(np.float32)
    _same_outputs(tmp_path, before, after, {"x": x}, 1e-2)


def test_non_float_casts_and_other_transposes_are_no_weights(rng):
    model = make_model(
        """g (float[N, 4] x, float[4, 4, 2] z) => (float[N, 4] y, float[4, 2, 4] p) {
            c = Cast<to = 1>(Wi)
            y = MatMul(x, c)
            p = Transpose<perm = [0, 2, 1]>(z)
        }""",
        {"Wi": np.eye(4, dtype=np.int64)},
    )
    groups, skipped = find_candidates(ir.serde.deserialize_model(model).graph)
    assert groups == []
    assert [s.reason for s in skipped] == ["weight dtype INT64 is not a float type"]


def test_matmuls_in_model_local_functions_are_listed_with_a_reason(tmp_path, rng):
    graph = onnx.parser.parse_graph(
        """g (float[N, 16] x) => (float[N, 16] y) {
            h = MatMul(x, W)
            y = local.Block(h, W)
        }"""
    )
    graph.initializer.append(numpy_helper.from_array(low_rank_matrix(rng, 16, 16, decay=0.3), "W"))
    function = onnx.helper.make_function(
        "local", "Block", ["a", "w"], ["b"], [onnx.helper.make_node("MatMul", ["a", "w"], ["b"])],
        [onnx.helper.make_opsetid("", 19)],
    )  # fmt: skip
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 19), onnx.helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=10,
    )
    path = save(model, tmp_path / "f.onnx")
    result = lrcompile.compile_model(path, tmp_path / "o.onnx", rank="8", verify=False)
    skipped = [layer for layer in result.layers if layer.status == "skipped"]
    assert [layer.reason for layer in skipped] == [
        "inside the model-local function Block; functions are not rewritten"
    ]


def test_quantized_and_recurrent_ops_are_named_as_left_alone(rng):
    model = make_model(
        """g (uint8[N, 8] x, float[1, N, 4] s) => (int32[N, 8] y, float[1, 1, N, 4] h) {
            y = MatMulInteger(x, Wq)
            h = LSTM<hidden_size = 4>(s, Wl, Rl)
        }""",
        {
            "Wq": np.ones((8, 8), np.uint8),
            "Wl": np.ones((1, 16, 4), np.float32),
            "Rl": np.ones((1, 16, 4), np.float32),
        },
        opset=19,
    )
    assert ops_left_alone(ir.serde.deserialize_model(model)) == [
        ("LSTM", "not MatMul/Gemm", 1),
        ("MatMulInteger", "already quantized", 1),
    ]


@pytest.mark.parametrize("forced", [False, True])
def test_report_totals_equal_what_the_written_model_holds(tmp_path, rng, forced):
    # A tied embedding (Gather and an lm_head through Transpose), aliases, a Cast: the change in
    # the model's weight bytes equals the change the report's totals claim.
    table = low_rank_matrix(rng, 64, 32, decay=0.3)
    before = make_model(
        """g (int64[N] ids) => (float[N, 64] logits) {
            e = Gather(E, ids)
            h = MatMul(e, W1)
            a = Identity(W2)
            h2 = MatMul(h, a)
            t = Transpose(E)
            logits = MatMul(h2, t)
        }""",
        {
            "E": table,
            "W1": low_rank_matrix(rng, 32, 48, decay=0.3),
            "W2": low_rank_matrix(rng, 48, 32, decay=0.3),
        },
    )
    path = save(before, tmp_path / "m.onnx")
    result = lrcompile.compile_model(
        path, tmp_path / "o.onnx", rank="8", rank_multiple=8, allow_no_saving=forced, verify=False
    )
    (lm_head,) = [layer for layer in result.layers if layer.weight == "E"]
    assert lm_head.status == ("factored" if forced else "dense")

    def weight_bytes(model_path):
        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(model_path).graph.initializer)

    growth = weight_bytes(tmp_path / "o.onnx") - weight_bytes(path)
    assert growth == result.totals.bytes_after - result.totals.bytes_before
    kept = 64 * 32 if forced else 0  # the table stays for the Gather either way
    assert lm_head.bytes_after == 4 * ((8 * (32 + 64) + kept) if forced else 64 * 32)
