// Launchers of the neox_rt CUDA ops (defined in ops.cu, registered in bindings.cpp). Each checks its inputs,
// sets the device guard and the current stream, and dispatches on dtype to the kernels in csrc/kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace neox_rt {

// The architecture the extension's kernels run as on CUDA device `device` (e.g. 75 for a "7.5+PTX" build on an
// H100, whose driver compiles the 7.5 PTX): what decides bf16 tensor cores and programmatic dependent launch.
int64_t kernel_arch_of(int64_t device);

// softmax(scale * scores) over keys with key j > query_positions[b, s] masked. scores [b, nh, s, t].
at::Tensor scaled_causal_softmax(const at::Tensor& scores, const at::Tensor& query_positions, double scale);

// Rotary on q, k + cache write of k, v. qkv [b, s, nh*3*hd] -> q [b, s, nh, hd]; mutates k_cache, v_cache.
// pdl: programmatic dependent launch (sm_90).
at::Tensor rotary_kv_write(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                           const at::Tensor& sin, int64_t rotary_ndims, at::Tensor& k_cache, at::Tensor& v_cache,
                           bool pdl);

// One query per sequence over its first seqlens[i] slots. q [b, nh, hd] -> [b, nh, hd]. pdl: programmatic
// dependent launch (sm_90); blocks_per_sm: the split plan (0: the default); merge_kernel: merge the splits in a
// second kernel instead of the last block of each head (for tests and benchmarks); variant: 0 default,
// 1 single-buffered steps, 2 double-buffered (pipelined) steps (csrc/kernels/decode_attention.cuh); pdl_late: with
// pdl, the blocks let the next kernel launch only after their own wait, so that it starts after every kernel before
// this one has finished (what the quantized sum's b_first needs); split_by_len: the splits divide each sequence's
// length instead of the cache's capacity (decode_len_split in csrc/kernels/decode_attention.cuh).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seqlens, double scale, bool pdl, int64_t blocks_per_sm,
                            bool merge_kernel, int64_t variant, bool pdl_late, bool split_by_len);

// rotary_kv_write, then decode_attention, in one launch (csrc/kernels/decode_attention.cuh, DecodeNewToken): qkv
// [b, 1, nh*3*hd], positions [b, 1] (each sequence's new slot and rotary position; slots outside the cache are not
// written), caches [B >= b, nh, T, hd] (written at the new slot), seqlens [b] -> the attention output [b, nh, hd].
// pdl, blocks_per_sm, merge_kernel, variant, pdl_late and split_by_len as decode_attention.
at::Tensor rotary_decode_attention(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                                   const at::Tensor& sin, int64_t rotary_ndims, at::Tensor& k_cache,
                                   at::Tensor& v_cache, const at::Tensor& seqlens, double scale, bool pdl,
                                   int64_t blocks_per_sm, bool merge_kernel, int64_t variant, bool pdl_late,
                                   bool split_by_len);

// decode_attention over the paged cache (defined in paged.cu; csrc/kernels/paged_attention.cuh): sequence i attends
// over its first seqlens[i] positions through its row of block_tables. q [b, nh, hd], caches [num_blocks, nh, bs, hd]
// (bs a power of two), block_tables [b, max_blocks] and seqlens [b] int32 -> [b, nh, hd]; seqlens[i] <= 0 gives
// zeros. pdl, blocks_per_sm, merge_kernel and pdl_late as decode_attention.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seqlens, double scale, bool pdl,
                                  int64_t blocks_per_sm, bool merge_kernel, bool pdl_late);

at::Tensor layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, bool pdl);

std::tuple<at::Tensor, at::Tensor> dual_layernorm(const at::Tensor& x, const at::Tensor& weight1,
                                                  const at::Tensor& bias1, const at::Tensor& weight2,
                                                  const at::Tensor& bias2, double eps, bool pdl);

// act(x @ weight.T + bias) + residual for x with <= 16 rows; activation 0 none, 1 gelu (erf), 2 gelu (tanh),
// 3 relu; variant: GemvVariant (csrc/kernels/gemv.cuh; 0 auto); pdl: programmatic
// dependent launch (sm_90).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                int64_t activation, const std::optional<at::Tensor>& residual, int64_t variant, bool pdl);

// Weight-only quantized linears (defined in quant.cu; csrc/kernels/quant_gemm.cuh): act(x @ W.T + bias) + residual for
// x [..., k] with 1-64 rows (fp16, bf16 from sm_80), W dequantized as the formats' dequantize(x.dtype) does.
// int8: qweight int8 [n, k], scales [n] (k % 64 == 0). int4: qweight int32 [n, k / 8], scales [n, k / group_size],
// zeros uint8 [n, k / group_size] (k % 128 == 0, group_size % 32 == 0). activation as gemv; variant: QuantVariant
// (0 auto, 1 or 2 tiles of 16 channels a warp); pdl: programmatic dependent launch (sm_90).
at::Tensor quant_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& bias, int64_t activation,
                             const std::optional<at::Tensor>& residual, int64_t variant, bool pdl);
at::Tensor quant_linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& bias,
                             int64_t activation, const std::optional<at::Tensor>& residual, int64_t variant, bool pdl);
// The same in the kernels' tiled layout (TiledInt8Weight / TiledInt4Weight): bits 8 or 4, n = out_features; qweight of
// n rounded up to 16 rows; int4's scales are int32 words scale bits | zero << 16 [n_pad / 16, groups, 16]. sm_80+.
at::Tensor quant_linear_tiled(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              int64_t out_features, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias, int64_t activation,
                              const std::optional<at::Tensor>& residual, int64_t variant, bool pdl);
// A parallel-residual layer's pairs of tiled linears (one format, 1-8 rows, the auto variant) in one launch each:
// (act1(x1 W1^T + b1), act2(x2 W2^T + b2)), and x1 W1^T + x2 W2^T + b1 + b2 + residual (W1, W2 of out_features rows).
// The sum's b_first: x2's chunks first, read before the dependent launch's wait: only where x2 is complete when the
// launch starts (the kernel before it launched with pdl_late or without PDL; csrc/kernels/quant_gemm.cuh).
std::tuple<at::Tensor, at::Tensor> quant_linear_tiled_pair(
    const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1, int64_t out_features1,
    int64_t group_size1, const std::optional<at::Tensor>& bias1, int64_t activation1, const at::Tensor& x2,
    const at::Tensor& qweight2, const at::Tensor& scales2, int64_t out_features2, int64_t group_size2,
    const std::optional<at::Tensor>& bias2, int64_t activation2, int64_t bits, bool pdl, int64_t warps);
// The pair with the dual LayerNorm before it: (act1(LN1(x) W1^T + b1), act2(LN2(x) W2^T + b2)), LN_i with weight
// ln_weight_i and bias ln_bias_i over x's hidden size (a multiple of 8; rows x hidden <= 16384).
std::tuple<at::Tensor, at::Tensor> quant_linear_tiled_norm_pair(
    const at::Tensor& x, const at::Tensor& ln_weight1, const at::Tensor& ln_bias1, const at::Tensor& ln_weight2,
    const at::Tensor& ln_bias2, double eps, const at::Tensor& qweight1, const at::Tensor& scales1,
    int64_t out_features1, int64_t group_size1, const std::optional<at::Tensor>& bias1, int64_t activation1,
    const at::Tensor& qweight2, const at::Tensor& scales2, int64_t out_features2, int64_t group_size2,
    const std::optional<at::Tensor>& bias2, int64_t activation2, int64_t bits, bool pdl, int64_t warps);
at::Tensor quant_linear_tiled_sum(const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1,
                                  int64_t group_size1, const at::Tensor& x2, const at::Tensor& qweight2,
                                  const at::Tensor& scales2, int64_t group_size2, int64_t out_features, int64_t bits,
                                  const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
                                  const std::optional<at::Tensor>& residual, bool pdl, bool b_first);
// quant_linear_tiled_sum, then the next layer's dual LayerNorm of its output in the same launch (its last block):
// (y, LN1(y), LN2(y)), up to 8 rows of a hidden size that is a multiple of 8, at most 8192.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_linear_tiled_sum_norm(
    const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1, int64_t group_size1,
    const at::Tensor& x2, const at::Tensor& qweight2, const at::Tensor& scales2, int64_t group_size2,
    int64_t out_features, int64_t bits, const std::optional<at::Tensor>& bias1,
    const std::optional<at::Tensor>& bias2, const std::optional<at::Tensor>& residual, const at::Tensor& ln_weight1,
    const at::Tensor& ln_bias1, const at::Tensor& ln_weight2, const at::Tensor& ln_bias2, double eps, bool pdl,
    bool b_first);

// Two single-row GEMVs in one launch (csrc/kernels/gemv_fused.cuh): (act1(x1 W1^T + b1), act2(x2 W2^T + b2)).
// x1, x2: one row each ([..., k], numel k, k % 16 == 0). ksplit: warps per row's k (0 auto, 2, 4, 8); min_blocks:
// blocks per SM the registers are fitted to (0 auto, 2, 3, 4).
std::tuple<at::Tensor, at::Tensor> gemv_pair(const at::Tensor& x1, const at::Tensor& weight1,
                                             const std::optional<at::Tensor>& bias1, int64_t activation1,
                                             const at::Tensor& x2, const at::Tensor& weight2,
                                             const std::optional<at::Tensor>& bias2, int64_t activation2,
                                             int64_t ksplit, int64_t min_blocks, bool pdl);

// x1 W1^T + x2 W2^T + b1 + b2 + residual for one row (one GEMV over the concatenated k, fp32 sum, one rounding).
// push_buffers (p2p_all_reduce's): the output also goes to every peer's slot, for p2p_reduce_dual_layernorm there.
at::Tensor gemv_sum(const at::Tensor& x1, const at::Tensor& weight1, const at::Tensor& x2, const at::Tensor& weight2,
                    const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
                    const std::optional<at::Tensor>& residual, int64_t ksplit, int64_t min_blocks, bool pdl,
                    at::OptionalIntArrayRef push_buffers, int64_t push_rank, int64_t push_slot_bytes);
// gemv_sum, then the next layer's dual LayerNorm of its output in the same launch (its last block): (y, LN1(y),
// LN2(y)), out_features a multiple of 8 up to 8192; no push.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemv_sum_norm(
    const at::Tensor& x1, const at::Tensor& weight1, const at::Tensor& x2, const at::Tensor& weight2,
    const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
    const std::optional<at::Tensor>& residual, const at::Tensor& ln_weight1, const at::Tensor& ln_bias1,
    const at::Tensor& ln_weight2, const at::Tensor& ln_bias2, double eps, int64_t ksplit, int64_t min_blocks,
    bool pdl);

// The all-reduce of a tensor-parallel layer's partial x (one row; the peers' pushed by gemv_sum) with the dual
// LayerNorm after it: (sum over ranks, LN1(sum), LN2(sum)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> p2p_reduce_dual_layernorm(
    const at::Tensor& x, at::IntArrayRef buffers, int64_t rank, int64_t slot_bytes, const at::Tensor& weight1,
    const at::Tensor& bias1, const at::Tensor& weight2, const at::Tensor& bias2, double eps, bool pdl);

// Sum of x over the ranks whose peer-to-peer buffers are `buffers` (csrc/kernels/allreduce.cuh; this rank's own at
// index `rank`): a one-shot all-reduce for tensors of at most slot_bytes / 2 (x.nbytes % 16 == 0). Every rank must call
// it the same number of times, in the same order.
at::Tensor p2p_all_reduce(const at::Tensor& x, at::IntArrayRef buffers, int64_t rank, int64_t slot_bytes, bool pdl);

}  // namespace neox_rt
