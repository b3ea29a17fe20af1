"""inspect: candidates, spectra, the measured trade-off curve, plots, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lrcompile import cli
from lrcompile.config import CompileConfig
from lrcompile.inspection import inspect_model
from tests.conftest import low_rank_matrix, make_model, save


@pytest.fixture
def two_layer(tmp_path, rng):
    model = make_model(
        """g (float[N, 64] x) => (float[N, 48] y) {
            h = MatMul(x, W1)
            a = Relu(h)
            y = Gemm <transB = 1> (a, W2)
        }""",
        {"W1": low_rank_matrix(rng, 64, 96, 0.8), "W2": low_rank_matrix(rng, 48, 96, 0.9)},
    )
    path = save(model, tmp_path / "two.onnx")
    x = rng.standard_normal((128, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return path, tmp_path / "calib.npz"


def test_candidates_and_plain_spectra(two_layer):
    path, _ = two_layer
    result = inspect_model(path, spectra=True)
    assert [(layer.weight, layer.op, layer.shape) for layer in result.layers] == [
        ("W1", "MatMul", (64, 96)),
        ("W2", "Gemm", (96, 48)),
    ]
    w1 = result.layers[0]
    assert w1.break_even == pytest.approx(64 * 96 / 160)
    # sigma_i = 0.8**i: 99% of the energy needs the smallest r with 1 - 0.64**r >= 0.99.
    assert w1.energy_rank(0.99) == int(np.ceil(np.log(0.01) / np.log(0.64)))
    assert result.curve == () and result.calibration is None


def test_calibrated_inspection_measures_the_curve(two_layer):
    path, calib = two_layer
    result = inspect_model(path, CompileConfig(rank="auto", calib=str(calib)), curve_points=4)
    assert all(layer.whitened is not None and layer.sensitivity > 0 for layer in result.layers)
    costs = [point.cost_ratio for point in result.curve]
    assert costs[0] == 1.0 and result.curve[0].measured_error == 0.0
    assert costs == sorted(costs, reverse=True) and 2 <= len(costs) <= 4
    assert result.curve[-1].measured_error > 0


def test_cli_inspect_writes_plots_and_json(two_layer, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the plot extra")
    path, calib = two_layer
    out = tmp_path / "plots"
    result = CliRunner().invoke(
        cli.main,
        [
            "inspect",
            str(path),
            "--calib",
            str(calib),
            "--plot",
            str(out),
            "--json",
            str(tmp_path / "i.json"),
            "--curve-points",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "break-even" in result.stdout and "measured error" in result.stdout
    for name in ("spectra.png", "tradeoff.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "i.json").read_text())
    assert [layer["weight"] for layer in data["layers"]] == ["W1", "W2"]


def test_cli_inspect_bad_calibration_exits_2(two_layer, tmp_path):
    path, _ = two_layer
    np.savez(tmp_path / "bad.npz", y=np.zeros((2, 64), np.float32))
    result = CliRunner().invoke(
        cli.main, ["inspect", str(path), "--calib", str(tmp_path / "bad.npz")]
    )
    assert result.exit_code == 2
    assert "array 'y' is not a model input" in result.stderr


def test_cli_inspect_names_the_ops_it_leaves_alone(tmp_path, rng):
    # An already-quantized LM (genai's int4) has no MatMul to list: inspect says why.
    model = make_model(
        """g (uint8[N, 8] x, float[N, 8] f) => (int32[N, 8] y, float[N, 4] z) {
            y = MatMulInteger(x, Wq)
            z = MatMul(f, W)
        }""",
        {"Wq": np.ones((8, 8), np.uint8), "W": rng.standard_normal((8, 4)).astype(np.float32)},
        opset=19,
    )
    path = save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(
        cli.main, ["inspect", str(path), "--json", str(tmp_path / "i.json")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "left alone: 1 MatMulInteger (already quantized)"
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["left_alone"] == [
        {"op": "MatMulInteger", "reason": "already quantized", "count": 1}
    ]
    assert [layer["weight"] for layer in data["layers"]] == ["W"]
