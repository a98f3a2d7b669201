"""Quantized-linear microbenchmark (#24): the W8A16 / W4A16 CUDA kernels on the decode shapes, each variant, against
fp16 (cuBLAS and the CUDA GEMV) and against the floor of their bytes.

    python bench/quant_kernels.py --out $OUT/quant_kernels.json            # 20B and 1.4b, rows 1, 8, 32
    python bench/quant_kernels.py --models gpt-neox-20b --rows 1 --variants 3 5   # LEAN against FOLD

Shapes: each model's four decode linears (qkv, dense, h->4h, 4h->h), fp16 activations, int8 per channel and
int4 groups of 128 (round-to-nearest of a random weight: the kernels' speed does not depend on the values).
Variants (QuantVariant, csrc/kernels/quant_gemm.cuh): by default every one the extension has, 0 to
QUANT_VARIANT_LAST, so the A/B of LEAN (3) and FOLD (5: zero point and scale out of the per-weight work; int4 FOLD
only up to 16 rows, LEAN above) sits in one run on the same inputs.
Time: bench/kernels.py's timers, the median of 40 calls each after a 256 MiB read (L2 cold), and for ops of
>= 32 MiB 48 calls back to back over rotating weights (how a decode graph runs them). Floor: the op's bytes (packed
weight, scales, zeros, x, y) over the device-to-device copy bandwidth measured in the same run. Every cell is first
checked against the reference (dequantize, then matmul in fp32): max |diff| / max |ref| is reported, and a cell
over 1e-2 is marked as wrong rather than timed as if it were right (FOLD, which does not round its weights to fp16,
differs from that reference by fp16 rounding, ~1e-3 at most). Results: JSON via bench/common.write_result,
then a markdown table, printed last.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from common import write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)
from kernels import back_to_back_ms, copy_bandwidth, median_ms  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neox_rt.quant.formats import Int4Weight, Int8Weight  # noqa: E402

MODELS = {"gpt-neox-20b": 6144, "pythia-1.4b": 2048, "pythia-2.8b": 2560, "pythia-12b": 5120}
LAYERS = {"qkv": (3, 1), "dense": (1, 1), "h->4h": (4, 1), "4h->h": (1, 4)}  # (out, in) in units of hidden
MAX_REL_ERR = 1e-2


def quant_bytes(w) -> int:
    return sum(b.numel() * b.element_size() for b in w.buffers())


def cases(models, layers, rows_list):
    for model in models:
        h = MODELS[model]
        for lname in layers:
            fo, fi = LAYERS[lname]
            for rows in rows_list:
                yield model, lname, fo * h, fi * h, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt-neox-20b", "pythia-1.4b"], choices=list(MODELS))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--variants", nargs="+", type=int, default=None,
                   help="kernel variants to time (default: every one the extension has, 0 = auto)")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--no-back-to-back", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/quant_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from neox_rt.ops import cuda as cuda_ops
    cuda_ops.load_extension()
    variants = args.variants if args.variants is not None else list(range(cuda_ops.QUANT_VARIANT_LAST + 1))
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows_out = []
    dev, dt = "cuda", torch.float16
    for model, lname, n, k, rows in cases(args.models, args.layers, args.rows):
        w = torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5
        x = torch.randn(rows, k, device=dev, dtype=dt)
        formats = {"int8": Int8Weight.quantize(w), "int4": Int4Weight.quantize(w, group_size=128)}
        io_bytes = (rows * (k + n)) * 2
        # (format, provider, variant, call(x, weight), the weight, its bytes)
        provs = [("fp16", "cublas", None, torch.nn.functional.linear, w, w.numel() * 2)]
        if rows <= 16:
            provs.append(("fp16", "cuda gemv", None, cuda_ops.linear, w, w.numel() * 2))
        for fmt, qw in formats.items():
            impl = cuda_ops.int8_linear if fmt == "int8" else cuda_ops.int4_linear
            for v in variants:
                provs.append((fmt, f"cuda v{v}", v, impl, qw, quant_bytes(qw)))
        ref = {fmt: (x.float() @ qw.dequantize(dt).float().t()) for fmt, qw in formats.items()}
        ref["fp16"] = x.float() @ w.float().t()
        for fmt, name, v, impl, weight, wbytes in provs:
            row = dict(model=model, layer=lname, n=n, k=k, rows=rows, format=fmt, provider=name, variant=v)
            nbytes = wbytes + io_bytes
            cuda_ops.QUANT_VARIANT = v or 0
            try:
                out = impl(x, weight).float()
                torch.cuda.synchronize()
                err = ((out - ref[fmt]).abs().max() / ref[fmt].abs().max()).item()
                row["rel_err"] = err
                if not err <= MAX_REL_ERR:
                    row["error"] = f"wrong result: max |diff| / max |ref| = {err:.3g}"
                else:
                    ms = median_ms(lambda: impl(x, weight))
                    row.update(us=ms * 1e3, bytes=nbytes, floor_us=nbytes / copy_gbps / 1e3,
                               pct_floor=100 * nbytes / ms / 1e6 / copy_gbps)
                    b2b = None if args.no_back_to_back else back_to_back_ms(
                        impl, lambda weight=weight: (x, clone_weight(weight)), nbytes)
                    if b2b is not None:
                        row.update(b2b_us=b2b * 1e3, b2b_pct_floor=100 * nbytes / b2b / 1e6 / copy_gbps)
            except Exception as e:  # noqa: BLE001 - one failing cell must not stop the run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            finally:
                cuda_ops.QUANT_VARIANT = 0
            rows_out.append(row)
            print(cell_line(row), flush=True)
        del w, formats, ref
        torch.cuda.empty_cache()
    payload = dict(copy_gbps=copy_gbps, rows=rows_out, variants=variants)
    out = args.out or (os.path.join(os.environ["OUT"], "quant_kernels.json") if os.environ.get("OUT") else None)
    if out:
        write_result(out, payload)
    print(markdown(rows_out))
    return 0


def clone_weight(w):
    """A copy of an fp16 weight or of a format object (its buffers cloned): back-to-back calls rotate over copies."""
    if isinstance(w, torch.Tensor):
        return w.clone()
    if isinstance(w, Int4Weight):
        return Int4Weight(w.qweight.clone(), w.scales.clone(), w.zeros.clone(), w.in_features, w.group_size)
    return Int8Weight(w.qweight.clone(), w.scales.clone())


def cell_line(r) -> str:
    head = f"{r['model']:>13} {r['layer']:>6} m={r['rows']:<3} {r['format']:>5} {r['provider']:>10}"
    if "error" in r:
        return f"{head}  ERROR {r['error']}"
    b2b = f"  b2b {r['b2b_us']:7.1f} us ({r['b2b_pct_floor']:3.0f}%)" if "b2b_us" in r else ""
    return (f"{head}  {r['us']:7.1f} us  floor {r['floor_us']:6.1f} ({r['pct_floor']:3.0f}%)"
            f"{b2b}  err {r['rel_err']:.1e}")


def markdown(rows) -> str:
    lines = ["| model | layer | rows | format | provider | us (cold) | % floor | us (b2b) | % floor (b2b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['layer']} | {r['rows']} | {r['format']} | {r['provider']} | "
                         f"{r['error']} | | | |")
            continue
        b2b = (f"{r['b2b_us']:.1f} | {r['b2b_pct_floor']:.0f}" if "b2b_us" in r else " | ")
        lines.append(f"| {r['model']} | {r['layer']} | {r['rows']} | {r['format']} | {r['provider']} | "
                     f"{r['us']:.1f} | {r['pct_floor']:.0f} | {b2b} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
