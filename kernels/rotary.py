"""Rotary embedding + KV-cache write in one pass over the fused QKV output.

For every token (row i, column j) at position p = positions[i, j] and every head: q and k get the NeoX
rotate-half rotary on their first rotary_ndims dims (dim d pairs with d + rd/2; fp32 math with the cos/sin
tables), k and v go to cache slot p of cache row i, and q is returned [b, s, nh, hd] (the contract of
:func:`neox_rt.ops.reference.rotary_kv_write_ref`). v is copied bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, next_pow2, on_triton_device


@triton.jit
def _rotary_kv_write_kernel(
    qkv_ptr,      # [b, s, nh, 3, hd] (per-head fused layout)
    pos_ptr,      # [b, s] int
    cos_ptr,      # [max_pos, half] fp32
    sin_ptr,      # [max_pos, half] fp32
    q_ptr,        # [b, s, nh, hd] out
    k_cache_ptr,  # [B, nh, T, hd]
    v_cache_ptr,  # [B, nh, T, hd]
    s, nh, hd, T, rd, half,
    HEADS: tl.constexpr, HD_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # i * s + j
    row = token // s
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # [HEADS]
    d = tl.arange(0, HD_P2)  # [HD_P2]
    mask = (heads[:, None] < nh) & (d[None, :] < hd)  # [HEADS, HD_P2]
    pos = tl.load(pos_ptr + token).to(tl.int64)

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
    k = tl.load(base + hd + d[None, :], mask=mask, other=0.0).to(tl.float32)
    k_p = tl.load(base + hd + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * hd + d[None, :], mask=mask)
    q = q * cos[None, :] + q_p * sin[None, :]
    k = k * cos[None, :] + k_p * sin[None, :]

    tl.store(q_ptr + token * nh * hd + heads[:, None] * hd + d[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    slot = ((row * nh + heads[:, None]) * T + pos) * hd + d[None, :]  # [HEADS, HD_P2]
    tl.store(k_cache_ptr + slot, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot, v, mask=mask)


def rotary_kv_write(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    rotary_ndims: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """qkv [b, s, nh*3*hd], positions [b, s] -> rotated q [b, s, nh, hd]; k, v written to the caches."""
    b, s, _ = qkv.shape
    nh, T, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    q = torch.empty(b, s, nh, hd, dtype=qkv.dtype, device=qkv.device)
    hd_p2 = next_pow2(hd)
    heads = max(1, min(next_pow2(nh), 2048 // hd_p2))
    half = max(rotary_ndims // 2, 1)  # rd = 0: nothing rotates, the modulo must still be defined
    if b * s:
        _rotary_kv_write_kernel[(b * s, triton.cdiv(nh, heads))](
            qkv, positions, cos, sin, q, k_cache, v_cache, s, nh, hd, T, int(rotary_ndims), half,
            HEADS=heads, HD_P2=hd_p2, num_warps=4)
    return q


def supports_rotary_kv_write(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache) -> bool:
    """Float qkv [b, s, 3*nh*hd] and caches [B >= b, nh, T, hd] of one dtype, all contiguous; int positions
    [b, s]; fp32 contiguous tables [max_pos, rd/2]; even rotary_ndims <= hd."""
    if qkv.dim() != 3 or k_cache.dim() != 4 or positions.dim() != 2:
        return False
    nh, hd = k_cache.shape[1], k_cache.shape[3]
    return (qkv.dtype in FLOAT_DTYPES and k_cache.dtype == qkv.dtype and v_cache.dtype == qkv.dtype
            and qkv.shape[-1] == 3 * nh * hd and v_cache.shape == k_cache.shape
            and k_cache.shape[0] >= qkv.shape[0] and tuple(positions.shape) == tuple(qkv.shape[:2])
            and positions.dtype in (torch.int64, torch.int32) and cos.dtype == torch.float32
            and sin.dtype == torch.float32 and rotary_ndims % 2 == 0 and 0 <= rotary_ndims <= hd
            and (rotary_ndims == 0 or cos.shape[-1] == rotary_ndims // 2)
            and all(t.is_contiguous() for t in (qkv, positions, cos, sin, k_cache, v_cache))
            and on_triton_device(qkv, positions, cos, sin, k_cache, v_cache))
