"""What keeps ``--rank auto`` bounded on LMs: outputs on disk, factors cached on disk, one probe
model for every sensitivity, outputs compared in slices."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import lrcompile
from lrcompile.calibration.statistics import calibrate
from lrcompile.factors.cache import FactorCache
from lrcompile.factors.provider import FactorProvider
from lrcompile.io.data import FeedSource
from lrcompile.io.spill import OutputStore
from lrcompile.numerics import decompose, whiten
from lrcompile.numerics.ranks import RankSpec
from lrcompile.passes.candidates import find_candidates
from lrcompile.passes.factored_graph import factor_names
from lrcompile.passes.probe_graph import PROBE_INPUT, probe_model
from lrcompile.pipeline import factor_passes
from lrcompile.runtime import metrics
from lrcompile.runtime.metrics import ErrorAccumulator, ErrorMeter, measure_error
from lrcompile.search.decisions import Planner, rank_specs
from lrcompile.tools.synthetic import lm_like


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    path = lm_like(folder, layers=2, hidden=64, ffn=128, vocab=1000)
    ids = np.random.default_rng(0).integers(0, 1000, (16, 16))  # 256 rows: above every width
    np.savez(folder / "calib.npz", input_ids=ids)
    return path, [{"input_ids": ids[i : i + 8]} for i in (0, 8)]


def test_output_store_reads_back_what_was_written_and_removes_its_folder(rng):
    store = OutputStore()
    batches = [{"a": rng.standard_normal((2, 3)), "b": np.arange(4)} for _ in range(3)]
    assert [store.append(batch) for batch in batches] == [0, 1, 2]
    assert len(store) == 3
    for got, expected in zip(store, batches, strict=True):
        assert list(got) == ["a", "b"]
        assert all(np.array_equal(got[name], expected[name]) for name in expected)
    assert [
        np.array_equal(b["a"], e["a"]) for b, e in zip(store[1:], batches[1:], strict=True)
    ] == [1, 1]
    folder = store.folder
    assert len(list(folder.iterdir())) == 6
    store.close()
    assert not folder.exists()


def test_calibration_keeps_reference_outputs_on_disk(lm):
    path, feeds = lm
    model = ir.load(path)
    groups, _ = find_candidates(model.graph, ())
    calibration = calibrate(
        ir.serde.serialize_model(model),
        groups,
        FeedSource(feeds, "test", False),
        data_folder=path.parent,
    )
    assert isinstance(calibration.reference, OutputStore)
    assert len(calibration.reference) == 2
    assert calibration.reference[0]["logits"].shape == (8, 16, 1000)


def test_cached_factors_sliced_at_a_rank_equal_the_direct_factorization(rng):
    k, n = 48, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((200, k))
    white = whiten.whitening_from_gram(x.T @ x)
    cache = FactorCache()
    svd = whiten.whitened_svd(w, white)
    top = whiten.factorize_whitened(w, 21, white, svd=svd)
    entry = cache.put("w", top, svd[1])
    assert entry.left.shape == (k, 21) and len(entry.spectrum) == 40
    for rank in (1, 8, 21):
        direct = whiten.factorize_whitened(w, rank, white, svd=svd)
        sliced = entry.at_rank(rank)
        # Byte for byte: the provider serves a planned rank from the cache, and a compile's
        # output must not depend on whether its rank came from a cache.
        assert np.array_equal(sliced.left, direct.left)
        assert np.array_equal(sliced.right, direct.right)
        assert sliced.total_energy == pytest.approx(direct.total_energy)
    with pytest.raises(ValueError):
        entry.at_rank(22)
    plain = decompose.factorize(w, 21)
    entry = cache.put("p", plain, np.linalg.svd(w, compute_uv=False))
    assert np.array_equal(entry.at_rank(5).left, decompose.factorize(w, 5).left)
    assert np.array_equal(entry.at_rank(5).right, decompose.factorize(w, 5).right)


def test_probe_model_measures_each_layer_as_a_model_with_that_layer_factored(lm):
    path, feeds = lm
    model = ir.load(path)
    groups, _ = find_candidates(model.graph, ())
    session = ErrorMeter(model).session
    reference = [{"logits": session.run(None, feed)[0]} for feed in feeds]
    planner = Planner(groups, rank_specs(groups, RankSpec("auto")), {}, multiple=8)
    provider = FactorProvider()
    picked = [groups[0], groups[5], groups[-1]]  # a projection, a down projection, lm_head
    factors, plans = {}, {}
    for group in picked:
        plans[group.key] = planner.only(group.key, 8)
        names = factor_names(model.graph, groups, [group.key])
        factors[group.key] = provider.fit(groups, plans[group.key], names)[group.key].pair
    order = [group.key for group in picked]
    meter = ErrorMeter(probe_model(model, factors, order))
    none = meter(feeds, reference, extra={PROBE_INPUT: np.array(-1, np.int64)})
    assert none < 1e-6  # every layer dense: the original model
    for index, group in enumerate(picked):
        candidate = model.clone()
        factor_passes(plans[group.key], {group.key: factors[group.key]})(candidate)
        alone = measure_error(candidate, feeds, reference)
        probed = meter(feeds, reference, extra={PROBE_INPUT: np.array(index, np.int64)})
        assert alone > 1e-5
        assert probed == pytest.approx(alone, rel=1e-3)
    assert len(model.graph) == len(ir.load(path).graph)  # the original is not touched


def test_outputs_compared_in_slices_give_the_unsliced_statistics(rng, monkeypatch):
    reference = rng.standard_normal((3, 7, 50)).astype(np.float32)
    candidate = reference + 0.1 * rng.standard_normal(reference.shape).astype(np.float32)
    whole = ErrorAccumulator()
    whole.add(reference, candidate)
    monkeypatch.setattr(metrics, "SLICE_ELEMENTS", 120)  # two positions per slice
    sliced = ErrorAccumulator()
    sliced.add(reference, candidate)
    a, b = whole.metrics("y", 1.0), sliced.metrics("y", 1.0)
    for field in ("relative_l2", "cosine", "max_abs_error", "kl", "top1"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-9)
    assert sliced.positions == 21


def test_auto_on_an_lm_shaped_model_with_the_kl_gate(lm, tmp_path):
    path, _ = lm
    out = tmp_path / "o.onnx"
    ids = np.load(path.parent / "calib.npz")["input_ids"]
    np.savez(tmp_path / "held.npz", input_ids=ids[8:])  # the held-back batch of two
    result = lrcompile.compile_model(
        path, out, rank="auto", calib=str(path.parent / "calib.npz"), metric="kl",
        tolerance=0.05, batch_size=8, verify_data=tmp_path / "held.npz",
    )  # fmt: skip
    assert (result.auto.batches, result.auto.held_back) == (2, 1)
    assert result.auto is not None and result.verification is not None
    steps = {step.index: step for step in result.auto.steps}
    chosen = min(steps.values(), key=lambda s: s.cost_ratio if s.passed else np.inf)
    assert chosen.measured_error <= 0.05 * 0.8
    # What the search measured is what the check measures on the same (held-back) data.
    kl = result.verification.outputs[0].kl
    assert kl == pytest.approx(result.auto.measured_error, rel=1e-3, abs=1e-6)


def test_caching_factors_leaves_no_weight_of_the_original_mapped(lm):
    """Each weight is unmapped once its factors are cached: while the next chunk's calibration
    session runs (the peak of a 0.5B LM's search), the cached layers' pages are not resident."""
    from lrcompile.compiler import factor_provider
    from lrcompile.config import CompileConfig
    from lrcompile.profile import Profile
    from lrcompile.stages.calibrate import calibrate_and_cache
    from lrcompile.stages.load import load

    path, _ = lm
    config = CompileConfig(rank="auto", calib=str(path.parent / "calib.npz"), batch_size=8)
    prepared = load(path, config)
    external = [g for g in prepared.groups if isinstance(g.tensor, ir.ExternalTensor)]
    provider = factor_provider(config)
    try:
        calibrated = calibrate_and_cache(prepared, config, provider, Profile())
        calibrated.close()
        assert all(provider.cached(group.key) is not None for group in external)
    finally:
        provider.close()
    assert len(external) == len(prepared.groups) > 0
    assert [g.name for g in external if g.tensor.raw is not None] == []
