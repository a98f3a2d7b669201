"""Prefill attention, flash style: causal attention of new queries over the KV cache in one kernel.

out[i, j, h] = softmax(scale * q[i, j, h] . K[i, h, :p+1]^T) V[i, h, :p+1] with p = positions[i, j]
(the contract of :func:`neox_rt.ops.reference.attention_ref`). Program (query block, i*nh + h) walks the cache in
blocks of keys with an online softmax in fp32; scores never reach memory, so the separate scale + mask +
softmax kernel is not needed on this path. The loop stops after the block holding the largest position
of the query block (computed on the device: no host sync); keys past a query's position are masked.
QK^T and PV run on tensor cores (fp32 accumulation; fp32 inputs use IEEE fp32, not TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, next_pow2, on_triton_device

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    q_ptr,    # [b, s, nh, hd] (strided)
    k_ptr,    # [B, nh, T, hd] contiguous
    v_ptr,    # [B, nh, T, hd] contiguous
    pos_ptr,  # [b, s] int (strided)
    out_ptr,  # [b, s, nh, hd] contiguous
    stride_qb, stride_qs, stride_qh, stride_pb, stride_ps,
    s, nh, hd, T, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD_P2: tl.constexpr, IEEE: tl.constexpr,
):
    mb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    i = bh // nh
    h = bh % nh
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # query index j
    rmask = rows < s
    d = tl.arange(0, HD_P2)
    dmask = d < hd
    n = tl.arange(0, BLOCK_N)
    pos = tl.load(pos_ptr + i * stride_pb + rows * stride_ps, mask=rmask, other=0)  # [BLOCK_M]
    q = tl.load(q_ptr + i * stride_qb + h * stride_qh + rows[:, None] * stride_qs + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, HD_P2]
    head = (i * nh + h) * T * hd
    hi = tl.minimum(tl.max(pos, axis=0) + 1, T)  # keys past the block's last position are never read

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HD_P2], dtype=tl.float32)
    for start in range(0, hi, BLOCK_N):
        keys = start + n  # [BLOCK_N]
        kmask = keys < hi
        offs = head + keys[:, None].to(tl.int64) * hd + d[None, :]  # [BLOCK_N, HD_P2]
        m2 = kmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=m2, other=0.0)
        v = tl.load(v_ptr + offs, mask=m2, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
        visible = (keys[None, :] <= pos[:, None]) & kmask[None, :]
        qk = tl.where(visible, qk * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: block 0 holds slot 0, visible to every row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + ((i * s + rows[:, None]) * nh + h) * hd + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              scale: float) -> torch.Tensor:
    """q [b, s, nh, hd], caches [B >= b, nh, T, hd], positions [b, s] -> [b, s, nh, hd] in q's dtype."""
    b, s, nh, hd = q.shape
    T = k_cache.shape[2]
    out = torch.empty(b, s, nh, hd, dtype=q.dtype, device=q.device)
    if b * s == 0:
        return out
    hd_p2 = next_pow2(hd)
    ieee = q.dtype == torch.float32
    block_m = 64 if s > 16 else 16
    block_n = 64 if hd_p2 <= 64 else 32
    if hd_p2 >= 256 or (ieee and hd_p2 >= 128):
        block_n = 16
    num_warps = 4 if hd_p2 <= 128 else 8
    num_stages = 2 if (hd_p2 >= 256 or ieee) else 3  # shared memory of the K/V pipeline
    grid = (triton.cdiv(s, block_m), b * nh)
    _attention_kernel[grid](
        q, k_cache, v_cache, positions, out, q.stride(0), q.stride(1), q.stride(2), positions.stride(0),
        positions.stride(1), s, nh, hd, T, float(scale) * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HD_P2=hd_p2, IEEE=ieee, num_warps=num_warps,
        num_stages=num_stages)
    return out


def supports_attention(q, k_cache, v_cache, positions, scale) -> bool:
    """Float q [b, s, nh, hd] with a contiguous last dim and 16 <= hd <= 256; contiguous caches of q's dtype
    [B >= b, nh, T, hd]; int positions [b, s] (values < T)."""
    return (q.dim() == 4 and q.dtype in FLOAT_DTYPES and 16 <= q.shape[-1] <= 256 and q.stride(-1) == 1
            and k_cache.dim() == 4 and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and v_cache.shape == k_cache.shape and k_cache.shape[0] >= q.shape[0]
            and k_cache.shape[1] == q.shape[2] and k_cache.shape[3] == q.shape[3]
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and positions.dtype in (torch.int64, torch.int32) and tuple(positions.shape) == tuple(q.shape[:2])
            and on_triton_device(q, k_cache, v_cache, positions))
