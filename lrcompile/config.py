"""The compile configuration: one field per CLI option of ``lrcompile compile``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lrcompile import decompose
from lrcompile.allocate import OBJECTIVES
from lrcompile.errors import LrcompileError
from lrcompile.verify import DEFAULT_BATCH_SIZE, DEFAULT_TOLERANCE


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """What to factor and how, and how to check the result.

    Attributes:
        rank: Default rank spec: ``64``, ``0.5`` or ``energy:0.95`` (see ``lrcompile.ranks``).
        overrides: JSON/YAML file mapping glob patterns of node or weight names to a spec or
            ``skip``; the first matching pattern wins.
        rank_multiple: Ranks are rounded to multiples of this (tensor cores want 16).
        decomposition: ``auto`` (randomized SVD for large weights at low rank), ``exact`` or
            ``randomized``.
        seed: Seed of the randomized SVD and of synthetic verification inputs.
        allow_no_saving: Factor layers even when the rank saves nothing (for experiments).
        external_data: Always write weights to ``<output>.data`` (automatic above 2 GB).
        verify: Compare the output with the input model after compiling.
        tolerance: Largest relative L2 error of any output: the verification gate, and the
            target of ``auto`` on the calibration data.
        verify_data: ``.npz`` of inputs for verification (synthetic inputs when None).
        input_shapes: ``name:DxD`` entries giving shapes of synthetic inputs.
        batch_size: Rows per batch of calibration and verification data.
        calib: ``.npz`` of calibration inputs, or ``synthetic``; calibrating makes every spec
            factor with activation-whitened SVD, and ``auto`` needs it (synthetic by default).
        calib_script: Polygraphy data-loader script (``file.py`` or ``file.py:function``)
            yielding calibration feed dicts.
        objective: What ``auto`` minimizes: ``flops`` (per-row FLOPs) or ``params``.
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
            calibrated on: it targets ``(1 - headroom) * tolerance`` on the calibration data
            (on MiniLM the held-out error ran 10-13% above the calibration error).
    """

    rank: str
    overrides: Path | None = None
    rank_multiple: int = 16
    decomposition: str = "auto"
    seed: int = 0
    allow_no_saving: bool = False
    external_data: bool = False
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    verify_data: Path | None = None
    input_shapes: tuple[str, ...] = ()
    batch_size: int = DEFAULT_BATCH_SIZE
    calib: str | None = None
    calib_script: str | None = None
    objective: str = "flops"
    headroom: float = 0.2
    budget: float | None = None
    fp8: bool = False
    fp8_weights: str = "per-tensor"
    fp8_scope: str = "factored"
    fp8_calib: str = "max"
    plugin: bool = False
    jobs: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.rank_multiple < 1:
            raise LrcompileError(f"rank multiple must be >= 1, got {self.rank_multiple}")
        if self.decomposition not in decompose.METHODS:
            raise LrcompileError(
                f"decomposition {self.decomposition!r} is not one of {', '.join(decompose.METHODS)}"
            )
        if not self.tolerance >= 0:
            raise LrcompileError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.objective not in OBJECTIVES:
            raise LrcompileError(
                f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}"
            )
        self._check_fp8()
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise LrcompileError(f"budget must be in (0, 1], got {self.budget}")
        if not 0.0 <= self.headroom < 1.0:
            raise LrcompileError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.device not in ("cpu", "cuda"):
            raise LrcompileError(f"device {self.device!r} is not one of cpu, cuda")
        if self.jobs < 1:
            raise LrcompileError(f"jobs must be >= 1, got {self.jobs}")
        if self.batch_size < 1:
            raise LrcompileError(f"batch size must be >= 1, got {self.batch_size}")

    def _check_fp8(self) -> None:
        from lrcompile.calibrate import parse_range_method
        from lrcompile.passes.fp8 import SCOPES, WEIGHT_MODES

        if self.fp8_weights not in WEIGHT_MODES:
            raise LrcompileError(
                f"FP8 weights {self.fp8_weights!r} is not one of {', '.join(WEIGHT_MODES)}"
            )
        if self.fp8_scope not in SCOPES:
            raise LrcompileError(f"FP8 scope {self.fp8_scope!r} is not one of {', '.join(SCOPES)}")
        parse_range_method(self.fp8_calib)
        if self.fp8 and self.calib is None and self.calib_script is None:
            raise LrcompileError(
                "--fp8 needs calibration data for its scales: pass --calib FILE.npz or"
                " --calib-script FILE.py (or --calib synthetic to accept scales from random data)"
            )
