"""1 x 1 decode latency with a KV cache: the dense KV-cache export next to the same export
compiled at the ranks a prefill compile chose.

    python examples/llm/prepare.py qwen.gguf out/ --kv-cache      # out/lm_kv.onnx
    python examples/llm/decode.py out/lm_kv.onnx out/lm.kl0.05.onnx out/heldout.npz

First it checks the export: with an empty past it gives the prefill model's logits, and one step
fed the present of a prompt gives what the prefill model gives on the prompt and that token.
Then it compiles the KV-cache export with lrcompile at the compiled prefill model's ranks (read
from its ``*_lr_A`` factors; every other layer dense) and times one-token steps after a
``--past``-token history, dense and compiled. The compile factors with plain SVD and does not
verify: the factors' values do not change the latency, and the prefill compile's check and
``evaluate.py`` measure the accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from evaluate import median_ms  # this folder's evaluate.py (the script's folder is on sys.path)

import lrcompile
from lrcompile.runtime.sessions import create_session

SUFFIX = "_lr_A"


def prefill_ranks(compiled: Path) -> dict[str, int]:
    """The rank of each factored layer of a compiled model, by the original node's name."""
    model = onnx.load(str(compiled), load_external_data=False)
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    ranks = {}
    for node in model.graph.node:
        if node.name.endswith(SUFFIX):
            if node.input[1] not in shapes:  # FP8 or cast factors: read through their producer
                raise SystemExit(
                    f"{compiled}: {node.name} reads no initializer; plain factors only"
                )
            ranks[node.name[: -len(SUFFIX)]] = int(shapes[node.input[1]][1])
    return ranks


def history(session, batch: int, length: int) -> dict[str, np.ndarray]:
    """Zero ``past_key_values.*`` inputs of ``length`` tokens (the shapes' static heads and head
    size from the session)."""
    return {
        spec.name: np.zeros((batch, spec.shape[1], length, spec.shape[3]), np.float32)
        for spec in session.get_inputs()
        if spec.name.startswith("past_key_values")
    }


def feeds(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict:
    """``ids`` after ``past`` (empty when None), with an all-ones attention mask."""
    past = history(session, len(ids), 0) if past is None else past
    length = next(iter(past.values())).shape[2] + ids.shape[1]
    return {"input_ids": ids, "attention_mask": np.ones((len(ids), length), np.int64)} | past


def check_export(decoder: Path, prefill: Path, prompt: np.ndarray) -> float:
    """The largest |logit| difference between the KV-cache export (empty past, then one step
    fed the prompt's present) and the prefill model on the same tokens."""
    session = create_session(decoder)
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds(session, prompt[:, :-1])), strict=True))
    past = {name.replace("present", "past_key_values"): v for name, v in outputs.items()}
    past.pop("logits")
    step = session.run(["logits"], feeds(session, prompt[:, -1:], past))[0]
    del session
    reference = create_session(prefill).run(["logits"], {"input_ids": prompt})[0]
    return max(
        float(np.max(np.abs(outputs["logits"] - reference[:, :-1]))),
        float(np.max(np.abs(step[:, 0] - reference[:, -1]))),
    )


def decode_latency(path: Path, past: int, repeats: int = 20) -> float:
    """Median ms of one 1 x 1 step after ``past`` tokens (after warm-up runs)."""
    session = create_session(path)
    feed = feeds(session, np.ones((1, 1), np.int64), history(session, 1, past))
    return median_ms(session, feed, repeats, warmup=3)


def compile_at_ranks(decoder: Path, ranks: dict[str, int], out: Path) -> lrcompile.CompileResult:
    """``decoder`` compiled with ``ranks`` by node name, every other layer dense."""
    with tempfile.TemporaryDirectory() as scratch:
        overrides = Path(scratch) / "ranks.json"
        overrides.write_text(json.dumps({**ranks, "*": "skip"}))
        return lrcompile.compile_model(
            decoder, out, rank="0.5", overrides=overrides, verify=False, external_data=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decoder", type=Path, help="the KV-cache export (lm_kv.onnx)")
    parser.add_argument("compiled", type=Path, help="a compiled prefill model (lm.*.onnx)")
    parser.add_argument("heldout", type=Path, help="token ids; the first row's start is a prompt")
    parser.add_argument("--past", type=int, default=255)
    args = parser.parse_args()
    prefill = args.decoder.with_name("lm.onnx")
    prompt = np.load(args.heldout)["input_ids"][:1, :16]
    print(f"export check: max |logit difference| vs {prefill.name}", end=" ", flush=True)
    print(f"{check_export(args.decoder, prefill, prompt):.2e}")
    ranks = prefill_ranks(args.compiled)
    out = args.decoder.with_name(args.compiled.stem + ".kv.onnx")
    result = compile_at_ranks(args.decoder, ranks, out)
    print(f"compiled {out.name}: {result.totals.factored} layers at {args.compiled.name}'s ranks,")
    print(f"  x{result.totals.params_ratio:.3f} of the weight parameters")
    dense, compiled = decode_latency(args.decoder, args.past), decode_latency(out, args.past)
    print(
        f"1 x 1 decode after {args.past} tokens: dense {dense:.1f} ms, compiled {compiled:.1f} ms"
    )
    print(f"  (x{dense / compiled:.2f})")


if __name__ == "__main__":
    main()
