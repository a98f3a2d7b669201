"""The op table: every op the model calls, its PyTorch reference and the kernels registered to replace it.

An :class:`Op` holds the implementations a backend registered, each with a cheap ``supports(*args)`` predicate; a
call runs the first implementation that accepts its arguments, else the reference (:mod:`neox_rt.ops.reference`).
Which backend's implementations an op holds is decided once, by :func:`neox_rt.ops.backends.select_backend`. The
two pair ops of the parallel-residual layer fall back to two calls of the ``linear`` op, so each half still runs on
the linear's kernels, ``norm_linear_pair`` (the dual LayerNorm, then ``linear_pair``) and ``linear_sum_norm``
(``linear_sum``, then the dual LayerNorm) to those two ops, and ``rotary_decode_attention`` to ``rotary_kv_write``
then ``decode_attention``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from neox_rt.ops.reference import (attention_ref, decode_attention_ref, dual_layernorm_ref, layernorm_ref,
                                   linear_ref, paged_decode_attention_ref, paged_prefill_attention_ref,
                                   paged_rotary_kv_write_ref, rotary_kv_write_ref, scaled_causal_softmax_ref)


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


def linear_sum_norm_ref(x1, w1, x2, w2, bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2, eps):
    """``linear_sum`` and the next layer's dual LayerNorm of its output as one op: (y, LN1(y), LN2(y)) with
    y = x1 @ w1.T + x2 @ w2.T + bias1 + bias2 + residual, so that a backend normalises y in the sum's launch. This
    fallback calls the ``linear_sum`` and ``dual_layernorm`` ops (each served by its backend)."""
    y = OPS["linear_sum"](x1, w1, x2, w2, bias1, bias2, residual)
    return (y, *OPS["dual_layernorm"](y, ln_w1, ln_b1, ln_w2, ln_b2, eps))


def norm_linear_pair_ref(x, ln_w1, ln_b1, ln_w2, ln_b2, eps, w1, b1, act1, w2, b2, act2):
    """The parallel-residual layer's dual LayerNorm and its column-parallel pair as one op:
    (act1(LN1(x) @ w1.T + b1), act2(LN2(x) @ w2.T + b2)), so that a backend runs the LayerNorms inside the pair's
    launch. This fallback calls the ``dual_layernorm`` and ``linear_pair`` ops (each served by its backend)."""
    a, m = OPS["dual_layernorm"](x, ln_w1, ln_b1, ln_w2, ln_b2, eps)
    return OPS["linear_pair"](a, w1, b1, act1, m, w2, b2, act2)


def rotary_decode_attention_ref(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, seqlens, scale):
    """A decode step's attention with its new token's rotary and KV write as one op: qkv [b, 1, nh*3*hd], positions
    [b, 1] -> ``decode_attention(rotary_kv_write(...)[:, 0], ...)`` [b, nh, hd], the caches written at the new slot,
    so that a backend runs both in one launch. This fallback calls the ``rotary_kv_write`` and ``decode_attention``
    ops (each served by its backend)."""
    q = OPS["rotary_kv_write"](qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache)
    return OPS["decode_attention"](q[:, 0], k_cache, v_cache, seqlens, scale)


@dataclass
class Op:
    name: str
    reference: Callable
    impls: tuple[tuple[Callable, Callable[..., bool] | None], ...] = ()  # (impl, supports) tried in order
    backend: str = "torch"
    impl_backends: tuple[str, ...] = ()  # the backend of each entry of impls
    prepares: tuple[Callable, ...] = ()  # weight -> weight in the layout this op's kernels read (``prepare``)

    @property
    def impl(self) -> Callable | None:
        """The first registered implementation (None: the reference serves every call)."""
        return self.impls[0][0] if self.impls else None

    def __call__(self, *args, **kwargs):
        out = self.call_kernel(*args, **kwargs)  # no implementation returns None
        return self.reference(*args, **kwargs) if out is None else out

    def call_kernel(self, *args, **kwargs):
        """The first accepting implementation's result, or None where only the reference would serve the call (the
        caller then takes its own path: one pass over the ``supports`` predicates, not served_by's and then the
        call's)."""
        for impl, supports in self.impls:
            if supports is None or supports(*args, **kwargs):
                return impl(*args, **kwargs)
        return None

    def prepare(self, weight):
        """``weight`` in the layout the op's kernels read best (a backend's converter, e.g. the CUDA kernels' tiled
        int8 / int4 layout), or as it is: called once per weight after loading (:func:`neox_rt.quant.apply.
        prepare_weights`), never per call. A converted weight stays a weight format that every backend and the
        reference accept (the others through its ``dequantize``)."""
        for fn in self.prepares:
            weight = fn(weight)
        return weight

    def served_by(self, *args, **kwargs) -> str:
        """The backend that would run this call: the first accepting implementation's, or "torch"."""
        for (impl, supports), backend in zip(self.impls, self.impl_backends or (self.backend,) * len(self.impls)):
            if supports is None or supports(*args, **kwargs):
                return backend
        return "torch"


OPS: dict[str, Op] = {
    "layernorm": Op("layernorm", layernorm_ref),
    "dual_layernorm": Op("dual_layernorm", dual_layernorm_ref),
    "linear": Op("linear", linear_ref),
    "linear_pair": Op("linear_pair", linear_pair_ref),
    "linear_sum": Op("linear_sum", linear_sum_ref),
    "norm_linear_pair": Op("norm_linear_pair", norm_linear_pair_ref),
    "linear_sum_norm": Op("linear_sum_norm", linear_sum_norm_ref),
    "rotary_kv_write": Op("rotary_kv_write", rotary_kv_write_ref),
    "attention": Op("attention", attention_ref),
    "decode_attention": Op("decode_attention", decode_attention_ref),
    "rotary_decode_attention": Op("rotary_decode_attention", rotary_decode_attention_ref),
    "scaled_causal_softmax": Op("scaled_causal_softmax", scaled_causal_softmax_ref),
    # the paged KV cache [num_blocks, nh, block_size, hd] with per-sequence block tables (#23)
    "paged_rotary_kv_write": Op("paged_rotary_kv_write", paged_rotary_kv_write_ref),
    "paged_decode_attention": Op("paged_decode_attention", paged_decode_attention_ref),
    "paged_prefill_attention": Op("paged_prefill_attention", paged_prefill_attention_ref),
}


def register(op_name: str, impl, supports: Callable[..., bool] | None, backend: str,
             prepare: Callable | None = None) -> None:
    """Install ``impl`` for ``op_name``; calls that ``supports`` rejects run the reference. ``impl`` may also be a
    list of (impl, supports) pairs (``supports`` then None), tried in order (e.g. the linear's fp16 kernel, then
    the kernels of the weight formats). ``prepare``: the backend's weight-layout converter (:meth:`Op.prepare`)."""
    op = OPS[op_name]
    pairs = tuple(impl) if isinstance(impl, list) else ((impl, supports),)
    op.impls, op.backend, op.impl_backends = pairs, backend, (backend,) * len(pairs)
    op.prepares = (prepare,) if prepare is not None else ()


def clear() -> None:
    """Every op back to its reference."""
    for op in OPS.values():
        op.impls, op.backend, op.impl_backends, op.prepares = (), "torch", (), ()


def active_backends() -> dict[str, str]:
    """Which backend serves each op (for logs and benchmarks)."""
    return {k: op.backend for k, op in OPS.items()}
