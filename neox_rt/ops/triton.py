"""The ``triton`` backend: the Triton kernels of ``neox_rt.kernels`` (the top-level ``kernels/`` folder) as op-table
implementations, each with its ``supports`` predicate; arguments it rejects run the PyTorch reference.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (the CPU tests).
"""
from __future__ import annotations

import triton  # noqa: F401  (fail here, as one ImportError, when triton is absent)

from neox_rt.kernels import attention, decode_attention, layernorm, linear, rotary


def implementations() -> dict:
    """op name -> (implementation, supports predicate)."""
    return {
        "layernorm": (layernorm.layernorm, layernorm.supports_layernorm),
        "dual_layernorm": (layernorm.dual_layernorm, layernorm.supports_dual_layernorm),
        "rotary_kv_write": (rotary.rotary_kv_write, rotary.supports_rotary_kv_write),
        "decode_attention": (decode_attention.decode_attention, decode_attention.supports_decode_attention),
        "attention": (attention.attention, attention.supports_attention),
        "linear": (linear.linear, linear.supports_registered_linear),
    }
