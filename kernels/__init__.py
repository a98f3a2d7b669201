"""Triton kernels for neox_rt (installed as ``neox_rt.kernels``); :mod:`neox_rt.ops.triton` puts them in the op table.

One file per kernel: ``layernorm`` (LayerNorm, dual LayerNorm), ``rotary`` (rotary + KV-cache write),
``decode_attention`` (flash-decoding), ``attention`` (flash-style causal prefill over the cache; it makes
a separate fused softmax unnecessary), ``linear`` (skinny GEMV with bias, activation and residual in the
epilogue, for inputs of up to ``linear.REGISTER_MAX_ROWS`` rows, where it beats cuBLAS). Each file holds the kernel,
a host wrapper with the reference's signature (:mod:`neox_rt.ops.reference`) and a ``supports_*`` predicate.
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (the CPU tests).
"""
