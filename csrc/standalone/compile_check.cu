// Compile check for the framework-free kernels: includes every header in csrc/kernels and instantiates every
// launcher for every dtype, so `nvcc -c` for one arch compiles every kernel template that the extension uses.
// scripts/compile_cuda.sh runs it for sm_75 and sm_90; CMakeLists.txt builds it into neox_rt_kernels.
#include "kernels/decode_attention.cuh"
#include "kernels/gemv.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/rotary_kv_write.cuh"
#include "kernels/softmax.cuh"

namespace neox_rt {

#define NEOX_RT_INSTANTIATE_ALL(T)                                                                              \
  template cudaError_t launch_scaled_causal_softmax<T>(const T*, const int64_t*, T*, int, int, int, int, float, \
                                                       cudaStream_t);                                           \
  template cudaError_t launch_rotary_kv_write<T>(const T*, const int64_t*, const float*, const float*, T*, T*, \
                                                 T*, int, int, int, int, int, int64_t, int64_t, int, bool,     \
                                                 cudaStream_t);                                                 \
  template cudaError_t launch_decode_attention<T>(const T*, const T*, const T*, const int64_t*, T*, float*,   \
                                                  float*, int*, int, int, int, int64_t, int, float, bool, bool,\
                                                  cudaStream_t);                                               \
  template cudaError_t launch_layernorm<T>(const T*, const T*, const T*, T*, const T*, const T*, T*, int64_t,  \
                                           int, float, int, cudaStream_t);

NEOX_RT_INSTANTIATE_ALL(float)
NEOX_RT_INSTANTIATE_ALL(__half)
NEOX_RT_INSTANTIATE_ALL(__nv_bfloat16)
template cudaError_t launch_gemv<__half>(const __half*, const __half*, const __half*, const __half*, __half*, int,
                                         int, int, int, int, bool, cudaStream_t);
template cudaError_t launch_gemv<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
                                                const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, bool,
                                                cudaStream_t);

}  // namespace neox_rt
