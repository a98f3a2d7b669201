"""The HTTP layer's cost per token without a GPU (#23): what ``python -m neox_rt.serve`` adds to a streamed token
beyond the engine's own step, on this machine's host.

The embedded default model's ``LLMEngine`` runs with its forward replaced by a device step of ``--step-ms`` that
starts at the runner's ``launch`` and that ``collect`` waits for with the GIL released (``bench/stub_engine.py``: what
a GPU step is to the host thread that waits on it), everything else real:
scheduling, block tables, sampling, detokenization, and in the server the engine thread, the event loop, FastAPI,
the server-sent events. K (``--streams``) requests of ``--prompt`` tokens and ``--tokens`` outputs, all at once:
first in-process (``LLMEngine.step`` in a loop), then streamed by K httpx clients from this process through the
server in a subprocess (same settings; each pass run once first to warm up). Reported: TPOT in-process, at the
clients and by the server's own histogram (``/metrics``), the difference per token, and the host CPU time a token
in-process and in the server process. ``bench/serving.py --http``
measures the same on a GPU with the real model.

    python bench/http_overhead.py                       # 32 streams, 3.5 ms steps, 128 + 128 tokens
    python bench/http_overhead.py --streams 64 --step-ms 6
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import replace

from common import write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)

import stub_engine  # noqa: E402
from serving import TraceRequest, _http_through_server, run_continuous  # noqa: E402
from neox_rt.default_model import load_default  # noqa: E402
from neox_rt.engine.kv_cache import PagedKVCache  # noqa: E402


def in_process(neox, settings: dict, trace: list[TraceRequest]) -> dict:
    engine = stub_engine.LLMEngine(neox, **settings)
    run_continuous(engine, [replace(r, request_id=r.request_id + "-warm") for r in trace], 600.0)
    t, cpu = time.perf_counter(), time.process_time()
    run = run_continuous(engine, trace, 600.0)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"tpot_mean_ms": run["tpot_mean_ms"], "tpot_p50_ms": run["tpot_p50_ms"], "ttft_p50_ms": run["ttft_p50_ms"],
            "steps": run["steps"], "step_ms_mean": 1e3 * wall / run["steps"],
            "cpu_ms_per_token": 1e3 * cpu / run["output_tokens"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants so far (Linux /proc): the server and, in
    its default mode, its engine process."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(cpu_seconds(int(child)) for child in f.read().split())
    except FileNotFoundError:  # gone meanwhile
        pass
    return total


def through_server(settings: dict, prompts: list[list[int]], tokens: int, step_ms: float, timeout: float,
                   engine_process: bool = True, launch_ms: float = 0.0) -> dict:
    cmd = [sys.executable, "-m", "neox_rt.serve", "--engine", "stub_engine",
           "--served-model-name", "bench", "--max-num-seqs", str(settings["max_num_seqs"]),
           "--kv-cache-memory", str(settings["kv_cache_memory"]), "--max-model-len", str(settings["max_model_len"]),
           "--log-level", "warning", "--engine-process" if engine_process else "--no-engine-process"]
    env = {"NEOX_RT_STUB_STEP_MS": str(step_ms), "NEOX_RT_STUB_LAUNCH_MS": str(launch_ms)}
    with tempfile.TemporaryDirectory(prefix="neox_rt_http_") as tmp:
        res = _http_through_server(cmd, tmp, prompts, tokens, timeout, lambda m: print(m, file=sys.stderr), env=env,
                                   cpu_seconds=cpu_seconds, poll=0.3)
    if "error" in res:
        raise RuntimeError(res["error"])
    c = res["client"]
    return {"tpot_mean_ms": c["tpot_mean_ms"], "tpot_p50_ms": c["tpot_p50_ms"], "tpot_p99_ms": c["tpot_p99_ms"],
            "server_tpot_mean_ms": res["server_tpot_mean_ms"],
            "cpu_ms_per_token": 1e3 * res["cpu_s"] / (tokens * len(prompts)),
            "tokens_all_received": c["tokens_all_received"], "usage_matches_chunks": c["usage_matches_chunks"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=3.5, help="the stand-in GPU step (default 3.5: 1.4b's decode "
                   "step with 32 sequences on an H100, bench/results/serving_1.4b_h100_4a3ded9.json)")
    p.add_argument("--launch-ms", type=float, default=0.0, help="host time the stand-in launch holds the GIL for "
                   "(a real step's Python and CUDA launches; default 0)")
    p.add_argument("--modes", default="process,thread", help="the server's engine modes to run, in order: process "
                   "(the engine in its own process, the default) and / or thread (--no-engine-process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    stub_engine.STEP_MS, stub_engine.LAUNCH_MS = args.step_ms, args.launch_ms
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"process", "thread"}:
        p.error(f"--modes: process and / or thread, got {args.modes!r}")
    neox = load_default(notice=False)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1000, 4000) for _ in range(args.prompt)] for _ in range(args.streams)]
    kv = 2 * args.streams * -(-(args.prompt + args.tokens) // 16) * PagedKVCache.block_bytes(neox.model, 16)
    settings = dict(max_num_seqs=args.streams, kv_cache_memory=kv, max_model_len=args.prompt + args.tokens)
    trace = [TraceRequest(f"h{i}", 0.0, tuple(ids), args.tokens) for i, ids in enumerate(prompts)]
    res = {"streams": args.streams, "prompt": args.prompt, "tokens": args.tokens, "step_ms": args.step_ms,
           "launch_ms": args.launch_ms}
    res["engine"] = in_process(neox, settings, trace)
    res["cpu_count"] = os.cpu_count()
    print(f"{args.streams} streams, {args.step_ms} ms steps ({args.launch_ms} ms of them holding the GIL at launch): "
          f"TPOT in-process {res['engine']['tpot_mean_ms']:.2f} ms (step {res['engine']['step_ms_mean']:.2f}), host "
          f"CPU a token {res['engine']['cpu_ms_per_token']:.3f} ms")
    for mode in modes:
        key = "server" if mode == "process" else "server_thread"
        res[key] = through_server(settings, prompts, args.tokens, args.step_ms, args.start_timeout,
                                  engine_process=mode == "process", launch_ms=args.launch_ms)
        res[key]["overhead_ms_per_token"] = res[key]["tpot_mean_ms"] - res["engine"]["tpot_mean_ms"]
        print(f"  server, engine in a {mode}: TPOT at the clients {res[key]['tpot_mean_ms']:.2f} ms (server-measured "
              f"{res[key]['server_tpot_mean_ms']:.2f}): {res[key]['overhead_ms_per_token']:.2f} ms a token for HTTP; "
              f"host CPU a token {res[key]['cpu_ms_per_token']:.3f} ms; all tokens received: "
              f"{res[key]['tokens_all_received']}")
    if "server" in res:
        res["overhead_ms_per_token"] = res["server"]["overhead_ms_per_token"]
    if args.out:
        write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
