"""Latency regression suite: the seed article's table (time for N generated tokens, batch 1) and more.

One command, random fp16 weights generated on the GPU (no download, no host copy), for the pythia-1.4b,
pythia-6.9b and gpt-neox-20b shapes:

    python bench/latency.py                  # all three shapes (~3-4 min on one H100)
    python bench/latency.py --quick          # pythia-1.4b and gpt-neox-20b only
    python bench/latency.py --quick --check  # ... and fail (exit 1) on a >10% regression vs the baseline

Per model (batch 1, 32-token prompt unless said otherwise):
  - time for 100/200/512/1024 generated tokens: ONE run of max(--tokens) tokens through
    neox_rt's Generator (CUDA-graph decode, host checks every 8 steps as in normal use); a CUDA event is
    recorded after every decode step, so time for N tokens = start of generate -> step N-1, and the
    per-token p50/p90 are the event-to-event intervals (each a full token: sampling, host check, replay).
  - per-token ms at 128 tokens (the targets' setting), the flatness ratio (steps 974-1023 vs 50-99),
  - the eager path (NEOX_RT_CUDA_GRAPHS=0 equivalent) at 128 tokens, to show what graphs buy,
  - time to first token for 32-, 512- and 2048-token prompts (prefill + first token, CUDA events, median
    of 3). The benchmark config raises max_position_embeddings to 2048 + max(--tokens) so that a
    2048-token prompt fits (the rotary table grows; the weights do not),
  - tokens/s, achieved bandwidth = weight bytes x tokens/s and its % of the copy bandwidth measured in
    the same run (torch copy of 1 GiB, (read + write) bytes / time), peak GPU memory,
  - batched decode throughput at --batch sizes (128 new tokens, graphs),
  - transformers' GPTNeoXForCausalLM on the SAME weights (its parameters are our tensors, assigned by
    reference: no extra memory): eager (sdpa attention) and static cache + torch.compile (transformers'
    own auto-compile, mode="reduce-overhead"; compile time reported apart). HF per-token time =
    (t(128 tokens) - t(1 token)) / 127 of wall-clock generate() calls.
Weight bytes count every parameter (as the floors in bench/NOTES.md do; embed_in is gathered, not
streamed, so the true floor is ~1-2% lower).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time

import torch
from common import environment, git_commit, gpu_driver, run, write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neox_rt.engine.kv_cache import KVCache  # noqa: E402
import neox_rt  # noqa: E402
from neox_rt import ops  # noqa: E402
from neox_rt.model.config import NeoXConfig  # noqa: E402
from neox_rt.quant.apply import memory_report, quantize_model  # noqa: E402
from neox_rt.engine.generation import Generator  # noqa: E402

SHAPES = {  # NEOX_FACTS.md sizes
    "pythia-1.4b": dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                        rotary_pct=0.25, hidden_act="gelu"),
    "pythia-6.9b": dict(vocab_size=50432, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        rotary_pct=0.25, hidden_act="gelu"),
    "gpt-neox-20b": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                         rotary_pct=0.25, hidden_act="gelu_fast"),
}
TARGETS_MS = {"pythia-1.4b": (0.94, 1.3), "gpt-neox-20b": (13.6, 14.5)}  # (floor, target) H100, 128 tokens
# --quantize rows: (the layers' format, the LM head's: False float, True the layers', or a format of its own)
QUANT_ROWS = {"none": None, "int8": ("int8", False), "int4": ("int4", False), "int8-head": ("int8", True),
              "int4-head": ("int4", True), "int4-head8": ("int4", "int8")}
QUANT_TARGETS_MS = {"gpt-neox-20b int8": 7.5, "gpt-neox-20b int4": 4.5, "pythia-1.4b int4": 0.7}  # issue #24, H100
PROMPT = 32
TTFT_PROMPTS = (32, 512, 2048)
HF_TOKENS = 128
REGRESSION = 0.10
CHECKED = [  # (key path, higher is better)
    ("ours.ms_per_token_128", False), ("ours.p50_ms", False), ("ttft_ms.512", False),
    ("batched.8.tokens_per_s", True),
]


class IdsTokenizer:
    """Ids only; EOS is no vocabulary id, so every run goes to the token cap."""
    eos_id = -1
    vocab_size = 1 << 30

    def decode(self, ids):
        return ""


def sync():
    torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device copy bandwidth in bytes/s, counting read + write."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    sync()
    bw = 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)
    del a, b
    return bw


def random_model(name: str, max_tokens: int, tp=None):
    """fp16 model of the named shape with random weights generated on the GPU (``tp``: one rank's shard)."""
    cfg = NeoXConfig(max_position_embeddings=max(TTFT_PROMPTS) + max_tokens, **SHAPES[name])
    model = neox_rt.build_model(cfg, "float16", "cuda", *([tp] if tp is not None else []))
    torch.manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layernorm" in pname or "layer_norm" in pname:
                p.normal_(1.0 if pname.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    return model


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def timed_generate(gen: Generator, prompts, new_tokens: int):
    """Run generate with a CUDA event after every decode step. -> (event times in ms from start, results)."""
    events = []
    inner = gen._decode

    def decode(*a, **k):
        out = inner(*a, **k)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append(ev)
        return out

    gen._decode = decode
    try:
        start = torch.cuda.Event(enable_timing=True)
        sync()
        start.record()
        res = gen.generate(prompts, max_new_tokens=new_tokens)
        sync()
    finally:
        del gen._decode
    return [start.elapsed_time(e) for e in events], res


def prompts_of(b: int, n: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for _ in range(b)]


def ttft(model, n: int, reps: int = 3) -> float:
    """Median ms of prefill(n tokens) + greedy first token, batch 1, from an empty cache."""
    cache = KVCache.for_model(model, 1, n + 1)
    ids = torch.randint(2, model.config.vocab_size, (1, n), device="cuda")
    pos = torch.arange(n, device="cuda")[None]
    last = torch.tensor([n - 1], device="cuda")
    times = []
    for i in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(ids, pos, cache, last_index=last).argmax(-1)
        end.record()
        sync()
        if i:  # the first run compiles/autotunes kernels
            times.append(start.elapsed_time(end))
    del cache
    return statistics.median(times)


def bench_ours(model, args, res):
    vocab = model.config.vocab_size
    gen = Generator(model, IdsTokenizer())
    n = max(args.tokens)
    gen._get_cache(1, PROMPT + n)  # capture the graph against the cache the measured run reuses
    prompt = prompts_of(1, PROMPT, vocab)
    gen.generate(prompt, max_new_tokens=16)  # warm-up: kernels, graph capture
    times, _ = timed_generate(gen, prompt, n)
    steps = [b - a for a, b in zip(times, times[1:])]
    res["ours"] = {
        "graphs": gen.graphs is not None and gen.graphs.disabled_reason is None,
        "graph_disabled_reason": gen.graphs.disabled_reason if gen.graphs is not None else "NEOX_RT_CUDA_GRAPHS=0",
        "time_for_tokens_s": {str(t): times[t - 2] / 1e3 for t in args.tokens if t >= 2},
        "p50_ms": percentile(steps, 0.5), "p90_ms": percentile(steps, 0.9),
        "ms_per_token_128": statistics.mean(steps[:127]),
        "flatness_late_over_early": (statistics.mean(steps[-50:]) / statistics.mean(steps[50:100])
                                     if len(steps) >= 200 else None),
    }
    o = res["ours"]
    o["tokens_per_s"] = 1e3 / o["p50_ms"]
    o["bandwidth_GBps"] = res["weight_bytes"] * o["tokens_per_s"] / 1e9
    o["bandwidth_pct_of_copy"] = 100 * o["bandwidth_GBps"] * 1e9 / res["copy_bandwidth_Bps"]
    runner = gen.graphs
    if not args.skip_eager:  # eager decode (no graphs) at 128 tokens
        gen.graphs = None
        times, _ = timed_generate(gen, prompt, HF_TOKENS)
        gen.graphs = runner
        e = [b - a for a, b in zip(times, times[1:])]
        res["ours_eager"] = {"p50_ms": percentile(e, 0.5), "p90_ms": percentile(e, 0.9)}
    # batched decode throughput (graphs)
    res["batched"] = {}
    for b in args.batch:
        if b == 1:
            continue
        ps = prompts_of(b, PROMPT, vocab, seed=b)
        gen._get_cache(gen.graphs.cache_rows(b) if gen.graphs else b, PROMPT + HF_TOKENS)
        gen.generate(ps, max_new_tokens=4)  # warm-up: capture this bucket against the measured cache
        times, _ = timed_generate(gen, ps, HF_TOKENS)
        s = [y - x for x, y in zip(times, times[1:])]
        res["batched"][str(b)] = {"p50_ms": percentile(s, 0.5), "tokens_per_s": b * 1e3 / percentile(s, 0.5)}
    gen.cache = None
    del gen, runner
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_ttft:
        res["ttft_ms"] = {str(n): ttft(model, n) for n in TTFT_PROMPTS
                          if n <= model.config.max_position_embeddings - 1}


T4_BANDWIDTH_BPS = 0.8 * 320e9
"""A T4's achievable read bandwidth: 80% of its 320 GB/s peak (the share an H100 decode reaches of its own peak
copy bandwidth is higher; 80% is what well-tuned GEMVs reach on GDDR6), for the projected T4 time per token."""


def memory_cap_run(model, cap_gib: float, cache_tokens: int = 2048) -> dict:
    """Decode with a ``cache_tokens`` cache under a cap on this process's GPU memory (``torch.cuda.
    set_per_process_memory_fraction``, a 16 GB card's share), after the model is built: does it run, and its peak."""
    total = torch.cuda.get_device_properties(0).total_memory
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = {"cap_gib": cap_gib, "cache_tokens": cache_tokens, "weights_GB": torch.cuda.memory_allocated() / 1e9}
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    try:
        gen = Generator(model, IdsTokenizer())
        gen._get_cache(1, cache_tokens)
        prompt = prompts_of(1, cache_tokens - 64, model.config.vocab_size, seed=5)
        t0 = time.time()
        gen.generate(prompt, max_new_tokens=64)
        sync()
        out.update(ok=True, seconds=time.time() - t0)
    except Exception as e:  # noqa: BLE001 - an out-of-memory is the answer, not a crash
        out.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        gen = None
        gc.collect()
        torch.cuda.empty_cache()
        out["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def hf_model_sharing(model):
    """transformers GPTNeoXForCausalLM whose parameters ARE our tensors (no copy, no extra memory)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    cfg = GPTNeoXConfig(**model.config.to_hf_dict())
    cfg.dtype = torch.float16
    with torch.device("meta"):
        hf = GPTNeoXForCausalLM(cfg)
    ours = dict(model.named_parameters())
    if "embed_out.weight" in ours:
        ours["lm_head.weight"] = ours["embed_out.weight"]  # transformers 5 renamed the LM head
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        mod_name, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(mod_name), attr, ours[name])
    hf.gpt_neox.rotary_emb = GPTNeoXRotaryEmbedding(cfg).to("cuda")
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.device.type == "meta"]
    assert not left, f"HF tensors left on meta: {left[:4]}"
    return hf.eval()


def hf_generate_time(hf, ids, n, **kw) -> float:
    sync()
    t = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    sync()
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - t


def bench_hf(model, name, args, res):
    try:
        hf = hf_model_sharing(model)
    except Exception as e:  # noqa: BLE001 - report, keep the rest of the run
        res["hf_error"] = f"{type(e).__name__}: {e}"
        return
    ids = torch.tensor(prompts_of(1, PROMPT, model.config.vocab_size), device="cuda")
    with torch.no_grad():
        hf_generate_time(hf, ids, 8)
        t1 = min(hf_generate_time(hf, ids, 1) for _ in range(2))
        tn = hf_generate_time(hf, ids, HF_TOKENS)
    res["hf_eager"] = {"ms_per_token": (tn - t1) / (HF_TOKENS - 1) * 1e3, "ttft_ms": t1 * 1e3}
    if name in args.hf_compile:
        try:
            from transformers import CompileConfig
            kw = dict(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
            with torch.no_grad():  # as generate() itself; compiled graphs and inference tensors mix badly
                t0 = time.perf_counter()
                hf_generate_time(hf, ids, HF_TOKENS, **kw)  # compiles (decode step only) and records graphs
                compile_s = time.perf_counter() - t0
                hf_generate_time(hf, ids, HF_TOKENS, **kw)
                t1 = min(hf_generate_time(hf, ids, 1, **kw) for _ in range(2))
                tn = hf_generate_time(hf, ids, HF_TOKENS, **kw)
            res["hf_compile"] = {"ms_per_token": (tn - t1) / (HF_TOKENS - 1) * 1e3, "compile_s": compile_s}
        except Exception as e:  # noqa: BLE001
            res["hf_compile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    del hf
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def env_info() -> dict:
    return {"gpu": torch.cuda.get_device_name(), "driver": gpu_driver(),
            "cuda": torch.version.cuda, "torch": torch.__version__, "commit": git_commit(),
            "dirty": bool(run(["git", "status", "--porcelain", "--", "neox_rt", "kernels", "csrc"])),
            "backends": ops.active_backends(),
            "settings": {k: v for k, v in os.environ.items() if k.startswith("NEOX_RT_") and k != "NEOX_RT_COMMIT"}}


def slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def markdown(report) -> str:
    toks = report["tokens"]
    batches = sorted({int(b) for r in report["models"].values() for b in r.get("batched", {})})
    bcol = " / ".join(f"b{b}" for b in batches) or "batched"
    lines = [f"GPU {report['env']['gpu']}, torch {report['env']['torch']}, copy bandwidth "
             f"{report['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, backends {report['env']['backends']}", "",
             "| model | " + " | ".join(f"{t} tok (s)" for t in toks) + " | p50 / p90 ms | ms/tok @128 | floor / target |"
             " eager ms | tok/s | GB/s (% copy) | flat 1024/100 | TTFT 32/512/2048 ms | " + bcol + " tok/s |"
             " HF eager ms | HF compile ms (compile s) | peak GB |",
             "|" + "---|" * (len(toks) + 12)]
    for name, r in report["models"].items():
        o = r.get("ours", {})
        if not o:
            lines.append(f"| {name} | error: {r.get('error')} |")
            continue
        tt = " | ".join(f"{o['time_for_tokens_s'].get(str(t), float('nan')):.2f}" for t in toks)
        fl, tg = TARGETS_MS.get(name, (None, None))
        ft = f"{fl} / {tg}" if fl else "-"
        flat = f"{o['flatness_late_over_early']:.2f}" if o.get("flatness_late_over_early") else "-"
        ttft = "/".join(f"{r['ttft_ms'][k]:.0f}" for k in map(str, TTFT_PROMPTS) if k in r.get("ttft_ms", {}))
        bt = " / ".join(f"{v['tokens_per_s']:.0f}" for v in r.get("batched", {}).values()) or "-"
        he = f"{r['hf_eager']['ms_per_token']:.2f}" if "hf_eager" in r else "-"
        hc = r.get("hf_compile", {})
        hcs = (f"{hc['ms_per_token']:.2f} ({hc['compile_s']:.0f})" if "ms_per_token" in hc
               else ("error" if hc else "-"))
        lines.append(f"| {name} | {tt} | {o['p50_ms']:.2f} / {o['p90_ms']:.2f} | {o['ms_per_token_128']:.2f} | {ft} | "
                     f"{r['ours_eager']['p50_ms'] if 'ours_eager' in r else float('nan'):.2f} | {o['tokens_per_s']:.0f} | {o['bandwidth_GBps']:.0f} "
                     f"({o['bandwidth_pct_of_copy']:.0f}%) | {flat} | {ttft} | {bt} | {he} | {hcs} | "
                     f"{r['peak_memory_GB']:.1f} |")
    quant = [(k, r) for k, r in report["models"].items() if r.get("ours") and r.get("format") not in (None, "fp16")]
    if quant:
        lines += ["", "| row | weights GB | ms/tok @128 | floor ms | target ms | % of floor BW | b8 / b32 tok/s (fp16) |"
                  " T4 projected ms/tok | memory cap |", "|---|---|---|---|---|---|---|---|---|"]
        for k, r in quant:
            o = r["ours"]
            fp = report["models"].get(r["model"], {}).get("batched", {})
            bt = " / ".join(f"{v['tokens_per_s']:.0f} ({fp.get(b, {}).get('tokens_per_s', float('nan')):.0f})"
                            for b, v in r.get("batched", {}).items()) or "-"
            cap = r.get("memory_cap")
            capt = "-" if not cap else (f"ok, peak {cap['peak_GiB']:.1f} GiB" if cap.get("ok") else "failed")
            lines.append(f"| {k} | {r['weight_bytes'] / 1e9:.2f} | {o['ms_per_token_128']:.2f} | {r['floor_ms']:.2f} | "
                         f"{QUANT_TARGETS_MS.get(re.sub(r'-head8?$', '', k), '-')} | "
                         f"{100 * r['floor_ms'] / o['ms_per_token_128']:.0f}% | {bt} | "
                         f"{r['t4_projected_ms_per_token']:.1f} | {capt} |")
    lines.append("")
    lines.append("time for N tokens and p50/p90: one graph-decode run with a CUDA event per step (host checks "
                 "every 8 steps); HF: wall-clock generate(), (t128 - t1) / 127.")
    return "\n".join(lines)


def get_path(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def check(report, baseline) -> list[str]:
    """Regressions of more than REGRESSION against the baseline (same GPU model), as messages."""
    bad = []
    for name, r in report["models"].items():
        base = baseline.get("models", {}).get(name)
        if not base:
            continue
        for key, higher_better in CHECKED:
            new, old = get_path(r, key), get_path(base, key)
            if new is None or old is None:
                continue
            worse = new < old * (1 - REGRESSION) if higher_better else new > old * (1 + REGRESSION)
            if worse:
                bad.append(f"{name} {key}: {new:.4g} vs baseline {old:.4g}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--tokens", default="100,200,512,1024", help="generated-token counts for the table")
    p.add_argument("--batch", default="1,8,32", help="batch sizes for decode throughput")
    p.add_argument("--skip-hf", action="store_true", help="do not time transformers")
    p.add_argument("--hf-compile", default="pythia-1.4b,gpt-neox-20b",
                   help="models for which HF static cache + torch.compile is timed ('' for none)")
    p.add_argument("--quick", action="store_true", help="pythia-1.4b and gpt-neox-20b only")
    p.add_argument("--quantize", default="none", help="comma list of weight formats to time, each its own row beside "
                   "fp16: none, int8, int4 (group 128; the random fp16 weights quantized on the GPU), int8-head, "
                   "int4-head (the LM head quantized too), int4-head8 (int4 layers, the LM head in int8)")
    p.add_argument("--memory-cap-gib", type=float, default=None, help="for the quantized rows: also decode with a "
                   "2048-token cache under this cap on the process's GPU memory")
    p.add_argument("--skip-eager", action="store_true", help="do not time the eager (no CUDA graphs) decode")
    p.add_argument("--skip-ttft", action="store_true", help="do not time the prefills (time to first token)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/latency-<gpu>-<time>.json)")
    p.add_argument("--check", action="store_true", help="exit 1 on a >10%% regression vs bench/baselines/<gpu>.json")
    p.add_argument("--write-baseline", action="store_true", help="save this run as the GPU's baseline")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/latency.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.models = ["pythia-1.4b", "gpt-neox-20b"] if args.quick else [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in SHAPES:
            p.error(f"unknown model {m!r}; choose from {', '.join(SHAPES)}")
    args.tokens = sorted(int(t) for t in args.tokens.split(","))
    args.batch = [int(b) for b in args.batch.split(",")]
    args.hf_compile = [m for m in args.hf_compile.split(",") if m]
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    for q in args.quantize:
        if q not in QUANT_ROWS:
            p.error(f"unknown --quantize format {q!r}; choose from {', '.join(QUANT_ROWS)}")
    t_start = time.time()
    ops.select_backend(None, "cuda")
    report = {"env": env_info(), "tokens": args.tokens, "prompt_tokens": PROMPT, "copy_bandwidth_Bps": copy_bandwidth(),
              "models": {}}
    rows = [(name, fmt) for name in args.models for fmt in args.quantize]
    for name, fmt in rows:
        t0 = time.time()
        torch.cuda.empty_cache()
        key = name if fmt == "none" else f"{name} {fmt}"
        res = report["models"][key] = {"model": name, "format": "fp16" if fmt == "none" else fmt}
        model = None
        try:
            model = random_model(name, max(args.tokens))
            if fmt != "none":
                t_q = time.time()
                layers_fmt, head = QUANT_ROWS[fmt]
                quantize_model(model, layers_fmt, group_size=128, include_lm_head=head)
                res["quantize_s"] = time.time() - t_q
                gc.collect()
                torch.cuda.empty_cache()
            mem = memory_report(model)
            res["weight_bytes"] = mem.total_bytes
            res["memory_report"] = str(mem)
            res["linear_backend"] = ops.OPS["linear"].served_by(
                torch.zeros(1, 1, model.config.hidden_size, dtype=torch.float16, device="cuda"),
                model.gpt_neox.layers[0].attention.query_key_value.weight)
            res["copy_bandwidth_Bps"] = report["copy_bandwidth_Bps"]
            res["floor_ms"] = res["weight_bytes"] / report["copy_bandwidth_Bps"] * 1e3
            res["t4_projected_ms_per_token"] = res["weight_bytes"] / T4_BANDWIDTH_BPS * 1e3
            torch.cuda.reset_peak_memory_stats()
            bench_ours(model, args, res)
            res["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
            if fmt != "none" and args.memory_cap_gib:
                res["memory_cap"] = memory_cap_run(model, args.memory_cap_gib)
            if not args.skip_hf and fmt == "none":
                bench_hf(model, name, args, res)
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others
            res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"{key}: {res['error']}", file=sys.stderr)
        res.setdefault("peak_memory_GB", torch.cuda.max_memory_allocated() / 1e9)
        res["seconds"] = time.time() - t0
        print(f"{key}: done in {res['seconds']:.0f}s", file=sys.stderr, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    report["seconds"] = time.time() - t_start
    gpu = slug(report["env"]["gpu"])
    out = args.out or os.path.join(REPO, "bench", "results", f"latency-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    table = markdown(report)
    run_env = environment()  # one "environment" block (bench/common.py) for every copy of this run
    write_result(out, report, env=run_env)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    if os.environ.get("OUT") and not os.path.abspath(out).startswith(os.path.abspath(os.environ["OUT"])):
        write_result(os.path.join(os.environ["OUT"], "latency.json"), report, env=run_env)
    rc = 0
    base_path = os.path.join(REPO, "bench", "baselines", f"{gpu}.json")
    if args.write_baseline:
        write_result(base_path, report, env=run_env)
        print(f"baseline written: {base_path}")
    if args.check:
        if not os.path.exists(base_path):
            print(f"no baseline for {report['env']['gpu']} ({base_path}); nothing to compare")
        else:
            with open(base_path) as f:
                bad = check(report, json.load(f))
            print("regressions (>10%):\n  " + "\n  ".join(bad) if bad else "no regression against the baseline")
            rc = 1 if bad else 0
    print(f"results: {out} ({report['seconds']:.0f}s)")
    print(table)
    return rc


if __name__ == "__main__":
    sys.exit(main())
