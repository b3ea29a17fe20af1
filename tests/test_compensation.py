"""Error compensation: layers factored block by block, each fitted to the original outputs given
the inputs the model compressed so far gives it."""

from __future__ import annotations

import numpy as np
import pytest

import lrcompile
from lrcompile.calibration import compensation
from lrcompile.tools.synthetic import lm_like


@pytest.fixture
def chain(deep, tmp_path, rng):
    """``deep`` (four 64x64 layers, tanh between them) and 256 rows of correlated inputs."""
    mix = rng.standard_normal((64, 64)) * np.logspace(0, -1.5, 64)
    np.savez(tmp_path / "c.npz", x=(rng.standard_normal((256, 64)) @ mix.T).astype(np.float32))
    return deep, tmp_path / "c.npz"


def _error(path, calib, out, **options) -> float:
    result = lrcompile.compile_model(
        path, out, rank="16", calib=str(calib), verify_data=calib, tolerance=1.0, **options
    )
    return result.verification.outputs[0].relative_l2


def test_compensation_lowers_the_error_on_the_data_it_fits(chain, tmp_path, monkeypatch):
    path, calib = chain
    runs = []
    real = compensation.compensating_whitenings
    monkeypatch.setattr(
        "lrcompile.stages.rewrite.compensating_whitenings",
        lambda *args, **kwargs: runs.append(len(args[2])) or real(*args, **kwargs),
    )
    plain = _error(path, calib, tmp_path / "p.onnx")
    assert runs == []
    compensated = _error(path, calib, tmp_path / "c.onnx", compensate=4)
    assert runs == [1, 1, 1]  # blocks 2..4 of one layer each; the first is the plain whitening
    assert compensated < 0.9 * plain


def test_compensation_runs_models_whose_factors_wait_on_disk(tmp_path):
    path = lm_like(tmp_path, layers=2, hidden=64, ffn=128, vocab=1000)  # external data
    ids = np.random.default_rng(0).integers(0, 1000, (32, 16))
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    options = {"rank": "0.5", "calib": str(tmp_path / "calib.npz"), "metric": "kl"}
    results = [
        lrcompile.compile_model(path, tmp_path / f"o{blocks}.onnx", compensate=blocks, **options)
        for blocks in (0, 3)
    ]
    kl = [result.verification.outputs[0].kl for result in results]
    assert [r.output_path.with_name(r.output_path.name + ".data").exists() for r in results] == [
        True,
        True,
    ]
    assert kl[1] < kl[0]


def test_compensation_without_calibration_data_is_refused(chain, tmp_path):
    path, _ = chain
    with pytest.raises(lrcompile.LrcompileError, match="`compensate` needs calibration data"):
        lrcompile.compile_model(path, tmp_path / "o.onnx", rank="16", compensate=2)
    assert not (tmp_path / "o.onnx").exists()
