"""The op table: one PyTorch reference per fused op, and the backend that replaces it.

Every op the model calls goes through :data:`OPS`. Each op has a plain PyTorch reference here (the
specification, the test oracle and the CPU fallback). A backend (``cuda``: the ``neox_rt._C`` extension,
``triton``: ``neox_rt.kernels``) registers an implementation together with a ``supports(*args)``
predicate; a call whose arguments the predicate rejects runs the reference. The backend is chosen once,
from ``NEOX_RT_BACKEND`` (``cuda``, ``triton`` or ``torch``) or, by default, the fastest available per op
(``NEOX_RT_OP_BACKENDS="op=backend,..."`` overrides single ops of that default).

Shapes use b = batch, s = new tokens, nh = heads, hd = head dim, T = cache capacity.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("neox_rt")


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------

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
    stream, see :class:`neox_rt.model.Layer`), saving a separate elementwise kernel per add.
    """
    out = activation_ref(F.linear(x, weight, bias), activation)
    return out if residual is None else out + residual


def linear_pair_ref(x1, w1, b1, act1, x2, w2, b2, act2):
    """Two independent linears in one op: (act1(x1 @ w1.T + b1), act2(x2 @ w2.T + b2)).

    The parallel-residual layer's column-parallel pair (QKV from LN1(x), h->4h from LN2(x)), so that a backend runs
    both in one launch. This fallback calls the ``linear`` op twice (each call served by that op's backend).
    """
    return OPS["linear"](x1, w1, b1, act1), OPS["linear"](x2, w2, b2, act2)


def linear_sum_ref(x1, w1, x2, w2, bias1=None, bias2=None, residual=None):
    """x1 @ w1.T + x2 @ w2.T + bias1 + bias2 + residual: two linears of the same out_features, summed.

    The parallel-residual layer's row-parallel pair (attention's dense, 4h->h: x + attn + mlp), so that a backend
    runs them as one GEMV over the concatenated k. This fallback calls the ``linear`` op twice, the first output
    the second's residual (each rounded to the dtype; a fused backend sums in fp32 and rounds once).
    """
    return OPS["linear"](x2, w2, bias2, residual=OPS["linear"](x1, w1, bias1, residual=residual))


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
# Dispatch
# ----------------------------------------------------------------------------------------------------

@dataclass
class Op:
    name: str
    reference: Callable
    impls: tuple[tuple[Callable, Callable[..., bool] | None], ...] = ()  # (impl, supports) tried in order
    backend: str = "torch"

    @property
    def impl(self) -> Callable | None:
        """The first registered implementation (None: the reference serves every call)."""
        return self.impls[0][0] if self.impls else None

    def __call__(self, *args, **kwargs):
        for impl, supports in self.impls:
            if supports is None or supports(*args, **kwargs):
                return impl(*args, **kwargs)
        return self.reference(*args, **kwargs)


OPS: dict[str, Op] = {
    "layernorm": Op("layernorm", layernorm_ref),
    "dual_layernorm": Op("dual_layernorm", dual_layernorm_ref),
    "linear": Op("linear", linear_ref),
    "linear_pair": Op("linear_pair", linear_pair_ref),
    "linear_sum": Op("linear_sum", linear_sum_ref),
    "rotary_kv_write": Op("rotary_kv_write", rotary_kv_write_ref),
    "attention": Op("attention", attention_ref),
    "decode_attention": Op("decode_attention", decode_attention_ref),
    "scaled_causal_softmax": Op("scaled_causal_softmax", scaled_causal_softmax_ref),
}

BACKENDS = ("cuda", "triton", "torch")
_active_backend: str | None = None


def register(op_name: str, impl: Callable, supports: Callable[..., bool] | None, backend: str) -> None:
    """Install ``impl`` for ``op_name``; calls that ``supports`` rejects run the reference."""
    op = OPS[op_name]
    op.impls, op.backend = ((impl, supports),), backend


def reset() -> None:
    """Every op back to its reference."""
    global _active_backend
    for op in OPS.values():
        op.impls, op.backend = (), "torch"
    _active_backend = None


def _load_backend(name: str) -> bool:
    """Import a backend's module, which calls :func:`register`. False (and one warning) if unavailable; a bad
    setting of the backend (an environment variable) is a NeoxRtError, not a silent fallback."""
    from neox_rt.errors import NeoxRtError
    try:
        if name == "cuda":
            from neox_rt import cuda_ops
            cuda_ops.register_all()
        elif name == "triton":
            from neox_rt.kernels import register_all
            register_all()
        return True
    except NeoxRtError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing extension must never crash the runtime
        log.warning("neox_rt: %s backend unavailable (%s); using the PyTorch reference", name, e)
        return False


def select_backend(name: str | None = None, device: torch.device | str | None = None) -> str:
    """Choose the backend once. ``name`` or ``NEOX_RT_BACKEND``; default the fastest available.

    On a CPU device the reference runs (the ``triton`` backend may still be forced for CPU testing
    under ``TRITON_INTERPRET=1``). Returns the name of the backend in force.
    """
    global _active_backend
    name = name or os.environ.get("NEOX_RT_BACKEND") or None
    if name is not None and name not in BACKENDS:
        from neox_rt.errors import NeoxRtError
        raise NeoxRtError(f"unknown backend {name!r} (NEOX_RT_BACKEND); choose one of {', '.join(BACKENDS)}")
    overrides = op_backend_overrides()  # validated on every device, applied to the GPU default
    on_gpu = device is not None and torch.device(device).type == "cuda"
    wanted = name or ("fastest" if on_gpu else "torch")
    if _active_backend == wanted and wanted != "fastest":
        return _active_backend
    reset()
    if wanted == "fastest":
        # Per op, the backend that measured fastest on an H100 (bench/results/kernels_h100.json, the decode
        # A/B runs in bench/NOTES.md): Triton for layernorm and prefill attention; the CUDA extension for
        # rotary + KV-cache write (91% vs 66% of copy bandwidth at the 20B prefill shape); CUDA first, then
        # Triton, then the reference for the linear (the CUDA GEMV takes single-row decode with bias, GeLU and
        # residual fused, and 2-16 rows where its tensor-core tiles win; the Triton GEMV the other 2-16-row
        # linears, cuBLAS the rest) and for decode attention (the
        # single-launch CUDA kernel; Triton where it rejects the alignment). Either backend alone serves every
        # op it has when the other is unavailable. NEOX_RT_OP_BACKENDS overrides single ops.
        have_triton = _load_backend("triton")
        by_triton = {k: op.impls for k, op in OPS.items() if op.impls}
        reset()
        by_cuda = {k: op.impls for k, op in OPS.items() if op.impls} if _load_backend("cuda") else {}
        have = {"cuda": by_cuda, "triton": by_triton}
        for k, op in OPS.items():
            choice = overrides.get(k) or ("cuda+triton" if k in CUDA_THEN_TRITON
                                          else "cuda" if k in PREFER_CUDA else "triton")
            wanted_parts = () if choice == "torch" else choice.split("+")
            parts = [b for b in wanted_parts if k in have[b]]
            if wanted_parts and not parts:  # the preferred backend lacks this op: the other one serves it
                parts = [b for b in ("triton", "cuda") if k in have[b]][:1]
            op.impls = tuple(impl for b in parts for impl in have[b][k])
            op.backend = "+".join(parts) or "torch"
        _active_backend = wanted
        # report the backend that serves most ops
        return "triton" if have_triton else OPS["rotary_kv_write"].backend
    if wanted != "torch" and not _load_backend(wanted):
        wanted = "torch"
    _active_backend = wanted
    return wanted


def op_backend_overrides() -> dict[str, str]:
    """``NEOX_RT_OP_BACKENDS="op=backend,..."`` (backend: cuda, triton, torch or cuda+triton): per-op exceptions to
    the default ("fastest") selection, for A/B runs and for working around a kernel. Bad entries raise."""
    text = os.environ.get("NEOX_RT_OP_BACKENDS", "").strip()
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        op, _, backend = item.partition("=")
        op, backend = op.strip(), backend.strip()
        if op not in OPS or backend not in ("cuda", "triton", "torch", "cuda+triton"):
            from neox_rt.errors import NeoxRtError
            raise NeoxRtError(f"NEOX_RT_OP_BACKENDS entry {item!r}: expected op=backend with op one of "
                              f"{', '.join(OPS)} and backend one of cuda, triton, torch, cuda+triton")
        out[op] = backend
    return out


PREFER_CUDA = frozenset({"rotary_kv_write", "scaled_causal_softmax", "linear_pair", "linear_sum"})
"""Ops for which the default ("fastest") selection takes the CUDA extension over Triton."""
CUDA_THEN_TRITON = frozenset({"linear", "decode_attention"})
"""Ops for which the default selection asks the CUDA extension first, then Triton, then the reference: the
linear's CUDA GEMV takes single-row decode (every decode linear, bias, GeLU and residual fused) and the batched
decode (2-16 rows) of the layers its tensor-core tiles win, the Triton GEMV the other 2-16-row linears, cuBLAS the
rest (prefill); decode attention's single-launch CUDA kernel
takes aligned inputs, the Triton kernel the rest."""


def active_backends() -> dict[str, str]:
    """Which backend serves each op (for logs and benchmarks)."""
    return {k: op.backend for k, op in OPS.items()}


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
