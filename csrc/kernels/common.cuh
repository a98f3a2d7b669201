// Shared device helpers for the neox_rt kernels: dtype conversion, vector access, warp/block reductions.
// Framework-free (no torch headers): compiles with plain nvcc for sm_75 and newer. All arithmetic is done
// in fp32; bf16 is only converted (the conversion intrinsics exist on sm_75), never computed natively.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

namespace neox_rt {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive elements moved as one aligned load/store (N * sizeof(T) in {2, 4, 8, 16} bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats. blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(x);
}

// 16-byte load that bypasses L1 and is first to be evicted from L2 (ld.global.cs): for data read exactly once
// (weights, the KV cache in decode attention).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec_stream(const T* p) {
  static_assert(sizeof(T) * N == 16, "streaming loads are 16 bytes");
  const int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
  Vec<T, N> v;
  *reinterpret_cast<int4*>(&v) = raw;
  return v;
}

// Aligned load of N elements through the L2 only (ld.global.cg): for data another kernel may still be writing when
// this one starts (programmatic dependent launch), read after griddepcontrol.wait. The default path may use the
// read-only (non-coherent) cache, whose contract is data that stays unchanged for the kernel's lifetime.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec_cg(const T* p) {
  constexpr int B = static_cast<int>(sizeof(T)) * N;
  static_assert(B == 2 || B == 4 || B == 8 || B % 16 == 0, "2, 4, 8 or a multiple of 16 bytes");
  using Raw = typename std::conditional<
      B % 16 == 0, uint4,
      typename std::conditional<B == 8, uint2,
                                typename std::conditional<B == 4, unsigned, unsigned short>::type>::type>::type;
  constexpr int R = B % 16 == 0 ? B / 16 : 1;
  Vec<T, N> v;
#pragma unroll
  for (int r = 0; r < R; ++r) reinterpret_cast<Raw*>(&v)[r] = __ldcg(reinterpret_cast<const Raw*>(p) + r);
  return v;
}

// 16-byte load through L1 as an ordinary (weak, coherent) global load, ld.global.ca, never the read-only path
// the compiler picks for const __restrict__ pointers: for data the previous kernel writes and this one reads many
// times after griddepcontrol.wait (the GEMV's x), where an L2 round trip per read would cost (see load_vec_cg).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec_ca(const T* p) {
  static_assert(sizeof(T) * N == 16, "16-byte loads");
  uint4 raw;
  asm volatile("ld.global.ca.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
               : "l"(p));  // volatile: stays after griddepcontrol.wait (also volatile asm); no memory clobber
  Vec<T, N> v;
  *reinterpret_cast<uint4*>(&v) = raw;
  return v;
}

// atomicAdd with acquire-release semantics at GPU scope: writes ordered before it (in this thread, or in its block
// through a barrier) are visible to whoever acquires the new value, and writes released before the values it
// reads are visible to this thread afterwards.
__device__ __forceinline__ int atomic_add_acq_rel_gpu(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

template <int = 0>
__global__ void arch_probe_kernel() {}

// A value of the current device asked of the runtime once (query(dev); threads racing on first use store the same
// value) and kept in `known`, a slot a device (0: not asked yet); 0 where the runtime cannot say.
constexpr int kMaxKnownDevices = 64;
template <typename Query>
inline int once_per_device(std::atomic<int> (&known)[kMaxKnownDevices], Query query) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const bool kept = dev >= 0 && dev < kMaxKnownDevices;
  if (kept) {
    const int v = known[dev].load(std::memory_order_relaxed);
    if (v != 0) return v;
  }
  const int v = query(dev);
  if (kept && v != 0) known[dev].store(v, std::memory_order_relaxed);
  return v;
}

// The architecture this build's kernels run as on the current device, e.g. 75 or 90: the PTX target their code was
// compiled from (as CUB's PtxVersion asks it), which is below the device's compute capability where the driver
// compiles an older target's PTX: an extension built for "7.5+PTX" runs its __CUDA_ARCH__ 750 code on an H100, with
// no bf16 tensor cores and no griddepcontrol, so the host must not choose those paths from the device's capability.
inline int kernel_arch() {
  static std::atomic<int> known[kMaxKnownDevices];
  return once_per_device(known, [](int) {
    cudaFuncAttributes attr;
    return cudaFuncGetAttributes(&attr, arch_probe_kernel<0>) == cudaSuccess ? attr.ptxVersion : 0;
  });
}

// The current device's SM count.
inline int device_sm_count() {
  static std::atomic<int> known[kMaxKnownDevices];
  return once_per_device(known, [](int dev) {
    int sms = 0;
    return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess ? sms : 0;
  });
}

// Programmatic dependent launch pays only where the kernels call griddepcontrol (compiled for sm_90+, on sm_90+).
inline bool pdl_supported() { return kernel_arch() >= 90; }

// Grid dependency control (PTX griddepcontrol, sm_90+); no-ops on older architectures.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Launch a kernel, as `plain` or, with `pdl` (sm_90 programmatic dependent launch), as `programmatic` (the same
// kernel instantiated to call pdl_wait() before reading the previous kernel's outputs) with programmatic stream
// serialization, so that it may start while the previous kernel of the stream drains.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(bool pdl, void (*plain)(Params...), void (*programmatic)(Params...), dim3 grid, dim3 block,
                          cudaStream_t stream, Args... args) {
  if (!pdl) {
    plain<<<grid, block, 0, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, programmatic, args...);
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace neox_rt
