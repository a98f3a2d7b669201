"""Per-layer profile of one batch-1 decode step: where the time of a token goes, kernel by kernel.

    python bench/profile_decode.py --model gpt-neox-20b --out $OUT/profile_20b.json

Random fp16 weights of the named shape (bench/latency.py's shapes), a 32-token prompt, then decode steps
replayed as the runtime's CUDA graph (neox_rt.engine.graphs.DecodeGraphRunner) under torch.profiler, and the same
steps run eagerly. Every GPU kernel of the profiled steps is assigned to its layer (a layer starts at its
LayerNorm kernel) and to a slot inside the layer (LayerNorm, qkv, rotary + cache write, attention, dense,
h->4h, 4h->h, other; with the fused GEMV pairs "qkv + h->4h" and "dense + 4h->h"); per slot: kernels per layer, mean us per layer, us per token, share of the step, and
for the linears the achieved GB/s of their weight bytes and its % of the copy bandwidth measured in the same
run. "gaps" is the step's wall time (first kernel start to last kernel end) minus the time some kernel ran:
launch latency, kernel drain and fill between dependent kernels. "adds" is the wall a slot adds: per kernel, in
start order, how far its end passes the latest end before it (under PDL a kernel starts early and waits; its
duration then overlaps its predecessor's, the part it adds does not), summed per slot. JSON to --out, a table printed
last.
"""
from __future__ import annotations

import argparse
import bisect
import os
import re
import statistics
import sys
from collections import defaultdict

import torch
from common import git_commit, gpu_driver, simulated_tp, write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)
from latency import SHAPES, copy_bandwidth, random_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neox_rt.engine.kv_cache import KVCache  # noqa: E402
from neox_rt import ops  # noqa: E402
from neox_rt.engine.graphs import DecodeGraphRunner  # noqa: E402
from neox_rt.quant.apply import quantize_model  # noqa: E402

PROMPT = 32
LINEAR_RE = re.compile(r"gemv|gemm|xmma|cutlass|cublas|splitk|Kernel2", re.I)
LINEAR_SLOTS = ("qkv", "dense", "h->4h", "4h->h")
# the fused pairs: fp16 (csrc/kernels/gemv_fused.cuh) and quantized (csrc/kernels/quant_gemm.cuh)
FUSED_SLOTS = {"gemv_pair": "qkv + h->4h", "gemv_sum": "dense + 4h->h", "quant_gemm_pair": "qkv + h->4h",
               "quant_gemm_sum": "dense + 4h->h"}


def kernel_kind(name: str) -> str:
    n = name.lower()
    for key, slot in FUSED_SLOTS.items():
        if key in n:
            return slot
    if "layernorm" in n or "layer_norm" in n:
        return "layernorm"
    if LINEAR_RE.search(name):
        return "linear"
    # rotary + KV write inside decode attention: decode_attention_split_kernel<..., DecodeNewToken<T>>
    # (decode_rotary_split_kernel in the 659dce6 profiles)
    if "decode_rotary" in n or "decodenewtoken" in n:
        return "attention"
    if "rotary" in n:
        return "rotary+kv write"
    if "decode" in n or "attention" in n or "attn" in n or "merge" in n:
        return "attention"
    return "other"


def assign(kernels, num_layers: int):
    """kernels: [(name, start_us, dur_us)] of one step in start order -> {(layer, slot): [dur...]}, extra."""
    kinds = [kernel_kind(n) for n, _, _ in kernels]
    # a parallel-residual layer has one (dual) LayerNorm kernel, a sequential one two; the final LayerNorm
    # is the last one of the step. Where the quantized pair normalises x itself (norm_linear_pair), the pair that no
    # LayerNorm kernel precedes starts its layer.
    starts = [i for i, k in enumerate(kinds)
              if k == "layernorm" or (k == "qkv + h->4h" and (i == 0 or kinds[i - 1] != "layernorm"))]
    per_layer = (len(starts) - 1) // num_layers if num_layers else 0
    if per_layer < 1 or len(starts) != per_layer * num_layers + 1:
        return None, None, None
    slots = defaultdict(list)
    extra = defaultdict(list)
    slot_of = {}  # kernel index -> slot (or extra) name
    bounds = [starts[i * per_layer] for i in range(num_layers)] + [starts[-1]]
    for i, (name, _, dur) in enumerate(kernels):
        if i < bounds[0] or i >= bounds[-1]:
            key = "embedding" if i < bounds[0] else "final LN + LM head + argmax"
            extra[key].append(dur)
            slot_of[i] = key
            continue
        layer = max(j for j in range(num_layers) if bounds[j] <= i)
        kind = kernel_kind(name)
        if kind == "linear":
            nth = sum(1 for j in range(bounds[layer], i) if kernel_kind(kernels[j][0]) == "linear")
            kind = LINEAR_SLOTS[nth] if nth < len(LINEAR_SLOTS) else "linear (more)"
        slots[(layer, kind)].append(dur)
        slot_of[i] = kind
    return slots, extra, slot_of


def profile_steps(step_fn, steps: int):
    """Kernel events [(name, start_us, dur_us)] of each step, in start order.

    Each step is a ``record_function`` range followed by a synchronize, so a kernel belongs to the last step
    that began (on the host) before the kernel started on the GPU.
    """
    from torch.profiler import ProfilerActivity, profile, record_function
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function("neox_rt_step"):
                step_fn()
            torch.cuda.synchronize()
    events = prof.events()
    step_starts = sorted(e.time_range.start for e in events if e.name == "neox_rt_step")
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end - e.time_range.start) for e in events
                      if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "neox_rt_step"
                      and not e.name.startswith(("Memcpy", "Memset"))), key=lambda k: k[1])
    out = [[] for _ in step_starts]
    for k in kernels:
        i = bisect.bisect_right(step_starts, k[1]) - 1
        if i >= 0:
            out[i].append(k)
    return [ks for ks in out if ks]


def summarize(step_kernels, num_layers: int, weight_bytes: dict, copy_bw: float):
    rows = defaultdict(list)  # slot -> per-step total us
    added = defaultdict(list)  # slot -> per-step wall added (see below)
    counts = defaultdict(list)
    extras = defaultdict(list)
    walls, busy = [], []
    for ks in step_kernels:
        slots, extra, slot_of = assign(ks, num_layers)
        if slots is None:
            continue
        wall = ks[-1][1] + ks[-1][2] - ks[0][1]
        # union of kernel intervals (kernels may overlap under PDL)
        covered, end = 0.0, -1e30
        for _, s, d in ks:
            covered += max(0.0, s + d - max(s, end))
            end = max(end, s + d)
        walls.append(wall)
        busy.append(covered)
        per_slot = defaultdict(float)
        per_count = defaultdict(int)
        for (layer, slot), durs in slots.items():
            per_slot[slot] += sum(durs)
            per_count[slot] += len(durs)
        for slot, t in per_slot.items():
            rows[slot].append(t)
            counts[slot].append(per_count[slot])
        # the wall each kernel adds: how far its end passes the latest end before it (kernels in start order); a
        # kernel that starts early under PDL and waits is charged only for what it runs past its predecessor
        adds = defaultdict(float)
        end = ks[0][1]
        for i, (_, s, d) in enumerate(ks):
            adds[slot_of.get(i, "other")] += max(0.0, s + d - end)
            end = max(end, s + d)
        for slot, t in adds.items():
            added[slot].append(t)
        for k, durs in extra.items():
            extras[k].append(sum(durs))
    if not walls:
        return None
    wall = statistics.median(walls)
    out = {"steps": len(walls), "wall_us_per_token": wall, "kernel_busy_us_per_token": statistics.median(busy),
           "gaps_us_per_token": wall - statistics.median(busy), "slots": {}}
    order = ["layernorm", "qkv + h->4h", "qkv", "rotary+kv write", "attention", "dense + 4h->h", "dense", "h->4h",
             "4h->h", "other", "linear (more)"]
    for slot in sorted(rows, key=lambda s: order.index(s) if s in order else 99):
        t = statistics.median(rows[slot])
        r = {"kernels_per_layer": statistics.median(counts[slot]) / num_layers, "us_per_layer": t / num_layers,
             "us_per_token": t, "share_of_wall": t / wall}
        if slot in weight_bytes:
            gbps = weight_bytes[slot] * num_layers / (t * 1e-6) / 1e9
            r["GBps"] = gbps
            r["pct_of_copy"] = 100 * gbps * 1e9 / copy_bw
        if added.get(slot):
            r["added_us_per_layer"] = statistics.median(added[slot]) / num_layers
        out["slots"][slot] = r
    for k, v in extras.items():
        out["slots"][k] = {"kernels_per_layer": None, "us_per_layer": None, "us_per_token": statistics.median(v),
                           "share_of_wall": statistics.median(v) / wall}
        if added.get(k):
            out["slots"][k]["added_us_per_token"] = statistics.median(added[k])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-neox-20b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--simulate-tp", type=int, default=None, metavar="N",
                   help="rank 0's shard of TP=N on this one GPU, collectives replaced by local stand-ins")
    p.add_argument("--simulate-allreduce-us", type=float, default=0.0, metavar="US",
                   help="with --simulate-tp: each all-reduce spins this long on the GPU (a stand-in for the "
                        "NVLink all-reduce's wait, e.g. 8; bench/common.py)")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="the layers' linears in this weight format (int4: groups of 128), as bench/latency.py")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    backend = ops.select_backend(None, "cuda")
    copy_bw = copy_bandwidth()
    tp = simulated_tp(args.simulate_tp, args.simulate_allreduce_us) if args.simulate_tp else None
    model = random_model(args.model, 256, tp)
    if args.quantize != "none":
        quantize_model(model, args.quantize, group_size=128)
    c, tpn = model.config, model.tp.size
    layer = model.gpt_neox.layers[0]
    linears = {"qkv": layer.attention.query_key_value, "dense": layer.attention.dense,
               "h->4h": layer.mlp.dense_h_to_4h, "4h->h": layer.mlp.dense_4h_to_h}
    weight_bytes = {k: (lin.weight.nbytes() if callable(lin.weight.nbytes) else lin.weight.nbytes)
                    for k, lin in linears.items()}  # a weight format's packed bytes and scales, or the tensor's
    weight_bytes["qkv + h->4h"] = weight_bytes["qkv"] + weight_bytes["h->4h"]
    weight_bytes["dense + 4h->h"] = weight_bytes["dense"] + weight_bytes["4h->h"]
    cache = KVCache.for_model(model, 1, PROMPT + 64)
    ids = torch.randint(2, c.vocab_size, (1, PROMPT), device="cuda")
    with torch.inference_mode():
        model(ids, torch.arange(PROMPT, device="cuda")[None], cache, last_index=torch.tensor([PROMPT - 1],
                                                                                            device="cuda"))
    runner = DecodeGraphRunner(model, buckets=(1,))
    tok = torch.tensor([5], device="cuda")
    pos = torch.tensor([PROMPT], device="cuda")

    def graph_step():
        assert runner.step(tok, pos, cache, greedy_vocab=c.vocab_size) is not None, runner.disabled_reason

    def eager_step():
        with torch.inference_mode():
            model(tok[:, None], pos[:, None], cache, decode=True)

    for _ in range(3):
        graph_step()
        eager_step()
    report = {"model": args.model, "quantize": args.quantize, "simulated_tp": args.simulate_tp,
              "simulated_allreduce_us": args.simulate_allreduce_us if args.simulate_tp else None,
              "gpu": torch.cuda.get_device_name(), "driver": gpu_driver(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
              "backend": backend, "backends": ops.active_backends(), "copy_bandwidth_Bps": copy_bw,
              "env": {k: v for k, v in os.environ.items() if k.startswith("NEOX_RT_") and k != "NEOX_RT_COMMIT"},
              "weight_bytes_per_layer": weight_bytes, "layers": c.num_hidden_layers}
    for mode, fn in (("graph", graph_step), ("eager", eager_step)):
        steps = profile_steps(fn, args.steps)
        report[mode] = summarize(steps, c.num_hidden_layers, weight_bytes, copy_bw)
        if steps:
            report[mode + "_kernel_names_layer0"] = sorted({n for n, _, _ in steps[len(steps) // 2]})[:40]
    if args.out:
        write_result(args.out, report)  # + the "environment" block (bench/common.py)
    sim = f" (rank 0 of simulated TP={tpn})" if args.simulate_tp else ""
    fmt = "" if args.quantize == "none" else f" {args.quantize}"
    print(f"\n{args.model}{fmt}{sim} decode b=1 on {report['gpu']}, copy {copy_bw / 1e12:.2f} TB/s, "
          f"commit {report['commit']}, env {report['env']}")
    for mode in ("graph", "eager"):
        r = report[mode]
        if not r:
            print(f"{mode}: kernels could not be assigned to layers")
            continue
        print(f"{mode}: wall {r['wall_us_per_token'] / 1e3:.2f} ms/token, kernels busy "
              f"{r['kernel_busy_us_per_token'] / 1e3:.2f} ms, gaps {r['gaps_us_per_token'] / 1e3:.2f} ms")
        print(f"  {'slot':28s} {'k/layer':>7s} {'us/layer':>9s} {'ms/token':>9s} {'share':>6s} {'% copy':>7s} "
              f"{'adds us/layer':>13s}")
        for slot, s in r["slots"].items():
            kpl = f"{s['kernels_per_layer']:.0f}" if s["kernels_per_layer"] is not None else "-"
            upl = f"{s['us_per_layer']:.1f}" if s["us_per_layer"] is not None else "-"
            pct = f"{s['pct_of_copy']:.0f}%" if "pct_of_copy" in s else ""
            add = (f"{s['added_us_per_layer']:.1f}" if "added_us_per_layer" in s
                   else f"{s['added_us_per_token']:.1f}/tok" if "added_us_per_token" in s else "")
            print(f"  {slot:28s} {kpl:>7s} {upl:>9s} {s['us_per_token'] / 1e3:9.3f} {100 * s['share_of_wall']:5.1f}% "
                  f"{pct:>7s} {add:>13s}")


if __name__ == "__main__":
    main()
