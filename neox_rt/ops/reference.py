"""The PyTorch references: one plain function per fused op, the specification, the test oracle and the CPU fallback.

Pure math on tensors, no dispatch: :mod:`neox_rt.ops.table` builds the op table on these. Shapes use b = batch,
s = new tokens, nh = heads, hd = head dim, T = cache capacity.

A linear's ``weight`` is a tensor ``[out, in]`` or any weight format object with ``dequantize(dtype)`` returning one
(:func:`dense_weight`): the reference of a packed format is "dequantize, then matmul", and the kernels that serve
such a format register in the op table beside the fp16 ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """A linear's weight as a dense tensor: the tensor itself, or a weight format's ``dequantize(dtype)``."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


def activation_ref(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """The MLP activation named by ``hidden_act`` (``gelu`` = erf, ``gelu_fast``/``gelu_new`` = tanh)."""
    if name is None:
        return x
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_fast", "gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def layernorm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, computed in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def dual_layernorm_ref(x, weight1, bias1, weight2, bias2, eps):
    """Both LayerNorms of a parallel-residual layer from one x: (LN1(x), LN2(x))."""
    return layernorm_ref(x, weight1, bias1, eps), layernorm_ref(x, weight2, bias2, eps)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """out = act(x @ weight.T + bias) + residual; x [..., in], weight [out, in], bias [out], residual [..., out].

    The residual add is part of the op so that fused backends do it in the epilogue (the layer's residual
    stream, see :class:`neox_rt.model.model.Layer`), saving a separate elementwise kernel per add.
    """
    out = activation_ref(F.linear(x, dense_weight(weight, x.dtype), bias), activation)
    return out if residual is None else out + residual


def rotary_tables(rotary_ndims: int, max_positions: int, base: float, device=None):
    """cos, sin tables [max_positions, rotary_ndims // 2] in fp32 (inv_freq = 1 / base^(2i / rd))."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.int64, device=device).float()
                                / rotary_ndims))
    t = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)  # [T, rd/2]
    return freqs.cos(), freqs.sin()


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_ndims: int) -> torch.Tensor:
    """NeoX rotate-half rotary on the first rotary_ndims dims of x [b, s, nh, hd]; cos/sin [b, s, rd/2]."""
    if rotary_ndims == 0:
        return x
    half = rotary_ndims // 2
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_ndims], xf[..., rotary_ndims:]
    c, s_ = cos[:, :, None, :], sin[:, :, None, :]  # [b, s, 1, rd/2]
    out = torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_, rest], dim=-1)
    return out.to(x.dtype)


def rotary_kv_write_ref(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        rotary_ndims: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Split the per-head fused QKV, rotate q and k at each token's position, write k and v to the cache.

    qkv [b, s, nh*3*hd] (per-head layout: feature head*3*hd + part*hd + d), positions [b, s] int64,
    cos/sin [max_pos, rd/2] fp32, k_cache/v_cache [B >= b, nh, T, hd]. Cache row i receives token j of
    sequence i at slot positions[i, j]. Returns the rotated q [b, s, nh, hd].
    """
    b, s, _ = qkv.shape
    nh, hd = k_cache.shape[1], k_cache.shape[3]
    qkv = qkv.view(b, s, nh, 3, hd)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [b, s, nh, hd]
    c, sn = cos[positions], sin[positions]  # [b, s, rd/2]
    q = apply_rotary_ref(q, c, sn, rotary_ndims)
    k = apply_rotary_ref(k, c, sn, rotary_ndims)
    rows = torch.arange(b, device=qkv.device)[:, None].expand(b, s)  # [b, s]
    k_cache[rows, :, positions] = k.to(k_cache.dtype)  # advanced index -> [b, s, nh, hd]
    v_cache[rows, :, positions] = v.to(v_cache.dtype)
    return q


def scaled_causal_softmax_ref(scores: torch.Tensor, query_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) over keys, masking key j > query position; fp32 math, input dtype out.

    scores [b, nh, s, t], query_positions [b, s] (absolute position of each query; key j is at j).
    """
    t = scores.shape[-1]
    mask = torch.arange(t, device=scores.device)[None, None, None, :] > query_positions[:, None, :, None]
    x = scores.float() * scale
    x = x.masked_fill(mask, float("-inf"))
    return torch.softmax(x, dim=-1).to(scores.dtype)


def attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Causal attention of new queries over the cache: query at position p sees cache slots 0..p.

    q [b, s, nh, hd], k_cache/v_cache [B >= b, nh, T, hd], positions [b, s]. Returns [b, s, nh, hd].
    Scores and softmax in fp32.
    """
    b = q.shape[0]
    t = int(positions.max().item()) + 1
    k = k_cache[:b, :, :t].float()  # [b, nh, t, hd]
    v = v_cache[:b, :, :t].float()
    scores = torch.einsum("bsnd,bntd->bnst", q.float(), k)  # [b, nh, s, t]
    probs = scaled_causal_softmax_ref(scores, positions, scale)
    out = torch.einsum("bnst,bntd->bsnd", probs, v)
    return out.to(q.dtype)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence over its first seqlens[i] cache slots. q [b, nh, hd] -> [b, nh, hd].

    Attends over the whole cache capacity with a mask (no host sync), so it can be captured in a CUDA graph.
    """
    b = q.shape[0]
    k = k_cache[:b].float()  # [b, nh, T, hd]
    v = v_cache[:b].float()
    scores = torch.einsum("bnd,bntd->bnt", q.float(), k) * scale  # [b, nh, T]
    t = torch.arange(k.shape[2], device=q.device)
    scores = scores.masked_fill(t[None, None, :] >= seqlens[:, None, None], float("-inf"))
    out = torch.einsum("bnt,bntd->bnd", torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype)



# ----------------------------------------------------------------------------------------------------
# Paged KV cache (#23). Per layer, k_cache and v_cache are [num_blocks, nh, bs, hd] (bs = block size, 16 by
# default): block n holds bs consecutive token positions of one sequence, head by head, so that the keys of one
# (block, head) are bs * hd contiguous elements, as the dense cache's [B, nh, T, hd] keeps one (row, head)
# contiguous for the decode read. A sequence's block table is a row of int block_tables [b, max_blocks]: its
# token at position p lives in block block_tables[i, p // bs], slot p % bs; flat slot = block * bs + slot. Entries
# past a sequence's length may hold anything (-1, 0, a stale id) and are never read.
# ----------------------------------------------------------------------------------------------------

def paged_rotary_kv_write_ref(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              rotary_ndims: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """:func:`rotary_kv_write_ref` into a paged cache: each token's rotated k and its v go to flat slot
    ``slot_mapping`` (block * bs + offset); slot -1 marks a padding token, whose k and v are not written.

    qkv [..., nh*3*hd] with any leading shape, flattened as tokens: [num_tokens] varlen (the tokens of every
    sequence one after another, as vLLM), or a padded [b, s]; positions and slot_mapping int of the leading shape;
    cos/sin [max_pos, rd/2] fp32; caches [num_blocks, nh, bs, hd]. Returns the rotated q [..., nh, hd] (padding
    tokens' q too: their positions must index the tables). No host sync (capturable in a CUDA graph): a padding
    token rewrites the slot of the first real token with that token's values (every writer of that slot writes
    the same bytes), or, when no token is real, slot 0 with what it holds.
    """
    lead = qkv.shape[:-1]
    nb, nh, bs, hd = k_cache.shape
    n = lead.numel()
    qkv = qkv.reshape(n, nh, 3, hd)
    pos, slots = positions.reshape(n), slot_mapping.reshape(n).long()
    c, sn = cos[pos][None], sin[pos][None]  # [1, n, rd/2]
    q = apply_rotary_ref(qkv[None, :, :, 0], c, sn, rotary_ndims)[0]  # [n, nh, hd]
    k = apply_rotary_ref(qkv[None, :, :, 1], c, sn, rotary_ndims)[0]
    v = qkv[:, :, 2]
    if n:
        valid = slots >= 0
        first = torch.argmax(valid.to(torch.int32))  # the first real token (0 when there is none)
        some = valid[first]
        target = torch.where(valid, slots, torch.where(some, slots[first], torch.zeros_like(slots)))
        blk, off = target // bs, target % bs
        for cache, new in ((k_cache, k), (v_cache, v)):
            stay = cache[blk, :, off]  # [n, nh, hd]: what the target slots hold now
            fill = torch.where(some, new[first].to(cache.dtype), stay)  # padding's value: a real token's, or stay
            cache[blk, :, off] = torch.where(valid[:, None, None], new.to(cache.dtype), fill)
    return q.reshape(*lead, nh, hd)


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The blocks of each block table as a dense cache [b, nh, max_blocks * bs, hd] (entries out of range are
    clamped: whatever they point at is masked by the caller)."""
    nb, nh, bs, hd = cache.shape
    b, mb = block_tables.shape
    blocks = cache[block_tables.long().clamp(0, nb - 1)]  # [b, mb, nh, bs, hd]
    return blocks.permute(0, 2, 1, 3, 4).reshape(b, nh, mb * bs, hd)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`decode_attention_ref` over a paged cache: q [b, nh, hd], caches [num_blocks, nh, bs, hd], block_tables
    [b, max_blocks] int, seqlens [b] -> [b, nh, hd]; sequence i attends over its first seqlens[i] tokens through its
    block table. seqlens[i] == 0 (a padding row of a graph's batch bucket) gives zeros.

    Masked, never sliced by data (no host sync, capturable in a CUDA graph); keys and values past a sequence's
    length are masked, so whatever the slots and blocks past it hold (stale tokens, NaN) never reaches the output.
    """
    k = gather_paged(k_cache, block_tables).float()  # [b, nh, L, hd]
    v = gather_paged(v_cache, block_tables).float()
    t = torch.arange(k.shape[2], device=q.device)
    past = t[None, None, :] >= seqlens[:, None, None]  # [b, 1, L]
    scores = torch.einsum("bnd,bntd->bnt", q.float(), k) * scale
    scores = scores.masked_fill(past, float("-inf"))
    v = v.masked_fill(past[..., None], 0.0)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row (seqlens 0) is all -inf: NaN -> 0
    out = torch.einsum("bnt,bntd->bnd", probs, v)
    return out.to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor, seqlens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Causal attention of each sequence's chunk of new queries over its paged cache (chunked prefill), varlen.

    q [num_tokens, nh, hd]: the new tokens of sequence i are rows query_start_loc[i]..query_start_loc[i+1]
    (query_start_loc [b+1] int, cumulative, from 0); seqlens [b]: the tokens of sequence i in the cache, the
    chunk's included (written first by :func:`paged_rotary_kv_write_ref`). Query j of the n_i new ones sits at
    position seqlens[i] - n_i + j and sees keys 0..that position. Rows past query_start_loc[b] (padding) give
    zeros. Returns [num_tokens, nh, hd]; fp32 scores and softmax (:func:`attention_ref` per sequence, on the
    sequence's blocks gathered dense). Reads the lengths on the host: prefill runs outside CUDA graphs.
    """
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seqlens.tolist()
    for i in range(len(lens)):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        positions = torch.arange(lens[i] - (hi - lo), lens[i], device=q.device)[None]  # [1, n]
        k = gather_paged(k_cache, block_tables[i:i + 1])
        v = gather_paged(v_cache, block_tables[i:i + 1])
        out[lo:hi] = attention_ref(q[None, lo:hi], k, v, positions, scale)[0]
    return out


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
