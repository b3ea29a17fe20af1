"""LM exports with a KV cache: calibration and checks supply an empty past when data gives none."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lrcompile
from lrcompile.io import data as data_lib
from lrcompile.io.model import load_model
from lrcompile.io.past import is_past
from tests.conftest import low_rank_matrix, make_model, run, save


@pytest.fixture
def lm(tmp_path, rng):
    """ids -> embedding -> k = x Wk; present = Concat(past, k) along the sequence; logits.
    Inputs and outputs named as Optimum names them (dots cannot be written in ONNX text)."""
    model = make_model(
        """g (int64[batch_size, sequence_length] input_ids,
              float[batch_size, past_sequence_length, 32] past_key_values_0_key)
          => (float[batch_size, sequence_length, 200] logits,
              float[batch_size, total, 32] present_0_key) {
            e = Gather(E, input_ids)
            k = MatMul(e, Wk)
            present_0_key = Concat<axis = 1>(past_key_values_0_key, k)
            h = MatMul(k, W1)
            logits = MatMul(h, Wo)
        }""",
        {
            "E": rng.standard_normal((200, 32)).astype(np.float32),
            "Wk": low_rank_matrix(rng, 32, 32, 0.9),
            "W1": low_rank_matrix(rng, 32, 64, 0.9),
            "Wo": low_rank_matrix(rng, 64, 200, 0.9),
        },
    )
    dotted = {"past_key_values_0_key": "past_key_values.0.key", "present_0_key": "present.0.key"}
    for value in [*model.graph.input, *model.graph.output]:
        value.name = dotted.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [dotted.get(n, n) for n in node.input]
        node.output[:] = [dotted.get(n, n) for n in node.output]
    path = save(model, tmp_path / "lm.onnx")
    ids = rng.integers(0, 200, (64, 16), dtype=np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids[:48])
    np.savez(tmp_path / "heldout.npz", input_ids=ids[48:])
    return path


def test_the_past_is_supplied_empty_with_the_batch_of_the_data(lm):
    inputs = data_lib.model_inputs(load_model(lm))
    assert [is_past(spec.name) for spec in inputs] == [False, True]
    source = data_lib.input_feeds(
        str(lm.with_name("calib.npz")), None, inputs, shapes={}, batch_size=8, iterations=1, seed=0
    )
    assert len(source.feeds) == 6
    past = source.feeds[0]["past_key_values.0.key"]
    assert past.shape == (8, 0, 32) and past.dtype == np.float32
    synthetic = data_lib.input_feeds(
        None, None, inputs, shapes={}, batch_size=4, iterations=2, seed=0
    )
    assert synthetic.feeds[0]["past_key_values.0.key"].shape == (4, 0, 32)


def test_an_lm_with_a_kv_cache_calibrates_searches_and_verifies_on_prompts_alone(lm, tmp_path):
    result = lrcompile.compile_model(
        lm, tmp_path / "o.onnx", rank="auto", calib=str(lm.with_name("calib.npz")),
        verify_data=lm.with_name("heldout.npz"), tolerance=0.1,
    )  # fmt: skip
    assert result.totals.factored >= 1 and result.passed
    assert [o.name for o in result.verification.outputs] == ["logits", "present.0.key"]
    # Dynamic dimensions stay dynamic: a prompt after a history of 5 runs.
    out = onnx.load(str(tmp_path / "o.onnx"))
    dims = [d.dim_param for d in out.graph.input[1].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch_size", "past_sequence_length"]
    feeds = {
        "input_ids": np.zeros((2, 3), np.int64),
        "past_key_values.0.key": np.ones((2, 5, 32), np.float32),
    }
    logits, present = run(tmp_path / "o.onnx", feeds)
    assert logits.shape == (2, 3, 200) and present.shape == (2, 8, 32)


def test_a_kv_cache_output_is_gated_on_rel_l2_under_top1_and_kl(lm, tmp_path, rng):
    # The candidate changes only the cache slightly: its last axis (the head size) is no class
    # axis, so argmax changes along it must not fail the check.
    model = onnx.load(str(lm))
    wk = next(t for t in model.graph.initializer if t.name == "Wk")
    values = onnx.numpy_helper.to_array(wk)
    noisy = values + 0.01 * np.abs(values).mean() * rng.standard_normal(values.shape)
    wk.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), "Wk"))
    candidate = save(model, tmp_path / "candidate.onnx")
    for metric in ("top1", "kl"):
        result = lrcompile.verify(
            lm, candidate, data=lm.with_name("heldout.npz"), metric=metric, tolerance=0.02
        )
        outputs = {o.name: o for o in result.outputs}
        cache = outputs["present.0.key"]
        assert cache.kl is None and cache.top1 is None
        assert cache.error == cache.relative_l2 < 0.02
        assert outputs["logits"].kl is not None  # the logits keep their class statistics
        assert result.passed == all(o.error <= 0.02 for o in result.outputs)


def test_input_shapes_may_give_a_past_input_an_empty_sequence(lm, tmp_path):
    from click.testing import CliRunner

    from lrcompile import cli

    out = tmp_path / "o.onnx"
    shapes = "input_ids:4x16,past_key_values.0.key:4x0x32"
    args = [str(lm), "-o", str(out), "--rank", "16", "--input-shapes", shapes, "--tolerance", "1"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert "present.0.key" in result.output and out.is_file()
    # 0 stays refused where it is not a past: a prompt cannot be empty.
    bad = [str(lm), "-o", str(tmp_path / "b.onnx"), "--rank", "16", "--input-shapes",
           "input_ids:4x0"]  # fmt: skip
    refused = CliRunner().invoke(cli.main, bad)
    assert refused.exit_code == 2 and "must be a sequence of positive integers" in refused.output
    assert not (tmp_path / "b.onnx").exists()
