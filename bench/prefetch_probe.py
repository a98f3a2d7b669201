"""Does an L2 prefetch issued before a wait make the GEMV after it faster? (one GPU, sm_90)

    python bench/prefetch_probe.py --out $OUT/prefetch_probe.json

The weight of 20B's QKV at TP=2 ([9216, 6144] fp16, 113 MB) behind a one-thread spin of --idle-us standing in for
the all-reduce (torch.cuda._sleep). Every case starts from an L2 filled with other data (a 256 MB read) and is
timed with CUDA events from the end of that read (median of --reps):
  gemv           the GEMV alone, cold
  idle+gemv      the spin, then the GEMV (the decode without prefetch)
  pf+idle+gemv   the prefetch kernel (neox_rt.prefetch_l2, PDL as in the decode), the spin, the GEMV: one stream
  pf||idle+gemv  the prefetch on a second stream beside the spin, joined before the GEMV
  pf             the prefetch kernel alone (does it return at once, or only once the data is in?)
per prefetch form (0 bulk-copy unit, 1 line by line) and size. The gain a prefetch can give: min(MB, idle time x
bandwidth) / bandwidth.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from common import git_commit, gpu_driver  # noqa: E402  (bench/ is on sys.path as the script's folder)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle-us", type=float, default=10.0)
    p.add_argument("--mb", default="4,8,16,24")
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from neox_rt import cuda_ops
    ext = cuda_ops.load_extension()
    dev = torch.device("cuda")
    w = torch.randn(9216, 6144, device=dev, dtype=torch.float16) * 0.02
    x = torch.randn(1, 6144, device=dev, dtype=torch.float16)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    # calibrate the spin: cycles per microsecond
    torch.cuda._sleep(1000)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(4_000_000)
    b.record()
    b.synchronize()
    cycles = int(args.idle_us * 4_000_000 / (a.elapsed_time(b) * 1000))

    def gemv():
        ext.gemv(x, w, None, 0, None, 0, True)

    def timed(body):
        times = []
        for _ in range(args.reps + 3):
            flush.sum(dtype=torch.int64)  # evicts w: the L2 holds the flush buffer
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            body(s)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1000)
        return statistics.median(times[3:])

    rows = []
    base = dict(gemv=timed(lambda s: gemv()), idle=timed(lambda s: torch.cuda._sleep(cycles)),
                idle_gemv=timed(lambda s: (torch.cuda._sleep(cycles), gemv())))
    for variant in (0, 1):
        for mb in (int(v) for v in args.mb.split(",")):
            n = mb << 20

            def same_stream(s):
                ext.prefetch_l2(w, n, variant, True)
                torch.cuda._sleep(cycles)
                gemv()

            def two_streams(s):
                side.wait_event(s)
                with torch.cuda.stream(side):
                    ext.prefetch_l2(w, n, variant, True)
                torch.cuda._sleep(cycles)
                torch.cuda.current_stream().wait_stream(side)
                gemv()

            rows.append(dict(variant=variant, mb=mb, pf_alone_us=timed(lambda s: ext.prefetch_l2(w, n, variant, True)),
                             same_stream_us=timed(same_stream), two_streams_us=timed(two_streams)))
    bw = w.numel() * 2 / (base["gemv"] * 1e-6) / 1e12
    report = dict(gpu=torch.cuda.get_device_name(), driver=gpu_driver(), torch=torch.__version__,
                  commit=git_commit(), idle_us_asked=args.idle_us, base_us=base, gemv_tbps=bw, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{report['gpu']}: gemv cold {base['gemv']:.1f} us ({bw:.2f} TB/s), idle {base['idle']:.1f} us, "
          f"idle+gemv {base['idle_gemv']:.1f} us")
    print(f"{'form':>5} {'MB':>4} {'pf alone':>9} {'pf+idle+gemv':>13} {'pf||idle+gemv':>14} {'ideal':>7}")
    for r in rows:
        ideal = base["idle_gemv"] - min(r["mb"] * 2**20 / (bw * 1e6), base["idle"])
        print(f"{r['variant']:>5} {r['mb']:>4} {r['pf_alone_us']:>9.1f} {r['same_stream_us']:>13.1f} "
              f"{r['two_streams_us']:>14.1f} {ideal:>7.1f}")


if __name__ == "__main__":
    main()
