// Compile check for the framework-free kernels: includes every header in csrc/kernels and instantiates every
// launcher for every dtype, so `nvcc -c` for one arch compiles every kernel template that the extension uses.
// scripts/compile_cuda.sh runs it for sm_75 and sm_90; CMakeLists.txt builds it into neox_rt_kernels.
#include "kernels/allreduce.cuh"
#include "kernels/decode_attention.cuh"
#include "kernels/gemv.cuh"
#include "kernels/gemv_fused.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/paged_attention.cuh"
#include "kernels/quant_gemm.cuh"
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
                                                  cudaStream_t, const DecodeNewToken<T>*, bool, bool);         \
  template cudaError_t launch_layernorm<T>(const T*, const T*, const T*, T*, const T*, const T*, T*, int64_t,  \
                                           int, float, int, bool, cudaStream_t);                 \
  template cudaError_t launch_p2p_all_reduce<T>(const T*, T*, long long, const P2PBuffers&, bool, cudaStream_t); \
  template cudaError_t launch_p2p_reduce_layernorm<T>(const T*, const P2PBuffers&, T*, const T*, const T*, T*,      \
                                                      const T*, const T*, T*, int, float, int, bool, cudaStream_t);

NEOX_RT_INSTANTIATE_ALL(float)
NEOX_RT_INSTANTIATE_ALL(__half)
NEOX_RT_INSTANTIATE_ALL(__nv_bfloat16)
// Decode attention over the paged cache (#23): every head size, fp32, fp16 and bf16.
#define NEOX_RT_INSTANTIATE_PAGED(T)                                                                                \
  template cudaError_t launch_paged_decode_attention<T>(const T*, const T*, const T*, const int*, const int*, T*,  \
                                                        float*, float*, int*, int, int, int, int, int, int, int,   \
                                                        float, bool, cudaStream_t, bool);
NEOX_RT_INSTANTIATE_PAGED(float)
NEOX_RT_INSTANTIATE_PAGED(__half)
NEOX_RT_INSTANTIATE_PAGED(__nv_bfloat16)
#undef NEOX_RT_INSTANTIATE_PAGED
template cudaError_t launch_gemv<__half>(const __half*, const __half*, const __half*, const __half*, __half*, int,
                                         int, int, int, int, bool, cudaStream_t);
template cudaError_t launch_gemv<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
                                                const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, bool,
                                                cudaStream_t);
// The weight-only quantized linears (W8A16, W4A16), row-major and tiled: every configuration, both formats, fp16 and
// bf16 (bf16 kernels and the tiled layout compile to a trap below sm_80; the launchers never run them there).
#define NEOX_RT_INSTANTIATE_QUANT(T)                                                                              \
  template cudaError_t launch_quant_linear_int8<T>(const T*, const int8_t*, const T*, const T*, const T*, T*, int,   \
                                                   int, int, int, int, bool, cudaStream_t);                        \
  template cudaError_t launch_quant_linear_int4<T>(const T*, const int32_t*, const T*, const uint8_t*, const T*,     \
                                                   const T*, T*, int, int, int, int, int, int, bool, cudaStream_t);  \
  template cudaError_t launch_quant_linear_int8_tiled<T>(const T*, const int8_t*, const T*, const T*, const T*, T*,  \
                                                         int, int, int, int, int, bool, cudaStream_t);              \
  template cudaError_t launch_quant_linear_int4_tiled<T>(const T*, const int32_t*, const int32_t*, const T*,         \
                                                         const T*, T*, int, int, int, int, int, int, bool,          \
                                                         cudaStream_t);                                             \
  NEOX_RT_INSTANTIATE_QUANT_FUSED(T, QuantInt8)                                                                     \
  NEOX_RT_INSTANTIATE_QUANT_FUSED(T, QuantInt4)
// the fused pairs of tiled linears (quant_gemm_pair_kernel, quant_gemm_sum_kernel)
#define NEOX_RT_INSTANTIATE_QUANT_FUSED(T, F)                                                                     \
  template cudaError_t launch_quant_gemm_pair<T, F>(const QuantOperand<T>&, const QuantOperand<T>&, const T*,        \
                                                    const T*, T*, T*, int, int, int, int, int, bool, cudaStream_t,    \
                                                    const QuantNorm<T>&, int, int);                                   \
  template cudaError_t launch_quant_gemm_sum<T, F>(const QuantOperand<T>&, const QuantOperand<T>&, const T*,         \
                                                   const T*, const T*, T*, int, int, bool, cudaStream_t,              \
                                                   const SumNorm<T>&, bool);
NEOX_RT_INSTANTIATE_QUANT(__half)
NEOX_RT_INSTANTIATE_QUANT(__nv_bfloat16)
#undef NEOX_RT_INSTANTIATE_QUANT
#undef NEOX_RT_INSTANTIATE_QUANT_FUSED
template cudaError_t launch_gemv2<__half>(const GemvProblem<__half>&, const GemvProblem<__half>&, bool, int, int,
                                          bool, cudaStream_t, const P2PBuffers&, const SumNorm<__half>&);
template cudaError_t launch_gemv2<__nv_bfloat16>(const GemvProblem<__nv_bfloat16>&,
                                                 const GemvProblem<__nv_bfloat16>&, bool, int, int, bool, cudaStream_t,
                                                 const P2PBuffers&, const SumNorm<__nv_bfloat16>&);

// Decode attention's lane layout (kDecodeNarrow): head size 96 in fp16/bf16 uses groups of 4 lanes with 3 vectors
// each (no idle lane); 80 keeps 16-lane groups (a narrow group would need 5 vectors a lane); the powers of two are
// the same in both layouts; the block step stays 32 keys where the measurements were made.
static_assert(DecodeLayout<__half, 96, true>::LPK == 4 && DecodeLayout<__half, 96, true>::VPL == 3, "narrow 96");
static_assert(DecodeLayout<__half, 96, true, 0>::LPK == 16, "the session-4 layout of 96");
static_assert(DecodeLayout<__nv_bfloat16, 96, true>::LPK == 4, "narrow 96, bf16");
static_assert(DecodeLayout<float, 96, true>::LPK == 8 && DecodeLayout<float, 96, true>::VPL == 3, "narrow 96, fp32");
static_assert(DecodeLayout<__half, 80, true>::LPK == 16, "80 stays wide");
static_assert(DecodeLayout<__half, 128, true>::LPK == 16 && DecodeLayout<__half, 64, true>::LPK == 8 &&
                  DecodeLayout<__half, 256, true>::LPK == 32 && DecodeLayout<__half, 32, true>::LPK == 4,
              "powers of two unchanged");
static_assert(DecodeLayout<__half, 96, true>::STEP == 32 && DecodeLayout<__half, 96, true, 0>::STEP == 32, "step");

}  // namespace neox_rt
