"""Computed GPU memory per rank of a GPT-NeoX model under tensor parallelism (default: 20B, 2048-token cache).

    python bench/tp_memory.py                      # 20B, TP 1/2/4/8, cache 2048, batch 1; table + fit on 16 GB
    python bench/tp_memory.py --out mem.json       # also JSON

Per rank = weights (exact: the sharded model is built on the meta device and its parameters summed, so the
padded vocabulary and the replicated LayerNorms and row-parallel biases are counted as loaded) + KV cache
(2 * layers * batch * heads/tp * tokens * head_dim * 2 bytes) + an activation estimate for the worst step
(a full-context prefill with the PyTorch reference attention, which materialises fp32 scores) + a fixed
allowance for the CUDA context and NCCL buffers, which torch.cuda.max_memory_allocated does not see.
bench/tp_latency.py measures max_memory_allocated at TP=1 and TP=2 on the device for comparison.
"""
from __future__ import annotations

import argparse
import os

import torch

GIB = 1024 ** 3
CARD_16GB_USABLE = 15.0 * GIB
"""A 16 GB card (T4, V100-16GB) reports about 15 GiB (15360 MiB) to CUDA."""
CONTEXT_AND_NCCL = 1.0 * GIB
"""CUDA context (~0.4-0.5 GiB with cuBLAS workspaces) + NCCL communicator buffers (~0.2-0.5 GiB): an allowance."""

NEOX_20B = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                rotary_pct=0.25, hidden_act="gelu_fast", max_position_embeddings=2048)


def weight_bytes(config, tp: int, dtype=torch.float16) -> dict:
    """Exact bytes of one rank's parameters: split ones (sharded), replicated ones (LayerNorms, row biases)."""
    from neox_rt.model.build import build_model
    from neox_rt.parallel import TensorParallel, tp_split_dim
    model = build_model(config, dtype, "meta", TensorParallel(rank=0, size=tp))
    split = replicated = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if tp_split_dim(name) is None:
            replicated += nbytes
        else:
            split += nbytes
    return dict(split=split, replicated=replicated, total=split + replicated)


def kv_cache_bytes(config, tp: int, tokens: int, batch: int = 1, elem: int = 2) -> int:
    """k and v: [layers, batch, heads/tp, tokens, head_dim] each."""
    c = config
    return 2 * c.num_hidden_layers * batch * (c.num_attention_heads // tp) * tokens * c.head_dim * elem


def activation_bytes(config, tp: int, prompt: int, batch: int = 1, elem: int = 2) -> int:
    """Peak transient memory of one layer of a prefill of ``prompt`` tokens with the reference ops (fp16).

    attention_ref: fp32 k, v copies [b, nh/tp, P, hd] x2, fp32 scores, scaled-masked scores and probs
    [b, nh/tp, P, P] x3, fp32 q and output [b, P, nh/tp, hd] x2; around it the layer keeps x, LN1(x),
    LN2(x), the QKV output, the MLP up projection (fp16, before and after the activation) and the
    partial sum. Plus the last-token logits [b, V] in fp16 and fp32. A decode step is far smaller.
    """
    c = config
    nh, hd, h, f = c.num_attention_heads // tp, c.head_dim, c.hidden_size, c.intermediate_size // tp
    attention = 4 * batch * nh * prompt * (2 * hd + 3 * prompt + 2 * hd)
    layer = elem * batch * prompt * (4 * h + 3 * h // tp + 2 * f)
    logits = batch * c.vocab_size * (elem + 4)
    return attention + layer + logits


def estimate(config, tp: int, cache_tokens: int = 2048, prompt: int | None = None, batch: int = 1) -> dict:
    prompt = cache_tokens if prompt is None else prompt
    w = weight_bytes(config, tp)
    kv = kv_cache_bytes(config, tp, cache_tokens, batch)
    act = activation_bytes(config, tp, prompt, batch)
    allocated = w["total"] + kv + act
    return dict(tp=tp, cache_tokens=cache_tokens, prefill_tokens=prompt, batch=batch,
                weights_split=w["split"], weights_replicated=w["replicated"], weights=w["total"],
                kv_cache=kv, activations=act, allocated=allocated,
                context_and_nccl=CONTEXT_AND_NCCL, total=allocated + CONTEXT_AND_NCCL,
                fits_16gb_card=allocated + CONTEXT_AND_NCCL <= CARD_16GB_USABLE)


def table(rows: list[dict]) -> str:
    head = (f"{'tp':>3} {'weights':>9} {'(repl.)':>8} {'kv cache':>9} {'activ.':>8} {'allocated':>10} "
            f"{'+ctx/nccl':>10} {'fits 16GB':>10}")
    lines = [head]
    for r in rows:
        g = lambda k: r[k] / GIB  # noqa: E731
        lines.append(f"{r['tp']:>3} {g('weights'):>8.2f}G {g('weights_replicated') * 1024:>7.1f}M "
                     f"{g('kv_cache'):>8.2f}G {g('activations'):>7.2f}G {g('allocated'):>9.2f}G "
                     f"{g('total'):>9.2f}G {'yes' if r['fits_16gb_card'] else 'no':>10}")
    return "\n".join(lines)


def main(argv=None):
    from neox_rt.model.config import NeoXConfig
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--cache-tokens", type=int, default=2048)
    p.add_argument("--prefill-tokens", type=int, default=None, help="default: the whole cache (worst case)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/tp_memory.json when OUT is set)")
    args = p.parse_args(argv)
    config = NeoXConfig(**NEOX_20B)
    rows = [estimate(config, tp, args.cache_tokens, args.prefill_tokens, args.batch) for tp in args.tp]
    out = args.out or (os.path.join(os.environ["OUT"], "tp_memory.json") if os.environ.get("OUT") else None)
    if out:
        from common import write_result  # bench/common.py (bench/ is on sys.path as the script's folder)
        write_result(out, dict(model="gpt-neox-20b", dtype="float16", rows=rows))
    print(f"GPT-NeoX-20B fp16, batch {args.batch}, KV cache {args.cache_tokens} tokens "
          f"({kv_cache_bytes(config, 1, 1) / 2**20:.3f} MiB per token over all ranks), activations of a "
          f"{rows[0]['prefill_tokens']}-token prefill (reference attention), +{CONTEXT_AND_NCCL / GIB:.1f} GiB "
          f"context/NCCL; a 16 GB card has ~{CARD_16GB_USABLE / GIB:.0f} GiB usable. Per GPU (GiB):")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
