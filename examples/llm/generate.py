"""Generates with onnxruntime-genai, the way its users run an LM: each model folder side by side.

    python examples/llm/generate.py lm/genai lm/genai-lr lm/genai-int4 --prompts lm/heldout.npz

Each folder holds a model and genai's ``genai_config.json`` (the first is the reference: the
dense export of ``prepare.py --genai``). Every prompt (the first ``--prompt-tokens`` of each
held-out window) is generated greedily for ``--new-tokens`` with the KV cache by every model in
turn, so that the machine's load falls on all alike. Prints, per model: the weight bytes on disk,
the median prefill time, the median decode rate (tokens/s after the first token), and how many
generated tokens equal the reference's (position by position, and before the first difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def generate(model, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens, the prefill's seconds (to the first token), and the decode's tokens/s."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt[None].astype(np.int32))
    generator.generate_next_token()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    seconds = time.perf_counter() - start
    tokens = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    return tokens, prefill, (len(tokens) - 1) / seconds


def _bytes(folder: Path) -> int:
    """The model file genai_config.json names, with its external data beside it."""
    name = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    files = [folder / name, folder / f"{name}.data"]
    return sum(f.stat().st_size for f in files if f.is_file())


def _agreement(tokens: list[int], reference: list[int]) -> tuple[int, int]:
    same = [a == b for a, b in zip(tokens, reference, strict=True)]
    prefix = same.index(False) if False in same else len(same)
    return sum(same), prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="genai model folders, dense first")
    parser.add_argument("--prompts", type=Path, required=True, help=".npz with input_ids")
    parser.add_argument("--count", type=int, default=8, help="prompts")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    import onnxruntime_genai as og

    prompts = np.load(args.prompts)["input_ids"][: args.count, : args.prompt_tokens]
    models = [og.Model(str(folder)) for folder in args.folders]
    for model in models:
        generate(model, prompts[0], 4)  # warm-up
    runs: list[list[tuple]] = [[] for _ in models]
    for prompt in prompts:
        for model, results in zip(models, runs, strict=True):
            results.append(generate(model, prompt, args.new_tokens))
    reference = [tokens for tokens, _, _ in runs[0]]
    print(f"{len(prompts)} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new each")
    header = ("model", "weights MB", "prefill ms", "decode tok/s", "same tokens", "same prefix")
    rows = [header]
    for folder, results in zip(args.folders, runs, strict=True):
        same = [_agreement(t, r) for (t, _, _), r in zip(results, reference, strict=True)]
        total = len(reference) * args.new_tokens
        rows.append((
            folder.name,
            f"{_bytes(folder) / 1e6:.1f}",
            f"{statistics.median(p for _, p, _ in results) * 1e3:.0f}",
            f"{statistics.median(r for _, _, r in results):.1f}",
            f"{sum(s for s, _ in same)}/{total}",
            f"{statistics.median(p for _, p in same):.0f}/{args.new_tokens} (median)",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
