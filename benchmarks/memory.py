"""Memory: the peak of ``--rank auto`` on an LM-shaped model with inline weights, stage by stage.

The model (built here, never checked in) has a real small LM's proportions: a 262,144-token
vocabulary (embedding and untied lm_head [640, 262144], 168M parameters each), hidden 640, ffn
2048, ``--layers`` decoder blocks, float32, ONE file (weights inline, as some exporters write
them). The command is a user's: ``lrcompile lm.onnx --rank auto --calib calib.npz --tolerance 0.1``
on ``--sequences`` x 256 random tokens, in a fresh process. Printed: the process's peak (VmHWM),
each stage's own peak from the report's profile, and the bound 2 x weights + 1 GiB.

    python benchmarks/memory.py                      # 2 blocks: 1.40 GB, ~10 minutes on 2 cores
    python benchmarks/memory.py --layers 18          # 1.74 GB: a 270M LM's size, an hour or more
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from lrcompile.tools import peak_memory
from lrcompile.tools.synthetic import lm_like


def inline_lm(folder: Path, layers: int, vocab: int, hidden: int, ffn: int) -> Path:
    """The LM-shaped model with every weight inline in ``folder/lm.onnx``."""
    staged = folder / "external"
    staged.mkdir()
    model = onnx.load(str(lm_like(staged, layers, hidden, ffn, vocab)))  # loads the weights
    path = folder / "lm.onnx"
    onnx.save(model, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--folder", type=Path, help="Work here (default: a temporary folder).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrcompile-memory-", dir=args.folder) as folder:
        folder = Path(folder)
        path = inline_lm(folder, args.layers, args.vocab, args.hidden, args.ffn)
        weights = path.stat().st_size / 2**30
        ids = np.random.default_rng(0).integers(0, args.vocab, (args.sequences, args.tokens))
        np.savez(folder / "calib.npz", input_ids=ids)
        report = folder / "report.json"
        calib, out = folder / "calib.npz", folder / "out.onnx"
        command = [str(path), "-o", str(out), "--rank", "auto", "--calib", str(calib),
                   "--tolerance", "0.1", "--report", str(report)]  # fmt: skip
        start = time.perf_counter()
        code, peak, stderr = peak_memory.measure(command)
        seconds = time.perf_counter() - start
        assert code in (0, 1), stderr
        result = json.loads(report.read_text())
    print(f"machine: {platform.machine()}, {platform.python_version()}; model {weights:.2f} GiB")
    print(
        f"inline, {args.layers} blocks, vocab {args.vocab}; {args.sequences}x{args.tokens} tokens"
    )
    print(f"{'stage':<10} {'seconds':>8} {'peak GiB':>9}")
    for stage, spent in result["seconds"].items():
        stage_peak = result["peak_mib"].get(stage, float("nan")) / 1024
        print(f"{stage:<10} {spent:>8.1f} {stage_peak:>9.2f}")
    bound = 2 * weights + 1
    print(f"process peak {peak / 1024:.2f} GiB in {seconds:.0f} s; bound 2 x weights + 1 GiB:")
    print(f"{bound:.2f} GiB")


if __name__ == "__main__":
    main()
