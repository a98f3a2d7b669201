"""Kernels of the 20B decode step that miss their targets, one launch each, for Nsight Compute.
(``--quant``: the W8A16 / W4A16 linears on 20B's qkv and 4h->h instead, with the fp16 GEMV on qkv beside them.)

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats -o $OUT/probe python bench/ncu_probe.py

The script warms every kernel up first (compiles, autotuning, the extension's counters), then opens the profiler
range (cudaProfilerStart) and launches each once: the CUDA GEMV, the Triton GEMV and cuBLAS on the dense shape
(6144 x 6144, one row), the CUDA GEMV on qkv (18432 x 6144, the largest decode GEMV, for contrast), CUDA decode
attention at b=1 with 2048 cached tokens, and bench/kernels.py's pure read of the same bytes (75.5 and 50.4 MB). Nsight Compute replays each launch with caches flushed (its default), so every one
starts from a cold L2 as in bench/kernels.py.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from neox_rt.ops import cuda as cuda_ops  # noqa: E402
from neox_rt.kernels import linear as k_lin  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/ncu_probe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import kernels as bench  # bench/kernels.py: the pure-read kernel
    cuda_ops.load_extension()
    torch.manual_seed(0)
    h, nh, hd, cap = 6144, 64, 96, 2048
    dev, dt = "cuda", torch.float16
    x = torch.randn(1, h, device=dev, dtype=dt)
    w_dense = torch.randn(h, h, device=dev, dtype=dt) * h ** -0.5
    w_qkv = torch.randn(3 * h, h, device=dev, dtype=dt) * h ** -0.5
    q = torch.randn(1, nh, hd, device=dev, dtype=dt)
    kc = torch.randn(1, nh, cap, hd, device=dev, dtype=dt)
    vc = torch.randn(1, nh, cap, hd, device=dev, dtype=dt)
    sl = torch.full((1,), cap, device=dev, dtype=torch.int64)
    read = bench._read_kernel()
    reads = []
    for nbytes in (w_dense.numel() * 2, 2 * kc.numel() * 2):
        n = nbytes // 4
        buf = torch.ones(n, dtype=torch.int32, device=dev)
        block, iters, warps = 4096, 2, 8
        grid = ((n + block * iters - 1) // (block * iters),)
        out = torch.empty(grid[0], dtype=torch.int32, device=dev)
        reads.append(lambda buf=buf, out=out, n=n, grid=grid, block=block, iters=iters, warps=warps:
                     read[grid](buf, out, n, BLOCK=block, ITERS=iters, num_warps=warps))
    calls = [
        ("cuda gemv dense", lambda: cuda_ops.linear(x, w_dense, None, None)),
        ("triton gemv dense", lambda: k_lin.linear(x, w_dense, None, None)),
        ("cublas dense", lambda: torch.nn.functional.linear(x, w_dense)),
        ("cuda gemv qkv", lambda: cuda_ops.linear(x, w_qkv, None, None)),
        ("cuda decode attention b=1 L=2048", lambda: cuda_ops.decode_attention(q, kc, vc, sl, hd ** -0.5)),
        ("read 75.5 MB", reads[0]),
        ("read 50.3 MB", reads[1]),
    ]
    if "--quant" in sys.argv[1:]:  # the W8A16 / W4A16 kernels on 20B's qkv and 4h->h, one row (#24)
        from neox_rt.quant.formats import Int4Weight, Int8Weight
        w_4hh = torch.randn(h, 4 * h, device=dev, dtype=dt) * (4 * h) ** -0.5
        x4 = torch.randn(1, 4 * h, device=dev, dtype=dt)
        q8, q4 = Int8Weight.quantize(w_qkv), Int4Weight.quantize(w_qkv, group_size=128)
        q8b, q4b = Int8Weight.quantize(w_4hh), Int4Weight.quantize(w_4hh, group_size=128)

        def variant(v, fn, *args):  # QuantVariant (csrc/kernels/quant_gemm.cuh): 1 the plain kernel, 0 auto (LEAN)
            cuda_ops.QUANT_VARIANT = v
            try:
                return fn(*args)
            finally:
                cuda_ops.QUANT_VARIANT = 0
        calls = [
            ("int8 qkv", lambda: cuda_ops.int8_linear(x, q8)),
            ("int4 qkv plain", lambda: variant(1, cuda_ops.int4_linear, x, q4)),
            ("int4 qkv", lambda: cuda_ops.int4_linear(x, q4)),
            ("int8 4h->h", lambda: cuda_ops.int8_linear(x4, q8b)),
            ("int4 4h->h plain", lambda: variant(1, cuda_ops.int4_linear, x4, q4b)),
            ("int4 4h->h", lambda: cuda_ops.int4_linear(x4, q4b)),
            ("cuda gemv qkv", lambda: cuda_ops.linear(x, w_qkv, None, None)),
        ]
    for _ in range(3):
        for _, fn in calls:
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("launched:", ", ".join(n for n, _ in calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
