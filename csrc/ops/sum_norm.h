// What the sums with the next layer's dual LayerNorm in their launch share (gemv_sum_norm in ops.cu,
// quant_linear_tiled_sum_norm in quant.cu; the kernels' side is layernorm.cuh's sum_norm_tail): the outputs, the
// ticket, the kernel's arguments, and the LayerNorm kernel where no ticket is at hand.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/layernorm.cuh"
#include "ops/checks.h"
#include "ops/decode_workspace.h"
#include "ops/ops.h"

namespace neox_rt {

// The LayerNorm parameters (w1, b1, w2, b2) of a sum with the LayerNorm, as the two launchers take them.
using SumNormParams = const at::Tensor* const*;

// y, then LN1(y) and LN2(y) where `ln` is given: three tensors of y's shape.
inline std::vector<at::Tensor> sum_norm_outputs(at::IntArrayRef shape, const at::TensorOptions& options,
                                                SumNormParams ln) {
  std::vector<at::Tensor> out{at::empty(shape, options)};
  if (ln != nullptr) {
    out.push_back(at::empty(shape, options));
    out.push_back(at::empty(shape, options));
  }
  return out;
}

// That ticket (kSumNormTicket of decode_counters; null where those give none: the LayerNorm then runs in its own
// kernel, sum_norm_fallback).
inline int* sum_norm_ticket(int device, cudaStream_t stream) {
  int* counters = decode_counters(device, kSumNormTicket + 1, stream);
  return counters == nullptr ? nullptr : counters + kSumNormTicket;
}

// The kernel's SumNorm: none (its ticket null) without `ln` or a ticket.
template <typename T>
SumNorm<T> sum_norm_args(SumNormParams ln, double eps, const std::vector<at::Tensor>& out, int* ticket) {
  if (ln == nullptr || ticket == nullptr) return SumNorm<T>{};
  return {ptr<T>(*ln[0]), ptr<T>(*ln[1]), ptr<T>(*ln[2]), ptr<T>(*ln[3]), static_cast<float>(eps), ptr<T>(out[1]),
          ptr<T>(out[2]), ticket};
}

// After the sum's launch: where it had no ticket (a graph being captured before the counters exist), LN1(y) and
// LN2(y) from the LayerNorm kernel instead.
inline void sum_norm_fallback(std::vector<at::Tensor>& out, SumNormParams ln, double eps, bool pdl, bool has_rows,
                              const int* ticket) {
  if (ln == nullptr || !has_rows || ticket != nullptr) return;
  auto [a, b] = dual_layernorm(out[0], *ln[0], *ln[1], *ln[2], *ln[3], eps, pdl);
  out[1] = a;
  out[2] = b;
}

}  // namespace neox_rt
