"""Loading, external data, atomic writes, the untouched input, and deterministic output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lrcompile
from lrcompile.errors import ModelLoadError, OutputPathError
from lrcompile.io import model as model_io
from tests.conftest import run


def _digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _external_copy(mlp: Path, folder: Path, location: str = "weights.bin") -> Path:
    model = onnx.load(str(mlp))
    target = folder / "ext.onnx"
    onnx.save(
        model,
        str(target),
        save_as_external_data=True,
        location=location,
        size_threshold=0,
        all_tensors_to_one_file=True,
    )
    return target


def _set_location(path: Path, location: str, **info: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
        elif entry.key in info:
            entry.value = info[entry.key]
    onnx.save(model, str(path))


def _x(rng) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((5, 64)).astype(np.float32)}


def test_output_has_ir_version_10_and_keeps_opset(mlp, tmp_path):
    result = lrcompile.compile_model(mlp, tmp_path / "o.onnx", rank="8", verify=False)
    model = onnx.load(str(result.output_path))
    assert model.ir_version == 10
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 19)]


def test_external_data_round_trip(mlp, tmp_path, rng):
    source = _external_copy(mlp, tmp_path)
    inline = lrcompile.compile_model(source, tmp_path / "inline.onnx", rank="8", verify=False)
    ext = lrcompile.compile_model(
        source, tmp_path / "ext.lr.onnx", rank="8", external_data=True, verify=False
    )
    data = tmp_path / "ext.lr.onnx.data"
    assert data.is_file()
    proto = onnx.load(str(ext.output_path), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.name.endswith(("_lr_A", "_lr_B"))]
    assert len(big) == 4 and all(onnx.external_data_helper.uses_external_data(t) for t in big)
    assert {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    } == {"ext.lr.onnx.data"}
    # The inline output carries its own weights: it runs after the input's data file is gone.
    (tmp_path / "weights.bin").unlink()
    feeds = _x(rng)
    np.testing.assert_array_equal(run(inline.output_path, feeds)[0], run(ext.output_path, feeds)[0])


def test_external_data_chosen_automatically_above_threshold(mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    result = lrcompile.compile_model(mlp, tmp_path / "big.onnx", rank="8", verify=False)
    assert (tmp_path / "big.onnx.data").is_file()
    assert lrcompile.verify(mlp, result.output_path, tolerance=1.0).batches == 8


def test_weights_stay_on_disk_until_read(mlp, tmp_path):
    model = model_io.load_model(_external_copy(mlp, tmp_path))
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert all(t.raw is None for t in tensors)  # nothing mapped yet


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/etc/passwd"])
def test_escaping_external_location_is_refused(mlp, tmp_path, location):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 100000)
    source = _external_copy(mlp, folder)
    _set_location(source, location)
    with pytest.raises(ModelLoadError, match="points outside the model's folder"):
        model_io.load_model(source)


def test_missing_and_truncated_external_data(mlp, tmp_path):
    source = _external_copy(mlp, tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"lies outside 'weights\.bin'.*truncated"):
        model_io.load_model(source)
    data.unlink()
    with pytest.raises(ModelLoadError, match=r"external data file 'weights\.bin' is missing"):
        model_io.load_model(source)


def test_external_length_must_match_shape(mlp, tmp_path):
    source = _external_copy(mlp, tmp_path)
    _set_location(source, "weights.bin", length="12")
    with pytest.raises(ModelLoadError, match="length 12 does not match its shape"):
        model_io.load_model(source)


def test_input_is_byte_identical_and_output_deterministic(mlp, tmp_path):
    source = _external_copy(mlp, tmp_path)
    before = _digest(source, tmp_path / "weights.bin")
    for run_dir in ("one", "two"):
        (tmp_path / run_dir).mkdir()
        lrcompile.compile_model(
            source,
            tmp_path / run_dir / "a.onnx",
            rank="0.5",
            rank_multiple=8,
            decomposition="randomized",
            verify=False,
        )
        lrcompile.compile_model(
            source, tmp_path / run_dir / "x.onnx", rank="0.5", external_data=True, verify=False
        )
    assert _digest(source, tmp_path / "weights.bin") == before
    outputs = ("a.onnx", "x.onnx", "x.onnx.data")
    assert _digest(*(tmp_path / "one" / n for n in outputs)) == _digest(
        *(tmp_path / "two" / n for n in outputs)
    )


def test_failed_write_leaves_nothing_behind(mlp, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def broken_save(model, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    from lrcompile.io import inline

    monkeypatch.setattr(ir, "save", broken_save)  # outputs with external data
    monkeypatch.setattr(inline, "write_inline", broken_save)  # inline outputs, tensor by tensor
    with pytest.raises(OutputPathError, match=r"could not write the output \(No space left"):
        lrcompile.compile_model(mlp, out / "o.onnx", rank="8", verify=False)
    assert list(out.iterdir()) == []


def test_output_paths_that_would_touch_the_input_are_refused(mlp, tmp_path):
    with pytest.raises(OutputPathError, match="must not be the input"):
        lrcompile.compile_model(mlp, mlp, rank="8")
    source = _external_copy(mlp, tmp_path, location="o.onnx.data")
    with pytest.raises(OutputPathError, match="is read by the input model"):
        lrcompile.compile_model(source, tmp_path / "o.onnx", rank="8", external_data=True)
    with pytest.raises(OutputPathError, match="does not exist"):
        lrcompile.compile_model(mlp, tmp_path / "nodir" / "o.onnx", rank="8")


def test_initializers_listed_as_inputs_are_factored(mlp, tmp_path, rng):
    model = onnx.load(str(mlp))
    for init in model.graph.initializer:  # as torch's keep_initializers_as_inputs=True writes
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    source = tmp_path / "old.onnx"
    onnx.save(model, str(source))
    result = lrcompile.compile_model(source, tmp_path / "o.onnx", rank="8", tolerance=1.0)
    assert result.totals.factored == 2 and result.verification.passed
    out = onnx.load(str(result.output_path))
    assert [i.name for i in out.graph.input] == ["x"]


@pytest.mark.parametrize("offset", ["999999999", "-5"])
def test_external_offset_out_of_range(mlp, tmp_path, offset):
    source = _external_copy(mlp, tmp_path)
    model = onnx.load(str(source), load_external_data=False)
    tensor = model.graph.initializer[0]
    entries = {e.key: e for e in tensor.external_data}
    if "offset" in entries:
        entries["offset"].value = offset
    else:
        tensor.external_data.add(key="offset", value=offset)
    onnx.save(model, str(source))
    with pytest.raises(ModelLoadError, match=r"lies outside 'weights\.bin'"):
        model_io.load_model(source)


def test_external_data_linked_from_outside_the_folder_is_refused_with_the_fix(tmp_path, rng):
    # The Hugging Face cache layout: snapshots/<hash>/model.onnx_data -> ../../blobs/<sha>.
    import os

    from lrcompile.io.model import load_model
    from tests.conftest import make_model, save

    snapshot = tmp_path / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "blobs").mkdir()
    model = make_model(
        "g (float[N, 8] x) => (float[N, 8] y) { y = MatMul(x, W) }",
        {"W": rng.standard_normal((8, 8)).astype(np.float32)},
    )
    path = save(
        model, snapshot / "model.onnx", save_as_external_data=True, location="model.onnx_data",
        size_threshold=0,
    )  # fmt: skip
    os.rename(snapshot / "model.onnx_data", tmp_path / "blobs" / "sha")
    os.symlink("../../blobs/sha", snapshot / "model.onnx_data")
    with pytest.raises(ModelLoadError, match=r"is a symbolic link to .*blobs/sha, outside the"):
        load_model(path)
    # Even a link inside the folder is refused (by ONNX's checker): data files are real files.
    os.remove(snapshot / "model.onnx_data")
    os.rename(tmp_path / "blobs" / "sha", snapshot / "data.bin")
    os.symlink("data.bin", snapshot / "model.onnx_data")
    with pytest.raises(ModelLoadError, match="symbolic link"):
        load_model(path)


def test_a_constant_whose_value_lies_in_external_data_is_written_with_the_output(tmp_path, rng):
    # Optimum's exports keep some Constant values in the input's data file; the output, written
    # to another folder, must not name that file.
    from tests.conftest import low_rank_matrix, make_model

    shift = rng.standard_normal(64).astype(np.float32)
    model = make_model(
        "g (float[N, 64] x) => (float[N, 64] y) { h = MatMul(x, W)\n y = Add(h, shift) }",
        {"W": low_rank_matrix(rng, 64, 64), "shift": shift},
    )
    del model.graph.initializer[1]  # shift becomes a Constant's value
    value = onnx.numpy_helper.from_array(shift)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["shift"], value=value))
    source_folder, output_folder = tmp_path / "in", tmp_path / "out"
    source_folder.mkdir()
    output_folder.mkdir()
    source = source_folder / "m.onnx"
    onnx.save(model, str(source), save_as_external_data=True, location="m.data",
              size_threshold=0, convert_attribute=True)  # fmt: skip
    stored = onnx.load(str(source), load_external_data=False)
    assert onnx.external_data_helper.uses_external_data(stored.graph.node[0].attribute[0].t)
    result = lrcompile.compile_model(source, output_folder / "m.lr.onnx", rank="8", verify=False)
    written = onnx.load(str(result.output_path), load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data
                 if e.key == "location"}  # fmt: skip
    assert locations == {"m.lr.onnx.data"}  # the input's external data: the output's too
    assert not onnx.external_data_helper.uses_external_data(written.graph.node[0].attribute[0].t)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    (expected,) = run(source, {"x": x})
    (got,) = run(result.output_path, {"x": x})
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.5


@pytest.mark.parametrize(("op", "accepted"), [("SimplifiedLayerNormalization", True),
                                              ("NoSuchNormalization", False)])  # fmt: skip
def test_an_op_the_checker_does_not_know_is_judged_by_onnx_runtime(
    tmp_path, rng, op, accepted, caplog, monkeypatch
):
    # onnxruntime-genai's builder writes SimplifiedLayerNormalization in the default domain: the
    # ONNX checker has no schema of it, ONNX Runtime runs it.
    from onnx import TensorProto, helper, numpy_helper

    from lrcompile.io import validate

    monkeypatch.setattr(validate, "_WARNED", set())

    nodes = [helper.make_node(op, ["x", "g"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("MatMul", ["n", "W"], ["y"])]  # fmt: skip
    w = rng.standard_normal((64, 48)).astype(np.float32)
    weights = [numpy_helper.from_array(np.ones(64, np.float32), "g"),
               numpy_helper.from_array(w, "W")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)], ir_version=10)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    if accepted:
        result = lrcompile.compile_model(path, tmp_path / "o.onnx", rank="8", tolerance=0.9)
        assert result.totals.factored == 1 and result.verification.passed
        assert onnx.load(str(result.output_path)).graph.node[0].op_type == op
        # The input loaded twice and the output once: one warning.
        warned = [r for r in caplog.records if "ONNX Runtime loads it: accepted" in r.message]
        assert len(warned) == 1
    else:
        with pytest.raises(
            ModelLoadError, match=f"fails the ONNX checker: No Op registered for {op}"
        ):
            lrcompile.compile_model(path, tmp_path / "o.onnx", rank="8", verify=False)
        assert not (tmp_path / "o.onnx").exists()
