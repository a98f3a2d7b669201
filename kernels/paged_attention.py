"""The paged KV cache's kernels: rotary + KV write into slots of blocks, flash-decoding and chunked-prefill
attention through block tables.

Cache layout (the contract of :func:`neox_rt.ops.reference.paged_decode_attention_ref`): k_cache and v_cache are
[num_blocks, nh, bs, hd]; sequence i's token at position p lives in block block_tables[i, p // bs], slot p % bs, so
one (block, head) is bs * hd contiguous elements. ``paged_rotary_kv_write``: one program per (token, group of
heads) rotates q and k (NeoX rotate-half, fp32 math) and stores k, v at flat slot slot_mapping[token]
(block * bs + offset; -1: a padding token, nothing stored), as :mod:`.rotary` does for the dense cache.
``paged_decode_attention``: as :mod:`.decode_attention`, the table's capacity max_blocks * bs is cut into chunks of
whole key steps; program (i, h, c) loads, for each key of its step, the block id from the table row and reads
that block's slot, with an online softmax in fp32; a second kernel merges the chunks. The grid depends only on
shapes (no host sync, capturable in a CUDA graph); keys at or past seqlens[i] and table entries past them are never
read, and seqlens[i] == 0 gives zeros (a padding row of a batch bucket).
``paged_prefill_attention`` (chunked prefill; the contract of
:func:`neox_rt.ops.reference.paged_prefill_attention_ref`): flash attention of varlen query chunks, as
:mod:`.attention` with its keys read through the table. Program (tile, h) takes BLOCK_M query rows of ONE sequence:
sequence i owns the tiles from first(i) = query_start_loc[i] // BLOCK_M + i, room for its cdiv(n_i, BLOCK_M) tiles,
so num_tokens // BLOCK_M + b + 1 tiles cover every sequence and the padding rows past query_start_loc[b] (written as
zeros), and each program finds its sequence by a binary search of query_start_loc (log2(b) loads; tiles past a
sequence's rows exit with nothing read). The grid depends on shapes only: no host sync. Row j of sequence i sits at
position seqlens[i] - n_i + j; keys below the tile's first position run without a mask, the diagonal tiles with the
causal mask; tl.dot for QK^T and PV, online softmax in fp32.
Integer arguments that change from one engine step to the next (the block tables' width, token and sequence counts,
the split plan) are left out of Triton's value specialization (== 1, % 16 == 0): each new combination would compile
a new kernel in the middle of serving, the likely cause of the 0.8-1.5 s steps seen on an H100 (bench/NOTES.md,
session 13; not yet re-measured).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, next_pow2, num_sms, on_triton_device
from .decode_attention import BLOCK_N, HEAD_SIZES, NUM_WARPS, plan_splits

LOG2E = 1.4426950408889634
INT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _paged_rotary_kv_write_kernel(
    qkv_ptr,      # [n, nh, 3, hd] (per-head fused layout)
    pos_ptr,      # [n] int
    slot_ptr,     # [n] int: block * BS + offset, -1 = padding
    cos_ptr,      # [max_pos, half] fp32
    sin_ptr,      # [max_pos, half] fp32
    q_ptr,        # [n, nh, hd] out
    k_cache_ptr,  # [num_blocks, nh, BS, hd]
    v_cache_ptr,  # [num_blocks, nh, BS, hd]
    nh, hd, rd, half,
    BS: tl.constexpr, HEADS: tl.constexpr, HD_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # [HEADS]
    d = tl.arange(0, HD_P2)
    mask = (heads[:, None] < nh) & (d[None, :] < hd)  # [HEADS, HD_P2]
    pos = tl.load(pos_ptr + token).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)

    rot = d < rd
    partner = tl.where(d < half, d + half, d - half)
    partner = tl.where(rot, partner, d)
    freq = tl.where(rot, d % half, 0)
    cos = tl.load(cos_ptr + pos * half + freq, mask=rot, other=1.0)  # [HD_P2], 1 past rd
    sin = tl.load(sin_ptr + pos * half + freq, mask=rot, other=0.0)
    sin = tl.where(d < half, -sin, sin)  # rotate_half: (-x2, x1)

    base = qkv_ptr + token * nh * 3 * hd + heads[:, None] * (3 * hd)  # [HEADS, 1]
    q = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    q_p = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    q = q * cos[None, :] + q_p * sin[None, :]
    tl.store(q_ptr + token * nh * hd + heads[:, None] * hd + d[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)

    wmask = mask & ((tl.zeros([HEADS, HD_P2], dtype=tl.int64) + slot) >= 0)  # padding tokens write nothing
    k = tl.load(base + hd + d[None, :], mask=wmask, other=0.0).to(tl.float32)
    k_p = tl.load(base + hd + partner[None, :], mask=wmask, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * hd + d[None, :], mask=wmask)
    k = k * cos[None, :] + k_p * sin[None, :]
    blk = slot // BS
    off = slot % BS
    dst = ((blk * nh + heads[:, None]) * BS + off) * hd + d[None, :]  # [HEADS, HD_P2]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=wmask)
    tl.store(v_cache_ptr + dst, v, mask=wmask)


def paged_rotary_kv_write(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          rotary_ndims: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [..., nh*3*hd], positions and slot_mapping of its leading shape -> rotated q [..., nh, hd]; k and v
    written to the paged caches [num_blocks, nh, bs, hd] at their flat slots (none for slot -1)."""
    lead = qkv.shape[:-1]
    n = lead.numel()
    _, nh, bs, hd = k_cache.shape
    q = torch.empty(*lead, nh, hd, dtype=qkv.dtype, device=qkv.device)
    hd_p2 = next_pow2(hd)
    heads = max(1, min(next_pow2(nh), 2048 // hd_p2))
    half = max(rotary_ndims // 2, 1)  # rd = 0: nothing rotates, the modulo must still be defined
    if n:
        _paged_rotary_kv_write_kernel[(n, triton.cdiv(nh, heads))](
            qkv, positions, slot_mapping, cos, sin, q, k_cache, v_cache, nh, hd, int(rotary_ndims), half,
            BS=bs, HEADS=heads, HD_P2=hd_p2, num_warps=4)
    return q


def supports_paged_rotary_kv_write(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, slot_mapping) -> bool:
    """Float qkv [..., 3*nh*hd] and caches [num_blocks, nh, bs, hd] of one dtype, all contiguous; int positions and
    slot_mapping of qkv's leading shape; fp32 contiguous tables [max_pos, rd/2]; even rotary_ndims <= hd."""
    if qkv.dim() < 1 or k_cache.dim() != 4:
        return False
    nh, hd = k_cache.shape[1], k_cache.shape[3]
    lead = tuple(qkv.shape[:-1])
    return (qkv.dtype in FLOAT_DTYPES and k_cache.dtype == qkv.dtype and v_cache.dtype == qkv.dtype
            and qkv.shape[-1] == 3 * nh * hd and v_cache.shape == k_cache.shape
            and tuple(positions.shape) == lead and tuple(slot_mapping.shape) == lead
            and positions.dtype in INT_DTYPES and slot_mapping.dtype in INT_DTYPES
            and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and rotary_ndims % 2 == 0 and 0 <= rotary_ndims <= hd
            and (rotary_ndims == 0 or cos.shape[-1] == rotary_ndims // 2)
            and all(t.is_contiguous() for t in (qkv, positions, slot_mapping, cos, sin, k_cache, v_cache))
            and on_triton_device(qkv, positions, slot_mapping, cos, sin, k_cache, v_cache))


@triton.jit(do_not_specialize=["stride_bt", "T", "split_size", "num_splits"])
def _paged_decode_split_kernel(
    q_ptr,        # [b, nh, hd]
    k_ptr,        # [num_blocks, nh, BS, hd]
    v_ptr,        # [num_blocks, nh, BS, hd]
    bt_ptr,       # [b, max_blocks] int
    seqlens_ptr,  # [b] int
    out_ptr,      # [b, nh, hd] (SINGLE: the final output)
    m_ptr,        # [b, nh, splits] fp32 running max (log2 domain)
    l_ptr,        # [b, nh, splits] fp32 sum of exp2
    acc_ptr,      # [b, nh, splits, hd] fp32 unnormalised sum of p * v
    stride_qb, stride_qh, stride_bt, nh, hd, T, split_size, num_splits, qk_scale,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, HD_P2: tl.constexpr, SINGLE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    d = tl.arange(0, HD_P2)
    dmask = d < hd
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + i * stride_qb + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
    q = q * qk_scale  # scale and log2(e) folded in: softmax with exp2
    seqlen = tl.load(seqlens_ptr + i).to(tl.int32)
    lo = c * split_size
    hi = tl.minimum(tl.minimum(lo + split_size, seqlen), T)
    m_i = tl.max(tl.full([BLOCK_N], -float("inf"), tl.float32), axis=0)  # fp32 scalars, loop-carried
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc = tl.zeros([HD_P2], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + n  # [BLOCK_N] positions
        kmask = keys < hi
        blk = tl.load(bt_ptr + i * stride_bt + keys // BS, mask=kmask, other=0).to(tl.int64)  # [BLOCK_N]
        row = ((blk * nh + h) * BS + keys % BS) * hd  # [BLOCK_N]
        offs = row[:, None] + d[None, :]  # [BLOCK_N, HD_P2]
        m2 = kmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        qk = tl.sum(k * q[None, :], axis=1)  # [BLOCK_N]
        qk = tl.where(kmask, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)  # [BLOCK_N], 0 on masked keys
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if SINGLE:
        out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1.0), 0.0)  # l_i >= 1 when a key was seen; 0 keys: zeros
        tl.store(out_ptr + (i * nh + h) * hd + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        part = (i * nh + h) * num_splits + c
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part * hd + d, acc, mask=dmask)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_reduce_kernel(
    m_ptr,    # [b, nh, splits] fp32
    l_ptr,    # [b, nh, splits] fp32
    acc_ptr,  # [b, nh, splits, hd] fp32
    out_ptr,  # [b, nh, hd]
    nh, hd, num_splits,
    SPLITS_P2: tl.constexpr, HD_P2: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HD_P2)
    smask = sp < num_splits
    base = (i * nh + h) * num_splits
    m = tl.load(m_ptr + base + sp, mask=smask, other=-float("inf"))  # empty chunks hold -inf too
    l = tl.load(l_ptr + base + sp, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == -float("inf"), 0.0, m_max)  # seqlens 0: every chunk empty, weights 0, not NaN
    w = tl.exp2(m - m_max)  # [SPLITS_P2]
    acc = tl.load(acc_ptr + (base + sp[:, None]) * hd + d[None, :], mask=smask[:, None] & (d[None, :] < hd),
                  other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)  # [HD_P2]
    den = tl.sum(l * w, axis=0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + (i * nh + h) * hd + d, out.to(out_ptr.dtype.element_ty), mask=d < hd)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seqlens: torch.Tensor, scale: float,
                           num_splits: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None) -> torch.Tensor:
    """q [b, nh, hd], caches [num_blocks, nh, bs, hd], block_tables [b, max_blocks], seqlens [b] (>= 0)
    -> [b, nh, hd] in q's dtype. ``num_splits`` overrides the planner (tests force the multi-chunk path with it)."""
    b, nh, hd = q.shape
    bs = k_cache.shape[2]
    T = block_tables.shape[1] * bs  # the most tokens a table can address
    out = torch.empty(b, nh, hd, dtype=q.dtype, device=q.device)
    if b == 0 or nh == 0:
        return out
    hd_p2 = next_pow2(hd)
    block_n = block_n or (BLOCK_N if hd_p2 <= 128 else BLOCK_N // 2)
    if T == 0:
        return out.zero_()
    if num_splits is None:
        split_size, num_splits = plan_splits(b, nh, T, block_n, num_sms(q))
    else:
        split_size = triton.cdiv(triton.cdiv(T, num_splits), block_n) * block_n
        num_splits = triton.cdiv(T, split_size)
    single = num_splits == 1
    part = b * nh * num_splits if not single else 1
    m = torch.empty(part, dtype=torch.float32, device=q.device)
    l = torch.empty(part, dtype=torch.float32, device=q.device)
    acc = torch.empty(part * (hd if not single else 1), dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(b, nh, num_splits)](
        q, k_cache, v_cache, block_tables, seqlens, out, m, l, acc, q.stride(0), q.stride(1),
        block_tables.stride(0), nh, hd, T, split_size, num_splits, float(scale) * LOG2E,
        BS=bs, BLOCK_N=block_n, HD_P2=hd_p2, SINGLE=single, num_warps=num_warps or NUM_WARPS)
    if not single:
        _paged_decode_reduce_kernel[(b, nh)](m, l, acc, out, nh, hd, num_splits,
                                             SPLITS_P2=next_pow2(num_splits), HD_P2=hd_p2, num_warps=4)
    return out


def supports_paged_decode_attention(q, k_cache, v_cache, block_tables, seqlens, scale) -> bool:
    """Float q [b, nh, hd] (last dim contiguous), hd in HEAD_SIZES; contiguous caches of q's dtype
    [num_blocks, nh, bs, hd]; int block_tables [b, max_blocks] (rows contiguous) and seqlens [b]."""
    return (q.dim() == 3 and q.dtype in FLOAT_DTYPES and q.shape[-1] in HEAD_SIZES and q.stride(-1) == 1
            and k_cache.dim() == 4 and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and v_cache.shape == k_cache.shape and k_cache.shape[1] == q.shape[1] and k_cache.shape[3] == q.shape[2]
            and k_cache.shape[2] >= 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and block_tables.dim() == 2 and block_tables.shape[0] == q.shape[0] and block_tables.dtype in INT_DTYPES
            and (block_tables.shape[1] <= 1 or block_tables.stride(1) == 1)
            and seqlens.dtype in INT_DTYPES and seqlens.shape == q.shape[:1] and seqlens.is_contiguous()
            and on_triton_device(q, k_cache, v_cache, block_tables, seqlens))


@triton.jit
def _paged_prefill_tile(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, start, hi, pos, h, nh, hd, qk_scale,
                        BS: tl.constexpr, BLOCK_N: tl.constexpr, HD_P2: tl.constexpr, IEEE: tl.constexpr,
                        CAUSAL: tl.constexpr):
    """One key tile [start, start + BLOCK_N) of the online softmax. CAUSAL: keys at or past ``hi`` and keys past a
    row's position are masked; otherwise every key of the tile is below every row's position (no mask at all)."""
    keys = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions
    d = tl.arange(0, HD_P2)
    dmask = d < hd
    if CAUSAL:
        kmask = keys < hi
        blk = tl.load(bt_row_ptr + keys // BS, mask=kmask, other=0).to(tl.int64)  # [BLOCK_N] block of each key
        m2 = kmask[:, None] & dmask[None, :]
    else:
        blk = tl.load(bt_row_ptr + keys // BS).to(tl.int64)
        m2 = dmask[None, :]
    offs = ((blk * nh + h) * BS + keys % BS)[:, None] * hd + d[None, :]  # [BLOCK_N, HD_P2]
    k = tl.load(k_ptr + offs, mask=m2, other=0.0)
    v = tl.load(v_ptr + offs, mask=m2, other=0.0)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
    qk = qk * qk_scale
    if CAUSAL:
        qk = tl.where((keys[None, :] <= pos[:, None]) & kmask[None, :], qk, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: key 0 is in the first tile and every row sees it
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt", "num_tokens", "b", "search_steps", "num_tiles"])
def _paged_prefill_kernel(
    q_ptr,        # [num_tokens, nh, hd] (rows and heads strided)
    k_ptr,        # [num_blocks, nh, BS, hd]
    v_ptr,        # [num_blocks, nh, BS, hd]
    bt_ptr,       # [b, max_blocks] int
    qsl_ptr,      # [b + 1] int: query_start_loc
    seqlens_ptr,  # [b] int
    out_ptr,      # [num_tokens, nh, hd] contiguous
    stride_qt, stride_qh, stride_bt, num_tokens, b, search_steps, num_tiles, nh, hd, qk_scale,
    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD_P2: tl.constexpr, IEEE: tl.constexpr,
):
    tile = num_tiles - 1 - tl.program_id(0)  # the last tiles (a chunk's longest causal rows) start first
    h = tl.program_id(1).to(tl.int64)
    # Sequence i owns tiles first(i) = qsl[i] // BLOCK_M + i onwards (first(i+1) - first(i) >= cdiv(n_i, BLOCK_M));
    # "sequence" b holds the padding rows. Binary search for the largest i in [0, b] with first(i) <= tile.
    lo = tl.program_id(0) * 0
    hi = lo + b + 1
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(qsl_ptr + mid).to(tl.int32) // BLOCK_M + mid <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    seq = lo
    is_seq = seq < b
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    n = tl.load(qsl_ptr + seq + 1, mask=is_seq, other=num_tokens).to(tl.int32) - q_start  # padding: to the end
    seqlen = tl.load(seqlens_ptr + seq, mask=is_seq, other=0).to(tl.int32)
    first_row = (tile - q_start // BLOCK_M - seq) * BLOCK_M  # of this tile, within the sequence's new tokens
    live = is_seq & (first_row < n)  # a tile past its sequence's rows (or padding) reads no key
    ctx = seqlen - n  # the position of the sequence's first new token
    rows = first_row + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rmask = rows < n
    pos = ctx + rows  # [BLOCK_M] each query's position
    d = tl.arange(0, HD_P2)
    dmask = d < hd
    tokens = (q_start + rows).to(tl.int64)  # [BLOCK_M] rows of q and out
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=(rows < tl.where(is_seq, n, 0))[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, HD_P2]
    key_end = tl.where(live, tl.minimum(ctx + first_row + BLOCK_M, seqlen), 0)  # past the tile's last position
    full_end = tl.where(live, tl.maximum(ctx + first_row, 0) // BLOCK_N * BLOCK_N, 0)  # keys every row sees
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HD_P2], dtype=tl.float32)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _paged_prefill_tile(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, start, key_end, pos, h, nh,
                                            hd, qk_scale, BS, BLOCK_N, HD_P2, IEEE, False)
    for start in range(full_end, key_end, BLOCK_N):  # the diagonal: causal mask
        acc, m_i, l_i = _paged_prefill_tile(acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, start, key_end, pos, h, nh,
                                            hd, qk_scale, BS, BLOCK_N, HD_P2, IEEE, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # padding rows: no key, acc 0, zeros out
    tl.store(out_ptr + (tokens[:, None] * nh + h) * hd + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, seqlens: torch.Tensor,
                            scale: float, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q [num_tokens, nh, hd] varlen, caches [num_blocks, nh, bs, hd], block_tables [b, max_blocks],
    query_start_loc [b + 1] (from 0), seqlens [b] -> [num_tokens, nh, hd] in q's dtype (rows past
    query_start_loc[b] zeros). ``block_m`` / ``block_n`` override the tile sizes (tests: several tiles at small
    sizes)."""
    num_tokens, nh, hd = q.shape
    b = block_tables.shape[0]
    bs = k_cache.shape[2]
    out = torch.empty(num_tokens, nh, hd, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or nh == 0:
        return out
    hd_p2 = next_pow2(hd)
    ieee = q.dtype == torch.float32
    block_m = block_m or (64 if num_tokens > 16 * max(b, 1) else 16)  # chunks of 16 tokens or fewer on average
    if block_n is None:  # as the dense prefill kernel (.attention)
        block_n = 64 if hd_p2 <= 64 else 32
        if hd_p2 >= 256 or (ieee and hd_p2 >= 128):
            block_n = 16
    num_warps = 4 if hd_p2 <= 128 else 8
    num_stages = 2 if (hd_p2 >= 256 or ieee) else 3
    num_tiles = num_tokens // block_m + b + 1  # every sequence's tiles and the padding's (see the kernel)
    _paged_prefill_kernel[(num_tiles, nh)](
        q, k_cache, v_cache, block_tables, query_start_loc, seqlens, out, q.stride(0), q.stride(1),
        block_tables.stride(0), num_tokens, b, b.bit_length(), num_tiles, nh, hd, float(scale) * LOG2E,
        BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, HD_P2=hd_p2, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)
    return out


def supports_paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seqlens, scale) -> bool:
    """Float q [num_tokens, nh, hd] (last dim contiguous), hd in HEAD_SIZES; contiguous caches of q's dtype
    [num_blocks, nh, bs, hd]; int block_tables [b, max_blocks] (rows contiguous), contiguous int query_start_loc
    [b + 1] and seqlens [b]."""
    return (q.dim() == 3 and q.dtype in FLOAT_DTYPES and q.shape[-1] in HEAD_SIZES and q.stride(-1) == 1
            and k_cache.dim() == 4 and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and v_cache.shape == k_cache.shape and k_cache.shape[1] == q.shape[1] and k_cache.shape[3] == q.shape[2]
            and k_cache.shape[2] >= 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and block_tables.dim() == 2 and block_tables.dtype in INT_DTYPES
            and (block_tables.shape[1] <= 1 or block_tables.stride(1) == 1)
            and query_start_loc.dtype in INT_DTYPES and tuple(query_start_loc.shape) == (block_tables.shape[0] + 1,)
            and query_start_loc.is_contiguous()
            and seqlens.dtype in INT_DTYPES and tuple(seqlens.shape) == (block_tables.shape[0],)
            and seqlens.is_contiguous()
            and on_triton_device(q, k_cache, v_cache, block_tables, query_start_loc, seqlens))
