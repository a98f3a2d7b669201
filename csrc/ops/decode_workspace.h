// Scratch shared by the decode-attention launchers (decode_attention in ops.cu, paged_decode_attention in paged.cu)
// and the sums with the next LayerNorm in their last block (quant.cu, ops.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace neox_rt {

// The per-device buffer of at least `needed` ticket counters for the in-kernel merge of the splits, all zero (every
// launch leaves them zero); null while `stream` is capturing and the buffer is too small (the launch then merges in
// a second kernel). Defined in ops.cu, where the contract is spelled out.
int* decode_counters(int device, int64_t needed, cudaStream_t stream);

// The counter of that buffer that the sums with the next LayerNorm (quant_linear_tiled_sum_norm, gemv_sum_norm) take
// as their ticket (the last of the
// 2^16 every buffer has: past the b x heads a decode-attention launch uses; each launch that takes it, like each
// attention's, starts after the previous one has ended and leaves it zero).
constexpr int64_t kSumNormTicket = (int64_t{1} << 16) - 1;

}  // namespace neox_rt
