// Scratch shared by the decode-attention launchers (decode_attention in ops.cu, paged_decode_attention in paged.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace neox_rt {

// The per-device buffer of at least `needed` ticket counters for the in-kernel merge of the splits, all zero (every
// launch leaves them zero); null while `stream` is capturing and the buffer is too small (the launch then merges in
// a second kernel). Defined in ops.cu, where the contract is spelled out.
int* decode_counters(int device, int64_t needed, cudaStream_t stream);

}  // namespace neox_rt
