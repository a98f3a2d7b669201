// What the launchers (ops.cu, quant.cu, paged.cu) share to check their inputs and report: numbers in messages, the
// TORCH_CHECK macros, the launch-error check and the raw data pointer. Each translation unit gets its own copy
// (anonymous namespace), as when each defined them.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

namespace neox_rt {
namespace {

// Numbers and shapes in error messages go through fmt(): a string made here (std::to_string), never an integer
// streamed by c10::str. On the device machine (extension built by /opt/gcc, torch's own libstdc++ at run time) an
// integer streamed into the message from an extension translation unit crashed the process (segfault) instead of
// raising; strings, dtypes and devices streamed fine (bench/NOTES.md, session 8).
template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
[[maybe_unused]] std::string fmt(I v) {
  return std::to_string(v);
}

[[maybe_unused]] std::string fmt(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

#define CHECK_CUDA(t, name) TORCH_CHECK((t).is_cuda(), "neox_rt: ", name, " must be a CUDA tensor, got ", (t).device())
#define CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), "neox_rt: ", name, " must be contiguous (call .contiguous() first)")
#define CHECK_SAME_DEVICE(a, b, na, nb)                                                                      \
  TORCH_CHECK((a).device() == (b).device(), "neox_rt: ", na, " is on ", (a).device(), " but ", nb, " is on ", \
              (b).device())
#define CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), "neox_rt: ", name, " must be ", dt, ", got ", (t).scalar_type())
#define CHECK_SHAPE(t, ...)                                                                              \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), "neox_rt: ", #t, " must have shape ",       \
              fmt(at::IntArrayRef({__VA_ARGS__})), ", got ", fmt((t).sizes()))

[[maybe_unused]] void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "neox_rt: ", op, " launch failed: ", cudaGetErrorString(err));
}

template <typename T>
[[maybe_unused]] T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The LayerNorm parameters an op takes beside `like` (x): each [n] of its dtype on its device, contiguous and
// 16-byte aligned.
[[maybe_unused]] void check_layernorm_params(const at::Tensor& like, const at::Tensor* const* params, int count,
                                             int64_t n, const char* op) {
  for (int i = 0; i < count; ++i) {
    const at::Tensor& p = *params[i];
    CHECK_SAME_DEVICE(like, p, "x", "LayerNorm parameters");
    CHECK_CONTIGUOUS(p, "LayerNorm parameters");
    CHECK_DTYPE(p, like.scalar_type(), "LayerNorm parameters");
    TORCH_CHECK(p.dim() == 1 && p.size(0) == n, "neox_rt: ", op, " LayerNorm parameters must have shape [", fmt(n),
                "], got ", fmt(p.sizes()));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(p.data_ptr()) % 16 == 0, "neox_rt: ", op,
                " needs 16-byte aligned LayerNorm parameters");
  }
}

}  // namespace
}  // namespace neox_rt
