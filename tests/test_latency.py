"""``--objective latency``: the measured latency table, its cache, and the search that uses it."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

import lrcompile
from lrcompile import cli
from lrcompile.numerics.allocate import LayerSpectrum, allocation_path
from lrcompile.runtime import latency
from lrcompile.search import latency as latency_search
from tests.conftest import low_rank_matrix, make_model, save


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test's own latency cache (never the user's)."""
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency.json"


@pytest.fixture
def widening(tmp_path, rng):
    """x[N, 64] -> 64x64 -> Tanh -> 64x128 -> Tanh -> 128x64: two shapes the table tells apart."""
    weights = {
        "W1": low_rank_matrix(rng, 64, 64, 0.8) * 3,
        "W2": low_rank_matrix(rng, 64, 128, 0.8) * 3,
        "W3": low_rank_matrix(rng, 128, 64, 0.8) * 3,
    }
    model = make_model(
        """g (float[N, 64] x) => (float[N, 64] y) {
            h1 = MatMul(x, W1)
            a1 = Tanh(h1)
            h2 = MatMul(a1, W2)
            a2 = Tanh(h2)
            y = MatMul(a2, W3)
        }""",
        weights,
    )
    return save(model, tmp_path / "widening.onnx")


def _calib(tmp_path, rng, rows=96):
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((rows, 64)).astype(np.float32))
    return path


def test_grid_spreads_the_ranks_that_save_flops():
    assert latency.grid(384, 384, 16) == (16, 48, 80, 112, 144, 176)
    assert latency.grid(64, 64, 16) == (16,)  # 32 * 128 == 64 * 64 saves nothing
    assert latency.grid(16, 16, 16) == ()
    assert all(r * (384 + 1536) < 384 * 1536 for r in latency.grid(384, 1536, 16))


def test_curve_interpolates_between_measured_ranks():
    curve = latency.Curve(dense=10.0, ranks=(16, 48), factored=(2.0, 6.0))
    assert curve.seconds(None) == 10.0
    assert curve.seconds(32) == pytest.approx(4.0)
    assert curve.seconds(16) == 2.0


def test_a_layer_whose_factored_form_is_not_faster_has_no_rank_on_the_path():
    spectrum = np.geomspace(1.0, 1e-3, 64) ** 2
    fast = LayerSpectrum("fast", 64, 256, spectrum, nodes=2)
    slow = LayerSpectrum("slow", 64, 256, spectrum)
    # FLOPs allow ranks 16, 32 and 48 of a 64 x 256 weight; "fast" is faster only up to 32.
    seconds = {
        "fast": lambda rank: 8.0 if rank is None else (rank / 16 if rank <= 32 else 8.5),
        "slow": lambda rank: 8.0 if rank is None else 9.0,  # never faster
    }
    path = allocation_path([fast, slow], multiple=16, objective="latency", seconds=seconds)
    assert all(allocation.ranks["slow"] is None for allocation in path)
    assert path[0].dense_cost == 2 * 8.0 + 8.0  # seconds per node run, x its 2 nodes
    assert {allocation.ranks["fast"] for allocation in path} == {None, 16, 32}
    assert path[-1].cost == pytest.approx(2 * 16 / 16 + 8.0)
    flops = allocation_path([fast, slow], multiple=16)  # the same layers by FLOPs take 48
    assert 48 in {allocation.ranks["fast"] for allocation in flops}
    with pytest.raises(ValueError, match="measured seconds"):
        allocation_path([fast], objective="latency")


def test_table_measures_once_then_reads_its_cache(cache):
    shape = latency.Shape(64, 256, 8, 16)
    first = latency.LatencyTable(latency.cache_path(), budget_s=0.05)
    curve = first.curves([shape, shape])[shape.key]
    assert first.measured == 1
    assert curve.ranks == latency.grid(64, 256, 16) and len(curve.factored) == len(curve.ranks)
    assert curve.dense > 0 and all(t > 0 for t in curve.factored)
    saved = json.loads(cache.read_text())
    assert list(saved["targets"]) == [latency.target()]
    again = latency.LatencyTable(latency.cache_path(), budget_s=0.05)
    assert again.curves([shape])[shape.key] == curve and again.measured == 0


def test_another_machine_or_an_unreadable_cache_is_measured_afresh(cache, monkeypatch, caplog):
    shape = latency.Shape(64, 256, 8, 16)
    latency.LatencyTable(latency.cache_path(), budget_s=0.05).curves([shape])
    monkeypatch.setattr(latency, "target", lambda: "another runtime; another cpu")
    other = latency.LatencyTable(latency.cache_path(), budget_s=0.05)
    other.curves([shape])
    assert other.measured == 1
    assert len(json.loads(cache.read_text())["targets"]) == 2  # both kept
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        broken = latency.LatencyTable(latency.cache_path(), budget_s=0.05)
    broken.curves([shape])
    assert broken.measured == 1 and "unreadable" in caplog.text
    assert json.loads(cache.read_text())["version"] == latency.VERSION  # rewritten whole


def _curves(slow_key: str):
    """A fake measurement: factoring ``slow_key``'s shape never pays, the others' always."""

    def measure(shape, budget_s=0.0):
        ranks = latency.grid(shape.k, shape.n, shape.multiple)
        factored = 2.0 if f"{shape.k}x{shape.n}" == slow_key else 0.1
        return latency.Curve(1.0, ranks, tuple(factored for _ in ranks))

    return measure


def test_latency_objective_leaves_dense_what_is_not_faster(widening, tmp_path, rng, monkeypatch):
    monkeypatch.setattr(latency, "measure", _curves("64x128"))
    result = lrcompile.compile_model(
        widening,
        tmp_path / "out.onnx",
        rank="auto",
        calib=str(_calib(tmp_path, rng)),
        objective="latency",
        budget=0.5,
        tolerance=1.0,
    )
    # W2 stays dense; the others take the rank with the least error at their (flat) fake cost.
    assert result.auto.ranks == {"W1": 16, "W2": None, "W3": 32}
    estimate = result.auto.latency
    assert estimate.layers_dense == 3.0 and estimate.layers == pytest.approx(1.2)
    assert estimate.shapes == 3 and estimate.measured == 3
    assert estimate.model_dense is not None and estimate.model is not None  # really timed
    # The fake table saves 1.8 s of a model that runs in far less: no prediction, not a wrong one.
    assert estimate.predicted_speedup is None
    assert result.to_dict()["auto"]["latency"]["measured_speedup"] == estimate.measured_speedup
    assert "timing" in result.seconds


def test_latency_objective_measures_for_real_and_reuses_the_table(widening, tmp_path, rng):
    options = {
        "rank": "auto",
        "calib": str(_calib(tmp_path, rng)),
        "objective": "latency",
        "budget": 0.6,
        "tolerance": 1.0,
    }
    first = lrcompile.compile_model(widening, tmp_path / "a.onnx", **options)
    second = lrcompile.compile_model(widening, tmp_path / "b.onnx", **options)
    assert first.auto.latency.measured == 3 and second.auto.latency.measured == 0
    # Whatever this machine measured (at 8 rows a thin pair may not be faster), the cached
    # table gives the same ranks, and the same output when one is written.
    assert first.auto.ranks == second.auto.ranks
    assert (first.output_path is None) == (second.output_path is None)
    if first.output_path is not None:
        assert first.output_path.read_bytes() == second.output_path.read_bytes()


def test_estimate_predicts_from_the_seconds_the_table_saves():
    estimate = latency_search.LatencyEstimate(
        layers_dense=0.03, layers=0.02, target="t", shapes=1, measured=0, cache=None,
        model_dense=0.05, model=0.04,
    )  # fmt: skip
    assert estimate.predicted_speedup == pytest.approx(0.05 / 0.04)
    assert estimate.measured_speedup == pytest.approx(1.25)
    assert estimate.to_dict()["measured_over_predicted"] == pytest.approx(1.0)
    assert dataclasses.replace(estimate, model_dense=None).predicted_speedup is None


def test_a_sweep_shares_one_table_between_its_latency_settings(
    widening, tmp_path, rng, monkeypatch
):
    monkeypatch.setattr(latency, "measure", _curves("64x128"))
    settings = {
        tmp_path / "a.onnx": {"budget": 0.5, "objective": "latency"},
        tmp_path / "b.onnx": {"budget": 0.8, "objective": "latency"},
        tmp_path / "c.onnx": {"budget": 0.5},
    }
    calib = str(_calib(tmp_path, rng))
    sweep = dict(
        lrcompile.compile_sweep(widening, settings, rank="auto", calib=calib, tolerance=1.0)
    )
    a, b, c = (sweep[path] for path in settings)
    assert (a.auto.latency.measured, b.auto.latency.measured, c.auto.latency) == (3, 0, None)
    assert a.auto.ranks == {"W1": 16, "W2": None, "W3": 32}
    assert c.auto.ranks["W2"] is not None  # by FLOPs the 64x128 layer is worth factoring


def test_an_unwritable_cache_costs_a_warning_not_the_compile(
    widening, tmp_path, rng, monkeypatch, caplog
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(latency.CACHE_ENV, str(blocker / "cache"))  # under a file: no folder
    monkeypatch.setattr(latency, "measure", _curves("64x128"))
    with caplog.at_level(logging.WARNING):
        result = lrcompile.compile_model(
            widening, tmp_path / "out.onnx", rank="auto", calib=str(_calib(tmp_path, rng)),
            objective="latency", budget=0.5, tolerance=1.0,
        )  # fmt: skip
    assert result.auto.ranks == {"W1": 16, "W2": None, "W3": 32}
    assert "not written" in caplog.text


def test_the_cli_prints_the_table_and_the_whole_model_timing(widening, tmp_path, rng, monkeypatch):
    monkeypatch.setattr(latency, "measure", _curves("64x128"))
    out = tmp_path / "out.onnx"
    args = [str(widening), "-o", str(out), "--rank", "auto", "--calib", str(_calib(tmp_path, rng))]
    args += ["--objective", "latency", "--budget", "0.5", "--tolerance", "1"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("latency:"))
    assert "3 layer shapes timed" in line and "3 measured now" in line
    assert "whole model on a calibration batch" in line and " ms -> " in line
    assert line.endswith("no prediction")  # the fake table saves more than the model takes


@pytest.mark.parametrize("flag", ["--fp8", "--plugin"])
def test_latency_objective_refuses_tensorrt_targets_with_one_line(widening, tmp_path, rng, flag):
    calib = _calib(tmp_path, rng)
    out = tmp_path / "out.onnx"
    args = [str(widening), "-o", str(out), "--rank", "auto", "--calib", str(calib)]
    result = CliRunner().invoke(cli.main, [*args, "--objective", "latency", flag])
    assert result.exit_code == 2, result.output
    assert "--objective latency" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_inspect_refuses_the_latency_objective(widening, tmp_path, rng):
    config = lrcompile.CompileConfig(
        rank="auto", calib=str(_calib(tmp_path, rng)), objective="latency"
    )
    with pytest.raises(lrcompile.LrcompileError, match="measured by a compile"):
        lrcompile.inspect_model(widening, config)
