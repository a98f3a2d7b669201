"""Ops: the op table (:mod:`.table`), the PyTorch references (:mod:`.reference`), backend selection
(:mod:`.backends`) and the bindings of the CUDA extension (:mod:`.cuda`) and of the Triton kernels (:mod:`.triton`).

``from neox_rt import ops`` gives the table (``ops.OPS``), the references and the selection functions; the backend
modules are imported on demand by :func:`select_backend`.
"""
from neox_rt.ops.backends import (BACKENDS, CUDA_THEN_TRITON, PREFER_CUDA, op_backend_overrides, reset,
                                  select_backend)
from neox_rt.ops.reference import (activation_ref, apply_rotary_ref, attention_ref, decode_attention_ref, dense_weight,
                                   dual_layernorm_ref, layernorm_ref, linear_ref, paged_decode_attention_ref,
                                   paged_prefill_attention_ref, paged_rotary_kv_write_ref, rotary_kv_write_ref,
                                   rotary_tables, scaled_causal_softmax_ref, softmax_scale)
from neox_rt.ops.table import (OPS, Op, active_backends, linear_pair_ref, linear_sum_norm_ref, linear_sum_ref,
                               norm_linear_pair_ref, register, rotary_decode_attention_ref)

__all__ = ["OPS", "Op", "register", "reset", "select_backend", "active_backends", "op_backend_overrides", "BACKENDS",
           "PREFER_CUDA", "CUDA_THEN_TRITON", "activation_ref", "apply_rotary_ref", "attention_ref",
           "decode_attention_ref", "dense_weight", "dual_layernorm_ref", "layernorm_ref", "linear_ref",
           "linear_pair_ref", "linear_sum_ref", "linear_sum_norm_ref", "norm_linear_pair_ref",
           "paged_decode_attention_ref", "paged_prefill_attention_ref", "paged_rotary_kv_write_ref",
           "rotary_decode_attention_ref", "rotary_kv_write_ref", "rotary_tables", "scaled_causal_softmax_ref",
           "softmax_scale"]
