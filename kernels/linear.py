"""Skinny linear (decode GEMV, up to 16 rows) with the bias and activation fused into the epilogue.

out = act(x @ weight.T + bias), x [..., in] with at most MAX_ROWS rows, weight [out, in] (the contract of
:func:`neox_rt.ops.reference.linear_ref`). Decode is memory-bound: the kernel streams each weight tile once and
multiplies it with all rows (padded to 16 for the tensor cores), fp32 accumulation, then adds the bias and
applies the activation before the one store. Whether it replaces cuBLAS is decided by measurement
(``bench/kernels.py``): :data:`REGISTER_MAX_ROWS` is the largest row count that the op table sends here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2, on_triton_device

MAX_ROWS = 16
# Every linear of up to 16 rows (fp16/bf16): with the tiles below it beat cuBLAS at every 20B shape at 4 and 16
# rows on one H100 (bench/results/kernels_h100_b20bfea.json, sweep; kernels_h100_linear_87222b7.json): qkv 80.6 vs
# 85.7 us, dense 31.3 vs 32.7, h->4h + GeLU 104.5-106 vs 114.5 (cuBLAS + a separate GeLU), 4h->h 108.2 vs 112.3.
# In the default selection the CUDA GEMV takes single-row inputs first (in the decode graph, with PDL, it beat this
# kernel: 20B 14.62 vs 14.82 ms per token, bench/results/latency_ab_87222b7_*) and, since session 6, 2-16 rows of
# the layers its tensor-core tiles win (cuda_ops.supports_linear); this kernel keeps the large ones (20B qkv, h->4h,
# 4h->h).
REGISTER_MAX_ROWS = 16
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_fast": 2, "gelu_new": 2, "gelu_pytorch_tanh": 2, "relu": 3}


@triton.jit
def _gemv_kernel(
    x_ptr,     # [m, k]
    w_ptr,     # [n, k]
    b_ptr,     # [n] (HAS_BIAS)
    r_ptr,     # [m, n] (HAS_RES)
    out_ptr,   # [m, n]
    m, n, k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    rows = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    cmask = cols < n
    rmask = rows < m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        kmask = start + kk < k
        x = tl.load(x_ptr + rows[:, None] * k + start + kk[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * k + start + kk[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # gelu (erf)
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACT == 3:
        acc = tl.maximum(acc, 0.0)
    omask = rmask[:, None] & cmask[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + rows[:, None] * n + cols[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, residual: torch.Tensor | None = None, block_n: int | None = None,
           block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual: x [..., k] (at most MAX_ROWS rows), weight [n, k] -> [..., n].

    ``block_n``, ``block_k``, ``num_warps`` and ``num_stages`` override the tile configuration (bench/kernels.py
    --sweep compares them)."""
    k = x.shape[-1]
    n = weight.shape[0]
    m = x.numel() // k if k else 0
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_m = max(16, next_pow2(m))
    # Tiles from the H100 sweep (bench/kernels.py --sweep-ops triton_linear, 20B shapes at 4 and 16 rows): wide
    # layers (qkv, h->4h: hundreds of column blocks) stream best in short k tiles, 3 stages (qkv 80.6 us vs 94.0
    # with 256-wide tiles); narrow ones (dense, 4h->h: 192-384 column blocks) in 256-wide tiles, 4 stages deep
    # (4h->h 108.2 us vs 111.9 with 3).
    wide = n >= 16384
    block_n = block_n or (32 if wide else 16)
    block_k = block_k or (128 if wide else 256)
    extra = {"num_stages": num_stages or (3 if wide else 4)}
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, residual if residual is not None else out, out, m, n, k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation], HAS_RES=residual is not None, IEEE=x.dtype == torch.float32,
        num_warps=num_warps or 4, **extra)
    return out


def supports_linear(x, weight, bias=None, activation=None, residual=None, max_rows: int | None = None) -> bool:
    """Float x contiguous with 1..max_rows rows (default REGISTER_MAX_ROWS), weight [n, k] contiguous of x's
    dtype, optional bias [n], an activation the epilogue knows, optional residual of the output's shape."""
    max_rows = REGISTER_MAX_ROWS if max_rows is None else max_rows
    if activation not in ACTIVATIONS or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    k = x.shape[-1] if x.dim() else 0
    if k < 16 or not x.is_contiguous() or not 0 < x.numel() // k <= min(max_rows, MAX_ROWS):
        return False
    if not (weight.dim() == 2 and weight.shape[1] == k and weight.dtype == x.dtype and weight.is_contiguous()):
        return False
    if bias is not None and not (bias.shape == weight.shape[:1] and bias.is_contiguous()):
        return False
    if residual is not None and not (residual.shape == (*x.shape[:-1], weight.shape[0]) and residual.is_contiguous()
                                     and residual.dtype == x.dtype):
        return False
    return on_triton_device(x, weight, *(t for t in (bias, residual) if t is not None))


def supports_registered_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    """The registered predicate: fp16/bf16 and at most REGISTER_MAX_ROWS rows (see there for the measurements);
    fp32 and larger row counts (prefill) stay on cuBLAS."""
    return (isinstance(weight, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)
            and supports_linear(x, weight, bias, activation, residual))
