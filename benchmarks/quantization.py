"""Quantization beside ONNX Runtime's own quantizers: same data, same machine, same process.

    python benchmarks/quantization.py minilm                 # the demo's model, ~10 minutes
    python benchmarks/quantization.py lm lm/                 # the 0.5B LM of examples/llm (hours)

MiniLM: the demo's export, calibration and held-out sentences (``lrcompile.demo.minilm``). Rows:
dense fp32; lrcompile factoring (``--rank auto``, the demo's tolerance 0.1); ONNX Runtime's
``quantize_dynamic`` (int8 per channel, its default ops: the embedding Gather too); ONNX
Runtime's ``MatMulNBitsQuantizer`` at its defaults (MatMul only, asymmetric) with its RTN, HQQ and
k-quant algorithms, at 8 and 4 bits; lrcompile ``--quantize int8|int4 --rank auto`` (integers
plus a searched correction per layer, embeddings in int8) at two tolerances of ``--metric
cosine`` on the calibration batches it holds back, and int8 with ``--objective latency`` (each
layer's fastest form within the tolerance: weight-only int8, W8A8 with activations quantized at
run time, or dense; the forms timed on this machine at the calibration batch's rows) at three.
Columns: held-out embedding cosine to the original per sentence (mean / min), file MB, speed
against dense at batch 1 and 32 (ONNX Runtime CPU, default optimisation, interleaved medians, no
thread spinning), compile seconds.

LM: the dense ``lm/lm.onnx`` of ``examples/llm/prepare.py``; held-out perplexity ratio, mean KL,
top-1 changes, GB and prefill latency (``examples/llm/evaluate.py``) of ``quantize_dynamic``,
``MatMulNBitsQuantizer`` 4-bit (RTN, HQQ at group 128 and 32; k-quant) and lrcompile int4 group
128 with ``--rank auto`` at a perplexity-ratio tolerance (``--metric ppl``, on the calibration
batches held back), by bytes and by ``--objective latency`` (timed at the 1 x 256 prefill).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lrcompile.demo.minilm import megabytes
from lrcompile.demo.minilm import quantize_dynamic as quantize

HERE = Path(__file__).resolve().parent


def nbits(model: Path, output: Path, bits: int, block: int, algorithm: str, external=False):
    """ONNX Runtime's ``MatMulNBitsQuantizer`` (MatMul weights to MatMulNBits, asymmetric, its
    default ops) with the ``default`` (round to nearest), ``hqq`` or ``k_quant`` algorithm."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    configs = {
        "default": lambda: mnq.DefaultWeightOnlyQuantConfig(block_size=block, bits=bits),
        "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits),
        "k_quant": lambda: mnq.KQuantWeightOnlyQuantConfig(),
    }
    quantizer = mnq.MatMulNBitsQuantizer(
        onnx.load(str(model)), bits=bits, block_size=block, algo_config=configs[algorithm]()
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=external)
    return output


def timed(make: Callable[[], Path]) -> tuple[Path, float]:
    start = time.perf_counter()
    path = make()
    return path, time.perf_counter() - start


def minilm_variants(workdir: Path, prepared) -> list[tuple[str, Path, float]]:
    """(name, model, compile seconds) of every row but the dense one."""
    import lrcompile

    dense, calib = prepared.model, str(prepared.calib)

    def ours(name: str, **options) -> Callable[[], Path]:
        def make() -> Path:
            result = lrcompile.compile_model(
                dense, workdir / name, calib=calib, batch_size=32, verify=False, **options
            )
            return result.output_path

        return make

    makers = [
        ("lrcompile factoring, auto tol 0.1", ours("lr.onnx", rank="auto", tolerance=0.1)),
        ("quantize_dynamic int8 per-channel",
         lambda: quantize(dense, workdir / "dynamic.onnx")),
        ("MatMulNBits 8-bit g32 RTN",
         lambda: nbits(dense, workdir / "n8.onnx", 8, 32, "default")),
        ("MatMulNBits 4-bit g32 RTN",
         lambda: nbits(dense, workdir / "n4.onnx", 4, 32, "default")),
        ("MatMulNBits 4-bit g32 HQQ",
         lambda: nbits(dense, workdir / "n4h.onnx", 4, 32, "hqq")),
        ("MatMulNBits 4-bit k-quant",
         lambda: nbits(dense, workdir / "n4k.onnx", 4, 32, "k_quant")),
    ]  # fmt: skip
    makers += [
        (f"lrcompile {bits} auto, 1-cos {tolerance}",
         ours(f"{bits}-{tolerance}.onnx", quantize=bits, rank="auto", metric="cosine",
              tolerance=tolerance))
        for bits in ("int8", "int4")
        for tolerance in (0.005, 0.002)
    ]  # fmt: skip
    makers += [
        (f"lrcompile int8 auto --objective latency, 1-cos {tolerance}",
         ours(f"lat-{tolerance}.onnx", quantize="int8", rank="auto", metric="cosine",
              tolerance=tolerance, objective="latency"))
        for tolerance in (0.02, 0.005, 0.002)
    ]  # fmt: skip
    rows = []
    for name, make in makers:
        print(f"  compiling: {name}", file=sys.stderr, flush=True)
        path, seconds = timed(make)
        rows.append((name, path, seconds))
    return rows


def minilm(workdir: Path) -> None:
    from lrcompile.demo import metrics
    from lrcompile.demo.minilm import embed, prepare
    from lrcompile.runtime.latency import model_latencies

    prepared = prepare(workdir)
    rows = [("dense fp32", prepared.model, 0.0), *minilm_variants(workdir, prepared)]
    heldout = prepared.heldout_feeds()
    reference = embed(prepared.model, heldout)
    feeds = [{k: v[:batch] for k, v in heldout.items()} for batch in (1, 32)]
    times = model_latencies([path for _, path, _ in rows], feeds, budget_s=3.0)
    print(f"| variant | cos mean | cos min | MB | x b1 | x b32 | compile s |\n|{'---|' * 7}")
    for index, (name, path, seconds) in enumerate(rows):
        cos = metrics.cosines(reference, embed(path, heldout))
        speed = [row[0] / row[index] for row in times]
        print(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {megabytes(path):.1f} |"
              f" x{speed[0]:.2f} | x{speed[1]:.2f} | {seconds:.0f} |")  # fmt: skip


def lm(folder: Path, workdir: Path, tolerance: float) -> None:
    import lrcompile

    sys.path.insert(0, str(HERE.parent / "examples" / "llm"))
    from evaluate import evaluate

    dense = folder / "lm.onnx"

    def ours(group: int, objective: str = "bytes") -> Callable[[], Path]:
        def make() -> Path:
            out = workdir / f"lm.int4g{group}.{objective}.onnx"
            lrcompile.compile_model(
                dense, out, quantize="int4", group_size=group, rank="auto",
                calib=str(folder / "calib.npz"), batch_size=1, metric="ppl",
                labels="input_ids:logits", tolerance=tolerance, verify=False, symmetric=False,
                objective=objective,
            )  # fmt: skip
            return out

        return make

    makers = [
        ("quantize_dynamic int8 per-channel",
         lambda: quantize(dense, workdir / "lm.int8.onnx", external=True)),
        ("MatMulNBits 4-bit g128 RTN",
         lambda: nbits(dense, workdir / "n128.onnx", 4, 128, "default", True)),
        ("MatMulNBits 4-bit g128 HQQ",
         lambda: nbits(dense, workdir / "h128.onnx", 4, 128, "hqq", True)),
        ("MatMulNBits 4-bit g32 HQQ",
         lambda: nbits(dense, workdir / "h32.onnx", 4, 32, "hqq", True)),
        (f"lrcompile int4 g128 auto, ppl x{1 + tolerance:g}", ours(128)),
        (f"lrcompile int4 g128 auto --objective latency, ppl x{1 + tolerance:g}",
         ours(128, "latency")),
    ]  # fmt: skip
    print(
        f"| variant | ppl | ratio | KL | top-1 chg | GB | prefill ms | compile s |\n|{'---|' * 8}"
    )
    reference = None
    for name, make in [("dense fp32", lambda: dense), *makers]:
        print(f"  {time.strftime('%H:%M:%S')} compiling: {name}", file=sys.stderr, flush=True)
        path, seconds = timed(make)
        ref, row = evaluate(dense, path, folder / "heldout.npz")
        reference = reference or ref
        print(f"| {name} | {row['perplexity']:.3f} | {row['perplexity'] / ref['perplexity']:.3f} |"
              f" {row['kl']:.4f} | {row['top1_changed']:.3f} | {megabytes(path) / 1e3:.2f} |"
              f" {row['latency_ms']:.1f} | {seconds:.0f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("minilm", "lm"))
    parser.add_argument("folder", nargs="?", type=Path, help="lm: examples/llm/prepare.py's folder")
    parser.add_argument(
        "--tolerance", type=float, default=0.03, help="lm: auto's perplexity ratio - 1"
    )
    parser.add_argument("--workdir", type=Path, help="keep the models here")
    args = parser.parse_args()
    import onnxruntime

    print(f"{platform.machine()}, Python {platform.python_version()},"
          f" onnxruntime {onnxruntime.__version__}, {np.__name__} {np.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lrcompile-quant-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.model == "minilm":
            minilm(workdir)
        else:
            lm(args.folder, workdir, args.tolerance)


if __name__ == "__main__":
    main()
