"""Batch-1 decode latency of GPT-NeoX-20B (random fp16 weights made on the GPU) at a tensor-parallel size.

    python bench/tp_latency.py --tp 1 --out $OUT/tp1.json
    torchrun --nproc-per-node 2 bench/tp_latency.py --tp 2 --out $OUT/tp2.json
    NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 2 bench/tp_latency.py --tp 2 --out $OUT/tp2_nop2p.json
    torchrun --nproc-per-node 4 bench/tp_latency.py --tp 4 --memory-cap-gib 15 --out $OUT/tp4_cap15.json
    python bench/tp_latency.py --device cpu --layers 2 --hidden 256 --heads 4 --vocab 1001 --new 8   # smoke

Per rank: build the sharded model with ``neox_rt.build_model`` on the GPU and fill it in place
(``normal_``; nothing goes through host memory), prefill a 32-token prompt, then decode 128 tokens greedily
the way ``Generator`` does (the CUDA-graph runner ``neox_rt.engine.graphs.DecodeGraphRunner`` when present, else
the eager forward; rank 0's token broadcast to all ranks). Each step is timed with CUDA events after a
warm-up run of the same length; the median and p90 per token are reported, with the wall-clock mean.

Also measured: the all-reduces of one token in isolation (layers + 1 all-reduces of [1, 1, hidden] fp16,
plus the token broadcast, eager and captured in one CUDA graph), the decode latency with the all-reduce
replaced by the identity (numerically wrong, timing only: the difference is the all-reduce's share), and
peak memory per GPU (torch.cuda.max_memory_allocated) with a 2048-token KV cache allocated and a
full-context prefill run, next to the estimate of bench/tp_memory.py.
JSON (rank 0) under --out or $OUT; a short table is printed last.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
from common import git_commit, gpu_driver, simulated_tp, write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

# the tree this script belongs to first (a baseline copy under .baseline/ must run its own neox_rt, not the
# installed one: the tpsim stages of session 7 timed the installed tree twice before this line existed)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_rt.engine.kv_cache import KVCache  # noqa: E402
import neox_rt  # noqa: E402
from neox_rt import ops  # noqa: E402
from neox_rt.model.config import NeoXConfig  # noqa: E402
from neox_rt.model.build import parse_dtype  # noqa: E402
from neox_rt.parallel import init_from_env  # noqa: E402
from neox_rt.quant.apply import StageQuantizer, empty_model, memory_report, streaming_units  # noqa: E402

MIB = 2 ** 20
START = time.perf_counter()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--layers", type=int, default=44)
    p.add_argument("--hidden", type=int, default=6144)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--vocab", type=int, default=50432)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="decoded tokens timed")
    p.add_argument("--memory-cache", type=int, default=2048, help="KV cache tokens for the memory measurement")
    p.add_argument("--no-graphs", action="store_true", help="eager decode even if neox_rt.graphs exists")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap each process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 15 for a "
                        "16 GB T4's usable share; the run fails with an out-of-memory error if the model does not fit")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantized linears (int4: groups of 128), built layer by layer: each layer is "
                        "allocated, filled at random and quantized before the next, so the float model never exists "
                        "(what a capped run needs: 20B int8 at TP=2 is ~10 GiB a rank, fp16 would be 19)")
    p.add_argument("--skip-no-allreduce", action="store_true")
    p.add_argument("--simulate-tp", type=int, default=None, metavar="N",
                   help="one process: rank 0's shard of TP=N with the collectives replaced by local stand-ins "
                        "(timing of the per-rank compute without communication; bench/common.py)")
    p.add_argument("--simulate-allreduce-us", type=float, default=0.0, metavar="US",
                   help="with --simulate-tp: each all-reduce spins this long on the GPU (a stand-in for the "
                        "NVLink all-reduce's wait, e.g. 8; bench/common.py)")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/tp<N>[_nop2p].json when OUT is set)")
    return p.parse_args(argv)


class Timer:
    """CUDA events on a GPU, perf_counter on CPU; elapsed in ms."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def fill_random(model, seed: int, prefix: str = "") -> None:
    """Weights ~ N(0, 0.02), LayerNorms near identity, in place on the model's device (or on a unit of the model's,
    whose parameter names start with ``prefix``)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters(prefix=prefix):
            if "layernorm" in name or "layer_norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.05, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)


def build_quantized(config, dtype, device, tp, fmt: str, seed: int):
    """The model with ``fmt`` linears, unit by unit: each unit (embedding, layer, final LayerNorm, LM head) is
    allocated on ``device``, filled at random and its linears quantized before the next unit exists."""
    model = empty_model(config, dtype, tp)
    quantize = StageQuantizer(fmt, 128)
    for i, (prefix, unit) in enumerate(streaming_units(model)):
        unit.to_empty(device=device)
        fill_random(unit, seed + i, prefix)
        quantize(model, [f"{prefix}.{n}" for n, _ in unit.named_parameters()])
    return model


def make_stepper(model, use_graphs: bool):
    """step(tok [1], pos [1]) -> next greedy tok [1] (broadcast from rank 0), as Generator decodes."""
    vocab = model.config.vocab_size
    runner = None
    if use_graphs:
        try:
            from neox_rt.engine.graphs import DecodeGraphRunner
            runner = DecodeGraphRunner(model, 0)
        except ImportError:
            runner = None

    def step(tok, pos, cache):
        res = runner.step(tok, pos, cache, vocab) if runner is not None else None
        if res is None:  # eager
            res = model(tok[:, None], pos[:, None], cache, decode=True)[:, 0], None  # [1, V]
        logits, greedy = res
        nxt = greedy if greedy is not None else logits.float()[:, :vocab].argmax(-1)  # [1]
        return model.tp.broadcast(nxt.clone())

    def path():
        if runner is None:
            return "eager"
        return "eager (graph capture failed: %s)" % runner.disabled_reason if runner.disabled_reason else "cuda-graph"
    return step, path


def decode_run(model, cache, step, timer, prompt_ids, new: int):
    """Prefill, then ``new`` decode steps; per-step ms, wall ms per token, the generated ids."""
    device = prompt_ids.device
    cache.reset()
    n = prompt_ids.shape[1]
    positions = torch.arange(n, device=device)[None]
    logits = model(prompt_ids, positions, cache, last_index=torch.tensor([n - 1], device=device))
    tok = model.tp.broadcast(logits.float().argmax(-1))
    pos = torch.tensor([n], device=device)
    marks, out = [], []
    timer.sync()
    t0 = time.perf_counter()
    for _ in range(new):
        a = timer.mark()
        tok = step(tok, pos, cache)
        b = timer.mark()
        pos += 1
        marks.append((a, b))
        out.append(tok)
    timer.sync()
    wall = (time.perf_counter() - t0) * 1e3 / new
    return [timer.ms(a, b) for a, b in marks], wall, torch.cat(out).tolist()


def allreduce_alone(tp, hidden: int, count: int, dtype, device, timer, reps: int = 50) -> dict:
    """ms of ``count`` all-reduces of [1, 1, hidden] + one token broadcast: eager, and as one CUDA graph."""
    if tp.size == 1:
        return dict(eager_ms=0.0, graph_ms=0.0, count=count)
    x = torch.randn(1, 1, hidden, dtype=dtype, device=device)
    tok = torch.zeros(1, dtype=torch.long, device=device)

    def token():
        for _ in range(count):
            tp.all_reduce(x)
        tp.broadcast(tok)

    for _ in range(5):
        token()
    timer.sync()
    a = timer.mark()
    for _ in range(reps):
        token()
    b = timer.mark()
    timer.sync()
    res = dict(eager_ms=timer.ms(a, b) / reps, count=count)
    if device.type == "cuda":
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                token()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                token()
            for _ in range(5):
                g.replay()
            timer.sync()
            times = []
            for _ in range(reps):
                a = timer.mark()
                g.replay()
                b = timer.mark()
                times.append((a, b))
            timer.sync()
            res["graph_ms"] = statistics.median(timer.ms(a, b) for a, b in times)
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
            res["graph_error"] = f"{type(e).__name__}: {e}"
    return res


def environment(device) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])
    env["commit"] = git_commit()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            env["nccl"] = None
        env["driver"] = gpu_driver()
    env["nccl_p2p_disable"] = os.environ.get("NCCL_P2P_DISABLE", "0")
    env["settings"] = {k: v for k, v in os.environ.items() if k.startswith("NEOX_RT_") and k != "NEOX_RT_COMMIT"}
    return env


def gather_float(tp, value: float, device) -> list[float]:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    return tp.all_gather_last_dim(t).tolist()


def phase(tp, what: str) -> None:
    """Rank 0 logs the seconds since start at each phase to stderr (where a run's time goes, e.g. its exit)."""
    if tp.is_main:
        print(f"tp_latency: {time.perf_counter() - START:7.1f} s  {what}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    tp = (simulated_tp(args.simulate_tp, args.simulate_allreduce_us) if args.simulate_tp
          else init_from_env(args.tp, device.type))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        if args.memory_cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
    dtype = parse_dtype(args.dtype)
    config = NeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, rotary_pct=0.25, hidden_act="gelu_fast",
                        max_position_embeddings=2048)
    backend = ops.select_backend(None, device)
    timer = Timer(device)
    if args.quantize:
        model = build_quantized(config, dtype, device, tp, args.quantize, seed=1234 + tp.rank)
    else:
        model = neox_rt.build_model(config, dtype, device, tp)
        fill_random(model, seed=1234 + tp.rank)
    phase(tp, "model built and filled")
    weight_bytes = memory_report(model).total_bytes  # formats' buffers and float parameters
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(2, args.vocab, (1, args.prompt), generator=g).to(device)

    # -- decode latency: cache as Generator allocates it (prompt + new tokens)
    cache = KVCache.for_model(model, 1, args.prompt + args.new)
    step, path = make_stepper(model, not args.no_graphs and device.type == "cuda")
    decode_run(model, cache, step, timer, prompt_ids, args.new)  # warm-up (captures the graph)
    times, wall, ids = decode_run(model, cache, step, timer, prompt_ids, args.new)
    phase(tp, "decode timed")
    times.sort()
    p50, p90 = statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]

    # -- the all-reduce share: in isolation, and by skipping it in the model (timing only)
    alone = (allreduce_alone(tp, args.hidden, args.layers + 1, dtype, device, timer) if not args.simulate_tp
             else dict(eager_ms=0.0, graph_ms=0.0, count=0))
    no_ar = None
    if tp.size > 1 and not args.skip_no_allreduce and not args.simulate_tp:
        tp.all_reduce = lambda x: x  # instance attribute shadows the method: every layer skips it
        p2p, tp.p2p = tp.p2p, None  # and no layer leaves its all-reduce to the next LayerNorm (model.layers.PendingSum)
        try:
            skip_step, _ = make_stepper(model, not args.no_graphs and device.type == "cuda")
            decode_run(model, cache, skip_step, timer, prompt_ids, args.new)
            no_ar = statistics.median(decode_run(model, cache, skip_step, timer, prompt_ids, args.new)[0])
            del skip_step  # its graphs and their memory pool
        finally:
            del tp.all_reduce
            tp.p2p = p2p
    decode_path = path()
    del step, path, cache  # the graph runner (closures) and its memory pool, before measuring memory
    gc.collect()

    # -- memory: a 2048-token cache and a full-context prefill
    peak = None
    if device.type == "cuda" and not args.skip_memory:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        big = KVCache.for_model(model, 1, args.memory_cache)
        n = min(args.memory_cache, config.max_position_embeddings)
        long_ids = torch.randint(2, args.vocab, (1, n), generator=g).to(device)
        model(long_ids, torch.arange(n, device=device)[None], big, last_index=torch.tensor([n - 1], device=device))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del big
    phase(tp, "all-reduce share and memory measured")
    peaks = gather_float(tp, float(peak or 0), device)

    estimate = None
    try:
        from tp_memory import estimate as mem_estimate
        estimate = mem_estimate(config, tp.size, args.memory_cache)
    except Exception as e:  # noqa: BLE001
        estimate = dict(error=str(e))

    result = dict(
        bench="tp_latency", model=f"gpt-neox L{args.layers} h{args.hidden} nh{args.heads} V{args.vocab}",
        dtype=args.dtype, quantize=args.quantize, memory_report=str(memory_report(model)), tp=tp.size,
        simulated=bool(args.simulate_tp),
        simulated_allreduce_us=args.simulate_allreduce_us if args.simulate_tp else None, batch=1,
        prompt_tokens=args.prompt, new_tokens=args.new,
        backend=backend, ops=ops.active_backends(), decode_path=decode_path,
        per_token_ms=dict(p50=p50, p90=p90, min=times[0], wall_mean=wall),
        weight_bytes_per_rank=weight_bytes,
        weight_stream_gbs=weight_bytes / (p50 * 1e-3) / 1e9,
        allreduce_per_token_ms=alone,
        allreduce_impl=("p2p in graphs, nccl eager" if tp.p2p.mode == 1 else "p2p") if tp.p2p is not None
        else "nccl" + (f" ({tp.p2p_off_reason})" if tp.p2p_off_reason else ""),
        decode_no_allreduce_p50_ms=no_ar,
        allreduce_share_ms=(p50 - no_ar) if no_ar is not None else None,
        peak_memory_bytes_per_rank=peaks, memory_cache_tokens=args.memory_cache, memory_estimate=estimate,
        memory_cap_gib=args.memory_cap_gib,
        tokens_checksum=sum(ids) % 1000003, **environment(device))
    if tp.is_main:
        suffix = "_nop2p" if os.environ.get("NCCL_P2P_DISABLE", "0") == "1" else ""
        suffix += "_sim" if args.simulate_tp else ""
        out = args.out or (os.path.join(os.environ["OUT"], f"tp{tp.size}{suffix}.json")
                           if os.environ.get("OUT") else None)
        if out:
            write_result(out, result)  # + the "environment" block (bench/common.py)
        ar = alone.get("graph_ms", alone["eager_ms"])
        print(f"device {result.get('gpu', 'cpu')}  torch {torch.__version__}  backend {backend}  "
              f"decode {result['decode_path']}  NCCL_P2P_DISABLE={result['nccl_p2p_disable']}  "
              f"all-reduce {result['allreduce_impl']}")
        print(f"{'tp':>3} {'p50 ms':>8} {'p90 ms':>8} {'wall ms':>8} {'GB/s/rank':>10} {'AR ms/tok':>10} "
              f"{'no-AR p50':>10} {'peak GiB/rank':>14}")
        print(f"{tp.size:>3} {p50:>8.3f} {p90:>8.3f} {wall:>8.3f} {result['weight_stream_gbs']:>10.0f} "
              f"{ar:>10.3f} {no_ar if no_ar is not None else float('nan'):>10.3f} "
              f"{max(peaks) / 2**30:>14.2f}")
    phase(tp, "results written")
    if tp.size > 1 and not args.simulate_tp:
        torch.distributed.destroy_process_group()
        phase(tp, "process group destroyed")
    return result


if __name__ == "__main__":
    main()
