"""The compile configuration: one field per CLI option of ``lrcompile compile``, and every
default and choice (the CLI reads them from here: ``CompileConfig`` field defaults, ``CHOICES``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lrcompile.errors import LrcompileError
from lrcompile.io.past import is_past
from lrcompile.numerics.allocate import OBJECTIVES
from lrcompile.numerics.decompose import METHODS
from lrcompile.numerics.quantize import BASES
from lrcompile.numerics.ranges import parse_range_method
from lrcompile.passes.fp8 import SCOPES, WEIGHT_MODES
from lrcompile.runtime.metrics import METRICS
from lrcompile.runtime.sessions import ACCURACY_MEANINGS

# 5% relative L2 over all outputs: low-rank compression always costs some accuracy, and the gate
# should pass a model whose outputs are close in aggregate while failing one that drifted.
DEFAULT_TOLERANCE = 0.05
DEFAULT_BATCH_SIZE = 8
DEFAULT_ITERATIONS = 8  # batches of synthetic data
DEFAULT_PADDING_MASK = "attention_mask"  # Hugging Face exports' name
DEVICES = ("cpu", "cuda")

# The valid values of every field that has a fixed set of them.
CHOICES: dict[str, tuple[str, ...]] = {
    "decomposition": METHODS,
    "objective": OBJECTIVES,
    "fp8_weights": WEIGHT_MODES,
    "fp8_scope": SCOPES,
    "device": DEVICES,
    "metric": METRICS,
    "quant_base": BASES,
}
QUANTIZE = {"int8": 8, "int4": 4}  # --quantize: bits
CHOICES["quantize"] = tuple(QUANTIZE)  # or None: no quantization
DEFAULT_GROUP_SIZE = {8: None, 4: 32}  # rows per block along K (None: per output channel)

# Input shapes for synthetic data: {input name: concrete shape}, e.g. {"input_ids": (8, 128)}.
InputShapes = Mapping[str, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """What to factor and how, and how to check the result.

    Attributes:
        rank: Default rank spec: ``64``, ``0.5``, ``energy:0.95`` or ``auto``
            (``lrcompile.numerics.ranks``).
        overrides: JSON/YAML file mapping glob patterns of node or weight names to a spec or
            ``skip``; the first matching pattern wins.
        rank_multiple: Ranks are rounded to multiples of this (tensor cores want 16).
        decomposition: ``auto`` (randomized SVD for large weights at low rank), ``exact`` or
            ``randomized``.
        seed: Seed of the randomized SVD and of synthetic verification inputs.
        allow_no_saving: Factor layers even when the rank saves nothing (for experiments).
        external_data: Always write weights to ``<output>.data`` (automatic above 2 GB).
        verify: Compare the output with the input model after compiling.
        tolerance: Largest error of any output under ``metric``: the verification gate, and
            the target of ``auto`` on the calibration data.
        metric: The gated error: ``rel-l2`` (relative L2), ``cosine`` (1 - cosine), ``kl`` (mean
            KL of the softmax over the last axis, nats), ``top1`` (fraction of positions whose
            argmax changed) or ``ppl`` (perplexity ratio - 1, needs ``labels``); see
            ``lrcompile.runtime.metrics``.
        gate_cache: Under ``kl``, ``top1`` and ``ppl``, also gate the KV-cache outputs
            (``present.*``) on rel-l2 at ``tolerance``; off, they are reported and the verdict
            rests on the logits, which carry the cache's effect on every later position.
        labels: ``(input, output)``, e.g. ``("input_ids", "logits")``: the output's logits at
            each position predict the input's next entry; checks report both perplexities.
        verify_data: ``.npz`` of inputs for verification (synthetic inputs when None).
        input_shapes: Shapes of synthetic inputs with dynamic dimensions, by input name.
        val_ranges: Value ranges ``(low, high)`` of synthetic inputs, by input name (default:
            ``[0, 1]``, or ``[0, rows - 1]`` for an integer input that indexes a table).
        batch_size: Rows per batch of calibration and verification data.
        calib: ``.npz`` of calibration inputs, or ``synthetic``; calibrating makes every spec
            factor with activation-whitened SVD, and ``auto`` needs it (synthetic by default).
        calib_script: Polygraphy data-loader script (``file.py`` or ``file.py:function``)
            yielding calibration feed dicts.
        objective: What ``auto`` minimizes: ``flops`` (per-row FLOPs), ``params``, ``bytes``
            (the weights' bytes as stored), or ``latency``: the searched MatMuls' seconds on
            ONNX Runtime CPU, measured at the calibration batches' rows and cached per machine
            (``lrcompile.runtime.latency``); a layer stays dense unless factoring it measured
            faster (with ``quantize``: each stored form timed as written, at ``accuracy_level``).
            None: ``flops``, or ``bytes`` with ``quantize`` (which takes ``bytes`` or
            ``latency``).
        fp8: Add FP8 E4M3 Q/DQ (TensorRT-ready) on the factored MatMuls; needs calibration.
        fp8_weights: FP8 weight scales ``per-tensor`` or ``per-channel`` (explicit axis).
        fp8_scope: ``factored`` (the factored pairs) or ``all`` (dense MatMul/Gemm too).
        fp8_calib: Activation range: ``max`` or ``percentile:P`` (e.g. ``percentile:99.99``).
        plugin: Replace each factored block by a ``lrcompile.LowRankGemm`` call (a model-local
            function ONNX Runtime inlines; TensorRT runs the fused plugin).
        jobs: Layers factored in parallel. 1 by default: NumPy's BLAS already uses every core
            (on 2 cores, 2 jobs ran 1.6x slower than 1); jobs pay on many-core machines with
            many small layers.
        device: Where plain SVDs run: ``cpu`` (NumPy) or ``cuda`` (torch on a GPU).
        budget: With ``auto``: instead of searching for the tolerance, take the most accurate
            allocation costing at most this fraction of the dense cost (of ``objective``).
        headroom: Fraction of the tolerance ``auto`` keeps in reserve for data it was not
            calibrated on: it targets ``(1 - headroom) * tolerance`` on the held-back batches
            (on MiniLM the held-out error ran 10-13% above the calibration error).
        validation: Fraction of the calibration batches ``auto`` holds back (rounded up, at
            least one of two or more): its factors are fitted to the other batches, and every
            candidate is measured on these, data the factors never saw. 0: fitted and measured
            on the same batches (on a 0.5B LM that search met KL 0.04 and held-out text got 0.30).
        compensate: Error compensation when calibrating, in this many blocks of layers (0: off):
            the layers are factored block by block in graph order, each block's fitted to the
            original outputs given the inputs the model compressed so far gives it
            (``lrcompile.numerics.whiten``); each block after the first costs two runs over the
            fitted calibration data (blocks whose statistics would not fit the calibration memory
            budget are split further). Under ``auto`` the ranks are searched without it. Off by
            default: on MiniLM's held-out sentences it lost to plain whitening
            (docs/experiments.md).
        padding_mask: The input whose zero entries mark padding (``[batch, sequence]``, as
            Hugging Face exports' ``attention_mask``): activation rows at those positions stay
            out of the calibration statistics the factors are fitted to, so that they fit the
            real tokens; ``""`` counts every row. Used when the model has that input as 2-D and
            the calibration data (not synthetic) holds 0 and 1 in it; a name other than the
            default that is not such an input is refused, as is data that is all padding, and
            any other value without calibration data (it would change nothing).
        quantize: ``int8`` or ``int4``: every weight becomes integers read through
            DequantizeLinear (``lrcompile.numerics.quantize``), ``rank`` then the rank of a
            low-rank correction of the quantization error (None: no correction).
        group_size: Rows of K per quantization block (a power of 2, at least 16); default 32
            for int4, per output channel for int8.
        symmetric: Zero points at 0 (``False``: each block's [min, max] mapped onto the range).
        quant_base: How the integers are chosen: ``rtn`` (round to nearest) or ``mse`` (each
            block's range shrunk to its least squared error).
        accuracy_level: The accuracy level of the MatMulNBits ONNX Runtime fuses from the
            quantized weights, in ``auto``'s probes and the check (0-4; None: ONNX Runtime's
            default, 4: int8 activations). Set the same session entry,
            ``session.qdq_matmulnbits_accuracy_level``, where the model is deployed.
        share_first_factor: The corrections of layers that read one input (q/k/v, gate/up)
            share one first MatMul, split for each layer's second (``passes.shared``): the same
            numbers, fewer kernels; on ONNX Runtime CPU it measured no faster (within 3%,
            ``benchmarks/quantized_speed.py``), so it is off by default.
    """

    rank: str | None = None
    overrides: Path | None = None
    rank_multiple: int = 16
    decomposition: str = "auto"
    seed: int = 0
    allow_no_saving: bool = False
    external_data: bool = False
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    metric: str = "rel-l2"
    gate_cache: bool = True
    labels: tuple[str, str] | None = None
    verify_data: Path | None = None
    input_shapes: InputShapes = dataclasses.field(default_factory=dict)
    val_ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    batch_size: int = DEFAULT_BATCH_SIZE
    calib: str | None = None
    calib_script: str | None = None
    objective: str | None = None
    headroom: float = 0.2
    validation: float = 0.25
    budget: float | None = None
    compensate: int = 0
    padding_mask: str = DEFAULT_PADDING_MASK
    fp8: bool = False
    fp8_weights: str = "per-tensor"
    fp8_scope: str = "factored"
    fp8_calib: str = "max"
    plugin: bool = False
    jobs: int = 1
    device: str = "cpu"
    quantize: str | None = None
    group_size: int | None = None
    symmetric: bool = True
    quant_base: str = "rtn"
    accuracy_level: int | None = None
    share_first_factor: bool = False

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices and not (value is None and name in ("quantize", "objective")):
                raise LrcompileError(f"`{name}` {value!r} is not one of {', '.join(choices)}")
        if self.objective is None:
            object.__setattr__(self, "objective", "flops" if self.quantize is None else "bytes")
        object.__setattr__(self, "input_shapes", checked_shapes(self.input_shapes))
        ranges = {str(k): (float(v[0]), float(v[1])) for k, v in self.val_ranges.items()}
        object.__setattr__(self, "val_ranges", ranges)
        self._check_ranges()
        parse_range_method(self.fp8_calib)
        if self.labels is not None:
            object.__setattr__(self, "labels", parse_labels(self.labels))
        if self.metric == "ppl" and self.labels is None:
            raise LrcompileError("`metric=ppl` needs `labels` INPUT:OUTPUT (e.g. input_ids:logits)")
        self._check_quantize()  # first: what does not combine with it is refused as such
        if self.fp8 and self.calib is None and self.calib_script is None:
            raise LrcompileError(
                "`fp8` needs calibration data for its scales: pass `calib` FILE.npz or"
                " `calib_script` FILE.py (or `calib=synthetic` to accept scales from random data)"
            )
        if self.objective == "latency" and (self.fp8 or self.plugin):
            raise LrcompileError(
                "`objective=latency` measures ONNX Runtime CPU's float MatMuls; an `fp8` or"
                " `plugin` model's speed is TensorRT's, which is not measured here: use"
                " `objective=flops`"
            )
        if self.padding_mask != DEFAULT_PADDING_MASK and not self.calibrated:
            raise LrcompileError(
                f"`padding_mask` {self.padding_mask!r} names the padding of calibration data,"
                " and none was given: pass `calib` FILE.npz or `calib_script` FILE.py, or leave"
                " `padding_mask` out"
            )
        if self.compensate and not self.calibrated:
            raise LrcompileError(
                "`compensate` needs calibration data (it fits the layers to their activations):"
                " pass `calib` FILE.npz or `calib_script` FILE.py"
            )

    def _check_quantize(self) -> None:
        level = self.accuracy_level
        if level is not None and level not in ACCURACY_MEANINGS:
            raise LrcompileError(f"`accuracy_level` must be one of 0-4, got {level}")
        if self.quantize is None:
            if self.share_first_factor:
                raise LrcompileError("`share_first_factor` is a setting of `quantize`: give both")
            if level is not None:
                raise LrcompileError("`accuracy_level` is a setting of `quantize`: give both")
            if self.rank is None:
                raise LrcompileError("`rank` is required (a spec such as 64, 0.5 or auto)")
            if self.group_size is not None:
                raise LrcompileError("`group_size` is a setting of `quantize`: give both")
            return
        group = self.group_size
        if group is not None and (group < 16 or group & (group - 1)):
            raise LrcompileError(
                f"`group_size` must be a power of 2 of at least 16 (ONNX Runtime's MatMulNBits"
                f" blocks), got {group}"
            )
        for option, given in (("fp8", self.fp8), ("plugin", self.plugin),
                              ("compensate", self.compensate)):  # fmt: skip
            if given:
                raise LrcompileError(f"`{option}` does not combine with `quantize` (yet)")
        if self.objective not in ("bytes", "latency"):
            raise LrcompileError(
                f"`objective={self.objective}` prices factored layers; with `quantize` auto"
                " minimizes `objective=bytes` (the default) or `objective=latency`"
            )

    @property
    def bits(self) -> int | None:
        """The quantized weights' bits (None without ``quantize``)."""
        return QUANTIZE.get(self.quantize) if self.quantize is not None else None

    @property
    def group(self) -> int | None:
        """Rows per quantization block (None: per output channel)."""
        bits = self.bits
        if bits is None:
            return None
        return self.group_size if self.group_size is not None else DEFAULT_GROUP_SIZE[bits]

    def _check_ranges(self) -> None:
        checks = [
            (self.rank_multiple >= 1, "rank_multiple", "must be >= 1"),
            (self.tolerance >= 0, "tolerance", "must be >= 0"),
            (self.budget is None or 0.0 < self.budget <= 1.0, "budget", "must be in (0, 1]"),
            (0.0 <= self.headroom < 1.0, "headroom", "must be in [0, 1)"),
            (0.0 <= self.validation < 1.0, "validation", "must be in [0, 1)"),
            (self.compensate >= 0, "compensate", "must be >= 0 blocks"),
            (self.jobs >= 1, "jobs", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise LrcompileError(f"`{field}` {expected}, got {getattr(self, field)}")

    @property
    def calibrated(self) -> bool:
        """Whether calibration data was asked for (``--calib`` or ``--calib-script``)."""
        return self.calib is not None or self.calib_script is not None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        data = dataclasses.asdict(self)
        data["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        data["val_ranges"] = {k: list(v) for k, v in self.val_ranges.items()}
        data["labels"] = ":".join(self.labels) if self.labels else None
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def parse_labels(labels: str | Sequence[str]) -> tuple[str, str]:
    """``"input_ids:logits"`` (or a pair) as ``("input_ids", "logits")``.

    Raises:
        LrcompileError: Not ``INPUT:OUTPUT``.
    """
    parts = labels.rsplit(":", 1) if isinstance(labels, str) else list(labels)
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise LrcompileError(f"labels {labels!r}: expected INPUT:OUTPUT, e.g. input_ids:logits")
    return parts[0], parts[1]


def checked_shapes(shapes: InputShapes | None) -> dict[str, tuple[int, ...]]:
    """``shapes`` as ``{name: tuple of ints}``; a KV-cache input (``io.past.is_past``) may hold
    a 0 (an empty past).

    Raises:
        LrcompileError: A shape is not a sequence of positive integers.
    """
    result = {}
    for name, shape in (shapes or {}).items():
        dims = tuple(shape) if not isinstance(shape, str | bytes) else ()
        least = 0 if is_past(str(name)) else 1
        if not dims or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= least for d in dims
        ):
            what = "integers >= 0 (a KV-cache input)" if least == 0 else "positive integers"
            raise LrcompileError(
                f"input shape of {name!r} must be a sequence of {what}, got {shape!r}"
            )
        result[str(name)] = dims
    return result
