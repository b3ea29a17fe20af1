"""Factoring: the pass's op sequences and preconditions, numerics against ONNX Runtime, and the
decisions of the stages around it (refusals, specs, overrides)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lrcompile.numerics import decompose
from lrcompile.numerics.ranks import RankSpec
from lrcompile.passes.low_rank import FactorizeLowRankPass
from lrcompile.plan import Factor, Keep, Plan, WeightPlan
from tests.conftest import factorize, low_rank_matrix, make_model, run, save


def _apply(model: onnx.ModelProto, spec: str = "16", **options):
    """The compile's stages on ``model`` (cleanup included), and the model they wrote."""
    ir_model = ir.serde.deserialize_model(model)
    result = factorize(ir_model, spec, **options)
    return result, ir.serde.serialize_model(ir_model)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _compare(tmp_path, before, after, feeds, rtol=1e-4, atol=1e-4):
    ref = run(save(before, tmp_path / "before.onnx"), feeds)
    got = run(save(after, tmp_path / "after.onnx"), feeds)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)
    return ref, got


def test_matmul_full_rank_reproduces_outputs(tmp_path, rng):
    w = rng.standard_normal((32, 24)).astype(np.float32)
    model = make_model("g (float[N, 32] x) => (float[N, 24] y) { y = MatMul(x, W) }", {"W": w})
    result, out = _apply(model, "24", rank_multiple=1, allow_no_saving=True)
    assert result.modified
    assert _ops(out) == ["MatMul", "MatMul"]
    assert {i.name for i in out.graph.initializer} == {"W_lr_A", "W_lr_B"}
    onnx.checker.check_model(out)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    _compare(tmp_path, model, out, {"x": x}, rtol=1e-5, atol=1e-5)


def test_matmul_rank_r_error_is_eckart_young(tmp_path, rng):
    w = rng.standard_normal((64, 80)).astype(np.float32)
    model = make_model("g (float[N, 64] x) => (float[N, 80] y) { y = MatMul(x, W) }", {"W": w})
    result, out = _apply(model, "16")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    product = weights["W_lr_A"].astype(np.float64) @ weights["W_lr_B"]
    sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert np.linalg.norm(w - product) == pytest.approx(np.sqrt(np.sum(sigma[16:] ** 2)), rel=1e-5)
    (layer,) = result.layers
    assert (layer.status, layer.rank, layer.shape) == ("factored", 16, (64, 80))
    assert layer.params_after == 16 * (64 + 80)
    assert layer.relative_error == pytest.approx(
        np.sqrt(np.sum(sigma[16:] ** 2) / np.sum(sigma**2)), rel=1e-4
    )
    # The model computes x @ A @ B, so its outputs match x @ (A @ B) to fp32 rounding.
    x = rng.standard_normal((4, 64)).astype(np.float32)
    (y,) = run(save(out, tmp_path / "o.onnx"), {"x": x})
    np.testing.assert_allclose(y, x @ product, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    ("alpha", "beta", "bias"), [(1.0, 1.0, True), (0.5, 2.0, True), (1.5, 1.0, False)]
)
def test_gemm_variants_full_rank(tmp_path, rng, trans_a, trans_b, alpha, beta, bias):
    k, n = 24, 20
    a_shape = "K, M" if trans_a else "M, K"
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    weights = {"W": w}
    inputs = "a, W"
    if bias:
        weights["C"] = rng.standard_normal(n).astype(np.float32)
        inputs += ", C"
    text = f"""g (float[{a_shape.replace("K", str(k))}] a) => (float[M, {n}] y) {{
        y = Gemm <alpha = {alpha}, beta = {beta}, transA = {trans_a}, transB = {trans_b}> ({inputs})
    }}"""
    model = make_model(text, weights)
    _result, out = _apply(model, str(n), rank_multiple=1, allow_no_saving=True)
    assert _ops(out) == ["Gemm", "Gemm"]
    onnx.checker.check_model(out)
    a = rng.standard_normal((k, 3) if trans_a else (3, k)).astype(np.float32)
    _compare(tmp_path, model, out, {"a": a}, rtol=1e-4, atol=1e-4)
    second = out.graph.node[1]
    assert len(second.input) == (3 if bias else 2)


def test_gemm_low_rank_matches_factored_weight(tmp_path, rng):
    w = low_rank_matrix(rng, 48, 40)  # stored transposed: [N, K] with transB=1
    c = rng.standard_normal(48).astype(np.float32)
    model = make_model(
        "g (float[M, 40] a) => (float[M, 48] y) { y = Gemm <alpha = 2.0, transB = 1> (a, W, C) }",
        {"W": w, "C": c},
    )
    _, out = _apply(model, "8", rank_multiple=1)
    f = decompose.factorize(2.0 * w.T, 8)
    a = rng.standard_normal((6, 40)).astype(np.float32)
    (y,) = run(save(out, tmp_path / "o.onnx"), {"a": a})
    np.testing.assert_allclose(y, a @ f.left @ f.right + c, rtol=1e-4, atol=1e-4)


def test_shared_weight_is_factored_once(tmp_path, rng):
    w = low_rank_matrix(rng, 32, 48)
    model = make_model(
        """g (float[N, 32] x, float[N, 32] z) => (float[N, 48] y1, float[N, 48] y2) {
            y1 = MatMul(x, W)
            y2 = MatMul(z, W)
        }""",
        {"W": w},
    )
    result, out = _apply(model, "16")
    assert _ops(out) == ["MatMul"] * 4
    assert sorted(i.name for i in out.graph.initializer) == ["W_lr_A", "W_lr_B"]
    (layer,) = result.layers
    assert len(layer.nodes) == 2 and layer.flops_after == 2 * 16 * (32 + 48)
    feeds = {
        "x": rng.standard_normal((3, 32)).astype(np.float32),
        "z": rng.standard_normal((3, 32)).astype(np.float32),
    }
    _compare(tmp_path, model, out, feeds, rtol=1e-2, atol=1e-2)  # 0.7**16 truncation


def test_3d_activations_and_dynamic_dims_stay_dynamic(tmp_path, rng):
    w = low_rank_matrix(rng, 32, 64, decay=0.5)
    model = make_model(
        "g (float[B, S, 32] x) => (float[B, S, 64] y) { y = MatMul(x, W) }", {"W": w}
    )
    _, out = _apply(model, "16")
    out = onnx.shape_inference.infer_shapes(out)
    dims = [d.dim_param or d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["B", "S", 64]
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][:2] == ["B", "S"]
    mid = next(v for v in out.graph.value_info if v.name.endswith("_lr_mid"))
    assert [d.dim_param or d.dim_value for d in mid.type.tensor_type.shape.dim] == ["B", "S", 16]
    for batch, seq in [(1, 3), (4, 7)]:
        x = rng.standard_normal((batch, seq, 32)).astype(np.float32)
        _compare(tmp_path, model, out, {"x": x}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("dtype", "onnx_type"), [(np.float16, "float16"), (ml_dtypes.bfloat16, "bfloat16")]
)
def test_half_precision_factors_keep_the_weight_dtype(tmp_path, rng, dtype, onnx_type):
    w = low_rank_matrix(rng, 32, 32, decay=0.3).astype(dtype)
    model = make_model(
        f"g ({onnx_type}[N, 32] x) => ({onnx_type}[N, 32] y) {{ y = MatMul(x, W) }}", {"W": w}
    )
    _, out = _apply(model, "16")
    for init in out.graph.initializer:
        assert init.data_type == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    onnx.checker.check_model(out)
    if dtype is np.float16:  # ONNX Runtime CPU has no bfloat16 MatMul kernel
        x = rng.standard_normal((3, 32)).astype(np.float16)
        _compare(tmp_path, model, out, {"x": x}, rtol=2e-2, atol=2e-2)


def test_constant_node_weight(tmp_path, rng):
    w = low_rank_matrix(rng, 16, 40, decay=0.2)
    w_text = ", ".join(f"{v:.8e}" for v in w.ravel())
    model = make_model(
        f"""g (float[N, 16] x) => (float[N, 40] y) {{
            W = Constant <value = float[16, 40] {{{w_text}}}> ()
            y = MatMul(x, W)
        }}""",
        {},
    )
    result, out = _apply(model, "8", rank_multiple=1)
    assert result.layers[0].status == "factored"
    assert _ops(out) == ["MatMul", "MatMul"]
    x = rng.standard_normal((2, 16)).astype(np.float32)
    _compare(tmp_path, model, out, {"x": x}, rtol=1e-4, atol=1e-4)


def _statuses(result) -> dict[str, tuple[str, str | None]]:
    return {layer.nodes[0]: (layer.status, layer.reason) for layer in result.layers}


def test_refusals_are_reported_with_reasons(rng):
    w = low_rank_matrix(rng, 32, 32)
    bad = w.copy()
    bad[3, 4] = np.nan
    # Built node by node: the text parser needs nodes in topological order.
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "Wi"], ["a"], name="from_input"),
            onnx.helper.make_node("Transpose", ["x"], ["xt"], name="t"),
            onnx.helper.make_node("MatMul", ["x", "xt"], ["s"], name="activation"),
            onnx.helper.make_node("DequantizeLinear", ["Wq", "scale"], ["q"], name="dq"),
            onnx.helper.make_node("MatMul", ["x", "q"], ["b"], name="quantized"),
            onnx.helper.make_node("MatMul", ["x", "Wnan"], ["c"], name="nan"),
            onnx.helper.make_node("MatMul", ["xi", "Wint"], ["d"], name="integer"),
            onnx.helper.make_node("MatMul", ["x", "W3"], ["e"], name="three_d"),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [32, 32]),
            onnx.helper.make_tensor_value_info("xi", onnx.TensorProto.INT32, [32, 32]),
            onnx.helper.make_tensor_value_info("Wi", onnx.TensorProto.FLOAT, [32, 32]),
        ],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [32, 32]) for n in "asbc"]
        + [
            onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [2, 32, 32]),
            onnx.helper.make_tensor_value_info("d", onnx.TensorProto.INT32, [32, 32]),
        ],
        [
            onnx.numpy_helper.from_array(rng.integers(-8, 8, (32, 32)).astype(np.int8), "Wq"),
            onnx.numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale"),
            onnx.numpy_helper.from_array(bad, "Wnan"),
            onnx.numpy_helper.from_array(rng.integers(0, 3, (32, 32)).astype(np.int32), "Wint"),
            onnx.numpy_helper.from_array(rng.standard_normal((2, 32, 32)).astype(np.float32), "W3"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    result, out = _apply(model, "8")
    assert not result.modified
    statuses = _statuses(result)
    assert statuses["from_input"] == (
        "skipped",
        "weight is a graph input (can be overridden at run time)",
    )
    assert (
        statuses["activation"][0] == "skipped"
        and "computed at run time (by Transpose)" in statuses["activation"][1]
    )
    assert statuses["quantized"] == (
        "skipped",
        "weight is already quantized (produced by DequantizeLinear)",
    )
    assert statuses["nan"] == ("dense", "weight contains NaN or Inf")
    assert statuses["integer"] == ("skipped", "weight dtype INT32 is not a float type")
    assert statuses["three_d"] == ("skipped", "weight is 3-D [2, 32, 32], expected 2-D")
    assert _ops(out) == _ops(model)


def test_rank_without_saving_stays_dense(rng):
    model = make_model(
        "g (float[N, 32] x) => (float[N, 32] y) { y = MatMul(x, W) }",
        {"W": rng.standard_normal((32, 32)).astype(np.float32)},
    )
    result, out = _apply(model, "16")  # 16 * 64 == 32 * 32: break-even, no saving
    (layer,) = result.layers
    assert not result.modified
    assert (layer.status, layer.rank) == ("dense", 16)
    assert layer.reason == "rank 16 saves nothing (break-even 16)"
    assert _ops(out) == ["MatMul"]


def test_override_skip_and_per_layer_spec(rng):
    from lrcompile.io.overrides import Override

    model = make_model(
        """g (float[N, 64] x) => (float[N, 64] y) {
            h = MatMul(x, Wa)
            y = MatMul(h, Wb)
        }""",
        {"Wa": low_rank_matrix(rng, 64, 64), "Wb": low_rank_matrix(rng, 64, 64)},
    )
    overrides = (Override("Wa", RankSpec("skip")), Override("W*", RankSpec("fixed", 8)))
    result, _out = _apply(model, "16", overrides=overrides, rank_multiple=1)
    by_weight = {layer.weight: layer for layer in result.layers}
    assert (by_weight["Wa"].status, by_weight["Wa"].reason) == ("dense", "override says skip")
    assert (by_weight["Wb"].status, by_weight["Wb"].rank) == ("factored", 8)


def test_subgraph_nodes_are_skipped(rng):
    w = onnx.numpy_helper.from_array(low_rank_matrix(rng, 32, 32), "Wsub")
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "Wsub"], ["o"], name="inner")],
        "branch",
        [],
        [onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [4, 32])],
        [w],
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if"
            )
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 32]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 32])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    result, _ = _apply(model, "8")
    assert [(layer.status, layer.reason) for layer in result.layers] == [
        ("skipped", "inside an If/Loop/Scan body; subgraphs are not rewritten")
    ] * 2
    assert not result.modified


def _one_matmul(rng, k=16, n=12):
    w = rng.standard_normal((k, n)).astype(np.float32)
    text = f"g (float[N, {k}] x) => (float[N, {n}] y) {{ y = MatMul(x, W) }}"
    return ir.serde.deserialize_model(make_model(text, {"W": w})), w


def _factors(rng, k, n, rank, names=("W_lr_A", "W_lr_B")):
    arrays = rng.standard_normal((k, rank)), rng.standard_normal((rank, n))
    pairs = zip(arrays, names, strict=True)
    return tuple(ir.tensor(a.astype(np.float32), name=name) for a, name in pairs)


def test_the_pass_writes_exactly_the_factors_it_is_given(tmp_path, rng):
    # Before/Expected: the pass decides and computes nothing; the model reads the given A and B.
    model, _ = _one_matmul(rng)
    a, b = _factors(rng, 16, 12, 3)
    plan = Plan((WeightPlan("W", "3", Factor(3)),))
    result = FactorizeLowRankPass(plan, {"W": (a, b)})(model)
    assert result.modified
    assert [node.op_type for node in model.graph] == ["MatMul", "MatMul"]
    assert [node.inputs[1].name for node in model.graph] == ["W_lr_A", "W_lr_B"]
    x = rng.standard_normal((4, 16)).astype(np.float32)
    (y,) = run(save(ir.serde.serialize_model(model), tmp_path / "o.onnx"), {"x": x})
    np.testing.assert_allclose(y, x @ a.numpy() @ b.numpy(), rtol=1e-5, atol=1e-5)


def test_the_pass_leaves_kept_weights_alone(rng):
    model, _ = _one_matmul(rng)
    result = FactorizeLowRankPass(Plan((WeightPlan("W", "8", Keep("why")),)), {})(model)
    assert not result.modified
    assert [node.inputs[1].name for node in model.graph] == ["W"]


@pytest.mark.parametrize(
    ("plan", "factors", "message"),
    [
        (Plan((WeightPlan("V", "3", Factor(3)),)), {}, "the plan factors 'V', not in the model"),
        (Plan((WeightPlan("W", "3", Factor(3)),)), {}, "no factors given for 'W'"),
        (Plan((WeightPlan("W", "4", Factor(4)),)), "rank 3", "expected rank 4 of 16x12"),
        (Plan((WeightPlan("W", "3", Factor(3)),)), "taken", "already exist"),
    ],
)
def test_the_pass_refuses_what_it_cannot_apply(rng, plan, factors, message):
    model, _ = _one_matmul(rng)
    if factors == "rank 3":
        factors = {"W": _factors(rng, 16, 12, 3)}
    elif factors == "taken":
        factors = {"W": _factors(rng, 16, 12, 3, names=("W", "W_lr_B"))}
    with pytest.raises(ir.passes.PreconditionError, match=message):
        FactorizeLowRankPass(plan, factors)(model)
    assert [node.inputs[1].name for node in model.graph] == ["W"]  # nothing rewritten


def test_options_are_validated_before_anything_runs():
    from lrcompile.config import CompileConfig
    from lrcompile.errors import LrcompileError

    with pytest.raises(LrcompileError, match="`rank_multiple` must be >= 1, got 0"):
        CompileConfig(rank="8", rank_multiple=0)
    with pytest.raises(LrcompileError, match="`decomposition` 'qr' is not one of auto, exact"):
        CompileConfig(rank="8", decomposition="qr")


def test_weight_also_read_elsewhere_stays_dense_unless_forced_then_is_counted(tmp_path, rng):
    w = low_rank_matrix(rng, 32, 64)
    model = make_model(
        """g (float[N, 32] x, int64[N] ids) => (float[N, 64] y, float[N, 64] e) {
            y = MatMul(x, W)
            e = Gather(W, ids)
        }""",
        {"W": w},
    )
    result, out = _apply(model, "8", rank_multiple=1)
    (layer,) = [layer for layer in result.layers if layer.weight == "W"]
    assert layer.status == "dense" and not result.modified
    assert layer.reason.startswith("weight also read by Gather: its factors would be added")
    assert layer.params_after == layer.params_before == 32 * 64
    result, out = _apply(model, "8", rank_multiple=1, allow_no_saving=True)
    (layer,) = [layer for layer in result.layers if layer.weight == "W"]
    assert layer.status == "factored"
    assert layer.reason == "weight also read by other nodes; kept beside its factors"
    assert layer.params_after == 8 * (32 + 64) + 32 * 64
    assert sorted(i.name for i in out.graph.initializer) == ["W", "W_lr_A", "W_lr_B"]


def test_energy_spec_keeps_at_least_that_energy(rng):
    w = low_rank_matrix(rng, 64, 96, decay=0.8)  # sigma_i = 0.8**i
    model = make_model("g (float[N, 64] x) => (float[N, 96] y) { y = MatMul(x, W) }", {"W": w})
    result, _ = _apply(model, "energy:0.99", rank_multiple=1)
    (layer,) = result.layers
    energy = np.cumsum(0.8 ** (2 * np.arange(64)))
    expected = int(np.searchsorted(energy / energy[-1], 0.99)) + 1
    assert layer.rank == expected == 11
    assert 0.99 <= layer.kept_energy < 0.99 + 0.8 ** (2 * 10)
    assert layer.method == "exact"


def test_gemm_before_opset_11_is_left_alone(rng):
    model = make_model(
        "g (float[4, 32] a) => (float[4, 32] y) { y = Gemm(a, W, C) }",
        {"W": low_rank_matrix(rng, 32, 32), "C": np.zeros(32, np.float32)},
        opset=9,
    )
    result, _ = _apply(model, "8", rank_multiple=8)
    assert [(layer.status, layer.reason) for layer in result.layers] == [
        ("skipped", "Gemm before opset 11 requires its C input; upgrade")
    ]


def test_a_fraction_spec_below_one_rank_multiple_leaves_the_layer_dense(rng):
    model = make_model(
        "g (float[N, 64] x) => (float[N, 96] y) { y = MatMul(x, W) }",
        {"W": low_rank_matrix(rng, 64, 96)},
    )
    result, _ = _apply(model, "0.1")
    (layer,) = result.layers
    assert layer.status == "dense" and not result.modified
    assert layer.reason == "0.1 of the layer is less than one rank multiple"
