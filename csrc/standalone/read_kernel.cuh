// read_kernel: a pure read of n 16-byte vectors (8 streaming loads in flight a thread, 256 threads a block, 2048
// vectors a block), the bandwidth the standalone probes (decode_probe.cu, quant_probe.cu) time their kernels against
// and flush L2 with. Include after a kernel header (it uses kernels/common.cuh's programmatic-dependent-launch calls).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "kernels/common.cuh"

template <bool PDL>
__global__ void __launch_bounds__(256) read_kernel(const int4* p, size_t n, int* sink) {
  if (PDL) {
    neox_rt::pdl_launch_dependents();
    neox_rt::pdl_wait();
  }
  const size_t base = blockIdx.x * size_t(256 * 8) + threadIdx.x;
  int acc = 0;
  int4 v[8];
#pragma unroll
  for (int u = 0; u < 8; ++u)
    if (base + u * 256 < n) v[u] = __ldcs(p + base + u * 256);
#pragma unroll
  for (int u = 0; u < 8; ++u)
    if (base + u * 256 < n) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  if (acc == 0x7fffffff) sink[0] = acc;
}
