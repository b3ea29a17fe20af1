"""LM exports with a KV cache: calibration and checks supply an empty past when data gives none."""

from __future__ import annotations

import json
from pathlib import Path

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


def _with_noisy_keys(lm: Path, path: Path, rng, scale: float) -> Path:
    """``lm`` with noise of ``scale`` x its mean magnitude on the key projection: a candidate
    that changes the cache more than the logits."""
    model = onnx.load(str(lm))
    wk = next(t for t in model.graph.initializer if t.name == "Wk")
    values = onnx.numpy_helper.to_array(wk)
    noisy = values + scale * np.abs(values).mean() * rng.standard_normal(values.shape)
    wk.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), "Wk"))
    return save(model, path)


def test_a_kv_cache_output_is_gated_on_rel_l2_under_top1_and_kl(lm, tmp_path, rng):
    # The candidate changes only the cache slightly: its last axis (the head size) is no class
    # axis, so argmax changes along it must not fail the check.
    candidate = _with_noisy_keys(lm, tmp_path / "candidate.onnx", rng, 0.01)
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
    # Under kl the cache's rel-l2 is the worst gated error: the verdict names it and its measure.
    assert result.worst_cache == "present.0.key"
    from click.testing import CliRunner

    from lrcompile import cli

    args = ["verify", str(lm), str(candidate), "--data", str(lm.with_name("heldout.npz"))]
    shown = CliRunner().invoke(cli.main, [*args, "--metric", "kl", "--tolerance", "0.02"])
    error = f"{result.outputs[1].relative_l2:.3e}"
    assert (
        f"verdict: PASS (worst relative L2 {error} (present.0.key), tolerance 0.02" in shown.output
    )


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


def _gqa_lm(path, rng):
    """An onnxruntime-genai-style layer: q, k and v in one weight feeding GroupQueryAttention
    (2 query heads, 1 KV head of 16), the past's head size named ``kv_cache_dim`` as genai's
    builder names it."""
    d, heads, kv, head, vocab = 32, 2, 1, 16, 100
    batch, past, total = "batch_size", "past_sequence_length", "total_sequence_length"
    cache = {
        f"{kind}.0.{part}": [batch, kv, past if kind != "present" else total, "kv_cache_dim"]
        for kind in ("past_key_values", "present")
        for part in ("key", "value")
    }
    value_info = onnx.helper.make_tensor_value_info
    nodes = [
        ("Gather", ["E", "input_ids"], ["e"], {}),
        ("MatMul", ["e", "Wqkv"], ["qkv"], {"name": "/attn/qkv_proj/MatMul"}),
        ("ReduceSum", ["attention_mask", "one"], ["length"], {"keepdims": 0}),
        ("Sub", ["length", "one"], ["last"], {}),
        ("Cast", ["last"], ["seqlens_k"], {"to": onnx.TensorProto.INT32}),
        ("Shape", ["attention_mask"], ["mask_shape"], {"start": 1}),
        ("Cast", ["mask_shape"], ["total_1"], {"to": onnx.TensorProto.INT32}),
        ("Squeeze", ["total_1"], ["total"], {}),
        ("GroupQueryAttention",
         ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total"],
         ["attn", "present.0.key", "present.0.value"],
         {"domain": "com.microsoft", "num_heads": heads, "kv_num_heads": kv}),
        ("MatMul", ["attn", "Wo"], ["logits"], {"name": "/lm_head/MatMul"}),
    ]  # fmt: skip
    weights = {
        "E": rng.standard_normal((vocab, d)),
        "Wqkv": rng.standard_normal((d, (heads + 2 * kv) * head)) / 6,
        "Wo": rng.standard_normal((heads * head, vocab)) / 6,
    }
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, i, o, **a) for op, i, o, a in nodes],
        "gqa",
        [
            value_info("input_ids", onnx.TensorProto.INT64, [batch, "sequence_length"]),
            value_info("attention_mask", onnx.TensorProto.INT64, [batch, total]),
            *(value_info(n, onnx.TensorProto.FLOAT, s) for n, s in cache.items() if "past" in n),
        ],
        [
            value_info("logits", onnx.TensorProto.FLOAT, [batch, "sequence_length", vocab]),
            *(value_info(n, onnx.TensorProto.FLOAT, s) for n, s in cache.items() if "pres" in n),
        ],
        [
            *(onnx.numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    opsets = [onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)]
    save(onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10), path)
    ids = rng.integers(0, vocab, (16, 12), dtype=np.int64)
    np.savez(path.with_name("heldout.npz"), input_ids=ids, attention_mask=np.ones_like(ids))
    return path


def test_an_empty_past_takes_its_head_size_from_group_query_attention(tmp_path, rng):
    from click.testing import CliRunner

    from lrcompile import cli

    lm = _gqa_lm(tmp_path / "gqa.onnx", rng)
    pasts = [s for s in data_lib.model_inputs(load_model(lm)) if is_past(s.name)]
    assert [s.shape for s in pasts] == [("batch_size", 1, "past_sequence_length", 16)] * 2
    # ONNX Runtime runs the model on prompts alone: the empty past it got has head size 16
    # (a 0 there, as before, fails inside GroupQueryAttention).
    out = tmp_path / "o.onnx"
    heldout = str(lm.with_name("heldout.npz"))
    args = [str(lm), "-o", str(out), "--rank", "8", "--verify-data", heldout, "--tolerance", "10"]
    result = CliRunner().invoke(cli.main, [*args, "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "/attn/qkv_proj/MatMul (fused q/k/v)" in result.output
    layers = {
        layer["nodes"][0]: layer
        for layer in json.loads((tmp_path / "r.json").read_text())["layers"]
    }
    assert layers["/attn/qkv_proj/MatMul"]["fused"] == "q/k/v"
    assert layers["/lm_head/MatMul"]["fused"] is None
    assert layers["/attn/qkv_proj/MatMul"]["status"] == "factored"


def test_genai_config_gives_the_sizes_the_graph_does_not_else_the_past_is_refused(tmp_path, rng):
    from click.testing import CliRunner

    from lrcompile import cli

    # Nothing in the graph tells the past's heads or head size: no attention node reads it, and
    # the keys it is concatenated with have no shape in the file.
    model = make_model(
        """g (int64[batch_size, sequence_length] input_ids,
              float[batch_size, heads, past_sequence_length, head] past_key_values_0_key)
          => (float[batch_size, sequence_length, 50] logits,
              float[batch_size, heads, total, head] present_0_key) {
            e = Gather(E, input_ids)
            logits = MatMul(e, W)
            k = MatMul(e, Wk)
            split = Constant<value = int64[4] {0, 0, 3, 4}>()
            heads = Reshape(k, split)
            keys = Transpose<perm = [0, 2, 1, 3]>(heads)
            present_0_key = Concat<axis = 2>(past_key_values_0_key, keys)
        }""",
        {
            "E": rng.standard_normal((50, 32)).astype(np.float32),
            "W": low_rank_matrix(rng, 32, 50),
            "Wk": low_rank_matrix(rng, 32, 12),
        },
    )
    model.graph.input[1].name = model.graph.node[-1].input[0] = "past_key_values.0.key"
    model.graph.output[1].name = model.graph.node[-1].output[0] = "present.0.key"
    path = save(model, tmp_path / "lm.onnx")
    (tmp_path / "typed").mkdir()
    np.savez(tmp_path / "heldout.npz", input_ids=rng.integers(0, 50, (8, 6), dtype=np.int64))
    out = tmp_path / "o.onnx"
    args = [str(path), "-o", str(out), "--rank", "8", "--tolerance", "10"]
    args += ["--verify-data", str(tmp_path / "heldout.npz")]
    refused = CliRunner().invoke(cli.main, args)
    assert refused.exit_code == 2 and not out.exists()
    assert (
        "does not tell the sizes of its dimensions ['heads', 'past_sequence_length', 'head']"
        in (refused.output)
    )
    assert "--input-shapes past_key_values.0.key:8x<heads>x0x<head>" in refused.output
    # The keys' shape in value_info tells them: the Concat's other axes are the past's.
    keys = onnx.helper.make_tensor_value_info("keys", onnx.TensorProto.FLOAT, ["b", 3, "s", 4])
    model.graph.value_info.append(keys)
    typed = load_model(save(model, tmp_path / "typed" / "lm.onnx"))
    assert data_lib.model_inputs(typed)[1].shape == ("batch_size", 3, "past_sequence_length", 4)
    config = {"model": {"decoder": {"head_size": 4, "num_key_value_heads": 3}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    pasts = [s for s in data_lib.model_inputs(load_model(path)) if is_past(s.name)]
    assert pasts[0].shape == ("batch_size", 3, "past_sequence_length", 4)
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    _, present = run(out, {"input_ids": np.zeros((2, 6), np.int64),
                           "past_key_values.0.key": np.ones((2, 3, 5, 4), np.float32)})  # fmt: skip
    assert present.shape == (2, 3, 11, 4)


def test_synthetic_attention_masks_attend_to_every_token_real_ones_may_pad(tmp_path, rng):
    from lrcompile.passes.inputs import index_ranges, synthetic_ranges

    model = load_model(_gqa_lm(tmp_path / "gqa.onnx", rng))
    assert synthetic_ranges(model.graph) == {"attention_mask": (1, 1), "input_ids": (0, 99)}
    assert "attention_mask" not in index_ranges(model.graph)  # real data is not bound by it
    inputs = data_lib.model_inputs(model)
    source = data_lib.input_feeds(
        None, None, inputs, shapes={}, batch_size=4, iterations=3, seed=0,
        val_ranges=synthetic_ranges(model.graph),
    )  # fmt: skip
    masks = np.stack([feed["attention_mask"] for feed in source.feeds])
    assert masks.shape[:2] == (3, 4) and np.all(masks == 1)
    assert len({int(feed["input_ids"].max()) for feed in source.feeds}) > 1


def test_the_runtimes_files_are_copied_beside_an_output_in_another_folder(tmp_path, rng, caplog):
    from click.testing import CliRunner

    from lrcompile import cli

    lm = _gqa_lm(tmp_path / "model.onnx", rng)
    config = {"model": {"decoder": {"filename": "model.onnx", "head_size": 16}}, "search": {}}
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "notes.txt"):
        (tmp_path / name).write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer_config.json").write_text("the user's own")
    args = [str(lm), "--rank", "8", "--no-verify", "-o"]
    result = CliRunner().invoke(cli.main, [*args, str(out / "model.lr.onnx")])
    assert result.exit_code == 0, result.output
    assert "beside it, for the runtime: genai_config.json, tokenizer.json" in result.output
    copied = json.loads((out / "genai_config.json").read_text())
    assert copied == {**config, "model": {"decoder": {**config["model"]["decoder"],
                                                     "filename": "model.lr.onnx"}}}  # fmt: skip
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert (out / "tokenizer_config.json").read_text() == "the user's own"  # never overwritten
    assert not (out / "notes.txt").exists()
    # Beside the input, nothing is copied: the config still names the original, and says so.
    same = CliRunner().invoke(cli.main, [*args, str(tmp_path / "model.lr.onnx")])
    assert same.exit_code == 0 and "beside it" not in same.output
    assert "names model.onnx, not model.lr.onnx" in caplog.text
    assert json.loads((tmp_path / "genai_config.json").read_text()) == config


def test_no_gate_cache_reports_the_cache_and_rests_the_verdict_on_the_logits(lm, tmp_path, rng):
    from click.testing import CliRunner

    from lrcompile import cli

    candidate = _with_noisy_keys(lm, tmp_path / "candidate.onnx", rng, 0.02)
    data = lm.with_name("heldout.npz")
    gated = lrcompile.verify(lm, candidate, data=data, metric="kl", tolerance=1.0)
    cache, logits = gated.outputs[1].relative_l2, gated.outputs[0].kl
    assert logits < cache / 2  # a tolerance between the two tells the modes apart
    tolerance = (logits + cache) / 2
    gated = lrcompile.verify(lm, candidate, data=data, metric="kl", tolerance=tolerance)
    assert not gated.passed and gated.worst_cache == "present.0.key"
    reported = lrcompile.verify(
        lm, candidate, data=data, metric="kl", tolerance=tolerance, gate_cache=False
    )
    assert reported.passed and reported.worst_error == logits
    assert not reported.outputs[1].gated and reported.outputs[1].relative_l2 == cache
    # Under rel-l2 every output is gated either way.
    plain = lrcompile.verify(lm, candidate, data=data, tolerance=cache / 2, gate_cache=False)
    assert not plain.passed and plain.outputs[1].gated
    args = ["verify", str(lm), str(candidate), "--data", str(data), "--metric", "kl"]
    shown = CliRunner().invoke(cli.main, [*args, "--tolerance", str(tolerance), "--no-gate-cache"])
    assert shown.exit_code == 0 and "not gated" in shown.output
    assert f"verdict: PASS (worst KL {logits:.3e}," in shown.output
    # auto's probes measure the same way (runtime.metrics.measure_error).
    from lrcompile.runtime.metrics import measure_error

    inputs = data_lib.model_inputs(load_model(lm))
    source = data_lib.input_feeds(
        str(data), None, inputs, shapes={}, batch_size=16, iterations=1, seed=0
    )
    feed = source.feeds[0]
    names = ["logits", "present.0.key"]
    reference = dict(zip(names, run(lm, feed), strict=True))
    probe = load_model(candidate)
    both = measure_error(probe, [feed], [reference], "kl")
    logits_only = measure_error(probe, [feed], [reference], "kl", gate_cache=False)
    assert both == pytest.approx(cache, rel=1e-6) and logits_only == pytest.approx(logits, rel=1e-6)
