// Launchers of the weight-only quantized linears (W8A16, W4A16; csrc/kernels/quant_gemm.cuh), registered in
// bindings.cpp: each checks its inputs, sets the device guard and the current stream, and dispatches on x's dtype.
// A translation unit of its own (ops.cu holds the other ops); the checks mirror ops.cu's.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/quant_gemm.cuh"
#include "ops/checks.h"
#include "ops/sum_norm.h"
#include "ops/ops.h"

namespace neox_rt {
namespace {

// NEOX_RT_QUANT_PAIR_CT (experiment setting, read once): the fused pair's tiles of channels a warp, 0 (default: the
// launcher's choice), 1 or 2 (launch_quant_gemm_pair's `ct`), for A/B runs.
int pair_tiles_override() {
  static const int ct = [] {
    const char* v = std::getenv("NEOX_RT_QUANT_PAIR_CT");
    return v != nullptr && (v[0] == '1' || v[0] == '2') && v[1] == '\0' ? v[0] - '0' : 0;
  }();
  return ct;
}

// NEOX_RT_QUANT_PAIR_WARPS (experiment setting, read once): the fused pair's warps a block, 0 (default: the launcher's
// choice: 4), 8 or 4 (launch_quant_gemm_pair's `warps`), for A/B runs.
int pair_warps_override() {
  static const int w = [] {
    const char* v = std::getenv("NEOX_RT_QUANT_PAIR_WARPS");
    return v != nullptr && (v[0] == '8' || v[0] == '4') && v[1] == '\0' ? v[0] - '0' : 0;
  }();
  return w;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// What both formats share: x [..., k] fp16 / bf16 (bf16 from sm_80 on) with 1..64 rows, contiguous and 16-byte
// aligned; qweight on x's device, contiguous, 16-byte aligned, of `qdtype` and shape [qrows, qcols]; scales of
// `scales_dtype` (x's dtype unless given); n output features: bias [n]; residual of the output's shape; activation
// 0-3; variant 0-5. Returns the output shape.
std::vector<int64_t> check_quant_common(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                        const std::optional<at::Tensor>& bias, int64_t activation,
                                        const std::optional<at::Tensor>& residual, int64_t variant,
                                        at::ScalarType qdtype, int64_t qcols, const char* op, int64_t n = -1,
                                        int64_t qrows = -1,
                                        std::optional<at::ScalarType> scales_dtype = std::nullopt) {
  CHECK_CUDA(x, "x");
  CHECK_SAME_DEVICE(x, qweight, "x", "qweight");
  CHECK_SAME_DEVICE(x, scales, "x", "scales");
  CHECK_CONTIGUOUS(x, "x");
  CHECK_CONTIGUOUS(qweight, "qweight");
  CHECK_CONTIGUOUS(scales, "scales");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "neox_rt: ", op,
              " supports float16 and bfloat16 x, got ", x.scalar_type());
  CHECK_DTYPE(qweight, qdtype, "qweight");
  CHECK_DTYPE(scales, scales_dtype.value_or(x.scalar_type()), "scales");
  if (n < 0) n = qweight.dim() == 2 ? qweight.size(0) : 0;
  if (qrows < 0) qrows = n;
  TORCH_CHECK(x.dim() >= 1 && qweight.dim() == 2 && qweight.size(0) == qrows && qweight.size(1) == qcols, "neox_rt: ",
              op, " needs x [..., k] and qweight [", fmt(qrows), ", ", fmt(qcols), "] for k = ",
              fmt(x.dim() >= 1 ? x.size(-1) : 0), "; got x ", fmt(x.sizes()), " and qweight ", fmt(qweight.sizes()));
  const int64_t k = x.size(-1), m = k == 0 ? 0 : x.numel() / k;
  TORCH_CHECK(m <= quant_max_rows(), "neox_rt: ", op, " handles at most ", fmt(quant_max_rows()), " rows of x, got ",
              fmt(m), " (dequantize and use F.linear)");
  TORCH_CHECK(aligned16(x) && aligned16(qweight), "neox_rt: ", op, " needs 16-byte aligned x and qweight");
  TORCH_CHECK(activation >= 0 && activation <= 3, "neox_rt: ", op, " activation must be 0 (none), 1 (gelu erf), ",
              "2 (gelu tanh) or 3 (relu), got ", fmt(activation));
  TORCH_CHECK(variant >= kQuantAuto && variant <= kQuantVariantLast, "neox_rt: ", op, " variant must be 0 (auto), ",
              "1 (one tile of 16 channels a warp), 2 (two tiles), 3 (lean), 4 (lean, two tiles) or 5 (fold: zero ",
              "point and scale out of the per-weight work), got ", fmt(variant));
  if (x.scalar_type() == at::kBFloat16) {
    const c10::cuda::CUDAGuard guard(x.device());
    TORCH_CHECK(kernel_arch() >= 80, "neox_rt: ", op, " in bfloat16 needs kernels built for compute capability ",
                "8.0 or newer (bf16 tensor cores); this build runs as sm_", fmt(kernel_arch()), ": use float16");
  }
  if (bias.has_value()) {
    CHECK_SAME_DEVICE(x, *bias, "x", "bias");
    CHECK_CONTIGUOUS(*bias, "bias");
    CHECK_DTYPE(*bias, x.scalar_type(), "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "neox_rt: ", op, " bias must have shape [", fmt(n),
                "], got ", fmt(bias->sizes()));
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  if (residual.has_value()) {
    CHECK_SAME_DEVICE(x, *residual, "x", "residual");
    CHECK_CONTIGUOUS(*residual, "residual");
    CHECK_DTYPE(*residual, x.scalar_type(), "residual");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "neox_rt: ", op,
                " residual must have the output's shape ", fmt(at::IntArrayRef(out_shape)), ", got ",
                fmt(residual->sizes()));
  }
  return out_shape;
}

}  // namespace

at::Tensor quant_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const std::optional<at::Tensor>& bias, int64_t activation,
                             const std::optional<at::Tensor>& residual, int64_t variant, bool pdl) {
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0;
  const auto out_shape = check_quant_common(x, qweight, scales, bias, activation, residual, variant, at::kChar, k,
                                            "quant_linear_int8");
  const int64_t n = qweight.size(0), m = k == 0 ? 0 : x.numel() / k;
  TORCH_CHECK(k > 0 && k % QuantInt8::kChunkK == 0, "neox_rt: quant_linear_int8 needs in_features % ",
              fmt(QuantInt8::kChunkK), " == 0, got ", fmt(k));
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "neox_rt: quant_linear_int8 scales must have shape [",
              fmt(n), "] (one per output channel), got ", fmt(scales.sizes()));
  const c10::cuda::CUDAGuard guard(x.device());
  // Programmatic dependent launch exists from sm_90 on; elsewhere the flag is ignored.
  const bool use_pdl = pdl && pdl_supported();
  auto y = at::empty(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    check_cuda(launch_quant_linear_int8<scalar_t>(
                   ptr<scalar_t>(x), ptr<int8_t>(qweight), ptr<scalar_t>(scales),
                   bias.has_value() ? ptr<scalar_t>(*bias) : nullptr,
                   residual.has_value() ? ptr<scalar_t>(*residual) : nullptr, ptr<scalar_t>(y), static_cast<int>(m),
                   static_cast<int>(n), static_cast<int>(k), static_cast<int>(activation), static_cast<int>(variant),
                   use_pdl, stream),
               "quant_linear_int8");
  };
  if (x.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  return y;
}

at::Tensor quant_linear_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t group_size, const std::optional<at::Tensor>& bias,
                             int64_t activation, const std::optional<at::Tensor>& residual, int64_t variant,
                             bool pdl) {
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0;
  const auto out_shape = check_quant_common(x, qweight, scales, bias, activation, residual, variant, at::kInt,
                                            (k + 7) / 8, "quant_linear_int4");
  const int64_t n = qweight.size(0), m = k == 0 ? 0 : x.numel() / k;
  TORCH_CHECK(k > 0 && k % QuantInt4::kChunkK == 0, "neox_rt: quant_linear_int4 needs in_features % ",
              fmt(QuantInt4::kChunkK), " == 0, got ", fmt(k));
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && k % group_size == 0, "neox_rt: quant_linear_int4 needs a ",
              "group size that is a multiple of 32 and divides in_features ", fmt(k), ", got ", fmt(group_size));
  const int64_t groups = k / group_size;
  CHECK_SAME_DEVICE(x, zeros, "x", "zeros");
  CHECK_CONTIGUOUS(zeros, "zeros");
  CHECK_DTYPE(zeros, at::kByte, "zeros");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) == groups && zeros.sizes() == scales.sizes(),
              "neox_rt: quant_linear_int4 scales and zeros must have shape [", fmt(n), ", ", fmt(groups),
              "] (out_features, in_features / group_size); got ", fmt(scales.sizes()), " and ", fmt(zeros.sizes()));
  const c10::cuda::CUDAGuard guard(x.device());
  const bool use_pdl = pdl && pdl_supported();
  auto y = at::empty(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    check_cuda(launch_quant_linear_int4<scalar_t>(
                   ptr<scalar_t>(x), ptr<int32_t>(qweight), ptr<scalar_t>(scales), ptr<uint8_t>(zeros),
                   bias.has_value() ? ptr<scalar_t>(*bias) : nullptr,
                   residual.has_value() ? ptr<scalar_t>(*residual) : nullptr, ptr<scalar_t>(y), static_cast<int>(m),
                   static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
                   static_cast<int>(activation), static_cast<int>(variant), use_pdl, stream),
               "quant_linear_int4");
  };
  if (x.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  return y;
}

namespace {

// The tiled layout (neox_rt/quant/formats.py TiledInt8Weight / TiledInt4Weight): n output features, qweight of
// n rounded up to 16 rows; bits 8: int8 [n_pad, k], scales [n] of x's dtype; bits 4: int32 [n_pad, k / 8], scales
// the int32 words scale bits | zero << 16 [n_pad / 16, k / group_size, 16]. sm_80+, and the LEAN kernel's bounds.
// Checks one tiled linear's operands (as check_quant_common) and returns the output shape.
std::vector<int64_t> check_tiled(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 int64_t out_features, int64_t bits, int64_t group_size,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 const std::optional<at::Tensor>& residual, int64_t variant, const char* op) {
  TORCH_CHECK(bits == 8 || bits == 4, "neox_rt: ", op, " takes bits 8 or 4, got ", fmt(bits));
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0, n = out_features, n_pad = (n + 15) / 16 * 16;
  TORCH_CHECK(n > 0, "neox_rt: ", op, " needs out_features > 0, got ", fmt(n));
  const bool int4 = bits == 4;
  auto out_shape = check_quant_common(
      x, qweight, scales, bias, activation, residual, variant, int4 ? at::kInt : at::kChar, int4 ? (k + 7) / 8 : k,
      op, n, n_pad, int4 ? std::optional<at::ScalarType>(at::kInt) : std::nullopt);
  const int64_t chunk = int4 ? QuantInt4::kChunkK : QuantInt8::kChunkK;
  TORCH_CHECK(k > 0 && k % chunk == 0, "neox_rt: ", op, " needs in_features % ", fmt(chunk), " == 0, got ", fmt(k));
  if (int4) {
    TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && 512 % group_size == 0 && k % group_size == 0,
                "neox_rt: ", op, " needs a group size dividing 512 and in_features ", fmt(k), " (and a ",
                "multiple of 32), got ", fmt(group_size));
    TORCH_CHECK(scales.dim() == 3 && scales.size(0) == n_pad / 16 && scales.size(1) == k / group_size &&
                    scales.size(2) == 16,
                "neox_rt: ", op, " int4 scale words must have shape [", fmt(n_pad / 16), ", ", fmt(k / group_size),
                ", 16], got ", fmt(scales.sizes()));
  } else {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "neox_rt: ", op, " int8 scales must have shape [", fmt(n),
                "], got ", fmt(scales.sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(kernel_arch() >= 80, "neox_rt: ", op, " needs kernels built for compute capability 8.0 or newer; this ",
              "build runs as sm_", fmt(kernel_arch()), " (use the row-major format there)");
  return out_shape;
}

template <typename T>
QuantOperand<T> tiled_operand(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              int64_t bits, int64_t group_size) {
  return {ptr<T>(x), ptr<uint8_t>(qweight), bits == 4 ? reinterpret_cast<const T*>(ptr<int32_t>(scales))
                                                      : ptr<T>(scales),
          static_cast<int>(x.size(-1)), bits == 4 ? static_cast<int>(group_size) : 0};
}

// The fused pairs' own checks: the second linear's x on the first's device, of its dtype and with its rows (at most
// quant_fused_max_rows()).
void check_fused_pair(const at::Tensor& x1, const at::Tensor& x2, const char* op) {
  CHECK_SAME_DEVICE(x1, x2, "x1", "x2");
  TORCH_CHECK(x1.scalar_type() == x2.scalar_type(), "neox_rt: ", op, " needs x1 and x2 of one dtype, got ",
              x1.scalar_type(), " and ", x2.scalar_type());
  TORCH_CHECK(x1.sizes().slice(0, x1.dim() - 1) == x2.sizes().slice(0, x2.dim() - 1), "neox_rt: ", op,
              " needs x1 and x2 with the same leading shape, got ", fmt(x1.sizes()), " and ", fmt(x2.sizes()));
  const int64_t m = x1.size(-1) == 0 ? 0 : x1.numel() / x1.size(-1);
  TORCH_CHECK(m <= quant_fused_max_rows(), "neox_rt: ", op, " handles at most ", fmt(quant_fused_max_rows()),
              " rows of x, got ", fmt(m), " (use quant_linear_tiled per linear)");
}

}  // namespace

at::Tensor quant_linear_tiled(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              int64_t out_features, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias, int64_t activation,
                              const std::optional<at::Tensor>& residual, int64_t variant, bool pdl) {
  const auto out_shape = check_tiled(x, qweight, scales, out_features, bits, group_size, bias, activation, residual,
                                     variant, "quant_linear_tiled");
  const int64_t k = x.size(-1), n = out_features, m = x.numel() / k;
  const c10::cuda::CUDAGuard guard(x.device());
  const bool use_pdl = pdl && pdl_supported();
  auto y = at::empty(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* b = bias.has_value() ? ptr<scalar_t>(*bias) : nullptr;
    const scalar_t* r = residual.has_value() ? ptr<scalar_t>(*residual) : nullptr;
    if (bits == 4)
      check_cuda(launch_quant_linear_int4_tiled<scalar_t>(
                     ptr<scalar_t>(x), ptr<int32_t>(qweight), ptr<int32_t>(scales), b, r, ptr<scalar_t>(y),
                     static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
                     static_cast<int>(activation), static_cast<int>(variant), use_pdl, stream),
                 "quant_linear_tiled");
    else
      check_cuda(launch_quant_linear_int8_tiled<scalar_t>(
                     ptr<scalar_t>(x), ptr<int8_t>(qweight), ptr<scalar_t>(scales), b, r, ptr<scalar_t>(y),
                     static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(activation),
                     static_cast<int>(variant), use_pdl, stream),
                 "quant_linear_tiled");
  };
  if (x.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  return y;
}

namespace {

// The pair's launch (quant_linear_tiled_pair), or with the dual LayerNorm before it where `ln` holds its four
// parameters (checked by the caller; x2 is then x1): the operands checked, the outputs allocated, the kernel launched.
// `warps`: 0 (NEOX_RT_QUANT_PAIR_WARPS, or the launcher's choice), 8 or 4 (tests of both configurations).
std::tuple<at::Tensor, at::Tensor> launch_tiled_pair(
    const char* op, const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1,
    int64_t out_features1, int64_t group_size1, const std::optional<at::Tensor>& bias1, int64_t activation1,
    const at::Tensor& x2, const at::Tensor& qweight2, const at::Tensor& scales2, int64_t out_features2,
    int64_t group_size2, const std::optional<at::Tensor>& bias2, int64_t activation2, int64_t bits, bool pdl,
    int64_t warps, const at::Tensor* const* ln = nullptr, double eps = 0.0) {
  TORCH_CHECK(warps == 0 || warps == 8 || warps == 4, "neox_rt: ", op, " takes warps 0 (auto), 8 or 4, got ",
              fmt(warps));
  const auto shape1 = check_tiled(x1, qweight1, scales1, out_features1, bits, group_size1, bias1, activation1,
                                  std::nullopt, 0, op);
  const auto shape2 = check_tiled(x2, qweight2, scales2, out_features2, bits, group_size2, bias2, activation2,
                                  std::nullopt, 0, op);
  check_fused_pair(x1, x2, op);
  const int64_t m = x1.numel() / x1.size(-1);
  const c10::cuda::CUDAGuard guard(x1.device());
  const bool use_pdl = pdl && pdl_supported();
  auto y1 = at::empty(shape1, x1.options()), y2 = at::empty(shape2, x1.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const auto a = tiled_operand<scalar_t>(x1, qweight1, scales1, bits, group_size1);
    const auto b = tiled_operand<scalar_t>(x2, qweight2, scales2, bits, group_size2);
    QuantNorm<scalar_t> norm{};
    if (ln != nullptr)
      norm = {ptr<scalar_t>(x1), ptr<scalar_t>(*ln[0]), ptr<scalar_t>(*ln[1]), ptr<scalar_t>(*ln[2]),
              ptr<scalar_t>(*ln[3]), static_cast<float>(eps)};
    const scalar_t* b1 = bias1.has_value() ? ptr<scalar_t>(*bias1) : nullptr;
    const scalar_t* b2 = bias2.has_value() ? ptr<scalar_t>(*bias2) : nullptr;
    auto go = [&](auto launch) {
      check_cuda(launch(a, b, b1, b2, ptr<scalar_t>(y1), ptr<scalar_t>(y2), static_cast<int>(m),
                        static_cast<int>(out_features1), static_cast<int>(out_features2),
                        static_cast<int>(activation1), static_cast<int>(activation2), use_pdl, stream, norm,
                        pair_tiles_override(), warps != 0 ? static_cast<int>(warps) : pair_warps_override()),
                 op);
    };
    if (bits == 4) go(launch_quant_gemm_pair<scalar_t, QuantInt4>);
    else go(launch_quant_gemm_pair<scalar_t, QuantInt8>);
  };
  if (x1.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  return {y1, y2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quant_linear_tiled_pair(
    const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1, int64_t out_features1,
    int64_t group_size1, const std::optional<at::Tensor>& bias1, int64_t activation1, const at::Tensor& x2,
    const at::Tensor& qweight2, const at::Tensor& scales2, int64_t out_features2, int64_t group_size2,
    const std::optional<at::Tensor>& bias2, int64_t activation2, int64_t bits, bool pdl, int64_t warps) {
  return launch_tiled_pair("quant_linear_tiled_pair", x1, qweight1, scales1, out_features1, group_size1, bias1,
                           activation1, x2, qweight2, scales2, out_features2, group_size2, bias2, activation2, bits,
                           pdl, warps);
}

std::tuple<at::Tensor, at::Tensor> quant_linear_tiled_norm_pair(
    const at::Tensor& x, const at::Tensor& ln_weight1, const at::Tensor& ln_bias1, const at::Tensor& ln_weight2,
    const at::Tensor& ln_bias2, double eps, const at::Tensor& qweight1, const at::Tensor& scales1,
    int64_t out_features1, int64_t group_size1, const std::optional<at::Tensor>& bias1, int64_t activation1,
    const at::Tensor& qweight2, const at::Tensor& scales2, int64_t out_features2, int64_t group_size2,
    const std::optional<at::Tensor>& bias2, int64_t activation2, int64_t bits, bool pdl, int64_t warps) {
  constexpr const char* op = "quant_linear_tiled_norm_pair";
  CHECK_CUDA(x, "x");
  TORCH_CHECK(x.dim() >= 1, "neox_rt: ", op, " needs x [..., hidden], got ", fmt(x.sizes()));
  const int64_t k = x.size(-1), m = k == 0 ? 0 : x.numel() / k;
  const at::Tensor* const params[] = {&ln_weight1, &ln_bias1, &ln_weight2, &ln_bias2};
  check_layernorm_params(x, params, 4, k, op);
  TORCH_CHECK(k % 8 == 0 && m * k <= kQuantNormMaxElems, "neox_rt: ", op, " normalises in shared memory at most ",
              fmt(kQuantNormMaxElems), " values of x (rows x hidden, hidden a multiple of 8), got ", fmt(m),
              " rows of ", fmt(k));
  return launch_tiled_pair(op, x, qweight1, scales1, out_features1, group_size1, bias1, activation1, x, qweight2,
                           scales2, out_features2, group_size2, bias2, activation2, bits, pdl, warps, params, eps);
}

namespace {

// quant_linear_tiled_sum and quant_linear_tiled_sum_norm: y, and with `ln` (the four LayerNorm parameters) LN1(y) and
// LN2(y) in the sum's launch where its ticket counter is at hand (else, while a graph is being captured before the
// counters exist, in the LayerNorm kernel after it).
std::vector<at::Tensor> run_tiled_sum(const char* op, const at::Tensor& x1, const at::Tensor& qweight1,
                                      const at::Tensor& scales1, int64_t group_size1, const at::Tensor& x2,
                                      const at::Tensor& qweight2, const at::Tensor& scales2, int64_t group_size2,
                                      int64_t out_features, int64_t bits, const std::optional<at::Tensor>& bias1,
                                      const std::optional<at::Tensor>& bias2, const std::optional<at::Tensor>& residual,
                                      bool pdl, bool b_first, SumNormParams ln = nullptr, double eps = 0.0) {
  const auto shape = check_tiled(x1, qweight1, scales1, out_features, bits, group_size1, bias1, 0, residual, 0, op);
  check_tiled(x2, qweight2, scales2, out_features, bits, group_size2, bias2, 0, residual, 0, op);
  check_fused_pair(x1, x2, op);
  const int64_t m = x1.numel() / x1.size(-1);
  if (ln != nullptr) {
    check_layernorm_params(x1, ln, 4, out_features, op);
    TORCH_CHECK(sum_norm_ok(static_cast<int>(out_features), static_cast<int>(m)), "neox_rt: ", op,
                " normalises up to ", fmt(kSumNormMaxRows), " rows of a multiple of 8 up to ",
                fmt(kSumNormVecs * 8 * kSumNormMinThreads), " values, got ", fmt(m), " rows of ", fmt(out_features));
  }
  const c10::cuda::CUDAGuard guard(x1.device());
  const bool use_pdl = pdl && pdl_supported();
  auto out = sum_norm_outputs(shape, x1.options(), ln);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int* ticket = ln != nullptr && m > 0 ? sum_norm_ticket(x1.get_device(), stream) : nullptr;
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const auto a = tiled_operand<scalar_t>(x1, qweight1, scales1, bits, group_size1);
    const auto b = tiled_operand<scalar_t>(x2, qweight2, scales2, bits, group_size2);
    const scalar_t* b1 = bias1.has_value() ? ptr<scalar_t>(*bias1) : nullptr;
    const scalar_t* b2 = bias2.has_value() ? ptr<scalar_t>(*bias2) : nullptr;
    const scalar_t* r = residual.has_value() ? ptr<scalar_t>(*residual) : nullptr;
    const SumNorm<scalar_t> norm = sum_norm_args<scalar_t>(ln, eps, out, ticket);
    auto go = [&](auto launch) {
      check_cuda(launch(a, b, b1, b2, r, ptr<scalar_t>(out[0]), static_cast<int>(m), static_cast<int>(out_features),
                        use_pdl, stream, norm, b_first),
                 op);
    };
    if (bits == 4) go(launch_quant_gemm_sum<scalar_t, QuantInt4>);
    else go(launch_quant_gemm_sum<scalar_t, QuantInt8>);
  };
  if (x1.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  sum_norm_fallback(out, ln, eps, pdl, m > 0, ticket);
  return out;
}

}  // namespace

at::Tensor quant_linear_tiled_sum(const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1,
                                  int64_t group_size1, const at::Tensor& x2, const at::Tensor& qweight2,
                                  const at::Tensor& scales2, int64_t group_size2, int64_t out_features, int64_t bits,
                                  const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
                                  const std::optional<at::Tensor>& residual, bool pdl, bool b_first) {
  return run_tiled_sum("quant_linear_tiled_sum", x1, qweight1, scales1, group_size1, x2, qweight2, scales2,
                       group_size2, out_features, bits, bias1, bias2, residual, pdl, b_first)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_linear_tiled_sum_norm(
    const at::Tensor& x1, const at::Tensor& qweight1, const at::Tensor& scales1, int64_t group_size1,
    const at::Tensor& x2, const at::Tensor& qweight2, const at::Tensor& scales2, int64_t group_size2,
    int64_t out_features, int64_t bits, const std::optional<at::Tensor>& bias1,
    const std::optional<at::Tensor>& bias2, const std::optional<at::Tensor>& residual, const at::Tensor& ln_weight1,
    const at::Tensor& ln_bias1, const at::Tensor& ln_weight2, const at::Tensor& ln_bias2, double eps, bool pdl,
    bool b_first) {
  const at::Tensor* const ln[] = {&ln_weight1, &ln_bias1, &ln_weight2, &ln_bias2};
  auto out = run_tiled_sum("quant_linear_tiled_sum_norm", x1, qweight1, scales1, group_size1, x2, qweight2, scales2,
                           group_size2, out_features, bits, bias1, bias2, residual, pdl, b_first, ln, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace neox_rt
