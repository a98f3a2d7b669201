// Fused scale + causal mask + softmax for prefill attention scores (any column count).
//
// out[r, j] = exp(scale * x[r, j] - M) / L for key j <= query position p(r), 0 for masked keys, where
// M, L are the max and sum over the unmasked keys; fp32 math, the input dtype out.
// One block per row; pass 1 keeps an online (max, sum) per thread over a block-strided loop of columns, so
// rows of any length work (no 2048-column limit); pass 2 re-reads the row and writes it.
#pragma once

#include "common.cuh"

namespace neox_rt {

template <typename T>
__global__ void scaled_causal_softmax_kernel(const T* __restrict__ scores,        // [b, nh, s, t]
                                             const int64_t* __restrict__ qpos,    // [b, s]
                                             T* __restrict__ out,                 // [b, nh, s, t]
                                             int nh, int s, int t, float scale) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;                      // (bi * nh + h) * s + si
  const int si = static_cast<int>(row % s);
  const int bi = static_cast<int>(row / (static_cast<int64_t>(s) * nh));
  const int64_t p = qpos[static_cast<int64_t>(bi) * s + si];
  // Keys 0..p are visible; positions past the row are clipped (negative p masks the whole row).
  const int valid = p < 0 ? 0 : static_cast<int>(p + 1 < t ? p + 1 : t);
  const T* x = scores + row * t;
  T* y = out + row * t;

  float m = -INFINITY, l = 0.f;
  for (int j = threadIdx.x; j < valid; j += blockDim.x) {
    const float v = to_float(x[j]) * scale;
    if (v > m) {
      l = l * __expf(m - v) + 1.f;
      m = v;
    } else {
      l += __expf(v - m);
    }
  }
  const float row_max = block_max(m, scratch);
  const float row_sum = block_sum(m == -INFINITY ? 0.f : l * __expf(m - row_max), scratch);
  // A fully masked row has no distribution; write zeros rather than NaN.
  const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    const float prob = j < valid ? __expf(to_float(x[j]) * scale - row_max) * inv : 0.f;
    y[j] = from_float<T>(prob);
  }
}

// rows = b * nh * s. Threads: a multiple of 32 up to 1024 that covers short rows without idle warps.
template <typename T>
cudaError_t launch_scaled_causal_softmax(const T* scores, const int64_t* qpos, T* out, int b, int nh, int s,
                                         int t, float scale, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(b) * nh * s;
  if (rows == 0 || t == 0) return cudaSuccess;
  int threads = ((t + 31) / 32) * 32;
  threads = threads < 128 ? 128 : (threads > 1024 ? 1024 : threads);
  scaled_causal_softmax_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(scores, qpos, out, nh, s,
                                                                                       t, scale);
  return cudaGetLastError();
}

}  // namespace neox_rt
