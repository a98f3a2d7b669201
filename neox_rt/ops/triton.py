"""The ``triton`` backend: the Triton kernels of ``neox_rt.kernels`` (the top-level ``kernels/`` folder) as op-table
implementations, each with its ``supports`` predicate; arguments it rejects run the PyTorch reference.

An op may hold several implementations, tried in order: the ``linear`` op runs the fp16 GEMV for tensor weights, then
the W8A16 and W4A16 kernels for weights in the formats of :mod:`neox_rt.quant.formats` (each predicate rejects the
others' weights). On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (the CPU tests).
"""
from __future__ import annotations

import triton  # noqa: F401  (fail here, as one ImportError, when triton is absent)

from neox_rt.kernels import attention, decode_attention, layernorm, linear, paged_attention, quant_linear, rotary
from neox_rt.quant.formats import Int4Weight, Int8Weight


def int8_linear(x, weight: Int8Weight, bias=None, activation=None, residual=None):
    """The ``linear`` op for an :class:`Int8Weight` (W8A16)."""
    return quant_linear.linear_w8a16(x, weight.qweight, weight.scales, bias, activation, residual)


def supports_int8_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    return isinstance(weight, Int8Weight) and quant_linear.supports_w8a16(x, weight.qweight, weight.scales, bias,
                                                                          activation, residual)


def int4_linear(x, weight: Int4Weight, bias=None, activation=None, residual=None):
    """The ``linear`` op for an :class:`Int4Weight` (W4A16)."""
    return quant_linear.linear_w4a16(x, weight.qweight, weight.scales, weight.zeros, weight.group_size, bias,
                                     activation, residual)


def supports_int4_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    return (isinstance(weight, Int4Weight) and weight.in_features == (x.shape[-1] if x.dim() else -1)
            and quant_linear.supports_w4a16(x, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                            bias, activation, residual))


def implementations() -> dict:
    """op name -> (implementation, supports predicate), or a list of them tried in order."""
    return {
        "layernorm": (layernorm.layernorm, layernorm.supports_layernorm),
        "dual_layernorm": (layernorm.dual_layernorm, layernorm.supports_dual_layernorm),
        "rotary_kv_write": (rotary.rotary_kv_write, rotary.supports_rotary_kv_write),
        "decode_attention": (decode_attention.decode_attention, decode_attention.supports_decode_attention),
        "attention": (attention.attention, attention.supports_attention),
        "linear": [(linear.linear, linear.supports_registered_linear), (int8_linear, supports_int8_linear),
                   (int4_linear, supports_int4_linear)],
        "paged_rotary_kv_write": (paged_attention.paged_rotary_kv_write,
                                  paged_attention.supports_paged_rotary_kv_write),
        "paged_decode_attention": (paged_attention.paged_decode_attention,
                                   paged_attention.supports_paged_decode_attention),
        "paged_prefill_attention": (paged_attention.paged_prefill_attention,
                                    paged_attention.supports_paged_prefill_attention),
    }
