"""Calibration statistics, whitened compiles, the auto search, and calibration data sources."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile import cli
from lrcompile.calibration.statistics import calibrate
from lrcompile.io import data as data_lib
from lrcompile.io.model import load_model
from lrcompile.passes.candidates import find_candidates
from lrcompile.search import auto as auto_search
from tests.conftest import held_back, low_rank_matrix, make_model, run, save


def _calib(tmp_path, rng, rows=256, name="calib.npz"):
    # Correlated inputs: a few directions dominate, as in real activations.
    mix = rng.standard_normal((64, 64)) * np.logspace(0, -1.5, 64)
    x = (rng.standard_normal((rows, 64)) @ mix.T).astype(np.float32)
    path = tmp_path / name
    np.savez(path, x=x)
    return path, x


def test_calibration_gram_equals_direct_computation(deep, tmp_path, rng):
    path, x = _calib(tmp_path, rng, rows=50)
    model = load_model(deep)
    groups, _ = find_candidates(model.graph)
    inputs = data_lib.model_inputs(model)
    source = data_lib.input_feeds(
        str(path), None, inputs, shapes={}, batch_size=7, iterations=1, seed=0
    )
    calibration = calibrate(onnx.load(str(deep)), groups, source)
    by_name = {g.name: g for g in groups}
    # The activation feeding W3 is a2 = tanh(tanh(x W1) W2), computed here directly.
    w = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(deep)).graph.initializer}
    a2 = np.tanh(np.tanh(x @ w["W1"]) @ w["W2"]).astype(np.float64)
    # The mean over the 50 rows: factors must not depend on how many rows there were.
    np.testing.assert_allclose(
        calibration.gram(by_name["W3"]), a2.T @ a2 / 50, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        calibration.gram(by_name["W1"]), x.T.astype(np.float64) @ x / 50, rtol=1e-9
    )
    assert calibration.stats[("a2", False)].rows == 50
    assert len(calibration.feeds) == 8  # 7 + 7 + ... + 1 rows
    (y,) = run(deep, {"x": x})
    # Calibration runs without pre-packed weights, like every auto probe (the same kernels for
    # the reference and the candidates); the default session's pre-packed GEMM rounds ~1e-6 apart.
    np.testing.assert_allclose(
        np.concatenate([r["y"] for r in calibration.reference]), y, rtol=1e-5, atol=1e-7
    )


def test_held_back_batches_stay_out_of_the_statistics(deep, tmp_path, rng):
    path, x = _calib(tmp_path, rng, rows=50)
    model = load_model(deep)
    groups, _ = find_candidates(model.graph)
    source = data_lib.input_feeds(
        str(path), None, data_lib.model_inputs(model), shapes={}, batch_size=7, iterations=1, seed=0
    )
    calibration = calibrate(onnx.load(str(deep)), groups, source, fitted=6)  # of 8 batches
    by_name = {g.name: g for g in groups}
    fitted = x[:42].astype(np.float64)
    np.testing.assert_allclose(calibration.gram(by_name["W1"]), fitted.T @ fitted / 42, rtol=1e-9)
    assert calibration.stats[("x", False)].rows == 42 and calibration.held_back == 2
    feeds, reference = calibration.measured()
    assert [len(feed["x"]) for feed in feeds] == [7, 1]
    (y,) = run(deep, {"x": x[42:]})
    np.testing.assert_allclose(np.concatenate([r["y"] for r in reference]), y, rtol=1e-5, atol=1e-7)
    # Without the reference (auto's further chunks), the held-back batches are not even run.
    calls = []
    statistics = calibrate(
        onnx.load(str(deep)), groups, source, fitted=6, keep_reference=False,
        on_batch=lambda done, total, detail: calls.append(total),
    )  # fmt: skip
    assert set(calls) == {6} and statistics.stats[("x", False)].rows == 42
    everything = calibrate(onnx.load(str(deep)), groups, source)
    assert everything.held_back == 0 and len(everything.measured()[0]) == 8


def test_shared_activation_is_collected_once(tmp_path, rng):
    model = make_model(
        """g (float[N, 32] x) => (float[N, 32] q, float[N, 32] k, float[N, 32] v) {
            q = MatMul(x, Wq)
            k = MatMul(x, Wk)
            v = MatMul(x, Wv)
        }""",
        {n: low_rank_matrix(rng, 32, 32) for n in ("Wq", "Wk", "Wv")},
    )
    path = save(model, tmp_path / "qkv.onnx")
    ir_model = load_model(path)
    groups, _ = find_candidates(ir_model.graph)
    source = data_lib.input_feeds(
        None, None, data_lib.model_inputs(ir_model), shapes={}, batch_size=4, iterations=2, seed=0
    )
    calibration = calibrate(onnx.load(str(path)), groups, source)
    assert list(calibration.stats) == [("x", False)]


def test_whitened_compile_beats_plain_on_the_outputs(deep, tmp_path, rng):
    calib, _ = _calib(tmp_path, rng)
    plain = lrcompile.compile_model(deep, tmp_path / "p.onnx", rank="16", verify_data=calib)
    white = lrcompile.compile_model(
        deep, tmp_path / "w.onnx", rank="16", calib=str(calib), verify_data=calib
    )
    assert {layer.method for layer in white.layers} == {"whitened"}
    assert white.totals.params_after == plain.totals.params_after
    plain_error = plain.verification.outputs[0].relative_l2
    white_error = white.verification.outputs[0].relative_l2
    assert white_error < 0.5 * plain_error


@pytest.mark.parametrize("tolerance", [0.02, 0.1])
def test_auto_meets_the_tolerance_on_the_calibration_data(deep, tmp_path, rng, tolerance):
    calib, x = _calib(tmp_path, rng)
    result = lrcompile.compile_model(
        deep, tmp_path / "auto.onnx", rank="auto", calib=str(calib), tolerance=tolerance
    )
    auto = result.auto
    assert auto.tolerance == pytest.approx(0.8 * tolerance)  # the default headroom of 0.2
    assert auto.measured_error <= auto.tolerance
    # 32 batches of 8 rows, the last quarter held back from the factors and measured on.
    assert (auto.batches, auto.held_back) == (32, 8)
    # Independently: run both models on the held-back calibration rows.
    (ref,) = run(deep, {"x": held_back(x, auto)})
    (got,) = run(result.output_path, {"x": held_back(x, auto)})
    error = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert error == pytest.approx(auto.measured_error, rel=1e-4)
    assert error <= tolerance
    assert result.totals.flop_ratio < 0.9  # it did compress
    # The bisection's last failing probe was over the tolerance: the answer is on the boundary.
    failing = [s for s in auto.steps if not s.passed]
    assert failing and all(s.measured_error > auto.tolerance for s in failing)
    assert all(s.cost_ratio < auto.cost_ratio for s in failing)
    # Predicted and measured errors are the same quantity (relative L2), on the same scale.
    for step in auto.steps:
        assert step.predicted_error == pytest.approx(np.sqrt(auto.path[step.index].predicted_error))
        assert 1 / 3 < step.predicted_error / step.measured_error < 3
    assert auto.to_dict()["steps"][0]["predicted_error"] == auto.steps[0].predicted_error


def test_auto_measures_on_batches_its_factors_were_not_fitted_to(deep, tmp_path, rng):
    # 96 calibration rows for 64-wide layers: factors fitted to them flatter themselves there.
    _, x = _calib(tmp_path, rng, rows=96 + 1024)
    np.savez(tmp_path / "c.npz", x=x[:96])
    np.savez(tmp_path / "h.npz", x=x[96:])

    def compile_with(validation):
        return lrcompile.compile_model(
            deep, tmp_path / f"o{validation}.onnx", rank="auto", calib=str(tmp_path / "c.npz"),
            verify_data=tmp_path / "h.npz", tolerance=0.05, rank_multiple=4, validation=validation,
        )  # fmt: skip

    fitted_on_all, held = compile_with(0.0), compile_with(0.25)
    assert fitted_on_all.auto.held_back == 0 and (held.auto.batches, held.auto.held_back) == (12, 3)
    heldout = [r.verification.outputs[0].relative_l2 for r in (fitted_on_all, held)]
    # Measured on its own rows, the search promised far less error than new rows saw (0.038 vs
    # 0.050, over the tolerance); measured on rows held back, it promised what new rows saw.
    assert heldout[0] > 1.25 * fitted_on_all.auto.measured_error
    assert heldout[1] == pytest.approx(held.auto.measured_error, rel=0.1)
    assert held.passed and held.auto.measured_error <= held.auto.tolerance
    # Without --verify-data, the check runs on the held-back batches too, not on fitted rows.
    check = lrcompile.compile_model(
        deep, tmp_path / "c.onnx", rank="auto", calib=str(tmp_path / "c.npz"), tolerance=0.05,
        rank_multiple=4,
    )  # fmt: skip
    assert "the 3 calibration batches held back from fitting" in check.verification.data_source
    relative_l2 = check.verification.outputs[0].relative_l2
    assert relative_l2 == pytest.approx(check.auto.measured_error, rel=1e-4)


def test_auto_on_one_calibration_batch_says_it_measures_on_fitted_data(deep, tmp_path, rng, caplog):
    calib, _ = _calib(tmp_path, rng, rows=128)
    with caplog.at_level(logging.WARNING):
        result = lrcompile.compile_model(
            deep, tmp_path / "o.onnx", rank="auto", calib=str(calib), batch_size=128, verify=False
        )
    assert (result.auto.batches, result.auto.held_back) == (1, 0)
    assert "one calibration batch" in caplog.text and "flatters them" in caplog.text


def test_auto_spends_rank_where_the_output_needs_it(deep, tmp_path, rng):
    calib, _ = _calib(tmp_path, rng)
    result = lrcompile.compile_model(
        deep,
        tmp_path / "auto.onnx",
        rank="auto",
        calib=str(calib),
        tolerance=0.01,
        rank_multiple=4,
        verify=False,
    )
    ranks = {layer.weight: layer.rank or 64 for layer in result.layers}
    assert ranks["W2"] < ranks["W3"]  # steep spectrum (0.6) compresses more than flat (0.97)


def test_auto_without_calibration_warns_about_synthetic_data(deep, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = lrcompile.compile_model(deep, tmp_path / "a.onnx", rank="auto", tolerance=0.1)
    assert "SYNTHETIC" in caplog.text
    assert result.calibration == "synthetic inputs (seed 0)"


def test_calibration_script_source(deep, tmp_path, rng):
    _, x = _calib(tmp_path, rng, rows=64)
    np.save(tmp_path / "rows.npy", x)
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "from pathlib import Path\n"
        "def batches():\n"
        "    x = np.load(Path(__file__).with_name('rows.npy'))\n"
        "    for i in range(0, 64, 16):\n"
        "        yield {'x': x[i:i + 16]}\n"
    )
    result = lrcompile.compile_model(
        deep, tmp_path / "s.onnx", rank="16", calib_script=f"{script}:batches", verify=False
    )
    assert result.calibration == f"{script}:batches"
    assert {layer.method for layer in result.layers if layer.status == "factored"} == {"whitened"}


def _bad_script(tmp_path, body: str):
    script = tmp_path / "bad.py"
    script.write_text(body)
    return str(script)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda t: ["--calib", str(_npz(t, ids=np.zeros((4, 64), np.float32)))],
            "array 'ids' is not a model input",
        ),
        (
            lambda t: ["--calib", str(_npz(t, x=np.zeros((4, 64), np.float64)))],
            "has dtype float64, the model expects float32",
        ),
        (lambda t: ["--calib", str(_npz(t, x=np.zeros((4, 65), np.float32)))], "axis 1 must be 64"),
        (lambda t: ["--calib", str(_npz(t))], "holds no arrays"),
        (lambda t: ["--calib", str(t / "none.npz")], "no such file"),
        (
            lambda t: ["--calib-script", _bad_script(t, "def load_data():\n    return iter([])\n")],
            "yielded no feed dicts",
        ),
        (
            lambda t: [
                "--calib-script",
                _bad_script(t, "def load_data():\n    raise OSError('x')\n"),
            ],
            "load_data() failed: OSError: x",
        ),
        (
            lambda t: ["--calib-script", _bad_script(t, "def load_data():\n    yield {'x': 1}\n")],
            "feed 0: array 'x' has dtype int64",
        ),
        (
            lambda t: [
                "--calib",
                str(_npz(t, x=np.zeros((4, 64), np.float32))),
                "--calib-script",
                _bad_script(t, ""),
            ],
            "not both",
        ),
    ],
)
def test_bad_calibration_data_exits_2(deep, tmp_path, make, message):
    out = tmp_path / "o.onnx"
    args = [str(deep), "--rank", "auto", "-o", str(out), *make(tmp_path)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not out.exists()


def _npz(folder, **arrays):
    path = folder / "c.npz"
    np.savez(path, **arrays)
    return path


def test_auto_with_a_parameter_budget_beats_the_uniform_ratio(deep, tmp_path, rng):
    calib, x = _calib(tmp_path, rng)
    uniform = lrcompile.compile_model(
        deep, tmp_path / "u.onnx", rank="0.5", calib=str(calib), rank_multiple=4, verify=False
    )
    budget = uniform.totals.params_ratio
    result = lrcompile.compile_model(
        deep,
        tmp_path / "b.onnx",
        rank="auto",
        calib=str(calib),
        budget=budget,
        objective="params",
        rank_multiple=4,
        verify=False,
    )
    assert len(result.auto.steps) == 1  # one measurement, no search
    assert result.totals.params_after <= uniform.totals.params_after
    x = held_back(x, result.auto)
    (ref,) = run(deep, {"x": x})

    def error(path):
        (out,) = run(path, {"x": x})
        return np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref)

    assert error(result.output_path) == pytest.approx(result.auto.measured_error, rel=1e-4)
    assert error(result.output_path) < error(uniform.output_path)


def test_bisection_stops_at_its_cost_resolution():
    from lrcompile.search import auto

    costs = list(np.linspace(1.0, 0.1, 4000))
    calls: list[int] = []

    def passes(index: int) -> bool:
        calls.append(index)
        return index <= 2637

    best = auto._bisect(costs, passes)
    assert best <= 2637 and best in calls  # measured, and within the tolerance
    assert costs[best] - costs[2638] <= auto.RESOLUTION
    # 0.9 of the cost in steps of 0.005: 8 halvings (plus the cheapest end), not log2(4000) = 12.
    assert len(calls) == 1 + int(np.ceil(np.log2(0.9 / auto.RESOLUTION)))


def test_held_back_batches_are_the_rounded_up_fraction():
    from lrcompile.stages.calibrate import fitted_batches

    def source(batches):
        return data_lib.FeedSource([{}] * batches, "data.npz", False)

    assert fitted_batches(source(100), 0.07) == 93  # 0.07 x 100 is 7.000000000000001
    assert fitted_batches(source(10), 0.25) == 7 and fitted_batches(source(2), 0.9) == 1
    assert fitted_batches(source(10), 0.0) is None and fitted_batches(source(1), 0.25) is None


def test_sweep_gives_each_setting_its_own_compile_from_one_measurement(
    deep, tmp_path, rng, monkeypatch
):
    calib, _ = _calib(tmp_path, rng)
    options = {"rank": "auto", "calib": str(calib), "rank_multiple": 4}
    settings = {tmp_path / "t.onnx": {"tolerance": 0.02}, tmp_path / "b.onnx": {"budget": 0.5}}
    measured = []
    real = auto_search.measure_sensitivities
    monkeypatch.setattr(
        auto_search,
        "measure_sensitivities",
        lambda *args, **kwargs: measured.append(1) or real(*args, **kwargs),
    )
    before = deep.read_bytes()
    swept = dict(lrcompile.compile_sweep(deep, settings, **options))
    assert len(measured) == 1 and deep.read_bytes() == before
    for output, setting in settings.items():
        alone = lrcompile.compile_model(
            deep, tmp_path / f"alone.{output.name}", **options, **setting
        )
        assert swept[output].auto.ranks == alone.auto.ranks
        assert output.read_bytes() == alone.output_path.read_bytes()
        assert swept[output].verification.passed == alone.verification.passed
        assert set(swept[output].seconds) == set(alone.seconds)
    assert len(measured) == 3
    tolerance, budget = (swept[output].auto.cost_ratio for output in settings)
    assert budget <= 0.5 < tolerance  # different answers: the sweep did not reuse one


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": "auto", "settings": {"calib": "other.npz"}}, "varies calib; only tolerance"),
        ({"rank": "0.5", "settings": {"tolerance": 0.1}}, "makes no layer 'auto'"),
    ],
)
def test_sweep_refuses_what_it_cannot_share_before_running(deep, tmp_path, options, message):
    settings = {tmp_path / "a.onnx": options.pop("settings")}
    with pytest.raises(lrcompile.LrcompileError, match=message):
        lrcompile.compile_sweep(deep, settings, **options)
    assert not (tmp_path / "a.onnx").exists()


def test_sweep_refuses_one_output_named_twice(deep, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {"a.onnx": {"tolerance": 0.1}, "./a.onnx": {"budget": 0.5}}
    with pytest.raises(
        lrcompile.OutputPathError, match=r"a\.onnx: compile_sweep names this output"
    ):
        lrcompile.compile_sweep(deep, settings, rank="auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.onnx"]
