"""LayerNorm and the dual LayerNorm of a parallel-residual layer, one program per row.

out = (x - mean) / sqrt(var + eps) * weight + bias over the last dim, statistics in fp32, output in x's dtype
(the contract of :func:`neox_rt.ops.reference.layernorm_ref`). ``dual_layernorm`` reads x once and writes both
LN1(x) and LN2(x): the statistics are the same, only weight and bias differ.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, next_pow2, on_triton_device

MAX_HIDDEN = 65536  # one row lives in registers of one program
# warps per row = next_pow2(n) / ELEMENTS_PER_WARP, at most MAX_WARPS. bench/kernels.py --sweep on one H100 (20B,
# 2048 tokens): 8 warps per 8192-wide block 20.2 us (LayerNorm) / 29.1 us (dual) against 20.9 / 32.4 with 16.
ELEMENTS_PER_WARP = 1024
MAX_WARPS = 16


@triton.jit
def _layernorm_kernel(
    x_ptr,    # [rows, n]
    w1_ptr,   # [n]
    b1_ptr,   # [n]
    o1_ptr,   # [rows, n]
    w2_ptr,   # [n] (DUAL only)
    b2_ptr,   # [n] (DUAL only)
    o2_ptr,   # [rows, n] (DUAL only)
    n, eps,
    BLOCK: tl.constexpr, DUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n
    xhat = xc * (1.0 / tl.sqrt(var + eps))
    w1 = tl.load(w1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b1 = tl.load(b1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o1_ptr + row * n + offs, (xhat * w1 + b1).to(o1_ptr.dtype.element_ty), mask=mask)
    if DUAL:
        w2 = tl.load(w2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o2_ptr + row * n + offs, (xhat * w2 + b2).to(o2_ptr.dtype.element_ty), mask=mask)


def _launch(x, params, eps, dual, num_warps=None):
    n = x.shape[-1]
    rows = x.numel() // n
    outs = [torch.empty_like(x) for _ in range(2 if dual else 1)]
    block = next_pow2(n)
    num_warps = num_warps or min(MAX_WARPS, max(1, block // ELEMENTS_PER_WARP))
    w1, b1 = params[0], params[1]
    w2, b2 = (params[2], params[3]) if dual else (w1, b1)
    o2 = outs[1] if dual else outs[0]
    if rows:
        _layernorm_kernel[(rows,)](x, w1, b1, outs[0], w2, b2, o2, n, float(eps),
                                   BLOCK=block, DUAL=dual, num_warps=num_warps)
    return outs


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              num_warps: int | None = None) -> torch.Tensor:
    """LN(x) [..., n] -> [..., n] in x's dtype."""
    return _launch(x, (weight, bias), eps, dual=False, num_warps=num_warps)[0]


def dual_layernorm(x, weight1, bias1, weight2, bias2, eps, num_warps: int | None = None):
    """(LN1(x), LN2(x)) from one read of x [..., n]."""
    o1, o2 = _launch(x, (weight1, bias1, weight2, bias2), eps, dual=True, num_warps=num_warps)
    return o1, o2


def supports_layernorm(x, weight, bias, eps=1e-5, *more) -> bool:
    """Float x contiguous with a last dim of 1..MAX_HIDDEN; weight/bias contiguous [n] floats on x's device."""
    if x.dtype not in FLOAT_DTYPES or x.dim() == 0 or not x.is_contiguous():
        return False
    n = x.shape[-1]
    params = (weight, bias) + tuple(more)
    return (0 < n <= MAX_HIDDEN and on_triton_device(x, *params)
            and all(p.dtype in FLOAT_DTYPES and p.is_contiguous() and p.shape == (n,) for p in params))


def supports_dual_layernorm(x, weight1, bias1, weight2, bias2, eps=1e-5) -> bool:
    return supports_layernorm(x, weight1, bias1, eps, weight2, bias2)
