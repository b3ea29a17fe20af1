"""Held-out quality and CPU latency of a compiled LM next to the dense one.

    python examples/llm/evaluate.py out/lm.onnx out/lm.lr.onnx out/heldout.npz

Prints, for the dense and the compiled model: held-out perplexity (next-token labels from the
input ids), the mean KL(dense || compiled) of the next-token distributions in nats, the fraction
of positions whose top-1 token changed, and ONNX Runtime CPU prefill latency (1 x length). One
model is in memory at a time: the dense model's log-probabilities of the labels and its logits
wait on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lrcompile.runtime.sessions import create_session


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def run(path: Path, ids: np.ndarray, scratch: Path, reference: bool) -> dict[str, float]:
    """Perplexity (and, against the saved dense outputs, KL and top-1 changes) on ``ids``."""
    session = create_session(path)
    nll = kl = changed = 0.0
    positions = 0
    for row, sequence in enumerate(ids):
        logits = session.run(["logits"], {"input_ids": sequence[np.newaxis]})[0][0]
        logp = log_softmax(logits[:-1])
        nll -= float(logp[np.arange(len(logp)), sequence[1:]].sum())
        positions += len(logp)
        saved = scratch / f"{row}.npy"
        if reference:
            np.save(saved, logp.astype(np.float32))
        else:
            dense = np.load(saved).astype(np.float64)
            kl += float(np.sum(np.exp(dense) * (dense - logp)))
            changed += float(np.sum(dense.argmax(-1) != logp.argmax(-1)))
    latency = prefill_latency(session, ids.shape[1])
    return {
        "perplexity": float(np.exp(nll / positions)),
        "kl": kl / positions,
        "top1_changed": changed / positions,
        "latency_ms": latency,
    }


def prefill_latency(session, length: int, repeats: int = 5) -> float:
    """Median ms of one ``1 x length`` prefill (after a warm-up run)."""
    return median_ms(session, {"input_ids": np.ones((1, length), dtype=np.int64)}, repeats)


def median_ms(session, feed: dict, repeats: int, warmup: int = 1) -> float:
    """Median ms of ``session`` computing the logits of ``feed``, after ``warmup`` runs."""
    for _ in range(warmup):
        session.run(["logits"], feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], feed)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def evaluate(dense: Path, compiled: Path, heldout: Path) -> tuple[dict, dict]:
    ids = np.load(heldout)["input_ids"]
    with tempfile.TemporaryDirectory(prefix="lrcompile-eval-") as scratch:
        reference = run(dense, ids, Path(scratch), reference=True)
        candidate = run(compiled, ids, Path(scratch), reference=False)
    return reference, candidate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path)
    parser.add_argument("compiled", type=Path)
    parser.add_argument("heldout", type=Path)
    args = parser.parse_args()
    reference, candidate = evaluate(args.dense, args.compiled, args.heldout)
    print(f"{'model':10s} {'perplexity':>10s} {'KL':>8s} {'top-1 chg':>9s} {'prefill ms':>10s}")
    for name, row in (("dense", reference), ("compiled", candidate)):
        print(
            f"{name:10s} {row['perplexity']:10.3f} {row['kl']:8.4f} {row['top1_changed']:9.3f}"
            f" {row['latency_ms']:10.1f}"
        )
    print(f"perplexity ratio {candidate['perplexity'] / reference['perplexity']:.4f}")


if __name__ == "__main__":
    main()
