// Launchers of the weight-only quantized linears (W8A16, W4A16; csrc/kernels/quant_gemm.cuh), registered in
// bindings.cpp: each checks its inputs, sets the device guard and the current stream, and dispatches on x's dtype.
// A translation unit of its own (ops.cu holds the other ops); the checks mirror ops.cu's.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <type_traits>
#include <vector>

#include "kernels/quant_gemm.cuh"
#include "ops/checks.h"
#include "ops/ops.h"

namespace neox_rt {
namespace {

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

// The tiled layout (neox_rt/quant/formats.py TiledInt8Weight / TiledInt4Weight): n output features, qweight of
// n rounded up to 16 rows; bits 8: int8 [n_pad, k], scales [n] of x's dtype; bits 4: int32 [n_pad, k / 8], scales
// the int32 words scale bits | zero << 16 [n_pad / 16, k / group_size, 16]. sm_80+, and the LEAN kernel's bounds.
at::Tensor quant_linear_tiled(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              int64_t out_features, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias, int64_t activation,
                              const std::optional<at::Tensor>& residual, int64_t variant, bool pdl) {
  TORCH_CHECK(bits == 8 || bits == 4, "neox_rt: quant_linear_tiled takes bits 8 or 4, got ", fmt(bits));
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0, n = out_features, n_pad = (n + 15) / 16 * 16;
  TORCH_CHECK(n > 0, "neox_rt: quant_linear_tiled needs out_features > 0, got ", fmt(n));
  const bool int4 = bits == 4;
  const auto out_shape = check_quant_common(
      x, qweight, scales, bias, activation, residual, variant, int4 ? at::kInt : at::kChar, int4 ? (k + 7) / 8 : k,
      "quant_linear_tiled", n, n_pad, int4 ? std::optional<at::ScalarType>(at::kInt) : std::nullopt);
  const int64_t m = k == 0 ? 0 : x.numel() / k, chunk = int4 ? QuantInt4::kChunkK : QuantInt8::kChunkK;
  TORCH_CHECK(k > 0 && k % chunk == 0, "neox_rt: quant_linear_tiled needs in_features % ", fmt(chunk), " == 0, got ",
              fmt(k));
  if (int4) {
    TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && 512 % group_size == 0 && k % group_size == 0,
                "neox_rt: quant_linear_tiled needs a group size dividing 512 and in_features ", fmt(k), " (and a ",
                "multiple of 32), got ", fmt(group_size));
    TORCH_CHECK(scales.dim() == 3 && scales.size(0) == n_pad / 16 && scales.size(1) == k / group_size &&
                    scales.size(2) == 16,
                "neox_rt: quant_linear_tiled int4 scale words must have shape [", fmt(n_pad / 16), ", ",
                fmt(k / group_size), ", 16], got ", fmt(scales.sizes()));
  } else {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "neox_rt: quant_linear_tiled int8 scales must have shape [",
                fmt(n), "], got ", fmt(scales.sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(kernel_arch() >= 80, "neox_rt: quant_linear_tiled needs kernels built for compute capability 8.0 or ",
              "newer; this build runs as sm_", fmt(kernel_arch()), " (use the row-major format there)");
  const bool use_pdl = pdl && pdl_supported();
  auto y = at::empty(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* b = bias.has_value() ? ptr<scalar_t>(*bias) : nullptr;
    const scalar_t* r = residual.has_value() ? ptr<scalar_t>(*residual) : nullptr;
    if (int4)
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

}  // namespace neox_rt
