"""The options of ``lrcompile compile``: one per ``CompileConfig`` field, whose default and choices
they read from the config (help shows them), never copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lrcompile.config import CHOICES, CompileConfig

PATH = click.Path(path_type=Path, dir_okay=False)
_FIELDS = {field.name: field for field in dataclasses.fields(CompileConfig)}


def config_default(name: str) -> Any:
    """The default of the ``CompileConfig`` field ``name`` (None when it has none)."""
    field = _FIELDS[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_option(*decls: str, field: str, **kwargs: Any) -> Callable:
    """``click.option`` for the config field ``field``, its default and choices from the config."""
    if field in CHOICES:
        kwargs["type"] = click.Choice(CHOICES[field])
    default = config_default(field)
    if default is not None and not kwargs.get("multiple"):
        kwargs.setdefault("default", default)
        kwargs.setdefault("show_default", True)
    return click.option(*decls, field, **kwargs)


# Shared by compile and verify: the accuracy check.
CHECK_OPTIONS = [
    config_option(
        "--tolerance",
        field="tolerance",
        type=float,
        help="Largest error allowed per output, under --metric.",
    ),
    config_option(
        "--metric",
        field="metric",
        help="rel-l2 ||y - y_ref||/||y_ref||, cosine (1 - cos), kl (nats, logits), top1 (changed),"
        " ppl (perplexity ratio - 1, needs --labels).",
    ),
    config_option(
        "--gate-cache/--no-gate-cache",
        field="gate_cache",
        help="Under kl/top1/ppl, also gate KV-cache outputs (present.*) on rel-l2 at"
        " --tolerance; --no-gate-cache reports them, the logits carrying their effect.",
    ),
    config_option(
        "--labels",
        field="labels",
        metavar="INPUT:OUTPUT",
        help="Next-token labels: OUTPUT's logits predict INPUT's next entry (input_ids:logits);"
        " checks report perplexities.",
    ),
    config_option(
        "--input-shapes",
        field="input_shapes",
        multiple=True,
        metavar="NAME:DxD,...",
        help="Shapes of synthetic inputs with dynamic dimensions, e.g. input_ids:8x128.",
    ),
    config_option(
        "--val-range",
        field="val_ranges",
        multiple=True,
        metavar="NAME:LO,HI",
        help="Value range of a synthetic input (default [0,1]; index inputs: their table's rows).",
    ),
    config_option("--batch-size", field="batch_size", type=int, help="Rows per batch."),
]

# Shared by compile and inspect.
PADDING_MASK_OPTION = config_option(
    "--padding-mask",
    field="padding_mask",
    metavar="INPUT",
    help="Input whose zeros mark padding: those rows stay out of the calibration statistics"
    ' (used when the model has it; "" counts every row).',
)

COMPILE_OPTIONS = [
    config_option(
        "--rank",
        field="rank",
        metavar="SPEC",
        help="N (fixed rank), F in (0,1] (fraction of weight parameters kept), energy:F or auto;"
        " with --quantize the rank of the correction (omit: none).",
    ),
    config_option(
        "--quantize",
        field="quantize",
        help="Store weights as int8 or int4 (DequantizeLinear), --rank a low-rank correction.",
    ),
    config_option(
        "--group-size",
        field="group_size",
        type=int,
        help="Rows per quantization block (power of 2 >= 16) [default: int4 32, int8 per channel].",
    ),
    config_option(
        "--symmetric/--asymmetric",
        field="symmetric",
        help="Quantization zero points at 0, or each block's [min, max] mapped to the range.",
    ),
    config_option(
        "--quant-base",
        field="quant_base",
        help="How integers are chosen: rtn (round to nearest) or mse (range searched per block).",
    ),
    config_option(
        "--accuracy-level",
        field="accuracy_level",
        type=click.IntRange(0, 4),
        help="ONNX Runtime's MatMulNBits accuracy level for the quantized weights in the search"
        " and the check (4: int8 activations) [default: ONNX Runtime's, 4].",
    ),
    config_option(
        "--share-first-factor",
        field="share_first_factor",
        is_flag=True,
        help="Corrections of layers reading one input share one first MatMul (same numbers).",
    ),
    config_option(
        "--overrides",
        field="overrides",
        type=PATH,
        help="JSON/YAML mapping glob patterns of node/weight names to a spec or 'skip'.",
    ),
    config_option(
        "--rank-multiple", field="rank_multiple", type=int, help="Round ranks to this multiple."
    ),
    config_option(
        "--decomposition",
        field="decomposition",
        help="SVD method; auto uses randomized SVD for large weights at low rank.",
    ),
    config_option("--seed", field="seed", type=int, help="Seed (randomized SVD, data)."),
    config_option(
        "--allow-no-saving",
        field="allow_no_saving",
        is_flag=True,
        help="Factor layers even when the rank saves nothing.",
    ),
    config_option(
        "--external-data",
        field="external_data",
        is_flag=True,
        help="Write weights to OUTPUT.data (automatic with external-data input or above 2 GB).",
    ),
    config_option("--verify/--no-verify", field="verify", help="Check the output after compiling."),
    config_option(
        "--verify-data",
        field="verify_data",
        type=PATH,
        help=".npz of inputs for the check [default: calibration data, else synthetic].",
    ),
    *CHECK_OPTIONS,
    config_option(
        "--calib",
        field="calib",
        metavar="FILE.npz|synthetic",
        help="Calibration inputs: factor with activation-whitened SVD (auto: synthetic, warned).",
    ),
    config_option(
        "--calib-script",
        field="calib_script",
        metavar="FILE.py[:FUNC]",
        help="Polygraphy data-loader script yielding calibration feed dicts (FUNC: load_data).",
    ),
    config_option(
        "--objective",
        field="objective",
        help="What --rank auto minimizes [default: flops; bytes with --quantize].",
    ),
    config_option(
        "--headroom",
        field="headroom",
        type=float,
        help="auto aims for (1 - HEADROOM) x tolerance on the held-back calibration batches.",
    ),
    config_option(
        "--validation",
        field="validation",
        type=float,
        metavar="FRACTION",
        help="auto: calibration batches held back to measure candidates on (0: none).",
    ),
    config_option(
        "--budget",
        field="budget",
        type=float,
        help="auto: most accurate ranks within this fraction of the dense cost (no search).",
    ),
    config_option(
        "--compensate",
        field="compensate",
        type=click.IntRange(min=0),
        metavar="BLOCKS",
        help="Error compensation when calibrating: factor in BLOCKS blocks of layers, each fitted"
        " to the original outputs from the compressed model's inputs (0: off).",
    ),
    PADDING_MASK_OPTION,
    config_option(
        "--fp8",
        field="fp8",
        is_flag=True,
        help="Add TensorRT-ready FP8 E4M3 Q/DQ (needs calibration).",
    ),
    config_option(
        "--fp8-weights",
        field="fp8_weights",
        help="FP8 weight scales (per-channel with an explicit axis).",
    ),
    config_option(
        "--fp8-scope",
        field="fp8_scope",
        help="Quantize the factored MatMuls only, or the dense ones too.",
    ),
    config_option(
        "--fp8-calib",
        field="fp8_calib",
        metavar="max|percentile:P",
        help="How activation ranges become FP8 scales.",
    ),
    config_option(
        "--plugin",
        field="plugin",
        is_flag=True,
        help="Emit each factored block as one lrcompile.LowRankGemm call (TensorRT plugin).",
    ),
    config_option(
        "--jobs",
        field="jobs",
        type=int,
        help="Layers factored in parallel (BLAS already uses every core: more pays on many cores).",
    ),
    config_option("--device", field="device", help="Where SVDs run (cuda: torch on a GPU)."),
]


def with_options(options: list[Callable]) -> Callable:
    """Applies ``options`` to a command, in the order listed (as ``--help`` shows them)."""

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate
