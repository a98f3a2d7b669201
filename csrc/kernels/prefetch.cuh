// L2 prefetch of a weight the next kernels will stream (decode): asks the L2 for the first `bytes` of a tensor and
// returns at once (cp.async.bulk.prefetch.L2 on sm_90 is fire and forget), so that DRAM keeps filling the L2 while
// the GPU waits on something that moves little memory: the tensor-parallel all-reduce, the LayerNorm and
// attention between GEMVs. The GEMV that then reads the prefetched rows finds them in the L2.
//
// Programmatic dependent launch (`pdl`, sm_90): the kernel lets its dependents launch at once, issues its
// prefetches while the previous kernel (the GEMV before the all-reduce) drains, and then waits for that kernel
// (griddepcontrol.wait) so that its own completion implies the previous kernel's: a kernel launched after it
// without PDL (NCCL's all-reduce) reads complete outputs. It reads and writes nothing itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace neox_rt {

constexpr int kPrefetchThreads = 32;
constexpr int kPrefetchPiece = 4 << 10;  // bytes per bulk prefetch (one per thread per step): 128 KB a block
constexpr int kPrefetchMaxBlocks = 264;

// Line by line (prefetch.global.L2, one 128-byte line a thread a step, 256-thread blocks): the form that needs no
// bulk-copy unit (kPrefetchLines); the default asks the bulk-copy unit of each SM for 4 KB at a time.
constexpr int kPrefetchBulk = 0;
constexpr int kPrefetchLines = 1;
constexpr int kPrefetchLineThreads = 256;

template <bool PDL>
__global__ void __launch_bounds__(kPrefetchLineThreads)
    prefetch_l2_lines_kernel(const char* __restrict__ p, int64_t bytes) {
  if (PDL) pdl_launch_dependents();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kPrefetchLineThreads * 128;
  for (int64_t off = (static_cast<int64_t>(blockIdx.x) * kPrefetchLineThreads + threadIdx.x) * 128; off < bytes;
       off += stride)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
  if (PDL) pdl_wait();
}

template <bool PDL>
__global__ void __launch_bounds__(kPrefetchThreads) prefetch_l2_kernel(const char* __restrict__ p, int64_t bytes) {
  if (PDL) pdl_launch_dependents();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kPrefetchThreads * kPrefetchPiece;
  for (int64_t off = (static_cast<int64_t>(blockIdx.x) * kPrefetchThreads + threadIdx.x) * kPrefetchPiece;
       off < bytes; off += stride) {
    const int n = static_cast<int>(bytes - off < kPrefetchPiece ? bytes - off : kPrefetchPiece);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + off), "r"(n) : "memory");
#else
    for (int line = 0; line < n; line += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off + line));
#endif
  }
  if (PDL) pdl_wait();
}

// p 16-byte aligned, bytes a multiple of 16 (the launcher rounds down). bytes <= 0: nothing is launched.
// variant: kPrefetchBulk or kPrefetchLines; sms: the GPU's SM count (the line form's grid).
inline cudaError_t launch_prefetch_l2(const void* p, int64_t bytes, int variant, int sms, bool pdl,
                                      cudaStream_t stream) {
  bytes &= ~static_cast<int64_t>(15);
  if (bytes <= 0) return cudaSuccess;
  if (variant == kPrefetchLines) {
    const int64_t lines = (bytes + 127) / 128;
    const int64_t want = (lines + kPrefetchLineThreads - 1) / kPrefetchLineThreads;
    const int blocks = static_cast<int>(want < sms ? want : sms);
    return launch_kernel(pdl, prefetch_l2_lines_kernel<false>, prefetch_l2_lines_kernel<true>, dim3(blocks),
                         dim3(kPrefetchLineThreads), stream, static_cast<const char*>(p), bytes);
  }
  const int64_t per_block = static_cast<int64_t>(kPrefetchThreads) * kPrefetchPiece;
  const int blocks = static_cast<int>((bytes + per_block - 1) / per_block < kPrefetchMaxBlocks
                                          ? (bytes + per_block - 1) / per_block
                                          : kPrefetchMaxBlocks);
  return launch_kernel(pdl, prefetch_l2_kernel<false>, prefetch_l2_kernel<true>, dim3(blocks),
                       dim3(kPrefetchThreads), stream, static_cast<const char*>(p), bytes);
}

}  // namespace neox_rt
