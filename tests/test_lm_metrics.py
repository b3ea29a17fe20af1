"""LM-aware gates: KL of the next-token distributions, top-1 changes, 1 - cosine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile import cli
from lrcompile.runtime.metrics import ErrorAccumulator
from tests.conftest import held_back, low_rank_matrix, make_model, run, save


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_kl_and_top1_are_means_over_positions(rng):
    ref = rng.standard_normal((3, 5, 40)) * 3
    cand = ref + rng.standard_normal((3, 5, 40)) * 0.5
    accumulator = ErrorAccumulator()
    for batch in range(3):  # streamed batch by batch
        accumulator.add(ref[batch : batch + 1], cand[batch : batch + 1])
    metrics = accumulator.metrics("logits", 0.0, "kl")
    p, q = _log_softmax(ref), _log_softmax(cand)
    kl = np.mean(np.sum(np.exp(p) * (p - q), axis=-1))
    assert metrics.kl == pytest.approx(kl, rel=1e-9)
    assert metrics.top1 == pytest.approx(np.mean(ref.argmax(-1) != cand.argmax(-1)))
    assert metrics.error == metrics.kl
    assert accumulator.metrics("logits", 0.0, "top1").error == metrics.top1
    assert accumulator.metrics("logits", 0.0, "cosine").error == pytest.approx(1 - metrics.cosine)


def test_outputs_without_a_class_axis_are_gated_on_relative_l2(rng):
    accumulator = ErrorAccumulator()
    accumulator.add(np.ones((4, 1)), np.ones((4, 1)) * 1.1)
    metrics = accumulator.metrics("score", 0.2, "kl")
    assert metrics.kl is None and metrics.error == pytest.approx(0.1) and metrics.passed


@pytest.fixture
def logits_model(tmp_path, rng):
    model = make_model(
        """g (float[N, 32] x) => (float[N, 100] logits) {
            h = MatMul(x, W1)
            r = Relu(h)
            logits = MatMul(r, W2)
        }""",
        {"W1": low_rank_matrix(rng, 32, 64, 0.9) * 4, "W2": low_rank_matrix(rng, 64, 100, 0.9) * 4},
    )
    path = save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((256, 32)).astype(np.float32))
    return path


def test_the_kl_gate_in_compile_verify_and_auto(logits_model, tmp_path):
    calib = str(tmp_path / "c.npz")
    result = lrcompile.compile_model(
        logits_model, tmp_path / "o.onnx", rank="auto", calib=calib, metric="kl", tolerance=0.02
    )
    assert result.verification.metric == "kl" and result.passed
    assert result.auto.measured_error <= 0.8 * 0.02
    # The search measured KL: the kept model's KL on the held-back calibration rows is what it
    # reported.
    x = held_back(np.load(calib)["x"], result.auto)
    (ref,) = run(logits_model, {"x": x})
    (cand,) = run(tmp_path / "o.onnx", {"x": x})
    p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(cand.astype(np.float64))
    kl = np.mean(np.sum(np.exp(p) * (p - q), axis=-1))
    assert result.auto.measured_error == pytest.approx(kl, rel=1e-3)
    np.savez(tmp_path / "held.npz", x=x)
    out = CliRunner().invoke(
        cli.main,
        ["verify", str(logits_model), str(tmp_path / "o.onnx"), "--data", tmp_path / "held.npz",
         "--metric", "kl", "--tolerance", f"{kl * 0.99}", "--json", "-"],
    )  # fmt: skip
    assert out.exit_code == 1
    report = json.loads(out.output)
    assert report["metric"] == "kl" and report["outputs"][0]["error"] == pytest.approx(kl, rel=1e-6)
    table = CliRunner().invoke(
        cli.main, ["verify", str(logits_model), str(tmp_path / "o.onnx"), "--data", calib,
                   "--metric", "top1", "--tolerance", "1"],
    )  # fmt: skip
    assert table.exit_code == 0 and "top-1 changed" in table.output
    assert "verdict: PASS (worst top-1 change" in table.output


def test_perplexity_is_that_of_the_next_token_labels(rng):
    ref = rng.standard_normal((2, 6, 30)) * 2
    cand = ref + rng.standard_normal(ref.shape) * 0.3
    ids = rng.integers(0, 30, (2, 6))
    accumulator = ErrorAccumulator()
    for row in range(2):
        accumulator.add(ref[row : row + 1], cand[row : row + 1])
        accumulator.add_labels(ref[row : row + 1], cand[row : row + 1], ids[row : row + 1])
    metrics = accumulator.metrics("logits", 0.0, "ppl")

    def perplexity(logits):
        logp = _log_softmax(logits)[:, :-1]
        picked = np.take_along_axis(logp, ids[:, 1:, np.newaxis], -1)
        return float(np.exp(-picked.mean()))

    assert metrics.reference_perplexity == pytest.approx(perplexity(ref), rel=1e-9)
    assert metrics.perplexity == pytest.approx(perplexity(cand), rel=1e-9)
    assert metrics.error == pytest.approx(perplexity(cand) / perplexity(ref) - 1, rel=1e-9)
    with pytest.raises(ValueError, match="integers in"):
        accumulator.add_labels(ref[:1], cand[:1], ids[:1] + 30)
    with pytest.raises(ValueError, match="do not match"):
        accumulator.add_labels(ref[:1], cand[:1], ids[:1, :5])


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    from lrcompile.tools.synthetic import lm_like

    folder = tmp_path_factory.mktemp("lm")
    path = lm_like(folder, layers=1, hidden=64, ffn=128, vocab=500, logit_scale=8.0)
    # Text the model predicts: each next token is its top prediction for the current one (its
    # positions do not interact), from random first tokens.
    (logits,) = run(path, {"input_ids": np.arange(500)[np.newaxis]})
    following = logits[0].argmax(-1)
    ids = np.empty((16, 16), dtype=np.int64)
    ids[:, 0] = np.random.default_rng(1).integers(0, 500, 16)
    for t in range(1, 16):
        ids[:, t] = following[ids[:, t - 1]]
    np.savez(folder / "c.npz", input_ids=ids)
    np.savez(folder / "random.npz", input_ids=np.random.default_rng(2).integers(0, 500, (16, 16)))
    return path, folder / "c.npz"


def test_the_perplexity_gate_in_compile_verify_and_auto(small_lm, tmp_path):
    model, calib = small_lm
    out = tmp_path / "o.onnx"
    result = lrcompile.compile_model(
        model, out, rank="auto", calib=str(calib), metric="ppl", labels="input_ids:logits",
        tolerance=0.05,
    )  # fmt: skip
    logits = result.verification.outputs[0]
    assert result.verification.metric == "ppl" and logits.perplexity is not None
    # One-sided: a lower perplexity than the reference would pass.
    assert logits.error == pytest.approx(max(logits.perplexity_ratio - 1, 0.0))
    assert result.auto.measured_error <= 0.8 * 0.05
    assert result.auto.measured_error == pytest.approx(logits.error, rel=1e-3, abs=1e-7)
    assert "held back from fitting" in result.verification.data_source
    ids = held_back(np.load(calib)["input_ids"], result.auto)  # what the check ran on
    (ref,) = run(model, {"input_ids": ids})
    (cand,) = run(out, {"input_ids": ids})
    picked = [
        np.take_along_axis(_log_softmax(z.astype(np.float64))[:, :-1], ids[:, 1:, None], -1)
        for z in (ref, cand)
    ]
    assert logits.reference_perplexity == pytest.approx(np.exp(-picked[0].mean()), rel=1e-6)
    assert logits.perplexity == pytest.approx(np.exp(-picked[1].mean()), rel=1e-6)
    same = CliRunner().invoke(
        cli.main, ["verify", str(model), str(model), "--data", str(calib), "--labels",
                   "input_ids:logits", "--metric", "ppl", "--tolerance", "0"],
    )  # fmt: skip
    assert same.exit_code == 0 and "ppl ratio" in same.output and "1.0000" in same.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "tokens:logits"], "--labels names no input 'tokens'"),
        (["--labels", "input_ids:scores"], "--labels names no output 'scores'"),
        (["--labels", "input_ids"], "expected INPUT:OUTPUT"),
        (["--metric", "ppl"], "--metric ppl needs --labels"),
    ],
)
def test_bad_labels_are_one_line_and_exit_2(small_lm, extra, message):
    model, calib = small_lm
    out = CliRunner().invoke(
        cli.main, ["verify", str(model), str(model), "--data", str(calib), *extra]
    )
    assert out.exit_code == 2, out.output
    assert message in out.output and len(out.output.strip().splitlines()) == 1


def test_no_perplexity_verdict_on_labels_the_model_does_not_predict(small_lm, tmp_path):
    # Random token ids: the untrained model's perplexity is about its vocabulary, and a compressed
    # (flatter) model would "improve" it. No verdict rests on such labels.
    model, calib = small_lm
    out = CliRunner().invoke(
        cli.main, ["verify", str(model), str(model), "--data", str(calib.with_name("random.npz")),
                   "--labels", "input_ids:logits", "--metric", "ppl"],
    )  # fmt: skip
    assert out.exit_code == 2, out.output
    assert "no better than chance on its labels" in out.output
    assert len(out.output.strip().splitlines()) == 1
