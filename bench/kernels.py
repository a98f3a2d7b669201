"""Kernel microbenchmark: every fused op, providers torch (reference) / triton / cuda, side by side.

One command on one GPU (about 2-4 minutes on an H100, Triton compiles included):

    python bench/kernels.py                    # pythia-1.4b, pythia-6.9b, gpt-neox-20b shapes
    python bench/kernels.py --models gpt-neox-20b --out $OUT/kernels.json

Shapes (fp16): decode at batch 1 and 16 (cache capacity 2048, filled lengths 128 / 1024 / 2048 for decode
attention), prefill of one 128 / 1024 / 2048-token prompt (and 16 x 128) for LayerNorm, rotary + cache
write and attention, and the decode linears (QKV, dense, h->4h + bias + GeLU, 4h->h) at 1, 4 and 16 rows.
Time: median of 40 calls timed with CUDA events, each after reading a 256 MiB buffer (L2 cold and clean; see
``median_ms``: triton's do_bench zeroes its buffer, which leaves dirty lines the timed op must write back).
Memory-bound ops report achieved GB/s = minimal bytes the op must move / time, and its % of the copy
bandwidth measured in the same run (1 GiB device-to-device copy, read + write bytes); prefill attention
also reports TFLOP/s (causal: 4 * nh * hd * sum over queries of (p + 1)). Two references per case: the fastest
pure read of the op's bytes timed the same way (no kernel that must read them beats it under this timer), and, for
ops moving >= 32 MiB, back-to-back timing (48 calls queued over rotating input copies, each cold in L2, no host or
flush gap: how the decode graph runs them; --no-back-to-back skips it). A provider that fails or does not
support a shape gets an error row and the run continues. Results: JSON (GPU, CUDA, torch, triton, commit,
shapes, rows; the "environment" block of bench/common.py) to --out (default $OUT/kernels.json when OUT is set,
else bench/results/kernels_<gpu>.json), then a markdown table, printed last.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

import torch
from common import git_commit, gpu_driver, run, write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neox_rt import ops  # noqa: E402

MODELS = {  # hidden, heads, head dim, rotary dims (NEOX_FACTS.md)
    "pythia-1.4b": dict(h=2048, nh=16, hd=128, rd=32, act="gelu"),
    "pythia-6.9b": dict(h=4096, nh=32, hd=128, rd=32, act="gelu"),
    "gpt-neox-20b": dict(h=6144, nh=64, hd=96, rd=24, act="gelu_fast"),
}
CAPACITY = 2048
DTYPE = torch.float16
E = 2  # bytes per element
TARGETS = {  # % of copy bandwidth on the 20B shapes, H100 fp16 (decode-size LayerNorm / rotary rows move a
    # few kB: launch-bound, no bandwidth target; the targets apply to their 2048-token rows)
    "rotary_kv_write": 80, "layernorm": 80, "dual_layernorm": 80, "decode_attention": 80, "linear": 90,
}


def target_of(op: str, model: str, shape: str):
    if model != "gpt-neox-20b" or op not in TARGETS:
        return None
    if op in ("layernorm", "dual_layernorm", "rotary_kv_write") and "2048" not in shape:
        return None
    if op == "decode_attention" and "L=2048" not in shape:
        return None
    return TARGETS[op]


# ----------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------

def triton_impls():
    from neox_rt.kernels import attention, decode_attention, layernorm, linear, rotary
    return {"layernorm": layernorm.layernorm, "dual_layernorm": layernorm.dual_layernorm,
            "rotary_kv_write": rotary.rotary_kv_write, "decode_attention": decode_attention.decode_attention,
            "attention": attention.attention, "linear": linear.linear}


def cuda_impls():
    from neox_rt.ops import cuda as cuda_ops
    cuda_ops.load_extension()
    impls = {}
    for name, entry in cuda_ops.IMPLS.items():
        impl, supports = entry[0] if isinstance(entry, list) else entry  # linear: the fp16 GEMV first
        if name == "linear":  # the GEMV at up to 16 rows, any shape (the op table: where supports_linear says)
            def impl_linear(x, w, b=None, act=None, _impl=impl):
                if x.numel() // x.shape[-1] > 16:
                    raise ValueError("GEMV handles at most 16 rows")
                return _impl(x, w, b, act)
            impls[name] = impl_linear
        else:
            def checked(*args, _impl=impl, _supports=supports, _name=name):
                if not _supports(*args):
                    raise ValueError(f"cuda_ops.supports_{_name} rejects this shape")
                return _impl(*args)
            impls[name] = checked
    return impls


def providers():
    out = {"torch": {name: ops.OPS[name].reference for name in ops.OPS}}
    errors = {}
    for name, loader in (("triton", triton_impls), ("cuda", cuda_impls)):
        try:
            out[name] = loader()
        except Exception as e:  # noqa: BLE001 - a missing backend is a row of errors, not a crash
            errors[name] = f"{type(e).__name__}: {e}"
    return out, errors


# ----------------------------------------------------------------------------------------------------
# Cases: (op, model, shape label, make_args() -> args, bytes, flops)
# ----------------------------------------------------------------------------------------------------

def rnd(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=DTYPE) * scale


def cases(model_names, quick):
    lengths = (2048,) if quick else (128, 1024, 2048)
    for mname in model_names:
        m = MODELS[mname]
        h, nh, hd, rd = m["h"], m["nh"], m["hd"], m["rd"]
        # LayerNorm / dual LayerNorm: read x, write 1 or 2 outputs (+ the parameters)
        for tokens, label in [(1, "decode b=1"), (16, "decode b=16"), (2048, "prefill 2048 tok")]:
            def ln_args(tokens=tokens):
                return (rnd(tokens, h), rnd(h) + 1, rnd(h, scale=0.1), 1e-5)

            def dual_args(tokens=tokens):
                return (rnd(tokens, h), rnd(h) + 1, rnd(h, scale=0.1), rnd(h) + 1, rnd(h, scale=0.1), 1e-5)
            yield "layernorm", mname, label, ln_args, (2 * tokens * h + 2 * h) * E, 0
            yield "dual_layernorm", mname, label, dual_args, (3 * tokens * h + 4 * h) * E, 0
        # rotary + KV write: read qkv, positions, cos/sin rows; write q, k, v
        for b, s, label in [(1, 1, "decode b=1"), (16, 1, "decode b=16"), (1, 2048, "prefill 1x2048"),
                            (16, 128, "prefill 16x128")]:
            def rot_args(b=b, s=s):
                cos, sin = ops.rotary_tables(rd, CAPACITY, 10000.0, device="cuda")
                start = CAPACITY - s
                positions = (start + torch.arange(s, device="cuda")).expand(b, s).contiguous()
                k_cache = torch.empty(b, nh, CAPACITY, hd, device="cuda", dtype=DTYPE)
                return (rnd(b, s, 3 * nh * hd), positions, cos, sin, rd, k_cache, torch.empty_like(k_cache))
            nbytes = b * s * (6 * nh * hd * E + 8 + rd * 4)
            yield "rotary_kv_write", mname, label, rot_args, nbytes, 0
        # decode attention: read q, K and V of the filled slots, write out
        for b in (1, 16):
            for L in lengths:
                def dec_args(b=b, L=L):
                    k_cache = rnd(b, nh, CAPACITY, hd)
                    return (rnd(b, nh, hd), k_cache, rnd(b, nh, CAPACITY, hd),
                            torch.full((b,), L, device="cuda", dtype=torch.int64), hd ** -0.5)
                nbytes = (2 * b * nh * L * hd + 2 * b * nh * hd) * E
                yield "decode_attention", mname, f"b={b} L={L}", dec_args, nbytes, 4 * b * nh * hd * L
        # prefill attention over the cache (compute-bound: TFLOP/s)
        for b, s in [(1, L) for L in lengths] + [(16, 128)]:
            def att_args(b=b, s=s):
                positions = torch.arange(s, device="cuda").expand(b, s).contiguous()
                return (rnd(b, s, nh, hd), rnd(b, nh, CAPACITY, hd), rnd(b, nh, CAPACITY, hd), positions,
                        hd ** -0.5)
            nbytes = (2 * b * s * nh * hd + 2 * b * nh * s * hd) * E
            flops = 4 * b * nh * hd * s * (s + 1) // 2
            yield "attention", mname, f"prefill {b}x{s}", att_args, nbytes, flops
        # decode linears: stream the weight once
        for lname, (n_out, k_in, bias, act) in {"qkv": (3 * h, h, True, None), "dense": (h, h, False, None),
                                                "h->4h+gelu": (4 * h, h, True, m["act"]),
                                                "4h->h": (h, 4 * h, False, None)}.items():
            for rows in (1, 4, 16):
                def lin_args(rows=rows, n_out=n_out, k_in=k_in, bias=bias, act=act):
                    return (rnd(rows, k_in), rnd(n_out, k_in, scale=k_in ** -0.5),
                            rnd(n_out, scale=0.1) if bias else None, act)
                nbytes = (n_out * k_in + rows * (k_in + n_out) + (n_out if bias else 0)) * E
                yield "linear", mname, f"{lname} m={rows}", lin_args, nbytes, 2 * rows * n_out * k_in


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

_FLUSH: torch.Tensor | None = None


def median_ms(fn, reps: int = 40, warmup: int = 5) -> float:
    """Median ms of fn with a cold L2: before every call a 256 MiB buffer is READ (summed), which leaves the L2
    full of clean lines. (triton.testing.do_bench ZEROES its buffer instead: the L2 is then full of dirty lines,
    and the op being timed also pays for writing them back to DRAM; --sweep times cuBLAS both ways.)"""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s_, e_ in zip(starts, ends):
        _FLUSH.sum(dtype=torch.int32)
        s_.record()
        fn()
        e_.record()
    torch.cuda.synchronize()
    times = sorted(s_.elapsed_time(e_) for s_, e_ in zip(starts, ends))
    return float(times[len(times) // 2])


def median_ms_do_bench(fn) -> float:
    """triton.testing.do_bench (L2 flushed by zeroing a buffer), kept to show the difference in --sweep."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=25, return_mode="median"))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of nbytes, counting read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


def same_size_copy_ms(nbytes: int) -> float:
    """A device copy moving the same bytes (nbytes / 2 read, nbytes / 2 written), timed like the ops: the
    reference for small ops, whose time includes the fixed cost of a cold start (launch, first DRAM and TLB
    misses, the last wave's drain) that the 1 GiB copy behind copy_gbps amortises."""
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return ms


_READ_KERNEL = None


def _read_kernel():
    """A Triton kernel that only reads: each program sums ITERS x BLOCK int32 (evict-first) and stores one int."""
    global _READ_KERNEL
    if _READ_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def read_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
            base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
            acc = tl.zeros([BLOCK], dtype=tl.int32)
            for it in tl.static_range(ITERS):
                offs = base + it * BLOCK + tl.arange(0, BLOCK)
                acc += tl.load(x_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_first")
            tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))
        _READ_KERNEL = read_sum
    return _READ_KERNEL


READ_CONFIGS = ((1024, 8, 4), (2048, 4, 4), (4096, 2, 8), (4096, 4, 8), (8192, 2, 8))  # (BLOCK, ITERS, warps)


def same_size_read_ms(nbytes: int, back_to_back: bool = False) -> tuple[float, str, float | None]:
    """The fastest pure read of nbytes found, timed like the ops: a memory-bound op that must read these bytes
    cannot beat it in this timing (cold start and drain included). Candidates: torch's sum and a Triton read
    kernel in a few tile shapes. Returns (ms, which, ms of the best Triton shape timed back to back or None)."""
    n = max(1, nbytes // 4)
    x = torch.ones(n, dtype=torch.int32, device="cuda")
    best = (median_ms(lambda: x.sum(dtype=torch.int32)), "torch.sum")
    kern = _read_kernel()
    best_triton = (float("inf"), None)
    for block, iters, warps in READ_CONFIGS:
        grid = ((n + block * iters - 1) // (block * iters),)
        out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
        ms = median_ms(lambda: kern[grid](x, out, n, BLOCK=block, ITERS=iters, num_warps=warps))
        if ms < best[0]:
            best = (ms, f"triton {block}x{iters} w{warps}")
        if ms < best_triton[0]:
            best_triton = (ms, (block, iters, warps, grid, out))
    del x
    b2b = None
    if back_to_back and best_triton[1] is not None:
        block, iters, warps, grid, out = best_triton[1]
        b2b = back_to_back_ms(lambda x_: kern[grid](x_, out, n, BLOCK=block, ITERS=iters, num_warps=warps),
                              lambda: (torch.ones(n, dtype=torch.int32, device="cuda"),), nbytes)
    return best[0], best[1], b2b


B2B_MIN_BYTES = 32 << 20  # smaller ops run shorter than their launch on the host; their rotation would not stay cold


def back_to_back_ms(fn, args_fn, nbytes: int, calls: int = 48) -> float | None:
    """Per-call ms of `calls` launches of fn queued back to back (as in a decode graph, no L2 flush between them)
    over enough copies of the inputs, used in turn, that each call finds its bytes out of L2 (copies x nbytes >=
    3 x L2). The launches are queued behind a sleep kernel so the host never starves the GPU; the events
    bracket only the calls. None for ops under B2B_MIN_BYTES."""
    if nbytes < B2B_MIN_BYTES:
        return None
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    copies = max(2, -(-3 * l2 // nbytes))
    sets = [args_fn() for _ in range(copies)]
    for a in sets:
        fn(*a)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # ~10-20 ms of GPU time while the host queues the calls
        start.record()
        for c in range(calls):
            fn(*sets[c % copies])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del sets
    return float(sorted(times)[1])


def first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_case(op, args_fn, provs, prov_errors, nbytes, flops, copy_gbps, back_to_back=True):
    args = args_fn()
    results = {}
    ref = None
    for pname in ("torch", "triton", "cuda"):
        row = {"provider": pname}
        if pname in prov_errors:
            row["error"] = prov_errors[pname]
        elif op not in provs.get(pname, {}):
            row["error"] = "no such op"
        else:
            fn = provs[pname][op]
            try:
                out = first_tensor(fn(*args))
                torch.cuda.synchronize()
                if ref is None:
                    ref = out.float()
                else:
                    row["max_abs_diff_vs_torch"] = (out.float() - ref).abs().max().item()
                ms = median_ms(lambda: fn(*args))
                row.update(ms=ms, gbps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / copy_gbps)
                b2b = back_to_back_ms(fn, args_fn, nbytes) if back_to_back else None
                if b2b is not None:
                    row.update(b2b_ms=b2b, b2b_pct_copy=100 * nbytes / b2b / 1e6 / copy_gbps)
                if flops:
                    row["tflops"] = flops / ms / 1e9
            except Exception as e:  # noqa: BLE001 - one failing provider must not stop the run
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                row["error"] = msg
                print(f"  ! {op} {pname}: {msg}", file=sys.stderr)
                if os.environ.get("NEOX_RT_BENCH_TRACEBACK"):
                    traceback.print_exc()
        results[pname] = row
    del args
    return results


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

def env_info() -> dict:
    import triton
    return {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton.__version__, "commit": git_commit(),
            "dirty": bool(run(["git", "status", "--porcelain", "--", "kernels", "csrc", "neox_rt"])),
            "driver": gpu_driver(),
            "dtype": "float16", "l2": "cold (a 256 MiB buffer read before every call; see median_ms)",
            "cache_capacity": CAPACITY, "models": MODELS}


def cell(r) -> str:
    if "error" in r:
        return "ERR"
    extra = f", {r['tflops']:.0f} TF/s" if r.get("tflops") and r.get("op") == "attention" else ""
    return f"{r['ms'] * 1000:.1f} us ({r['pct_copy']:.0f}%{extra})"


def markdown(report) -> str:
    floor = report.get("one_element_kernel_us")
    lines = [f"Kernels on {report['env']['gpu']} (fp16, L2 cold; copy bandwidth "
             f"{report['copy_gbps']:.0f} GB/s = 100%). Cells: median time (% of copy bandwidth). 'same-size copy': "
             "a device copy moving the same bytes, timed the same way, and the best kernel's speed as a % of the "
             "copy's (copy time / kernel time)"
             + (f"; a one-element kernel takes {floor:.1f} us timed this way" if floor is not None else "")
             + ". 'same-size read': the fastest pure read of the op's bytes found (torch.sum or a Triton read "
             "kernel), timed the same way, as a % of copy bandwidth: no kernel that must read these bytes beats it "
             "in this timing. 'back-to-back': ops moving >= 32 MiB timed as 48 calls queued back to back over "
             "rotating copies of their inputs (each call cold in L2, no flush or launch gap between calls, as in a "
             "decode graph), the best kernel's % of copy bandwidth (and the pure read's, timed the same way).", "",
             "| op | model | shape | MB moved | torch | triton | cuda | best % | target | same-size copy "
             "| same-size read | back-to-back |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        # best of our kernels; for linear cuBLAS (the torch provider) counts too: it stays where it wins
        ok = [r for r in c["providers"].values()
              if "error" not in r and (r["provider"] != "torch" or c["op"] == "linear")]
        best = max((r["pct_copy"] for r in ok), default=None)
        target = target_of(c["op"], c["model"], c["shape"])
        tcell = "" if target is None else (f">= {target}%" + ("" if best is None else
                                                             (" ok" if best >= target else " MISS")))
        for r in c["providers"].values():
            r["op"] = c["op"]
        same = c.get("copy_same_ms")
        best_ms = min((r["ms"] for r in ok), default=None)
        scell = "-" if same is None else (f"{same * 1e3:.1f} us" + ("" if best_ms is None else
                                                                   f" ({100 * same / best_ms:.0f}%)"))
        read = c.get("read_same_ms")
        rpct = None if read is None else 100 * c["bytes"] / read / 1e6 / report["copy_gbps"]
        rcell = "-" if read is None else f"{read * 1e3:.1f} us ({rpct:.0f}%)"
        b2b = max((r["b2b_pct_copy"] for r in ok if "b2b_pct_copy" in r), default=None)
        rb = c.get("read_b2b_ms")
        bcell = ("-" if b2b is None else f"{b2b:.0f}%") + (
            "" if rb is None else f" (read {100 * c['bytes'] / rb / 1e6 / report['copy_gbps']:.0f}%)")
        lines.append(f"| {c['op']} | {c['model']} | {c['shape']} | {c['bytes'] / 1e6:.2f} | "
                     + " | ".join(cell(c["providers"][p]) for p in ("torch", "triton", "cuda"))
                     + f" | {'-' if best is None else f'{best:.0f}%'} | {tcell} | {scell} | {rcell} | {bcell} |")
    return "\n".join(lines)


def slug(gpu: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()


def sweep(copy_gbps: float, only: list[str] | None = None) -> list[dict]:
    """Tuning variants of the kernels that miss their targets, 20B shapes, timed like the main table.

    ``only``: the ops to sweep (default all: decode_attention, layernorm, triton_linear, linear, linear_tp: one row
    at the per-rank 20B shapes of TP=2 and 4)."""
    from neox_rt.kernels import decode_attention as k_dec
    from neox_rt.kernels import layernorm as k_ln
    from neox_rt.kernels import linear as k_lin
    m = MODELS["gpt-neox-20b"]
    h, nh, hd = m["h"], m["nh"], m["hd"]
    rows = []

    def record(op, shape, variant, fn, nbytes, timer=median_ms):
        try:
            fn()
            torch.cuda.synchronize()
            ms = timer(fn)
            r = {"op": op, "shape": shape, "variant": variant, "ms": ms, "pct_copy": 100 * nbytes / ms / 1e6 / copy_gbps}
        except Exception as e:  # noqa: BLE001
            r = {"op": op, "shape": shape, "variant": variant, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(r)
        print(f"  sweep {op} {shape} {variant}: {r.get('ms', float('nan')) * 1e3:.1f} us", file=sys.stderr)

    try:
        from neox_rt.ops import cuda as cuda_ops
        ext = cuda_ops.load_extension()
    except ImportError as e:
        print(f"sweep: no extension ({e})", file=sys.stderr)
        ext = None
    for b, L in ((1, 2048), (16, 2048), (1, 128)) if not only or "decode_attention" in only else ():
        q, kc, vc = rnd(b, nh, hd), rnd(b, nh, CAPACITY, hd), rnd(b, nh, CAPACITY, hd)
        sl = torch.full((b,), L, device="cuda", dtype=torch.int64)
        nbytes = (2 * b * nh * L * hd + 2 * b * nh * hd) * E
        for bn, nw, pps in ((64, 4, 8), (32, 4, 8), (64, 8, 8), (32, 4, 16), (16, 4, 16), (64, 4, 16), (128, 8, 8),
                            (32, 2, 16), (16, 2, 32)):
            record("decode_attention", f"b={b} L={L}", f"triton block_n={bn} warps={nw} programs/SM={pps}",
                   lambda: k_dec.decode_attention(q, kc, vc, sl, hd ** -0.5, block_n=bn, num_warps=nw,
                                                  programs_per_sm=pps), nbytes)
        for bps in (2, 4, 8, 16) if ext is not None else ():
            for var, merge in ((1, False), (1, True), (2, False)):
                record("decode_attention", f"b={b} L={L}",
                       f"cuda blocks/SM={bps} {'pipelined' if var == 2 else 'single-buffered'} "
                       f"{'merge kernel' if merge else 'in-kernel merge'}",
                       lambda: cuda_ops.decode_attention(q, kc, vc, sl, hd ** -0.5, blocks_per_sm=bps,
                                                         merge_kernel=merge, variant=var), nbytes)
    if only and not {"layernorm", "linear", "triton_linear", "linear_tp"} & set(only):
        return rows
    x = rnd(2048, h)
    w1, b1, w2, b2 = rnd(h) + 1, rnd(h, scale=0.1), rnd(h) + 1, rnd(h, scale=0.1)
    for nw in (2, 4, 8, 16, 32) if not only or "layernorm" in only else ():
        record("layernorm", "2048 tok", f"warps={nw}", lambda: k_ln.layernorm(x, w1, b1, 1e-5, num_warps=nw),
               (2 * 2048 * h + 2 * h) * E)
        record("dual_layernorm", "2048 tok", f"warps={nw}",
               lambda: k_ln.dual_layernorm(x, w1, b1, w2, b2, 1e-5, num_warps=nw), (3 * 2048 * h + 4 * h) * E)
    if not only or "triton_linear" in only:  # tile configurations of the Triton GEMV at 4 and 16 rows
        for lname, (n_out, k_in, act) in {"qkv": (3 * h, h, None), "dense": (h, h, None),
                                          "h->4h+gelu": (4 * h, h, "gelu_fast"), "4h->h": (h, 4 * h, None)}.items():
            w = rnd(n_out, k_in, scale=k_in ** -0.5)
            bias = rnd(n_out, scale=0.1) if act else None
            for rows_ in (4, 16):
                x1 = rnd(rows_, k_in)
                nbytes = (n_out * k_in + rows_ * (k_in + n_out)) * E
                for bn, bk, nw, ns in ((16, 256, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3), (16, 128, 4, 3),
                                       (32, 128, 4, 3), (64, 128, 4, 3), (16, 256, 4, 4), (32, 256, 4, 4),
                                       (16, 512, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3), (16, 128, 4, 5)):
                    record("linear", f"{lname} m={rows_}", f"triton block_n={bn} block_k={bk} warps={nw} stages={ns}",
                           lambda: k_lin.linear(x1, w, bias, act, block_n=bn, block_k=bk, num_warps=nw,
                                                num_stages=ns), nbytes)
    if ext is not None and (not only or "linear_tp" in only):
        # one row (batch-1 decode) at the per-rank 20B shapes of TP=2 and TP=4, cold and back to back with PDL as
        # in the decode graph: k / 8 warps is not a whole number of 256-element chunks for dense at TP=2 / 4
        for lname, (n_out, k_in) in {"tp2 qkv": (3 * h // 2, h), "tp2 dense": (h, h // 2),
                                     "tp2 h->4h": (2 * h, h), "tp2 4h->h": (h, 2 * h), "tp4 qkv": (3 * h // 4, h),
                                     "tp4 dense": (h, h // 4), "tp4 4h->h": (h, h)}.items():
            w = rnd(n_out, k_in, scale=k_in ** -0.5)
            x1 = rnd(1, k_in)
            nbytes = (n_out * k_in + k_in + n_out) * E
            for variant, vname in ((0, "gemv auto"), (4, "gemv k/4"), (6, "gemv 8 warps x 4 rows"),
                                   (5, "gemv 8 warps x 8 rows"), (11, "gemv 8 warps x 16 rows")):
                record("linear", f"{lname} m=1", vname, lambda: ext.gemv(x1, w, None, 0, None, variant, False), nbytes)
                record("linear", f"{lname} m=1", vname + ", back to back (PDL)",
                       lambda: ext.gemv(x1, w, None, 0, None, variant, True), nbytes,
                       timer=lambda _fn: back_to_back_ms(
                           lambda x_, w_: ext.gemv(x_, w_, None, 0, None, variant, True),
                           lambda: (rnd(1, k_in), rnd(n_out, k_in, scale=k_in ** -0.5)), nbytes))
    if ext is None or (only and "linear" not in only):
        return rows
    import torch.nn.functional as F
    shapes = {}
    for mname, prefix in (("gpt-neox-20b", ""), ("pythia-1.4b", "1.4b ")):  # the GEMV also runs the small models
        hm = MODELS[mname]["h"]
        shapes.update({f"{prefix}{ln}": s for ln, s in {"qkv": (3 * hm, hm), "dense": (hm, hm), "h->4h": (4 * hm, hm),
                                                         "4h->h": (hm, 4 * hm)}.items()})
    for lname, (n_out, k_in) in shapes.items():
        w = rnd(n_out, k_in, scale=k_in ** -0.5)
        for rows_ in (1, 2, 4, 8, 16):
            x1 = rnd(rows_, k_in)
            nbytes = (n_out * k_in + rows_ * (k_in + n_out)) * E
            record("linear", f"{lname} m={rows_}", "cuBLAS", lambda: F.linear(x1, w), nbytes)
            if rows_ == 1:  # the same call timed as triton.testing.do_bench times it (dirty L2)
                record("linear", f"{lname} m={rows_}", "cuBLAS, do_bench timing (L2 zeroed)", lambda: F.linear(x1, w),
                       nbytes, timer=median_ms_do_bench)
            record("linear", f"{lname} m={rows_}", "triton (default tiles)", lambda: k_lin.linear(x1, w), nbytes)
            for variant, vname in ((0, "gemv auto"), (1, "gemv legacy"), (2, "gemv k/1"), (3, "gemv k/2"),
                                   (4, "gemv k/4"), (5, "gemv 8 warps x 8 rows"),
                                   (6, "gemv 8 warps x 4 rows"), (7, "gemv tensor cores, k over 8 warps"),
                                   (8, "gemv tensor cores, k over 16 warps"),
                                   (9, "gemv tensor cores, k over 8 warps, 3 steps"),
                                   (10, "gemv tensor cores, k over 16 warps, 3 steps"),
                                   (11, "gemv 8 warps x 16 rows")):
                if rows_ > 2 and (1 < variant < 7 or variant == 11):
                    continue  # the single-row configurations run the legacy one above 2 rows
                record("linear", f"{lname} m={rows_}", vname, lambda: ext.gemv(x1, w, None, 0, None, variant, False),
                       nbytes)
                if variant >= 7 and lname == "dense" and rows_ in (4, 16):  # as the decode graph runs it
                    record("linear", f"{lname} m={rows_}", vname + ", back to back (PDL)",
                           lambda: ext.gemv(x1, w, None, 0, None, variant, True), nbytes,
                           timer=lambda _fn: back_to_back_ms(
                               lambda x_, w_: ext.gemv(x_, w_, None, 0, None, variant, True),
                               lambda: (rnd(rows_, k_in), rnd(n_out, k_in, scale=k_in ** -0.5)), nbytes))
    return rows


def sweep_table(rows) -> str:
    lines = ["| op | shape | variant | us | % copy |", "|---|---|---|---|---|"]
    for r in rows:
        cellv = "ERR" if "error" in r else f"{r['ms'] * 1e3:.1f} | {r['pct_copy']:.0f}%"
        lines.append(f"| {r['op']} | {r['shape']} | {r['variant']} | {cellv} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ops", nargs="+", default=None, help="only these ops")
    p.add_argument("--quick", action="store_true", help="cache length 2048 only")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--no-back-to-back", action="store_true", help="skip the back-to-back timing of ops that "
                   f"move >= {B2B_MIN_BYTES >> 20} MiB")
    p.add_argument("--sweep", action="store_true", help="also time tuning variants (20B shapes) and report them")
    p.add_argument("--sweep-ops", nargs="+", default=None, help="sweep only these ops (decode_attention, layernorm, "
                   "linear, triton_linear, linear_tp)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    provs, prov_errors = providers()
    for name, err in prov_errors.items():
        print(f"provider {name} unavailable: {err}", file=sys.stderr)
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s", file=sys.stderr)
    tiny = torch.zeros(1, device="cuda")
    empty_us = 1e3 * median_ms(lambda: tiny.add_(1))
    print(f"a one-element kernel, timed the same way: {empty_us:.1f} us", file=sys.stderr)
    report = {"env": env_info(), "copy_gbps": copy_gbps, "one_element_kernel_us": empty_us,
              "provider_errors": prov_errors, "cases": []}
    for op, mname, label, args_fn, nbytes, flops in cases(a.models, a.quick):
        if a.ops and op not in a.ops:
            continue
        print(f"{op:18s} {mname:13s} {label}", file=sys.stderr)
        try:
            res = run_case(op, args_fn, provs, prov_errors, nbytes, flops, copy_gbps, not a.no_back_to_back)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs
            res = {pn: {"provider": pn, "error": f"{type(e).__name__}: {e}"[:200]} for pn in ("torch", "triton",
                                                                                             "cuda")}
        read_ms, read_how, read_b2b = same_size_read_ms(nbytes, not a.no_back_to_back)
        report["cases"].append({"op": op, "model": mname, "shape": label, "bytes": nbytes, "flops": flops,
                                "copy_same_ms": same_size_copy_ms(nbytes), "read_same_ms": read_ms,
                                "read_same_how": read_how, "read_b2b_ms": read_b2b, "providers": res})
        torch.cuda.empty_cache()
    out = a.out or (os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT")
                    else os.path.join(REPO, "bench", "results", f"kernels_{slug(report['env']['gpu'])}.json"))
    table = markdown(report)
    report["table"] = table
    if a.sweep:
        report["sweep"] = sweep(copy_gbps, a.sweep_ops)
        table += "\n\nTuning variants (20B shapes, same timing):\n\n" + sweep_table(report["sweep"])
    write_result(out, report)  # + the "environment" block (bench/common.py)
    print(f"wrote {out}", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
