// Small-batch linear layer (GEMV-like): y[m, n] = act(x[m, :] . W[n, :] + bias[n]) for m <= 16 rows.
//
// Decode is memory-bound on W: each warp streams two rows of W once with 16-byte loads and applies them to all
// m rows of x (x is small and stays in L1/L2), accumulating in fp32; the bias and the activation are fused
// into the epilogue. Requires k % 8 == 0 and 16-byte aligned x and W (fp16 / bf16).
#pragma once

#include "common.cuh"

namespace neox_rt {

enum Activation : int { kActNone = 0, kActGeluErf = 1, kActGeluTanh = 2, kActRelu = 3 };

__device__ __forceinline__ float apply_activation(float v, int act) {
  switch (act) {
    case kActGeluErf: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kActGeluTanh: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case kActRelu: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

constexpr int kGemvWarps = 4;           // warps per block
constexpr int kGemvOutputsPerWarp = 2;  // rows of W per warp (x loads are shared between them)

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
gemv_kernel(const T* __restrict__ x,      // [m, k]
            const T* __restrict__ w,      // [n, k]
            const T* __restrict__ bias,   // [n] or null
            T* __restrict__ y,            // [m, n]
            int m, int n, int k, int act) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int NPW = kGemvOutputsPerWarp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * NPW;
  if (n0 >= n) return;
  float acc[NPW][MT];
#pragma unroll
  for (int o = 0; o < NPW; ++o)
#pragma unroll
    for (int r = 0; r < MT; ++r) acc[o][r] = 0.f;

  const T* wrow[NPW];
#pragma unroll
  for (int o = 0; o < NPW; ++o) wrow[o] = w + static_cast<int64_t>(n0 + o < n ? n0 + o : n0) * k;

  for (int c = lane * VEC; c < k; c += 32 * VEC) {
    float wv[NPW][VEC];
#pragma unroll
    for (int o = 0; o < NPW; ++o) {
      const Vec<T, VEC> v = load_vec<T, VEC>(wrow[o] + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) wv[o][e] = to_float(v.v[e]);
    }
#pragma unroll
    for (int r = 0; r < MT; ++r) {
      if (r < m) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + static_cast<int64_t>(r) * k + c);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xf = to_float(xv.v[e]);
#pragma unroll
          for (int o = 0; o < NPW; ++o) acc[o][r] += xf * wv[o][e];
        }
      }
    }
  }
#pragma unroll
  for (int o = 0; o < NPW; ++o) {
#pragma unroll
    for (int r = 0; r < MT; ++r) {
      const float v = warp_sum(acc[o][r]);
      if (lane == 0 && r < m && n0 + o < n) {
        const float b = bias != nullptr ? to_float(bias[n0 + o]) : 0.f;
        y[static_cast<int64_t>(r) * n + n0 + o] = from_float<T>(apply_activation(v + b, act));
      }
    }
  }
}

inline int gemv_max_rows() { return 16; }

// m in 1..16 (rounded up to 1, 2, 4, 8 or 16 rows of registers), k % 8 == 0, 16-byte aligned x and w.
template <typename T>
cudaError_t launch_gemv(const T* x, const T* w, const T* bias, T* y, int m, int n, int k, int act,
                        cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > gemv_max_rows() || k % (16 / static_cast<int>(sizeof(T))) != 0) return cudaErrorInvalidValue;
  const int per_block = kGemvWarps * kGemvOutputsPerWarp;
  const dim3 grid((n + per_block - 1) / per_block), block(kGemvWarps * 32);
  if (m <= 1) gemv_kernel<T, 1><<<grid, block, 0, stream>>>(x, w, bias, y, m, n, k, act);
  else if (m <= 2) gemv_kernel<T, 2><<<grid, block, 0, stream>>>(x, w, bias, y, m, n, k, act);
  else if (m <= 4) gemv_kernel<T, 4><<<grid, block, 0, stream>>>(x, w, bias, y, m, n, k, act);
  else if (m <= 8) gemv_kernel<T, 8><<<grid, block, 0, stream>>>(x, w, bias, y, m, n, k, act);
  else gemv_kernel<T, 16><<<grid, block, 0, stream>>>(x, w, bias, y, m, n, k, act);
  return cudaGetLastError();
}

}  // namespace neox_rt
