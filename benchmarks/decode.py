"""Decode and prefill speed of a KV-cache LM export, dense beside its compiled variants.

    python benchmarks/decode.py dense.onnx variant.onnx [...] --prompt heldout.npz

The models are Optimum-style exports (``--task text-generation-with-past``): ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.N.key|value`` in, ``logits`` and
``present.N.key|value`` out. Prefill: the first held-out row's first ``--prefill`` tokens with an
empty past. Decode: one token on the prefill's past (the same step run again and again: a decode
step's time at that past length). Every model is timed interleaved with the others (medians,
ONNX Runtime CPU at its defaults, no thread spinning). Greedy: ``--tokens`` tokens generated from
the prompt with the cache, and how many equal the dense model's before the first that differs.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np

from lrcompile.runtime.sessions import create_session
from lrcompile.runtime.timing import interleaved_medians


def empty_past(session) -> dict[str, np.ndarray]:
    """Zero-length pasts of each ``past_key_values.*`` input, its other dimensions from the graph
    (batch 1)."""
    past = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            _, heads, _, size = value.shape
            past[value.name] = np.zeros((1, heads, 0, size), np.float32)
    return past


def step_feed(ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed of ``ids`` (``[1, S]``) after ``past`` (its sequence length from any entry)."""
    length = next(iter(past.values())).shape[2] if past else 0
    total = length + ids.shape[1]
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((1, total), np.int64),
        "position_ids": np.arange(length, total, dtype=np.int64)[None],
        **past,
    }


def presents(session, outputs) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return {
        name.replace("present.", "past_key_values."): value
        for name, value in zip(names, outputs, strict=True)
        if name.startswith("present.")
    }


def greedy(session, prompt: np.ndarray, tokens: int) -> list[int]:
    outputs = session.run(None, step_feed(prompt, empty_past(session)))
    generated = []
    for _ in range(tokens):
        token = int(np.argmax(outputs[0][0, -1]))
        generated.append(token)
        past = presents(session, outputs)
        outputs = session.run(None, step_feed(np.array([[token]]), past))
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="the dense model first")
    parser.add_argument("--prompt", type=Path, required=True, help=".npz holding input_ids")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per shape")
    args = parser.parse_args()
    import onnxruntime

    print(f"{platform.machine()}, Python {platform.python_version()},"
          f" onnxruntime {onnxruntime.__version__}")  # fmt: skip
    prompt = np.load(args.prompt)["input_ids"][:1, : args.prefill]
    sessions = [create_session(model, spinning=False) for model in args.models]
    prefill = [step_feed(prompt, empty_past(s)) for s in sessions]
    decode = []
    for session, feed in zip(sessions, prefill, strict=True):
        past = presents(session, session.run(None, feed))
        decode.append(step_feed(np.array([[int(prompt[0, -1])]]), past))
    prefill_s = interleaved_medians(
        [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, prefill, strict=True)],
        budget_s=args.budget,
    )
    decode_s = interleaved_medians(
        [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, decode, strict=True)],
        budget_s=args.budget,
    )
    reference = greedy(sessions[0], prompt, args.tokens)
    print(f"| model | prefill 1 x {prompt.shape[1]} ms | x | decode 1 x 1 ms | x |"
          f" greedy tokens equal |\n|{'---|' * 6}")  # fmt: skip
    for index, model in enumerate(args.models):
        tokens = reference if index == 0 else greedy(sessions[index], prompt, args.tokens)
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True))
                     if a != b), len(reference))  # fmt: skip
        print(f"| {model.name} | {prefill_s[index] * 1e3:.1f} |"
              f" x{prefill_s[0] / prefill_s[index]:.2f} | {decode_s[index] * 1e3:.2f} |"
              f" x{decode_s[0] / decode_s[index]:.2f} | {same}/{len(reference)} |")  # fmt: skip


if __name__ == "__main__":
    main()
