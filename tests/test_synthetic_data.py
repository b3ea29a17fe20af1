"""Synthetic data that exercises the model, and no verdict on data that cannot support one."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile import cli
from lrcompile.errors import DataError
from lrcompile.io import data as data_lib
from lrcompile.passes.inputs import index_ranges
from tests.conftest import low_rank_matrix, make_model, save


@pytest.fixture
def encoder(tmp_path, rng):
    """Token ids into a 50-row embedding, positions (+3) into a 10-row table, a mask."""
    model = make_model(
        """g (int64[N, S] ids, int64[N, S] pos, int64[N, S] mask) => (float[N, S, 16] y) {
            e = Gather(E, ids)
            three = Constant<value = int64 {3}>()
            shifted = Add(pos, three)
            u = Unsqueeze(shifted, zero)
            q = Squeeze(u, zero)
            p = Gather(P, q)
            m = Cast<to = 1>(mask)
            mu = Unsqueeze(m, minus1)
            s = Add(e, p)
            h = Mul(s, mu)
            y = MatMul(h, W)
        }""",
        {
            "E": rng.standard_normal((50, 16)).astype(np.float32),
            "P": rng.standard_normal((10, 16)).astype(np.float32),
            "W": low_rank_matrix(rng, 16, 16),
            "zero": np.array([0], np.int64),
            "minus1": np.array([-1], np.int64),
        },
    )
    return save(model, tmp_path / "enc.onnx")


def test_index_inputs_are_found_through_casts_reshapes_and_adds(encoder):
    graph = ir.load(str(encoder)).graph
    assert index_ranges(graph) == {"ids": (0, 49), "pos": (0, 6)}


def test_synthetic_inputs_stay_in_their_tables_and_use_all_of_them(encoder):
    model = ir.load(str(encoder))
    inputs = data_lib.model_inputs(model)
    source = data_lib.input_feeds(
        None, None, inputs, shapes={"ids": (8, 32), "pos": (8, 32), "mask": (8, 32)},
        batch_size=8, iterations=4, seed=0, val_ranges=index_ranges(model.graph),
    )  # fmt: skip
    ids = np.concatenate([f["ids"] for f in source.feeds])
    pos = np.concatenate([f["pos"] for f in source.feeds])
    mask = np.concatenate([f["mask"] for f in source.feeds])
    assert ids.min() == 0 and ids.max() == 49 and len(np.unique(ids)) == 50
    assert pos.min() == 0 and pos.max() == 6
    assert set(np.unique(mask)) == {0, 1}  # not a table index: the documented default [0, 1]


def test_val_range_overrides_an_input(encoder, tmp_path):
    assert data_lib.parse_val_ranges(["ids:0,3", "x:[-1.5,2]"]) == {
        "ids": (0.0, 3.0),
        "x": (-1.5, 2.0),
    }
    for bad in ("ids", "ids:3,1", "ids:a,b", ":0,1"):
        with pytest.raises(DataError, match="expected NAME:LO,HI"):
            data_lib.parse_val_ranges([bad])
    result = CliRunner().invoke(
        cli.main,
        ["verify", str(encoder), str(encoder), "--val-range", "ids:0,3",
         "--input-shapes", "ids:2x4,pos:2x4,mask:2x4", "--json", "-"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["synthetic"] is True
    bad = CliRunner().invoke(
        cli.main, ["verify", str(encoder), str(encoder), "--val-range", "z:0,1"]
    )
    assert bad.exit_code == 2 and "'z' is not a model input" in bad.output


@pytest.mark.parametrize(
    ("body", "problem"),
    [("n = Neg(x)\n y = Sqrt(n)", "not finite"), ("n = Neg(x)\n y = Relu(n)", "identically zero")],
)
def test_a_degenerate_reference_gets_no_verdict_and_nothing_is_written(
    tmp_path, rng, body, problem
):
    # Synthetic floats are in [0, 1]: Log(0) = -inf somewhere, Relu(-x) = 0 everywhere.
    model = make_model(
        f"""g (float[N, 16] x0) => (float[N, 16] y) {{
            x = MatMul(x0, W)
            {body}
        }}""",
        {"W": np.abs(low_rank_matrix(rng, 16, 16)) * 0 + np.eye(16, dtype=np.float32)},
    )
    path = save(model, tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(
        cli.main, [str(path), "--rank", "4", "--rank-multiple", "1", "-o", str(out)]
    )
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert f"output 'y' is {problem}" in line and "--verify-data" in line
    assert not out.exists() and "nan" not in line and "inf " not in line


def test_a_candidate_with_non_finite_outputs_fails_without_nan_in_the_verdict(tmp_path, rng):
    w = low_rank_matrix(rng, 8, 8)
    ref = save(
        make_model("g (float[N, 8] x) => (float[N, 8] y) { y = MatMul(x, W) }", {"W": w}),
        tmp_path / "r.onnx",
    )
    nan = np.full((8, 8), np.nan, np.float32)
    cand = save(
        make_model("g (float[N, 8] x) => (float[N, 8] y) { y = MatMul(x, W) }", {"W": nan}),
        tmp_path / "c.onnx",
    )
    result = CliRunner().invoke(cli.main, ["verify", str(ref), str(cand)])
    assert result.exit_code == 1
    assert "non-finite" in result.output and "nan" not in result.output.lower()
    as_json = CliRunner().invoke(cli.main, ["verify", str(ref), str(cand), "--json", "-"])
    (output,) = json.loads(as_json.output)["outputs"]
    assert output["non_finite"] is True and output["relative_l2"] is None


def test_a_bfloat16_input_is_refused_in_one_line(tmp_path, rng):
    w = low_rank_matrix(rng, 64, 64).astype(ml_dtypes.bfloat16)
    model = make_model(
        "g (bfloat16[N, 64] x) => (bfloat16[N, 64] y) { y = MatMul(x, W) }", {"W": w}
    )
    path = save(model, tmp_path / "b.onnx")
    result = CliRunner().invoke(cli.main, [str(path), "--rank", "8"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "model input 'x' is bfloat16" in line and "--no-verify" in line
    ok = CliRunner().invoke(cli.main, [str(path), "--rank", "8", "--no-verify"])
    assert ok.exit_code == 0, ok.output


def test_auto_refuses_calibration_whose_rows_are_all_alike(tmp_path, rng):
    model = make_model(
        """g (float[N, 32] x) => (float[N, 32] y) {
            h = MatMul(x, W1)
            r = Relu(h)
            y = MatMul(r, W2)
        }""",
        {"W1": low_rank_matrix(rng, 32, 32), "W2": low_rank_matrix(rng, 32, 32)},
    )
    path = save(model, tmp_path / "m.onnx")
    alike = np.tile(rng.standard_normal((1, 32)).astype(np.float32), (64, 1))
    np.savez(tmp_path / "alike.npz", x=alike)
    result = CliRunner().invoke(
        cli.main, [str(path), "--rank", "auto", "--calib", str(tmp_path / "alike.npz")]
    )
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert (
        "calibration activations 'x'" in line
        and "numerical rank 1 over 48 rows, the 6 of 8 batches fitted" in line
    )
    assert not (tmp_path / "m.lr.onnx").exists()
    varied = rng.standard_normal((64, 32)).astype(np.float32)
    np.savez(tmp_path / "varied.npz", x=varied)
    good = lrcompile.compile_model(path, rank="auto", calib=str(tmp_path / "varied.npz"))
    assert good.auto is not None


def test_token_ids_outside_the_vocabulary_are_refused_in_one_line(tmp_path):
    # Real data whose ids leave the embedding table: one line naming the file, the input, the
    # value and the valid range, before ONNX Runtime stops deep in the graph on a Gather.
    from click.testing import CliRunner

    from lrcompile import cli
    from lrcompile.tools.synthetic import lm_like

    model = lm_like(tmp_path, layers=1, hidden=16, ffn=32, vocab=100)
    np.savez(tmp_path / "oov.npz", input_ids=np.full((4, 8), 150, np.int64))
    for args in (["--rank", "0.5", "--verify-data"], ["--rank", "auto", "--calib"]):
        result = CliRunner().invoke(cli.main, [str(model), *args, str(tmp_path / "oov.npz")])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            f"lrcompile: error: {tmp_path / 'oov.npz'}: array 'input_ids' holds 150, outside the"
            " 100 rows of the table it indexes (expected 0 to 99: ids of this model's vocabulary)"
        )
    verify = CliRunner().invoke(cli.main, ["verify", str(model), str(model), "--data",
                                           str(tmp_path / "oov.npz")])  # fmt: skip
    assert verify.exit_code == 2 and "holds 150, outside the 100 rows" in verify.stderr
