"""How well whitened factors fitted to calibration text hold on other text: layers of a 0.5B LM.

For 12 Linear layers of Qwen2.5-Coder-0.5B (q, o, gate, down of blocks 1, 11, 22), each factored at
half its break-even rank, the relative output error ||X (W - W')|| / ||X W|| of whitened factors:

    A: fitted to 24 of the 32 sequences of the first 8k tokens of one module (what
       examples/llm/prepare.py took before): on those rows, on the other 8, on held-out modules
    B: fitted to 32 windows spread over every calibration module: on them, on held-out modules
    B + damping: the Gram matrix plus 0.03 x mean(diag) x I, on held-out modules

    python benchmarks/calibration_spread.py qwen.gguf lm/heldout.npz   # torch, transformers, gguf

Measured (held-out: the first windows of the held-out modules in order): A's error on held-out
modules was 1.4-2.7x its error on its own rows (1.2-2.1x on the other 8 rows of the same file);
B's 1.1-1.8x, and lower than A's on held-out modules for all 12 layers; damping changed B's
held-out error by at most 2%.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np
from llm import example_module  # benchmarks/llm.py (the script's folder is on sys.path)


def activations(model, layers: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The input rows of each layer in ``layers`` over the sequences ``ids`` (float64)."""
    import torch

    rows = {name: [] for name in layers}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, args, name=name: rows[name].append(
                args[0].detach().reshape(-1, args[0].shape[-1]).double()
            )
        )
        for name, module in layers.items()
    ]
    with torch.no_grad():
        for row in ids:
            model(input_ids=torch.from_numpy(row[np.newaxis]), use_cache=False)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(value).numpy() for name, value in rows.items()}


def fit(x: np.ndarray, w: np.ndarray, rank: int, damping: float = 0.0) -> np.ndarray:
    """The rank-``rank`` whitened approximation of ``w`` for inputs ``x``."""
    gram = x.T @ x
    lower = np.linalg.cholesky(gram + damping * np.mean(np.diag(gram)) * np.eye(len(gram)))
    u, s, vt = np.linalg.svd(lower.T @ w, full_matrices=False)
    return np.linalg.solve(lower.T, (u[:, :rank] * s[:rank]) @ vt[:rank])


def error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (approx - w)) / np.linalg.norm(x @ w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("heldout", type=Path)
    args = parser.parse_args()
    prepare = example_module("prepare")
    model, tokenizer = prepare.load(args.gguf)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    one_file = np.asarray(tokenizer(text)["input_ids"][: 32 * 256]).reshape(32, 256)
    spread = prepare.tokens(tokenizer, prepare.CALIBRATION_MODULES, 32, 256)
    heldout = np.load(args.heldout)["input_ids"]
    layers = {
        f"{block}.{name}": model.model.layers[block].get_submodule(name)
        for block in (1, 11, 22)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    }
    a, b, h = (activations(model, layers, ids) for ids in (one_file, spread, heldout))
    print(f"{'layer':22s} {'A fit':>6s} {'A rest':>6s} {'A held':>6s} {'B fit':>6s} {'B held':>6s}"
          f" {'damped':>6s}")  # fmt: skip
    cut = 24 * 256
    for name, module in layers.items():
        w = module.weight.detach().double().numpy().T
        rank = int(0.5 * w.size / sum(w.shape)) // 16 * 16
        wa, wb = fit(a[name][:cut], w, rank), fit(b[name], w, rank)
        wd = fit(b[name], w, rank, damping=0.03)
        cells = [error(a[name][:cut], w, wa), error(a[name][cut:], w, wa), error(h[name], w, wa)]
        cells += [error(b[name], w, wb), error(h[name], w, wb), error(h[name], w, wd)]
        print(f"{name:22s} " + " ".join(f"{c:6.3f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
