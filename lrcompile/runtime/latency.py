"""Measured latency on the target runtime: what ``--objective latency`` minimizes.

    one weight K x N at M rows: MatMul(x[M,K], W)  vs  MatMul(MatMul(x, A[K,r]), B[r,N])
      at a grid of ranks (``grid``), each its own ONNX Runtime session (a session runs every node
      even when one output is fetched), timed interleaved (median), in between: linear
      -> cached on disk by shape, rows, rank grid, runtime and machine (``LatencyTable``)

The FLOP ratio is a prediction: on ONNX Runtime CPU a factored layer reaches 0.4-1.05x of it
depending on shape, rank and rows, one row the least (docs/benchmarks.md), so a layer whose factored
form is not faster must stay dense, which only a measurement can tell. The timing is of the
MatMuls alone; a whole model's speedup is measured by ``model_latencies``. The sessions run
without thread spinning (``sessions.session_options``), all of one shape's alive at once: for an
LM head (896 x 151,936 at 256 rows) about 4.4 GB while it is timed.

Timings are noisy, so the ranks chosen from a fresh table may differ from run to run; with the
cache they are reproducible (a compile with a warm cache measures nothing).

A quantized weight (``Form``) is timed as ``lrcompile --quantize`` writes it
(``latency_models``): DequantizeLinear of its
integers feeding the MatMul (ONNX Runtime fuses them into MatMulNBits, at the ``accuracy_level``
its sessions will run at: it changes the kernel), alone and with each correction rank
(``MatMul(MatMul(x, Cast(A)), Cast(B))`` added).

The cache is a JSON file (``cache_path``: ``$LRCOMPILE_CACHE_DIR/latency.json``, default
``~/.cache/lrcompile/latency.json``), written atomically; one that cannot be read is measured
afresh, never trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from lrcompile.runtime.latency_models import Form, layer_model
from lrcompile.runtime.sessions import create_session, onnxruntime, runtime_errors
from lrcompile.runtime.timing import interleaved_medians

logger = logging.getLogger(__name__)

CACHE_ENV = "LRCOMPILE_CACHE_DIR"
GRID = 6  # ranks measured per shape; the others are interpolated
VERSION = 1
SECONDS_PER_SHAPE = 0.4  # interleaved timing budget of one shape's variants


@dataclasses.dataclass(frozen=True)
class Curve:
    """One shape's measured seconds per run: dense, and factored at the ``grid`` ranks."""

    dense: float
    ranks: tuple[int, ...]
    factored: tuple[float, ...]

    def seconds(self, rank: int | None) -> float:
        """Dense (None) or factored at ``rank``, linear between the measured ranks (infinite
        when none was measured: never faster)."""
        if rank is None:
            return self.dense
        if not self.ranks:
            return math.inf
        return float(np.interp(rank, self.ranks, self.factored))


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a latency is measured for: a weight, the rows it multiplies, the ranks it may take
    (factored at ``grid``'s ranks, or, with a ``form``, quantized with its corrections)."""

    k: int
    n: int
    rows: int
    multiple: int
    dtype: str = "float32"
    form: Form | None = None

    @property
    def key(self) -> str:
        key = f"{self.k}x{self.n} {self.dtype} rows={self.rows} multiple={self.multiple}"
        return key if self.form is None else f"{key} {self.form.key}"

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks timed beside dense: factored, or the quantized form's corrections."""
        if self.form is not None:
            return self.form.corrections
        return grid(self.k, self.n, self.multiple)


def grid(k: int, n: int, multiple: int, points: int = GRID) -> tuple[int, ...]:
    """Up to ``points`` multiples of ``multiple``, evenly spread from the smallest to the largest
    rank that saves FLOPs (``r*(K+N) < K*N``); empty when none does."""
    top = (k * n - 1) // (k + n) // multiple  # largest count of multiples that saves
    if top < 1:
        return ()
    steps = np.unique(np.round(np.linspace(1, top, min(points, top))).astype(int))
    return tuple(int(step) * multiple for step in steps)


def target() -> str:
    """The runtime and machine a latency holds for: what the cache is keyed by."""
    ort = onnxruntime()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"onnxruntime {ort.__version__} CPUExecutionProvider; {cpu}; {cpus} cpus"


def cache_path() -> Path:
    """The latency cache file: under ``$LRCOMPILE_CACHE_DIR``, else ``~/.cache/lrcompile``."""
    folder = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lrcompile"
    return Path(folder) / "latency.json"


class LatencyTable:
    """Measured curves by shape, for this runtime and machine, read from and saved to a cache.

    ``path=None`` keeps nothing on disk.
    """

    def __init__(self, path: Path | None = None, *, budget_s: float = SECONDS_PER_SHAPE) -> None:
        self.path, self.budget_s, self.target = path, budget_s, target()
        self.measured = 0  # shapes measured (not found in the cache) by this table
        self._curves: dict[str, Curve] = {}
        if path is not None:
            self._curves = _read(path).get(self.target, {})

    def curves(
        self, shapes: Sequence[Shape], on_step: Callable[[int, int, str], None] | None = None
    ) -> dict[str, Curve]:
        """The curve of each shape (by ``Shape.key``), measuring those not cached; saves them."""
        missing = [s for s in dict.fromkeys(shapes) if not self._holds(s)]
        for index, shape in enumerate(missing):
            if on_step is not None:
                on_step(index, len(missing), shape.key)
            self._curves[shape.key] = measure(shape, self.budget_s)
            self.measured += 1
        if on_step is not None:
            on_step(len(missing), len(missing), "")
        if missing and self.path is not None:
            self._save()
        return {shape.key: self._curves[shape.key] for shape in shapes}

    def _holds(self, shape: Shape) -> bool:
        """Whether the table has a usable curve of ``shape`` (measured at its rank grid)."""
        curve = self._curves.get(shape.key)
        return curve is not None and curve.ranks == shape.ranks

    def _save(self) -> None:
        data = _read(self.path)  # another process may have added its own machine's since
        data.setdefault(self.target, {}).update(self._curves)
        text = json.dumps(
            {
                "version": VERSION,
                "targets": {
                    name: {key: dataclasses.asdict(c) for key, c in curves.items()}
                    for name, curves in data.items()
                },
            },
            indent=1,
        )
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging.write_text(text + "\n", encoding="utf-8")
            staging.replace(self.path)
        except OSError as e:  # a cache that cannot be written costs a re-measurement, no more
            logger.warning("latency cache %s not written: %s", self.path, e)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)


def measure(shape: Shape, budget_s: float = SECONDS_PER_SHAPE) -> Curve:
    """Seconds per run of the dense and the factored (or quantized) MatMuls of ``shape``
    (interleaved).

    Raises:
        LrcompileError: ONNX Runtime cannot build or run them (the shape is named).
    """
    ranks = shape.ranks
    dtype = np.dtype(shape.dtype)
    x = np.full((shape.rows, shape.k), 0.5, dtype)
    with (
        tempfile.TemporaryDirectory(prefix="lrcompile-latency-") as folder,
        runtime_errors(f"timing a {shape.key} MatMul", written=Path(folder)),
    ):
        sessions = [_session(Path(folder), shape, rank) for rank in (None, *ranks)]
        runs = [lambda s=s: s.run(None, {"x": x}) for s in sessions]
        times = interleaved_medians(runs, budget_s=budget_s)
    logger.info("latency %s: dense %.3g ms", shape.key, times[0] * 1e3)
    return Curve(times[0], ranks, tuple(times[1:]))


def model_latencies(
    models: Sequence[str | Path],
    feeds: Sequence[dict[str, np.ndarray]],
    budget_s: float = 2.0,
    accuracy_level: int | None = None,
) -> list[list[float]]:
    """Median seconds per run of each model on each feed (a row per feed; the models timed
    interleaved, ``budget_s`` per feed), with the default session options but thread spinning
    off (see ``sessions.session_options``; ``accuracy_level`` too); each model is loaded once.

    Raises:
        LrcompileError: ONNX Runtime cannot load or run one of them.
    """
    sessions = [
        create_session(model, spinning=False, accuracy_level=accuracy_level) for model in models
    ]
    with runtime_errors("timing the models"):
        return [
            interleaved_medians(
                [lambda s=s, f=feed: s.run(None, f) for s in sessions], budget_s=budget_s
            )
            for feed in feeds
        ]


def _session(folder: Path, shape: Shape, rank: int | None):
    """A session of ``shape``'s layer dense (None) or at ``rank`` (``latency_models``)."""
    path = folder / f"{'dense' if rank is None else rank}.onnx"
    model = layer_model(shape.k, shape.n, shape.dtype, rank, shape.form)
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    level = shape.form.accuracy_level if shape.form is not None else None
    return create_session(path, spinning=False, written=folder, accuracy_level=level)


def _read(path: Path) -> dict[str, dict[str, Curve]]:
    """The cached curves by target; empty when the file is missing, unreadable or stale."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != VERSION:
            return {}
        targets: dict[str, dict[str, Curve]] = {}
        for name, curves in data["targets"].items():
            targets[name] = {}
            for key, c in curves.items():
                ranks, factored = tuple(map(int, c["ranks"])), tuple(map(float, c["factored"]))
                if len(ranks) == len(factored):  # else measured afresh
                    targets[name][key] = Curve(float(c["dense"]), ranks, factored)
        return targets
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("latency cache %s unreadable (%s): measuring afresh", path, e)
        return {}
