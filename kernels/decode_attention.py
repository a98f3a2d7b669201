"""Flash-decoding: one query per sequence over its first seqlens[i] cache slots.

out[i, h] = softmax(scale * q[i, h] . K[i, h, :L]^T) V[i, h, :L] with L = seqlens[i] (the contract of
:func:`neox_rt.ops.reference.decode_attention_ref`). The cache capacity T is cut into ``num_splits`` equal chunks;
program (i, h, c) runs an online softmax over the keys of chunk c that lie below L (none when the chunk
starts at or past L) and writes its partial max, sum and weighted sum of V; a second kernel merges the
chunks. All math in fp32. The grid depends only on shapes, never on seqlens' values, so the op does no host
sync and can be captured in a CUDA graph. Head sizes that are not powers of two (80, 96) use a block of the
next power of two with masked lanes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, next_pow2, num_sms, on_triton_device

HEAD_SIZES = (32, 64, 80, 96, 128, 256)
PROGRAMS_PER_SM = 8  # enough chunks in flight to keep HBM busy when b * nh is small
MAX_SPLITS = 64
BLOCK_N = 64  # keys per loop step for head sizes up to 128 (half for 256)
NUM_WARPS = 4
LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr,        # [b, nh, hd]
    k_ptr,        # [B, nh, T, hd]
    v_ptr,        # [B, nh, T, hd]
    seqlens_ptr,  # [b] int
    out_ptr,      # [b, nh, hd] (SINGLE: the final output)
    m_ptr,        # [b, nh, splits] fp32 running max (log2 domain)
    l_ptr,        # [b, nh, splits] fp32 sum of exp2
    acc_ptr,      # [b, nh, splits, hd] fp32 unnormalised sum of p * v
    stride_qb, stride_qh, nh, hd, T, split_size, num_splits, qk_scale,
    BLOCK_N: tl.constexpr, HD_P2: tl.constexpr, SINGLE: tl.constexpr,
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
    head = (i * nh + h) * T * hd
    m_i = tl.max(tl.full([BLOCK_N], -float("inf"), tl.float32), axis=0)  # fp32 scalars, loop-carried
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc = tl.zeros([HD_P2], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + n  # [BLOCK_N]
        kmask = keys < hi
        offs = head + keys[:, None].to(tl.int64) * hd + d[None, :]  # [BLOCK_N, HD_P2]
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
        tl.store(out_ptr + (i * nh + h) * hd + d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=dmask)
    else:
        part = (i * nh + h) * num_splits + c
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part * hd + d, acc, mask=dmask)


@triton.jit
def _decode_reduce_kernel(
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
    m_max = tl.max(m, axis=0)  # finite: chunk 0 always holds slot 0 (seqlens >= 1)
    w = tl.exp2(m - m_max)  # [SPLITS_P2]
    acc = tl.load(acc_ptr + (base + sp[:, None]) * hd + d[None, :], mask=smask[:, None] & (d[None, :] < hd),
                  other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)  # [HD_P2]
    den = tl.sum(l * w, axis=0)
    tl.store(out_ptr + (i * nh + h) * hd + d, (num / den).to(out_ptr.dtype.element_ty), mask=d < hd)


def plan_splits(b: int, nh: int, T: int, block_n: int, sms: int,
                programs_per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """(split_size, num_splits) from shapes only: about programs_per_sm programs per SM, chunks of whole blocks."""
    max_splits = min(MAX_SPLITS, triton.cdiv(T, block_n))
    want = max(1, min(max_splits, triton.cdiv(programs_per_sm * sms, max(1, b * nh))))
    split_size = triton.cdiv(triton.cdiv(T, want), block_n) * block_n
    return split_size, triton.cdiv(T, split_size)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                     scale: float, num_splits: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, programs_per_sm: int | None = None) -> torch.Tensor:
    """q [b, nh, hd], caches [B >= b, nh, T, hd], seqlens [b] (>= 1) -> [b, nh, hd] in q's dtype.

    ``num_splits`` overrides the planner (tests use it to force the multi-chunk path on small caches);
    ``block_n`` (keys per loop step), ``num_warps`` and ``programs_per_sm`` override the tuned defaults
    (BLOCK_N / NUM_WARPS / PROGRAMS_PER_SM; bench/kernels.py --sweep compares them).
    """
    b, nh, hd = q.shape
    T = k_cache.shape[2]
    out = torch.empty(b, nh, hd, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    hd_p2 = next_pow2(hd)
    block_n = block_n or (BLOCK_N if hd_p2 <= 128 else BLOCK_N // 2)
    if num_splits is None:
        split_size, num_splits = plan_splits(b, nh, T, block_n, num_sms(q), programs_per_sm or PROGRAMS_PER_SM)
    else:
        split_size = triton.cdiv(triton.cdiv(T, num_splits), block_n) * block_n
        num_splits = triton.cdiv(T, split_size)
    single = num_splits == 1
    part = max(1, b * nh * num_splits) if not single else 1
    m = torch.empty(part, dtype=torch.float32, device=q.device)
    l = torch.empty(part, dtype=torch.float32, device=q.device)
    acc = torch.empty(part * (hd if not single else 1), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b, nh, num_splits)](
        q, k_cache, v_cache, seqlens, out, m, l, acc, q.stride(0), q.stride(1), nh, hd, T, split_size,
        num_splits, float(scale) * LOG2E, BLOCK_N=block_n, HD_P2=hd_p2, SINGLE=single,
        num_warps=num_warps or NUM_WARPS)
    if not single:
        _decode_reduce_kernel[(b, nh)](m, l, acc, out, nh, hd, num_splits, SPLITS_P2=next_pow2(num_splits),
                                       HD_P2=hd_p2, num_warps=4)
    return out


def supports_decode_attention(q, k_cache, v_cache, seqlens, scale) -> bool:
    """Float q [b, nh, hd] (last dim contiguous), hd in HEAD_SIZES; contiguous caches of q's dtype
    [B >= b, nh, T, hd]; int seqlens [b]."""
    return (q.dim() == 3 and q.dtype in FLOAT_DTYPES and q.shape[-1] in HEAD_SIZES and q.stride(-1) == 1
            and k_cache.dim() == 4 and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and v_cache.shape == k_cache.shape and k_cache.shape[0] >= q.shape[0]
            and tuple(k_cache.shape[1:4:2]) == tuple(q.shape[1:]) and k_cache.is_contiguous()
            and v_cache.is_contiguous() and seqlens.dtype in (torch.int64, torch.int32)
            and seqlens.shape == q.shape[:1] and seqlens.is_contiguous()
            and on_triton_device(q, k_cache, v_cache, seqlens))
