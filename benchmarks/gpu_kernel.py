"""GPU benchmark of the fused LowRankGemm kernel (needs a CUDA GPU; elsewhere it says so, exit 0).

For M in {1, 16, 128, 4096}, K = N in {4096, 8192}, r in {256, 512, 1024}, bf16:
dense ``x @ W`` (cuBLAS via torch), two separate matmuls ``(x @ A) @ B``, and the fused kernel.
Columns: time, effective TFLOP/s counting the dense 2*M*K*N, and the fused kernel's achieved
bandwidth (bytes it must move: A, B, x, y) against the device's peak. The target: at M <= 16 the
fused kernel at least 1.3x faster than two separate GEMMs and within 80% of the bandwidth
roofline.

    python benchmarks/gpu_kernel.py [--peak-gbs 4800]
"""

from __future__ import annotations

import argparse
import sys

# HBM peaks of the machines this project is lent (GB/s): H100 SXM 3350, H200 4800.
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbs", type=float, help="device HBM peak; guessed from the name")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("no torch: install the kernel extra; nothing measured")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing measured (run it on one, see docker/)")
        return 0
    import triton.testing

    from lrcompile.plugins.kernel import low_rank_gemm

    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    print(f"{name}, bf16, peak {peak or '?'} GB/s; times are medians of triton.testing.do_bench")
    header = f"{'M':>5} {'K=N':>5} {'r':>5} {'dense us':>9} {'two us':>8} {'fused us':>9}"
    print(f"{header} {'fused/two':>9} {'dense TF/s':>10} {'fused TF/s':>10} {'fused %BW':>9}")
    for kn in (4096, 8192):
        w = torch.randn(kn, kn, device="cuda", dtype=torch.bfloat16) / kn**0.5
        for r in (256, 512, 1024):
            a = torch.randn(kn, r, device="cuda", dtype=torch.bfloat16) / kn**0.5
            b = torch.randn(r, kn, device="cuda", dtype=torch.bfloat16) / r**0.5
            for m in (1, 16, 128, 4096):
                x = torch.randn(m, kn, device="cuda", dtype=torch.bfloat16)
                dense = triton.testing.do_bench(lambda x=x, w=w: x @ w) * 1e3
                two = triton.testing.do_bench(lambda x=x, a=a, b=b: (x @ a) @ b) * 1e3
                fused = triton.testing.do_bench(lambda x=x, a=a, b=b: low_rank_gemm(x, a, b)) * 1e3
                flops = 2 * m * kn * kn
                moved = 2 * (kn * r + r * kn + 2 * m * kn)
                bandwidth = moved / (fused * 1e-6) / 1e9
                share = f"{100 * bandwidth / peak:8.0f}%" if peak else "        ?"
                tflops = (flops / dense / 1e6, flops / fused / 1e6)
                print(
                    f"{m:>5} {kn:>5} {r:>5} {dense:>9.1f} {two:>8.1f} {fused:>9.1f}"
                    f" {two / fused:>9.2f} {tflops[0]:>10.1f} {tflops[1]:>10.1f} {share}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
