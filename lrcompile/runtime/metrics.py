"""Error statistics of a candidate's outputs against reference outputs, accumulated over batches.

Per output, over all data: the relative L2 error ``||y - y_ref|| / ||y_ref||``, the cosine
similarity of the flattened outputs, the max absolute error and, for outputs with a class axis
(the last, of size > 1: logits), the mean over positions of ``KL(softmax(ref) || softmax(cand))``
in nats and the fraction of positions whose argmax differs. The gate is one of them (``METRICS``):

- ``rel-l2``: the relative L2 error (default; 0.05 = 5% of the outputs' norm);
- ``cosine``: ``1 - cosine`` (0.001 = cosine 0.999);
- ``kl``: the mean KL in nats (for logits; 0.05 means the candidate's next-token distribution is
  close: perplexity changes by about ``exp(0.05) - 1 = 5%`` at most on the reference's own
  samples);
- ``top1``: the fraction of positions whose top prediction changed (0.02 = 2%);
- ``ppl``: with labels (``Labels``: an integer input whose next entry each position of a logits
  output predicts, as a causal LM's ``input_ids:logits``), the candidate's perplexity over the
  reference's, minus one (0.02 = perplexity up 2%).

Outputs without a class axis, KV-cache outputs (``present.*``: their last axis is the head size),
and under ``ppl`` outputs without labels are gated on ``rel-l2``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lrcompile.errors import DataError
from lrcompile.io.model import runnable_proto
from lrcompile.io.past import is_present
from lrcompile.runtime.sessions import create_session, runtime_errors

METRICS: tuple[str, ...] = ("rel-l2", "cosine", "kl", "top1", "ppl")

# (input, output): the output's logits at position t predict the input's entry at t + 1.
Labels = tuple[str, str]

# Outputs are compared in slices of about this many values (float64 temporaries: 32 MB each).
SLICE_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class OutputMetrics:
    """How far one candidate output is from the reference over all data."""

    name: str
    relative_l2: float  # inf when the candidate's output is not finite
    cosine: float
    max_abs_error: float
    passed: bool
    kl: float | None = None  # outputs with a class axis only
    top1: float | None = None
    metric: str = "rel-l2"
    perplexity: float | None = None  # the candidate's, on labelled outputs only
    reference_perplexity: float | None = None
    gated: bool = True  # False: a KV cache reported, not gated (``gate_cache`` off)

    @property
    def perplexity_ratio(self) -> float | None:
        if self.perplexity is None or not self.reference_perplexity:
            return None
        return self.perplexity / self.reference_perplexity

    @property
    def finite(self) -> bool:
        return math.isfinite(self.relative_l2)

    @property
    def error(self) -> float:
        """The gated error under ``metric`` (inf when the output is not finite)."""
        if not self.finite:
            return math.inf
        if not self.gated:
            return 0.0
        if self.metric == "cosine":
            return 1.0 - self.cosine
        if self.metric == "kl" and self.kl is not None:
            return self.kl
        if self.metric == "top1" and self.top1 is not None:
            return self.top1
        if self.metric == "ppl" and self.perplexity_ratio is not None:
            return max(self.perplexity_ratio - 1.0, 0.0)
        return self.relative_l2

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite candidate output gives nulls and ``"non_finite": true``."""
        data = dataclasses.asdict(self)
        if not self.finite:
            data.update(relative_l2=None, cosine=None, max_abs_error=None, kl=None, top1=None)
            data.update(perplexity=None)
        return data | {"non_finite": not self.finite, "error": self.error if self.finite else None}


@dataclasses.dataclass
class ErrorAccumulator:
    """Running sums for the relative L2 error, cosine and max abs error of one output, and (with
    ``classes``) its KL and top-1 changes: a softmax of every batch, worth skipping when no
    result needs them."""

    classes: bool = True
    cache: bool = False  # a KV-cache output (``io.past.is_present``)
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    ref_finite: bool = True
    cand_finite: bool = True
    kl_sum: float = 0.0
    top1_changed: int = 0
    positions: int = 0
    nll_reference: float = 0.0  # summed over labelled positions (add_labels)
    nll_candidate: float = 0.0
    labelled: int = 0
    label_classes: int = 0  # of the labelled output

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Adds one batch, in slices of whole positions, so that the float64 temporaries stay
        bounded (an LM's logits for 256 tokens of a 152k vocabulary are 39M values)."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
        width = reference.shape[-1] if reference.ndim and reference.shape[-1] else 1
        ref_rows, cand_rows = reference.reshape(-1, width), candidate.reshape(-1, width)
        step = max(1, SLICE_ELEMENTS // max(width, 1))
        slices = [slice(start, start + step) for start in range(0, len(ref_rows), step)]
        for part in slices:
            self._add_flat(ref_rows[part], cand_rows[part])
        if self.classes and self.ref_finite and self.cand_finite and reference.ndim:
            for part in slices:
                self._add_classes(ref_rows[part], cand_rows[part])

    def add_labels(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> None:
        """Adds the next-token log-likelihoods of one batch: ``reference`` and ``candidate`` are
        ``[B, S, classes]`` logits, ``labels`` the ``[B, S]`` integer input; position ``t``
        predicts ``labels[:, t + 1]``.

        Raises:
            ValueError: The shapes do not match, or a label is not a class index.
        """
        reference, candidate, labels = map(np.asarray, (reference, candidate, labels))
        if reference.ndim != 3 or labels.shape != reference.shape[:2]:
            raise ValueError(
                f"labels of shape {labels.shape} do not match logits of shape {reference.shape}"
                " (expected [batch, sequence] labels and [batch, sequence, classes] logits)"
            )
        classes = reference.shape[-1]
        if labels.dtype.kind not in "iu" or (
            labels.size and not 0 <= labels.min() <= labels.max() < classes
        ):
            raise ValueError(f"labels must be integers in [0, {classes - 1}]")
        step = max(1, SLICE_ELEMENTS // max(classes, 1))
        for row in range(reference.shape[0]):
            targets = labels[row, 1:]
            for start in range(0, len(targets), step):
                part = slice(start, start + step)
                picked = np.arange(len(targets[part])), targets[part]
                ref = _log_softmax(_working(reference[row, part]))
                cand = _log_softmax(_working(candidate[row, part]))
                self.nll_reference -= float(np.sum(ref[picked], dtype=np.float64))
                self.nll_candidate -= float(np.sum(cand[picked], dtype=np.float64))
            self.labelled += len(targets)
        self.label_classes = classes

    def _add_classes(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """KL and argmax changes over the last axis of ``[positions, classes]``, when it is a
        class axis."""
        if reference.shape[-1] < 2 or reference.dtype.kind != "f":
            return
        ref = _log_softmax(_working(reference))
        cand = _log_softmax(_working(candidate))
        self.kl_sum += float(np.sum(np.exp(ref) * (ref - cand), dtype=np.float64))
        self.top1_changed += int(np.sum(np.argmax(ref, -1) != np.argmax(cand, -1)))
        self.positions += reference.shape[0]

    def _add_flat(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        cand = np.asarray(candidate, dtype=np.float64).ravel()
        self.ref_finite = self.ref_finite and bool(np.all(np.isfinite(ref)))
        self.cand_finite = self.cand_finite and bool(np.all(np.isfinite(cand)))
        if self.ref_finite:
            self.ref_sq += float(ref @ ref)  # judged on its own: is the reference usable
        if not (self.ref_finite and self.cand_finite):
            return
        diff = cand - ref
        self.diff_sq += float(diff @ diff)
        self.cand_sq += float(cand @ cand)
        self.dot += float(ref @ cand)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def reference_problem(self) -> str | None:
        """Why the reference cannot support a verdict (None when it can)."""
        if not self.ref_finite:
            return "not finite (NaN or Inf)"
        if self.ref_sq == 0:
            return "identically zero"
        if self.labelled and self.nll_reference / self.labelled >= math.log(self.label_classes / 2):
            # A perplexity gate on labels the model does not predict would pass any candidate
            # whose distribution merely flattens (its perplexity falls towards the class count).
            perplexity = _exp(self.nll_reference / self.labelled)
            return (
                f"no better than chance on its labels (perplexity {perplexity:.4g} over"
                f" {self.label_classes} classes)"
            )
        return None

    def metrics(
        self, name: str, tolerance: float, metric: str = "rel-l2", gate_cache: bool = True
    ) -> OutputMetrics:
        """The output's metrics; a cache output under kl/top1/ppl is gated on rel-l2, or only
        reported when not ``gate_cache`` (the logits carry its effect on every later position)."""
        gated = gate_cache or not self.cache or metric not in ("kl", "top1", "ppl")
        if not self.cand_finite:
            return OutputMetrics(name, math.inf, math.nan, math.inf, False, metric=metric)
        if self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq / self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else math.inf
        norms = math.sqrt(self.ref_sq * self.cand_sq)
        cosine = self.dot / norms if norms > 0 else float(self.diff_sq == 0)
        kl = max(self.kl_sum, 0.0) / self.positions if self.positions else None
        top1 = self.top1_changed / self.positions if self.positions else None
        ppl = ref_ppl = None
        if self.labelled:
            ppl = _exp(self.nll_candidate / self.labelled)
            ref_ppl = _exp(self.nll_reference / self.labelled)
        result = OutputMetrics(
            name, rel, cosine, self.max_abs, False, kl, top1, metric, ppl, ref_ppl, gated
        )
        return dataclasses.replace(result, passed=math.isfinite(rel) and result.error <= tolerance)


def measure_error(
    model: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    metric: str = "rel-l2",
    labels: Labels | None = None,
    accuracy_level: int | None = None,
    gate_cache: bool = True,
) -> float:
    """Largest error under ``metric`` of any gated output of ``model`` on ``feeds`` against the
    ``reference`` outputs, one per feed (one ``ErrorMeter`` use)."""
    meter = ErrorMeter(model, accuracy_level)
    return meter(feeds, reference, metric, labels=labels, gate_cache=gate_cache)


def add_batch(
    sums: dict[str, ErrorAccumulator],
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    feed: Mapping[str, np.ndarray],
    labels: Labels | None = None,
    classes: bool = True,
) -> None:
    """Adds one batch of every reference output to ``sums`` (by output name), and the labelled
    output's log-likelihoods.

    Raises:
        DataError: The labels do not fit the labelled output.
    """
    if labels is not None and labels[1] not in reference:
        raise DataError(f"`labels` {labels[0]}:{labels[1]}: the model has no output {labels[1]!r}")
    for name, expected in reference.items():
        cache = is_present(name)
        accumulator = sums.setdefault(name, ErrorAccumulator(classes and not cache, cache))
        try:
            accumulator.add(expected, candidate[name])
        except ValueError as e:
            raise DataError(f"output {name!r}: {e}") from None
        if labels is not None and name == labels[1]:
            try:
                accumulator.add_labels(expected, candidate[name], feed[labels[0]])
            except ValueError as e:
                raise DataError(f"`labels` {labels[0]}:{labels[1]}: {e}") from None


class ErrorMeter:
    """One ONNX Runtime session of a candidate model, measured as often as needed.

    The model's tensors may lie in several folders (the input's external data, spilled factors);
    the session is made without pre-packed weight copies or a memory arena, so that a probe costs
    about one copy of the model.
    """

    def __init__(self, model: ir.Model, accuracy_level: int | None = None) -> None:
        proto, folder = runnable_proto(model)
        self.model = model  # lrcompile's candidate: kept for a bug report if ONNX Runtime fails
        self.session = create_session(
            proto, data_folder=folder, low_memory=True, written=model, name="a candidate model",
            accuracy_level=accuracy_level,
        )  # fmt: skip
        del proto

    def __call__(
        self,
        feeds: Sequence[Mapping[str, np.ndarray]],
        reference: Sequence[Mapping[str, np.ndarray]],
        metric: str = "rel-l2",
        extra: Mapping[str, np.ndarray] | None = None,
        labels: Labels | None = None,
        gate_cache: bool = True,
    ) -> float:
        """The largest error under ``metric`` of any output (see ``measure_error``)."""
        sums: dict[str, ErrorAccumulator] = {}
        # Only the gated error is returned: the class statistics only when it is one of them.
        classes = metric in ("kl", "top1")
        with runtime_errors("a candidate model", self.model):
            for feed, expected in zip(feeds, reference, strict=True):
                names = list(expected)
                values = self.session.run(names, {**feed, **(extra or {})})
                candidate = dict(zip(names, values, strict=True))
                add_batch(
                    sums, expected, candidate, feed, labels if metric == "ppl" else None, classes
                )
        return max(sums[name].metrics(name, 0.0, metric, gate_cache).error for name in sums)


def _working(values: np.ndarray) -> np.ndarray:
    """Logits in the dtype the softmax statistics are computed in: float16/bfloat16/float32 as
    float32, float64 as float64; sums are always accumulated in float64. Elementwise float32
    work is 4x faster than float64 on an LM's logits (softmax shifts them by their maximum, so
    nothing overflows), and a model's float32 outputs hold no more."""
    narrow = values.dtype.kind == "f" and values.dtype.itemsize <= 4
    dtype = np.float32 if narrow or values.dtype.name == "bfloat16" else np.float64
    return np.asarray(values, dtype=dtype)


def _exp(value: float) -> float:
    """``exp``, ``inf`` where it overflows (a broken candidate's perplexity)."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, in the logits' dtype, the normalizer summed in float64."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    total = np.sum(np.exp(shifted), axis=-1, keepdims=True, dtype=np.float64)
    return shifted - np.log(total).astype(logits.dtype)
