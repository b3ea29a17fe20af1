"""Padding rows (``attention_mask == 0``) stay out of the calibration statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile import cli
from lrcompile.calibration.compensation import compensating_whitenings
from lrcompile.calibration.statistics import ActivationStats, calibrate, real_rows
from lrcompile.io import data as data_lib
from lrcompile.io.model import load_model
from lrcompile.passes.candidates import find_candidates
from lrcompile.stages.calibrate import calibration_source
from lrcompile.stages.load import load
from tests.conftest import make_model, run, save

WIDTH = 32

# A token encoder's shape: features [batch, sequence, K] -> MatMul, outputs zeroed at padding.
GRAPH = """
padded (float[B, S, 32] x, int64[B, S] attention_mask) => (float[B, S, 32] y) {
    h = MatMul(x, W)
    m = Cast<to = 1>(attention_mask)
    axes = Constant<value = int64[1] {-1}>()
    m3 = Unsqueeze(m, axes)
    y = Mul(h, m3)
}
"""


@pytest.fixture
def padded(tmp_path, rng):
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    return save(make_model(GRAPH, {"W": w}), tmp_path / "padded.onnx")


# Real tokens and padding each come from a few dominant directions of their own.
_SCALES = np.logspace(0, -2, WIDTH)
MIX, JUNK = (
    np.random.default_rng(seed).standard_normal((WIDTH, WIDTH)) * _SCALES for seed in (0, 1)
)


def _tokens(rng, batches: int, sequence: int = 12):
    """Real tokens, and padding 30x larger after each row's length."""
    x = rng.standard_normal((batches, sequence, WIDTH)) @ MIX.T
    lengths = rng.integers(3, sequence + 1, size=batches)
    mask = (np.arange(sequence) < lengths[:, None]).astype(np.int64)
    junk = rng.standard_normal((batches, sequence, WIDTH)) @ JUNK.T * 30
    x = np.where(mask[..., None] == 1, x, junk).astype(np.float32)
    return x, mask


def test_real_rows_line_up_with_the_mask_or_take_every_row():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    feed = {"attention_mask": mask}
    expected = [True, True, False, True, False, False]
    assert real_rows(np.zeros((2, 3, 4)), feed, "attention_mask").tolist() == expected
    assert real_rows(np.zeros((6, 4)), feed, "attention_mask").tolist() == expected  # flattened
    # A KV cache's mask spans past tokens too: its positions are not this step's rows.
    assert real_rows(np.zeros((2, 1, 4)), feed, "attention_mask") is None
    assert real_rows(np.zeros((2, 3, 4)), feed, None) is None
    assert real_rows(np.zeros((2, 3, 4)), {}, "attention_mask") is None


def test_stats_fit_real_rows_and_count_every_row_as_run():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    keep = np.array([True, False, True, True, False, False])
    stats = ActivationStats()
    stats.add(x, keep)
    rows = x.reshape(-1, 4)[keep].astype(np.float64)
    np.testing.assert_array_equal(stats.gram, rows.T @ rows)
    assert (stats.rows, stats.batch_rows) == (3, 6)


def test_calibration_gram_is_of_the_real_tokens_only(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=10)
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    model = load_model(padded)
    groups, _ = find_candidates(model.graph)
    feeds = data_lib.input_feeds(
        str(tmp_path / "calib.npz"), None, data_lib.model_inputs(model),
        shapes={}, batch_size=4, iterations=1, seed=0,
    )  # fmt: skip
    source = data_lib.FeedSource(feeds.feeds, "calib", False, mask="attention_mask")
    calibration = calibrate(onnx.load(str(padded)), groups, source)
    real = x[mask == 1].astype(np.float64)
    np.testing.assert_allclose(calibration.gram(groups[0]), real.T @ real / len(real), rtol=1e-9)
    assert calibration.stats[("x", False)].rows == int(mask.sum())
    assert calibration.stats[("x", False)].batch_rows == 4 * 12


# The same rows reaching a Gemm transposed ([K, batch * sequence], transA = 1).
GEMM_T = """
padded_t (float[B, S, 32] x, int64[B, S] attention_mask) => (float[R, 32] y) {
    shape = Constant<value = int64[2] {-1, 32}>()
    flat = Reshape(x, shape)
    xt = Transpose<perm = [1, 0]>(flat)
    y = Gemm<transA = 1>(xt, W)
}
"""


def test_a_transposed_gemm_input_leaves_padding_out_too(tmp_path, rng):
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    path = save(make_model(GEMM_T, {"W": w}), tmp_path / "padded_t.onnx")
    x, mask = _tokens(rng, batches=4)
    model = load_model(path)
    groups, _ = find_candidates(model.graph)
    source = data_lib.FeedSource(
        [{"x": x, "attention_mask": mask}], "calib", False, mask="attention_mask"
    )
    calibration = calibrate(onnx.load(str(path)), groups, source)
    real = x[mask == 1].astype(np.float64)
    assert list(calibration.stats) == [("xt", True)]
    np.testing.assert_allclose(calibration.gram(groups[0]), real.T @ real / len(real), rtol=1e-9)
    assert calibration.stats[("xt", True)].rows == int(mask.sum()) < x.shape[0] * x.shape[1]


def _real_token_error(original, compiled, x, mask) -> float:
    (expected,) = run(original, {"x": x, "attention_mask": mask})
    (got,) = run(compiled, {"x": x, "attention_mask": mask})
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def test_factors_fitted_without_padding_are_better_on_new_real_tokens(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=64)
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    new_x, new_mask = _tokens(np.random.default_rng(7), batches=32)
    errors = {}
    for name, padding_mask in (("masked", "attention_mask"), ("all rows", "")):
        out = tmp_path / f"{name}.onnx"
        result = lrcompile.compile_model(
            padded, out, rank="0.25", rank_multiple=4, calib=str(tmp_path / "calib.npz"),
            verify=False, padding_mask=padding_mask,
        )  # fmt: skip
        assert [layer.rank for layer in result.layers] == [4]
        errors[name] = _real_token_error(padded, out, new_x, new_mask)
    # Fitted to the padding too, the rank is spent on directions real tokens do not use.
    assert errors["masked"] < 0.6 * errors["all rows"]  # 0.49 against 0.87


def test_the_report_names_the_padding_left_out(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=16)
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    result = lrcompile.compile_model(
        padded, tmp_path / "out.onnx", rank="0.5", calib=str(tmp_path / "calib.npz"), verify=False
    )
    share = 1 - mask.mean()
    assert f"(its padding, attention_mask == 0 at {share:.0%} of positions," in result.calibration


def test_a_padding_mask_the_model_lacks_exits_2(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=8)
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    out = tmp_path / "out.onnx"
    args = [str(padded), "-o", str(out), "--rank", "0.5", "--calib", str(tmp_path / "calib.npz")]
    result = CliRunner().invoke(cli.main, [*args, "--padding-mask", "input_mask"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--padding-mask 'input_mask': not an input" in lines[0]
    assert "inputs: x, attention_mask" in lines[0]
    assert not out.exists()
    # A 3-D input is not a [batch, sequence] mask.
    result = CliRunner().invoke(cli.main, [*args, "--padding-mask", "x"])
    assert result.exit_code == 2 and "of shape ['B', 'S', 32]" in result.output
    assert not out.exists()


@pytest.mark.parametrize("rank", ["0.5", "auto"])
def test_a_padding_mask_without_calibration_data_exits_2(padded, tmp_path, rank):
    out = tmp_path / "out.onnx"
    args = [str(padded), "-o", str(out), "--rank", rank, "--padding-mask", ""]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--padding-mask '' names the padding of calibration data" in lines[0]
    assert not out.exists()
    # The default name is no request: without calibration data it compiles.
    result = CliRunner().invoke(cli.main, [*args[:-2], "--no-verify"])
    assert result.exit_code == 0, result.output


def test_compensation_statistics_leave_padding_out_too(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=8)
    model = load_model(padded)
    groups, _ = find_candidates(model.graph)
    feeds = [{"x": x[i : i + 4], "attention_mask": mask[i : i + 4]} for i in (0, 4)]
    # The model not yet rewritten: X' = X, so the compensating whitening is the plain one.
    white = compensating_whitenings(
        onnx.load(str(padded)), model, groups, feeds, mask="attention_mask"
    )
    real = x[mask == 1].astype(np.float64)
    lower = np.linalg.cholesky(real.T @ real / len(real))
    np.testing.assert_allclose(white[groups[0].key].lower, lower, rtol=1e-6, atol=1e-9)


def _compile(padded, tmp_path, *extra):
    out = tmp_path / "out.onnx"
    args = [str(padded), "-o", str(out), "--rank", "0.5", "--rank-multiple", "4"]
    args += ["--calib", str(tmp_path / "calib.npz")]
    return CliRunner().invoke(cli.main, [*args, *extra]), out


def test_a_mask_with_no_real_token_exits_2(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=8)
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=np.zeros_like(mask))
    result, out = _compile(padded, tmp_path)
    assert result.exit_code == 2 and not out.exists()
    assert "every position of the calibration data is padding" in result.output
    # Counting every row is the way out (no check: the outputs, zeroed by the mask, are all 0).
    result, out = _compile(padded, tmp_path, "--padding-mask", "", "--no-verify")
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_an_additive_mask_is_not_read_inverted(padded, tmp_path, rng, caplog):
    x, mask = _tokens(rng, batches=8)
    additive = np.where(mask == 1, 0, -10000).astype(np.int64)  # 0 where tokens attend
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=additive)
    config = lrcompile.CompileConfig(rank="0.5", calib=str(tmp_path / "calib.npz"))
    prepared = load(padded, config)
    assert calibration_source(prepared, config).mask is None  # every row, warned
    assert "values other than 0 and 1" in caplog.text


def test_no_padding_no_note(padded, tmp_path, rng):
    x, mask = _tokens(rng, batches=8)
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=np.ones_like(mask))
    result = lrcompile.compile_model(
        padded, tmp_path / "out.onnx", rank="0.5", calib=str(tmp_path / "calib.npz"), verify=False
    )
    assert result.calibration == str(tmp_path / "calib.npz")


def test_a_synthetic_mask_is_not_padding(padded):
    config = lrcompile.CompileConfig(rank="0.5", calib="synthetic")
    source = calibration_source(load(padded, config), config)
    assert source.synthetic and source.mask is None
    # Synthetic masks attend to every token (passes.inputs.synthetic_ranges): nothing to leave out.
    assert all(feed["attention_mask"].all() for feed in source.feeds)
