// The single registration point of the neox_rt CUDA ops: schemas (mutated arguments marked with (a!)) in
// TORCH_LIBRARY, the CUDA kernels in TORCH_LIBRARY_IMPL. Fake (meta) implementations for torch.compile live in
// neox_rt/ops/cuda.py. Importing neox_rt._C runs these registrations; the module itself has no functions.
#include <Python.h>
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(neox_rt, m) {
  m.def("scaled_causal_softmax(Tensor scores, Tensor query_positions, float scale) -> Tensor");
  m.def("rotary_kv_write(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, int rotary_ndims, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, bool pdl=False) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, float scale, bool pdl=False, "
        "int blocks_per_sm=0, bool merge_kernel=False, int variant=0, bool pdl_late=False, bool split_by_len=False) "
        "-> Tensor");
  m.def("rotary_decode_attention(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, int rotary_ndims, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor seqlens, float scale, bool pdl=False, int blocks_per_sm=0, "
        "bool merge_kernel=False, int variant=0, bool pdl_late=False, bool split_by_len=False) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqlens, "
        "float scale, bool pdl=False, int blocks_per_sm=0, bool merge_kernel=False, bool pdl_late=False) -> Tensor");
  m.def("layernorm(Tensor x, Tensor weight, Tensor bias, float eps, bool pdl=False) -> Tensor");
  m.def("dual_layernorm(Tensor x, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, float eps, "
        "bool pdl=False) -> (Tensor, Tensor)");
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias, int activation, Tensor? residual=None, int variant=0, "
        "bool pdl=False) -> Tensor");
  m.def("quant_linear_int8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int activation, "
        "Tensor? residual=None, int variant=0, bool pdl=False) -> Tensor");
  m.def("quant_linear_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor? bias, "
        "int activation, Tensor? residual=None, int variant=0, bool pdl=False) -> Tensor");
  m.def("quant_linear_tiled(Tensor x, Tensor qweight, Tensor scales, int out_features, int bits, int group_size, "
        "Tensor? bias, int activation, Tensor? residual=None, int variant=0, bool pdl=False) -> Tensor");
  m.def("quant_linear_tiled_pair(Tensor x1, Tensor qweight1, Tensor scales1, int out_features1, int group_size1, "
        "Tensor? bias1, int activation1, Tensor x2, Tensor qweight2, Tensor scales2, int out_features2, "
        "int group_size2, Tensor? bias2, int activation2, int bits, bool pdl=False, int warps=0) -> (Tensor, Tensor)");
  m.def("quant_linear_tiled_norm_pair(Tensor x, Tensor ln_weight1, Tensor ln_bias1, Tensor ln_weight2, "
        "Tensor ln_bias2, float eps, Tensor qweight1, Tensor scales1, int out_features1, int group_size1, "
        "Tensor? bias1, int activation1, Tensor qweight2, Tensor scales2, int out_features2, int group_size2, "
        "Tensor? bias2, int activation2, int bits, bool pdl=False, int warps=0) -> (Tensor, Tensor)");
  m.def("quant_linear_tiled_sum(Tensor x1, Tensor qweight1, Tensor scales1, int group_size1, Tensor x2, "
        "Tensor qweight2, Tensor scales2, int group_size2, int out_features, int bits, Tensor? bias1, Tensor? bias2, "
        "Tensor? residual=None, bool pdl=False, bool b_first=False) -> Tensor");
  m.def("quant_linear_tiled_sum_norm(Tensor x1, Tensor qweight1, Tensor scales1, int group_size1, Tensor x2, "
        "Tensor qweight2, Tensor scales2, int group_size2, int out_features, int bits, Tensor? bias1, Tensor? bias2, "
        "Tensor? residual, Tensor ln_weight1, Tensor ln_bias1, Tensor ln_weight2, Tensor ln_bias2, float eps, "
        "bool pdl=False, bool b_first=False) -> (Tensor, Tensor, Tensor)");
  m.def("gemv_pair(Tensor x1, Tensor weight1, Tensor? bias1, int activation1, Tensor x2, Tensor weight2, "
        "Tensor? bias2, int activation2, int ksplit=0, int min_blocks=0, bool pdl=False) -> (Tensor, Tensor)");
  m.def("gemv_sum(Tensor x1, Tensor weight1, Tensor x2, Tensor weight2, Tensor? bias1, Tensor? bias2, "
        "Tensor? residual=None, int ksplit=0, int min_blocks=0, bool pdl=False, int[]? push_buffers=None, "
        "int push_rank=0, int push_slot_bytes=0) -> Tensor");
  m.def("gemv_sum_norm(Tensor x1, Tensor weight1, Tensor x2, Tensor weight2, Tensor? bias1, Tensor? bias2, "
        "Tensor? residual, Tensor ln_weight1, Tensor ln_bias1, Tensor ln_weight2, Tensor ln_bias2, float eps, "
        "int ksplit=0, int min_blocks=0, bool pdl=False) -> (Tensor, Tensor, Tensor)");
  m.def("p2p_reduce_dual_layernorm(Tensor x, int[] buffers, int rank, int slot_bytes, Tensor weight1, "
        "Tensor bias1, Tensor weight2, Tensor bias2, float eps, bool pdl=False) -> (Tensor, Tensor, Tensor)");
  m.def("p2p_all_reduce(Tensor x, int[] buffers, int rank, int slot_bytes, bool pdl=False) -> Tensor");
  // no tensor argument, so no dispatch key: one kernel for every backend
  m.def("kernel_arch(int device) -> int", &neox_rt::kernel_arch_of);
}

TORCH_LIBRARY_IMPL(neox_rt, CUDA, m) {
  m.impl("scaled_causal_softmax", &neox_rt::scaled_causal_softmax);
  m.impl("rotary_kv_write", &neox_rt::rotary_kv_write);
  m.impl("decode_attention", &neox_rt::decode_attention);
  m.impl("rotary_decode_attention", &neox_rt::rotary_decode_attention);
  m.impl("paged_decode_attention", &neox_rt::paged_decode_attention);
  m.impl("layernorm", &neox_rt::layernorm);
  m.impl("dual_layernorm", &neox_rt::dual_layernorm);
  m.impl("gemv", &neox_rt::gemv);
  m.impl("quant_linear_int8", &neox_rt::quant_linear_int8);
  m.impl("quant_linear_int4", &neox_rt::quant_linear_int4);
  m.impl("quant_linear_tiled", &neox_rt::quant_linear_tiled);
  m.impl("quant_linear_tiled_pair", &neox_rt::quant_linear_tiled_pair);
  m.impl("quant_linear_tiled_norm_pair", &neox_rt::quant_linear_tiled_norm_pair);
  m.impl("quant_linear_tiled_sum", &neox_rt::quant_linear_tiled_sum);
  m.impl("quant_linear_tiled_sum_norm", &neox_rt::quant_linear_tiled_sum_norm);
  m.impl("gemv_pair", &neox_rt::gemv_pair);
  m.impl("gemv_sum", &neox_rt::gemv_sum);
  m.impl("gemv_sum_norm", &neox_rt::gemv_sum_norm);
  m.impl("p2p_all_reduce", &neox_rt::p2p_all_reduce);
  m.impl("p2p_reduce_dual_layernorm", &neox_rt::p2p_reduce_dual_layernorm);
}

// `import neox_rt._C` needs a module init function; the ops are reached through torch.ops.neox_rt.
static struct PyModuleDef neox_rt_module = {PyModuleDef_HEAD_INIT, "_C", "neox_rt CUDA ops (torch.ops.neox_rt)",
                                            -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&neox_rt_module); }
