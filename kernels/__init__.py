"""Triton kernels for neox_rt (installed as ``neox_rt.kernels``). ``register_all()`` installs them in the op table.

One file per kernel: ``layernorm`` (LayerNorm, dual LayerNorm), ``rotary`` (rotary + KV-cache write),
``decode_attention`` (flash-decoding), ``attention`` (flash-style causal prefill over the cache; it makes
a separate fused softmax unnecessary), ``linear`` (skinny GEMV with bias, activation and residual in the
epilogue, for inputs of up to ``linear.REGISTER_MAX_ROWS`` rows, where it beats cuBLAS). Each has a
``supports_*`` predicate: arguments it rejects (dtype, contiguity, head size, device) run the PyTorch
reference. On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (the CPU tests).
"""
from __future__ import annotations


def register_all() -> None:
    """Register every Triton op in :data:`neox_rt.ops.OPS` (ImportError when triton is missing)."""
    import triton  # noqa: F401  (fail here, as one ImportError, when triton is absent)

    from neox_rt import ops

    from . import attention, decode_attention, layernorm, linear, rotary

    ops.register("layernorm", layernorm.layernorm, layernorm.supports_layernorm, "triton")
    ops.register("dual_layernorm", layernorm.dual_layernorm, layernorm.supports_dual_layernorm, "triton")
    ops.register("rotary_kv_write", rotary.rotary_kv_write, rotary.supports_rotary_kv_write, "triton")
    ops.register("decode_attention", decode_attention.decode_attention,
                 decode_attention.supports_decode_attention, "triton")
    ops.register("attention", attention.attention, attention.supports_attention, "triton")
    ops.register("linear", linear.linear, linear.supports_registered_linear, "triton")
