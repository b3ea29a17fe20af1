"""The CLI: exit codes, one-line errors, nothing written on error, options match config fields."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrcompile import cli
from lrcompile.cli.terminal import Progress
from lrcompile.config import CHOICES, CompileConfig
from lrcompile.io.data import parse_val_ranges
from lrcompile.io.shapes import parse_input_shapes
from tests.conftest import make_model, save


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _assert_user_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("lrcompile: error: ")
    assert message in line, line


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_compile_writes_model_and_report(mlp, tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    result = _invoke(mlp, "--rank", "8", "-o", out, "--report", report, "--tolerance", "1.0")
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in result.stdout and "2 factored, 0 dense, 0 skipped" in result.stdout
    data = json.loads(report.read_text())
    assert data["totals"]["factored"] == 2
    assert [layer["rank"] for layer in data["layers"]] == [16, 16]  # 8 rounded up to 16
    assert data["verification"]["passed"] is True
    assert data["config"]["rank"] == "8"
    onnx.checker.check_model(str(out))


def test_default_output_and_explicit_compile_subcommand(mlp):
    result = _invoke("compile", mlp, "--rank", "16", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (mlp.parent / "mlp.lr.onnx").is_file()
    assert "verdict" not in result.stdout


def test_failed_verification_exits_1_and_keeps_the_output(mlp, tmp_path):
    out = tmp_path / "o.onnx"
    result = _invoke(mlp, "--rank", "8", "-o", out, "--tolerance", "1e-6")
    assert result.exit_code == 1, result.output
    assert "verdict: FAIL" in result.stdout and out.is_file()


def test_verify_exit_codes_and_json(mlp, tmp_path):
    out = tmp_path / "o.onnx"
    assert _invoke(mlp, "--rank", "8", "-o", out, "--no-verify").exit_code == 0
    passed = _invoke("verify", mlp, out, "--tolerance", "1.0", "--json", tmp_path / "v.json")
    assert passed.exit_code == 0 and "verdict: PASS" in passed.stdout
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    failed = _invoke("verify", mlp, out, "--tolerance", "1e-6", "--json", "-")
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["outputs"][0]["passed"] is False


def test_nothing_to_factor_exits_0_and_writes_nothing(tmp_path, rng):
    w = rng.standard_normal((16, 16)).astype(np.float32)
    model = save(
        make_model("g (float[N, 16] x) => (float[N, 16] y) { y = MatMul(x, W) }", {"W": w}),
        tmp_path / "small.onnx",
    )
    before = _files(tmp_path)
    result = _invoke(model, "--rank", "16")
    assert result.exit_code == 0, result.output
    assert "every layer stays dense; no output written" in result.stdout
    assert "rank 16 saves nothing (break-even 8)" in result.stdout
    assert _files(tmp_path) == before


def _truncated(mlp: Path, tmp_path: Path) -> Path:
    path = tmp_path / "truncated.onnx"
    path.write_bytes(mlp.read_bytes()[: len(mlp.read_bytes()) // 2])
    return path


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01")
    return path


def _checker_fails(tmp_path: Path) -> Path:
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "undefined"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 19)],
    )
    return save(model, tmp_path / "invalid.onnx")


def _missing_data(mlp: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ext.onnx"
    onnx.save(
        onnx.load(str(mlp)),
        str(path),
        save_as_external_data=True,
        location="w.bin",
        size_threshold=0,
    )
    (tmp_path / "w.bin").unlink()
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda mlp, tmp: tmp / "nope.onnx", "nope.onnx: no such file"),
        (lambda mlp, tmp: _garbage(tmp), "garbage.onnx: not an ONNX model"),
        (_truncated, "truncated.onnx: not an ONNX model"),
        (lambda mlp, tmp: _checker_fails(tmp), "invalid.onnx: fails the ONNX checker"),
        (_missing_data, "external data file 'w.bin' is missing"),
    ],
)
def test_bad_models_exit_2_and_write_nothing(mlp, tmp_path, make, message):
    work = tmp_path / "work"
    work.mkdir()
    model = make(mlp, work)
    before = _files(work)
    _assert_user_error(_invoke(model, "--rank", "8", "-o", work / "o.onnx"), message)
    assert _files(work) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "big"], "invalid rank spec 'big'"),
        (["--rank", "2.5"], "the fraction must be in (0, 1]"),
        (["--rank", "8", "--rank-multiple", "0"], "--rank-multiple must be >= 1, got 0"),
        (["--rank", "8", "--tolerance", "-1"], "--tolerance must be >= 0, got -1.0"),
        (["--rank", "8", "--input-shapes", "x:2"], "does not fit the model's input shape"),
    ],
)
def test_bad_options_exit_2(mlp, tmp_path, args, message):
    _assert_user_error(_invoke(mlp, "-o", tmp_path / "o.onnx", *args), message)
    assert not (tmp_path / "o.onnx").exists()


def test_bad_override_file_exits_2(mlp, tmp_path):
    overrides = tmp_path / "o.yaml"
    overrides.write_text("'W*': nonsense\n")
    result = _invoke(mlp, "--rank", "8", "--overrides", overrides, "-o", tmp_path / "o.onnx")
    _assert_user_error(result, "pattern 'W*': invalid rank spec 'nonsense'")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input_ids": np.zeros((2, 64), np.float32)}, "array 'input_ids' is not a model input"),
        ({"x": np.zeros((2, 64), np.int64)}, "has dtype int64, the model expects float32"),
        ({"x": np.zeros((2, 32), np.float32)}, "axis 1 must be 64"),
    ],
)
def test_malformed_data_exits_2(mlp, tmp_path, arrays, message):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    _assert_user_error(_invoke("verify", mlp, mlp, "--data", data), message)
    out = tmp_path / "o.onnx"
    _assert_user_error(_invoke(mlp, "--rank", "8", "-o", out, "--verify-data", data), message)
    assert not out.exists()


def test_output_equal_to_input_is_refused(mlp):
    before = mlp.read_bytes()
    _assert_user_error(_invoke(mlp, "--rank", "8", "-o", mlp), "must not be the input model")
    assert mlp.read_bytes() == before


def test_every_compile_option_maps_to_a_config_field_with_its_default_and_choices():
    command = cli.main.commands["compile"]
    context = command.make_context("compile", ["m.onnx"])  # what a bare run gets
    params = {p.name: p for p in command.params if p.name not in ("model", "output", "report")}
    fields = {f.name: f for f in dataclasses.fields(CompileConfig)}
    assert set(params) == set(fields)
    for name, param in params.items():
        default = context.params[name]
        if param.multiple:
            parse = parse_input_shapes if name == "input_shapes" else parse_val_ranges
            default = parse(default)
        field = fields[name]
        missing = dataclasses.MISSING
        expected = field.default if field.default_factory is missing else field.default_factory()
        assert default == expected, name
        choices = getattr(param.type, "choices", None)
        assert (tuple(choices) if choices else None) == CHOICES.get(name), name
        if default not in (None, {}, False):  # the help shows every default but off flags
            shown = param.opts[0].lstrip("-") if default is True else default  # --verify/...
            assert f"[default: {shown}]" in param.get_help_record(context)[1], name
    # Every choice the config knows is offered on the command line.
    assert {n for n, p in params.items() if getattr(p.type, "choices", None)} == set(CHOICES)


def test_console_entry_point_runs(mlp, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lrcompile", str(mlp), "--rank", "bad"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "lrcompile: error: invalid rank spec 'bad': expected an integer rank (64), a fraction of"
        " parameters kept (0.5), energy:F (energy:0.95) or auto"
    )


def test_verbose_says_each_stage_and_leaves_other_libraries_info_to_vv(mlp, tmp_path):
    def log(flag: str) -> list[str]:
        command = [sys.executable, "-m", "lrcompile", flag, str(mlp), "--rank", "16"]
        command += ["-o", str(tmp_path / f"o{flag}.onnx")]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stderr.splitlines() if line.startswith("INFO ")]

    lines = log("-v")
    stages = [line.split(": ")[1] for line in lines if line.startswith("INFO lrcompile.profile")]
    assert stages == [
        "load ...",
        "factors ...",
        "search ...",
        "rewrite ...",
        "save ...",
        "verify ...",
    ]
    assert not [line for line in lines if not line.startswith("INFO lrcompile.")]
    assert [line for line in log("-vv") if line.startswith("INFO onnx_ir.")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    for stream, shown in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        with Progress() as progress:
            for done in range(3):
                progress("calibrating", done, 2, "")
            for done in range(4):
                progress("factoring", done, 3, f"w{done}")
        text = stream.getvalue()
        assert ("calibrating" in text and "factoring" in text and "3/3" in text) is shown, text


def test_verbose_before_the_model_and_usage_errors_in_one_line(mlp):
    runner = CliRunner()
    result = runner.invoke(cli.main, ["-v", str(mlp), "--rank", "16", "--no-verify"])
    assert result.exit_code == 0, result.output
    for args in (["--rank", "16", "--decomposition", "foo"], ["--quantize", "int2"]):
        result = runner.invoke(cli.main, [str(mlp), *args])
        assert result.exit_code == 2
        (line,) = result.output.strip().splitlines()
        assert line.startswith("lrcompile: error: ") and "--help" in line


def test_a_bug_exits_3_in_one_line_with_the_traceback_under_verbose(mlp, monkeypatch):
    import lrcompile

    def broken(*args, **kwargs):
        raise RuntimeError("something impossible")

    monkeypatch.setattr(lrcompile, "compile_model", broken)
    result = CliRunner().invoke(cli.main, [str(mlp), "--rank", "16"])
    assert result.exit_code == 3
    (line,) = result.output.strip().splitlines()
    assert line == (
        "lrcompile: internal error: RuntimeError: something impossible (a bug in lrcompile;"
        " run with -v for the traceback)"
    )
    verbose = CliRunner().invoke(cli.main, ["-v", str(mlp), "--rank", "16"])
    assert verbose.exit_code == 3 and "Traceback (most recent call last)" in verbose.output


def test_a_check_on_synthetic_data_warns_loudly(mlp, caplog):
    result = CliRunner().invoke(cli.main, [str(mlp), "--rank", "16"])
    assert result.exit_code == 0  # W1 and W2 decay like 0.7**i: rank 16 keeps them
    assert "checking the output on SYNTHETIC inputs (synthetic inputs (seed 0))" in caplog.text
    assert "batches of SYNTHETIC inputs (seed 0)" in result.stdout


def test_the_library_names_fields_and_the_cli_spells_them_as_flags(mlp):
    import lrcompile

    with pytest.raises(lrcompile.LrcompileError) as library:
        lrcompile.CompileConfig(rank="8", compensate=2)
    assert str(library.value).startswith("`compensate` needs calibration data (it fits")
    assert str(library.value).endswith("pass `calib` FILE.npz or `calib_script` FILE.py")
    result = _invoke(str(mlp), "--rank", "8", "--compensate", "2")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "lrcompile: error: --compensate needs calibration data (it fits the layers to their"
        " activations): pass --calib FILE.npz or --calib-script FILE.py"
    )
    result = _invoke(str(mlp), "--rank", "8", "--input-shapes", "y:4x64")  # no input named y
    assert "--input-shapes: 'y' is not a model input" in result.stderr


def test_every_field_a_library_message_names_is_an_option_of_the_cli():
    # `name` and `name=value` in library strings are spelled as flags by the CLI; a name that
    # no command has would reach the user as is.
    import ast
    import re

    names = set()
    package = Path(cli.__file__).parents[1]
    for path in set(package.rglob("*.py")) - set((package / "cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names |= set(re.findall(r"(?<!`)`([a-z][a-z0-9_]*)(?:=[^`]*)?`(?!`)", node.value))
    options = {
        param.name
        for command in cli.main.commands.values()
        for param in command.params
        if isinstance(param, click.Option)
    }
    assert names and names <= options, sorted(names - options)
