"""Hashes of compiled outputs over a fixed set of models and options: not a timing, a check that a
refactor changes no byte of what lrcompile writes.

    python benchmarks/fingerprint.py before.json            # on the old commit (PYTHONPATH)
    python benchmarks/fingerprint.py after.json --compare before.json

Every case compiles a model built in code (seeded), stored once inline and once with external
data, and records the sha256 of each file written (the model and its ``.data``), or the one-line
error when the compile refused. ``--compare`` lists the cases whose hashes differ and exits 1 when
any does. Options whose output depends on the machine (``--objective latency``) are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

CALIB = "calib.npz"
OVERRIDES = "overrides.json"

# (case, model, options): options are compile_model keywords; "calib" names the model's data.
CASES = [
    ("fraction", "mlp", {"rank": "0.5"}),
    ("fixed-exact", "mlp", {"rank": "32", "decomposition": "exact"}),
    ("fixed-randomized", "mlp", {"rank": "32"}),
    ("energy", "mlp", {"rank": "energy:0.9"}),
    ("multiple-8", "mlp", {"rank": "0.3", "rank_multiple": 8}),
    ("no-saving", "mlp", {"rank": "0.9", "allow_no_saving": True}),
    ("jobs-2", "mlp", {"rank": "0.5", "jobs": 2}),
    ("external-data", "mlp", {"rank": "0.5", "external_data": True}),
    ("overrides", "mlp", {"rank": "0.5", "overrides": OVERRIDES}),
    ("calibrated", "mlp", {"rank": "0.5", "calib": CALIB}),
    ("calibrated-energy", "mlp", {"rank": "energy:0.95", "calib": CALIB}),
    ("auto", "mlp", {"rank": "auto", "calib": CALIB}),
    ("auto-budget", "mlp", {"rank": "auto", "calib": CALIB, "budget": 0.8}),
    ("auto-params", "mlp", {"rank": "auto", "calib": CALIB, "objective": "params"}),
    ("auto-overrides", "mlp", {"rank": "auto", "calib": CALIB, "overrides": OVERRIDES}),
    ("fp8", "mlp", {"rank": "0.5", "calib": CALIB, "fp8": True}),
    (
        "fp8-all-per-channel",
        "mlp",
        {
            "rank": "0.5",
            "calib": CALIB,
            "fp8": True,
            "fp8_scope": "all",
            "fp8_weights": "per-channel",
            "fp8_calib": "percentile:99.9",
        },
    ),
    ("auto-fp8", "mlp", {"rank": "auto", "calib": CALIB, "fp8": True, "tolerance": 0.1}),
    ("plugin", "mlp", {"rank": "0.5", "plugin": True}),
    ("plugin-fp8", "mlp", {"rank": "0.5", "calib": CALIB, "fp8": True, "plugin": True}),
    ("compensate", "tf", {"rank": "0.5", "calib": CALIB, "compensate": 2}),
    ("auto-compensate", "tf", {"rank": "auto", "calib": CALIB, "compensate": 2}),
    ("tf-calibrated", "tf", {"rank": "0.5", "calib": CALIB}),
    ("tf-energy", "tf", {"rank": "energy:0.9", "calib": CALIB}),
    ("tf-auto", "tf", {"rank": "auto", "calib": CALIB, "tolerance": 0.1}),
    ("lm-auto", "lm", {"rank": "auto", "calib": CALIB, "tolerance": 0.1}),
    ("lm-fraction", "lm", {"rank": "0.5"}),
    ("aliases", "aliases", {"rank": "0.5", "rank_multiple": 8}),
    ("aliases-no-saving", "aliases", {"rank": "0.5", "rank_multiple": 8, "allow_no_saving": True}),
    ("aliases-calibrated", "aliases", {"rank": "0.5", "rank_multiple": 8, "calib": CALIB}),
    ("padded-auto", "padded", {"rank": "auto", "calib": CALIB, "tolerance": 0.3}),
    ("padded-all-rows", "padded", {"rank": "0.5", "calib": CALIB, "padding_mask": ""}),
    ("padded-masked", "padded", {"rank": "0.5", "calib": CALIB}),
]
# Options every case of a model shares: enough calibration rows per batch for the MLP's 2048-wide
# activations, ranks fine enough for the small models.
MODEL_OPTIONS = {
    "mlp": {"batch_size": 256},
    "lm": {"rank_multiple": 4},
    "padded": {"rank_multiple": 4},
}
SWEEP = {"sweep-a.onnx": {"tolerance": 0.02}, "sweep-b.onnx": {"budget": 0.7}}


def build_models(folder: Path) -> None:
    """Writes each model (``<name>.onnx``), its calibration data and the override file."""
    from build_mlp import build

    from lrcompile.tools.synthetic import lm_like, transformer_like

    rng = np.random.default_rng(0)
    (folder / "t").mkdir()
    _inline(build(0), folder / "mlp.onnx")
    np.savez(folder / "mlp.npz", x=rng.standard_normal((2560, 512)).astype(np.float32))
    tf = transformer_like(folder / "t", 2, 64, 128, dtype=np.float32)
    _inline(onnx.load(tf), folder / "tf.onnx")
    np.savez(folder / "tf.npz", x=rng.standard_normal((24, 16, 64)).astype(np.float32))
    (folder / "u").mkdir()
    _inline(onnx.load(lm_like(folder / "u", 2, 32, 64, 500)), folder / "lm.onnx")
    np.savez(folder / "lm.npz", input_ids=rng.integers(0, 500, (32, 16)))
    _inline(_aliases(rng), folder / "aliases.onnx")
    np.savez(folder / "aliases.npz", x=rng.standard_normal((64, 48)).astype(np.float32))
    _inline(_padded(rng), folder / "padded.onnx")
    lengths = rng.integers(3, 13, size=48)
    mask = (np.arange(12) < lengths[:, None]).astype(np.int64)
    x = rng.standard_normal((48, 12, 32)) * np.logspace(0, -2, 32)
    np.savez(folder / "padded.npz", x=x.astype(np.float32), attention_mask=mask)
    overrides = {"fc2*": "skip", "*fc3*": "energy:0.8", "fc1*": 64}
    (folder / OVERRIDES).write_text(json.dumps(overrides))


def _inline(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def _aliases(rng) -> onnx.ModelProto:
    """Weights behind Identity, Transpose and Cast, a Gemm with alpha and transB, a tied weight."""
    graph = onnx.parser.parse_graph(
        """
        aliases (float[N, 48] x) => (float[N, 48] y, float[N, 32] g) {
            wa = Identity(W1)
            h1 = MatMul(x, wa)
            wt = Transpose<perm = [1, 0]>(W2t)
            h2 = MatMul(h1, wt)
            w3 = Cast<to = 1>(W3h)
            h3 = MatMul(h2, w3)
            y = Gemm<alpha = 0.5, transB = 1>(h3, W4, C)
            ids = Constant<value = int64[2] {0, 1}>()
            g = Gather(W1, ids)
        }"""
    )
    weights = {
        "W1": rng.standard_normal((48, 32)),
        "W2t": rng.standard_normal((64, 32)),
        "W3h": rng.standard_normal((64, 40)),
        "W4": rng.standard_normal((48, 40)),
        "C": rng.standard_normal(48),
    }
    for name, array in weights.items():
        dtype = np.float16 if name == "W3h" else np.float32
        graph.initializer.append(numpy_helper.from_array(array.astype(dtype), name))
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 19)], ir_version=10
    )


def _padded(rng) -> onnx.ModelProto:
    graph = onnx.parser.parse_graph(
        """
        padded (float[B, S, 32] x, int64[B, S] attention_mask) => (float[B, S, 32] y) {
            h = MatMul(x, W)
            m = Cast<to = 1>(attention_mask)
            axes = Constant<value = int64[1] {-1}>()
            m3 = Unsqueeze(m, axes)
            a = Mul(h, m3)
            y = MatMul(a, V)
        }"""
    )
    for name in ("W", "V"):
        w = rng.standard_normal((32, 32)) / np.sqrt(32)
        graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), name))
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 19)], ir_version=10
    )


def _stored(folder: Path, name: str, external: bool) -> Path:
    """The model ``name`` as the case reads it: inline, or every weight in external data."""
    path = folder / ("external" if external else "inline") / f"{name}.onnx"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        model = onnx.load(str(folder / f"{name}.onnx"))
        if external:
            onnx.save(model, str(path), save_as_external_data=True, location=f"{name}.onnx.data",
                      size_threshold=0)  # fmt: skip
        else:
            onnx.save(model, str(path))
    return path


def _digests(output: Path) -> dict[str, str] | None:
    files = [output, output.with_name(f"{output.name}.data")]
    found = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}
    return found or None


def fingerprints(folder: Path, only: str | None = None) -> dict[str, object]:
    import lrcompile

    results: dict[str, object] = {}
    for external in (False, True):
        storage = "external" if external else "inline"
        for case, name, options in CASES:
            if only and only not in case:
                continue
            model = _stored(folder, name, external)
            options = MODEL_OPTIONS.get(name, {}) | options
            if options.get("calib") == CALIB:
                options["calib"] = str(folder / f"{name}.npz")
            if options.get("overrides") == OVERRIDES:
                options["overrides"] = folder / OVERRIDES
            output = folder / "out" / storage / f"{case}.onnx"
            output.parent.mkdir(parents=True, exist_ok=True)
            try:
                lrcompile.compile_model(model, output, verify=False, **options)
                results[f"{storage}/{case}"] = _digests(output)
            except lrcompile.LrcompileError as e:
                results[f"{storage}/{case}"] = f"refused: {e}"
            print(f"{storage}/{case}: {results[f'{storage}/{case}']}", flush=True)
        if only and only not in "sweep":
            continue
        model = _stored(folder, "mlp", external)
        settings = {folder / "out" / storage / out: s for out, s in SWEEP.items()}
        sweep = lrcompile.compile_sweep(
            model,
            settings,
            rank="auto",
            calib=str(folder / "mlp.npz"),
            verify=False,
            **MODEL_OPTIONS["mlp"],
        )
        for output, _ in sweep:
            results[f"{storage}/{output.name}"] = _digests(output)
            print(f"{storage}/{output.name}: {results[f'{storage}/{output.name}']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="Write the hashes here (JSON).")
    parser.add_argument("--compare", type=Path, help="Hashes from another commit.")
    parser.add_argument("--only", help="Only the cases whose name contains this.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrcompile-fingerprint-") as folder:
        build_models(Path(folder))
        results = fingerprints(Path(folder), args.only)
    args.output.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return
    before = json.loads(args.compare.read_text())
    differ = sorted(k for k in results.keys() & before.keys() if results[k] != before[k])
    missing = sorted(before.keys() - results.keys())
    for key in differ:
        print(f"DIFFERS {key}: {before[key]} -> {results[key]}")
    same = len(results.keys() & before.keys()) - len(differ)
    print(f"{same} identical, {len(differ)} differ, {len(missing)} not run")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
