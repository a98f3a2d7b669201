"""Load a gpt-neox native checkpoint of the exact GPT-NeoX-20B layout on the GPU: time, host and GPU memory.

Writes a random-weights checkpoint in the 20B release's layout (``latest``, ``global_step150000/``,
``layer_LL-model_TT-model_states.pt``, TP=2 pipeline layout, hidden 6144, 64 heads, vocab 50432, fp16;
~41 GB for 44 layers) one layer file at a time, drops it from the page cache (cold load, unless --warm),
then loads it with ``neox_rt.load`` in a fresh process (so the peak RSS is the load's own) and reports:
load time, GB/s, peak host RSS (``ru_maxrss`` and ``/proc/self/status`` VmHWM), GPU memory.

``--layers N`` writes a reduced-depth checkpoint with the same per-layer shapes; the 44-layer load time is
then extrapolated linearly in bytes and labelled as such.

  python bench/load_20b.py --layers 8                         # ~8.5 GB written, loaded at TP=1
  python bench/load_20b.py                                    # the full 41 GB (needs ~45 GB free disk)
  python bench/load_20b.py --layers 8 --write-only --dir D    # then, on 2 GPUs, load at TP=2:
  torchrun --nproc-per-node 2 bench/load_20b.py --load-only --dir D

JSON goes to $OUT (else bench/results/); a short table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch
from common import git_commit, write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

HIDDEN, HEADS, VOCAB, LAYERS_20B, TP_SRC = 6144, 64, 50432, 44, 2
TAG = "global_step150000"

YAML_20B = """# GPT-NeoX-20B shape (configs/20B.yml), random weights written by bench/load_20b.py
{{
  "pipe-parallel-size": 4,
  "model-parallel-size": {tp},
  "num-layers": {layers},
  "hidden-size": {hidden},
  "num-attention-heads": {heads},
  "seq-length": 2048,
  "max-position-embeddings": 2048,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": true,
  "output_layer_parallelism": "column",
  "bias-gelu-fusion": true,
  "layernorm-epsilon": 1.0e-5,
}}
"""


def layer_shapes(h: int, tp: int) -> dict[str, tuple[int, ...]]:
    """One transformer layer's tensors as one TP rank of the 20B release stores them."""
    f = 4 * h
    return {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
            "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
            "attention.query_key_value.weight": (3 * h // tp, h), "attention.query_key_value.bias": (3 * h // tp,),
            "attention.dense.weight": (h, h // tp), "attention.dense.bias": (h,),
            "mlp.dense_h_to_4h.weight": (f // tp, h), "mlp.dense_h_to_4h.bias": (f // tp,),
            "mlp.dense_4h_to_h.weight": (h, f // tp), "mlp.dense_4h_to_h.bias": (h,)}


def stage_files(layers: int, h: int, vocab: int, tp: int) -> dict[int, dict[str, tuple[int, ...]]]:
    files = {0: {"word_embeddings.weight": (vocab // tp, h)}}
    for i in range(layers):
        files[i + 2] = layer_shapes(h, tp)
    files[layers + 3] = {"norm.weight": (h,), "norm.bias": (h,)}
    files[layers + 4] = {"final_linear.weight": (vocab // tp, h)}
    return files


def checkpoint_bytes(layers: int, h: int, vocab: int, tp: int) -> int:
    return tp * sum(2 * torch.Size(s).numel() for st in stage_files(layers, h, vocab, tp).values() for s in st.values())


def write_checkpoint(directory: str, layers: int, h: int, heads: int, vocab: int, tp: int) -> float:
    """Write the checkpoint one file at a time (random fp16, generated on the GPU when there is one)."""
    need = checkpoint_bytes(layers, h, vocab, tp)
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need * 1.05:
        sys.exit(f"load_20b: error: {need / 1e9:.1f} GB needed in {directory}, {free / 1e9:.1f} GB free: "
                 f"use --layers N (each layer is {checkpoint_bytes(1, h, vocab, tp) - checkpoint_bytes(0, h, vocab, tp):,}"
                 f" bytes)")
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(0)
    tag_dir = os.path.join(directory, TAG)
    os.makedirs(tag_dir, exist_ok=True)
    os.makedirs(os.path.join(directory, "configs"), exist_ok=True)
    t0 = time.perf_counter()
    for stage, shapes in stage_files(layers, h, vocab, tp).items():
        for rank in range(tp):
            state = {}
            for key, shape in shapes.items():
                t = torch.randn(shape, generator=g, device=gen_device, dtype=torch.float16)
                t = t.mul_(0.02) if len(shape) == 2 else (t.mul_(0.1).add_(1.0) if key.endswith("norm.weight") or
                                                          "layernorm.weight" in key else t.mul_(0.01))
                state[key] = t.cpu()
            path = os.path.join(tag_dir, f"layer_{stage:02d}-model_{rank:02d}-model_states.pt")
            torch.save(state, path)
            del state
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write(TAG)
    with open(os.path.join(directory, "configs", "20B.yml"), "w") as f:
        f.write(YAML_20B.format(tp=tp, layers=layers, hidden=h, heads=heads))
    os.sync()
    return time.perf_counter() - t0


def evict_page_cache(directory: str) -> None:
    """Drop the checkpoint's pages from the page cache (no root needed) so the load reads the disk."""
    for root, _, names in os.walk(directory):
        for n in names:
            fd = os.open(os.path.join(root, n), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def load_and_measure(directory: str) -> dict:
    import neox_rt
    from neox_rt.parallel import init_from_env
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = init_from_env(world, device_type="cuda")
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    # Warm up what is not loading (CUDA context, lazy imports of the first to_empty) so it stays out of load_s.
    from neox_rt.model.build import build_model
    from neox_rt.model.config import NeoXConfig
    build_model(NeoXConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
                torch.float16, device)
    rss_before = proc_status_kb("VmRSS")
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    m = neox_rt.load(directory, dtype="float16", device=device, tp=tp, progress=False, backend="torch")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    param_bytes = sum(p.numel() * p.element_size() for p in m.model.parameters())
    ids = torch.tensor([[0, 12092, 1533, 13]], device=device) % m.config.vocab_size
    logits = m.logits(ids)  # one small forward: the loaded model is usable
    c = m.config
    out = {
        "rank": tp.rank, "tp": tp.size, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
        "vocab_rows": c.vocab_size, "load_s": round(load_s, 3),
        "param_bytes_this_rank": param_bytes, "load_GBps": round(param_bytes / load_s / 1e9, 3),
        "peak_rss_MB_ru_maxrss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_MB_VmHWM": round(proc_status_kb("VmHWM") / 1024, 1),
        "rss_MB_before_load": round(rss_before / 1024, 1), "rss_MB_after_load": round(proc_status_kb("VmRSS") / 1024, 1),
        "logits_finite": bool(torch.isfinite(logits).all()),
    }
    if device.startswith("cuda"):
        out.update(gpu=torch.cuda.get_device_name(), gpu_allocated_GB=round(torch.cuda.memory_allocated() / 1e9, 3),
                   gpu_max_allocated_GB=round(torch.cuda.max_memory_allocated() / 1e9, 3))
    return out


def results_dir() -> str:
    d = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(d, exist_ok=True)
    return d




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/neox_rt_20b_ckpt", help="checkpoint directory (not under $OUT)")
    ap.add_argument("--layers", type=int, default=LAYERS_20B, help="transformer layers to write (20B: 44)")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoint and stop (keeps it)")
    ap.add_argument("--load-only", action="store_true", help="load an existing checkpoint (torchrun for TP>1)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint after the run")
    ap.add_argument("--warm", action="store_true", help="do not evict the files from the page cache")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help=argparse.SUPPRESS)  # smoke tests on CPU only
    ap.add_argument("--heads", type=int, default=HEADS, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=VOCAB, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.load_only:
        if not args.warm and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            evict_page_cache(args.dir)
        res = load_and_measure(args.dir)
        layers = res["layers"]
        written = checkpoint_bytes(layers, res["hidden"], res["vocab_rows"], TP_SRC)
        full_bytes = checkpoint_bytes(LAYERS_20B, res["hidden"], res["vocab_rows"], TP_SRC)
        res.update(cold=not args.warm, checkpoint_bytes=written, torch=torch.__version__, commit=git_commit())
        if layers != LAYERS_20B:  # linear in bytes: embeddings + 44 layers at this run's GB/s
            res["EXTRAPOLATED_load_s_44_layers"] = round(res["load_s"] * full_bytes / written, 2)
        if os.environ.get("NEOX_RT_BENCH_CHILD"):
            print("RESULT " + json.dumps(res), flush=True)
            return
        name = f"load_20b_tp{res['tp']}_rank{res['rank']}_{layers}layers.json"
        write_result(os.path.join(results_dir(), name), res)  # + the "environment" block (bench/common.py)
        _table([res])
        return

    write_s = write_checkpoint(args.dir, args.layers, args.hidden, args.heads, args.vocab, TP_SRC)
    written = checkpoint_bytes(args.layers, args.hidden, args.vocab, TP_SRC)
    print(f"wrote {written / 1e9:.2f} GB ({args.layers} layers) in {write_s:.1f} s to {args.dir}", flush=True)
    if args.write_only:
        return
    try:
        env = dict(os.environ, NEOX_RT_BENCH_CHILD="1", WORLD_SIZE="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--load-only", "--dir", args.dir] + (["--warm"] if args.warm else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"load_20b: error: the load failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    res.update(write_s=round(write_s, 1), write_GBps=round(written / write_s / 1e9, 3))
    write_result(os.path.join(results_dir(), f"load_20b_tp1_{args.layers}layers.json"), res)
    _table([res])


def _table(rows: list[dict]) -> None:
    print(f"{'tp':>3} {'rank':>4} {'layers':>6} {'GB':>7} {'load s':>8} {'GB/s':>6} {'maxrss MB':>10} {'VmHWM MB':>9} "
          f"{'GPU GB':>7} {'44-layer s (extrap.)':>21}")
    for r in rows:
        print(f"{r['tp']:>3} {r['rank']:>4} {r['layers']:>6} {r['param_bytes_this_rank'] / 1e9:>7.2f} "
              f"{r['load_s']:>8.2f} {r['load_GBps']:>6.2f} {r['peak_rss_MB_ru_maxrss']:>10.0f} "
              f"{r['peak_rss_MB_VmHWM']:>9.0f} {r.get('gpu_max_allocated_GB', 0):>7.2f} "
              f"{r.get('EXTRAPOLATED_load_s_44_layers', r['load_s']):>21}")


if __name__ == "__main__":
    main()
