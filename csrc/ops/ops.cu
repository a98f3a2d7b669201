// All op launchers in one translation unit (each TU that includes torch costs minutes of host compilation).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/allreduce.cuh"
#include "kernels/decode_attention.cuh"
#include "kernels/gemv.cuh"
#include "kernels/gemv_fused.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/rotary_kv_write.cuh"
#include "kernels/softmax.cuh"
#include "ops/checks.h"
#include "ops/decode_workspace.h"
#include "ops/sum_norm.h"
#include "ops/ops.h"

namespace neox_rt {
namespace {

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "neox_rt: ", name,
              " must be float16, bfloat16 or float32, got ", dt);
}

// Largest vector (elements) of at most 16 bytes that divides every size and keeps every pointer aligned.
int pick_vec(int64_t elem_size, std::initializer_list<int64_t> sizes, std::initializer_list<const void*> ptrs) {
  for (int vec = static_cast<int>(16 / elem_size); vec > 1; vec /= 2) {
    bool ok = true;
    for (int64_t s : sizes) ok = ok && s % vec == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0;
    if (ok) return vec;
  }
  return 1;
}

#define NEOX_RT_DISPATCH_FLOAT(dtype, name, ...)                                   \
  [&] {                                                                          \
    switch (dtype) {                                                             \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }          \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }          \
      default: TORCH_CHECK(false, "neox_rt: ", name, ": unsupported dtype ", dtype); \
    }                                                                            \
  }()


// The residual a GEMV adds in its epilogue: none, or the output's shape, dtype and device, contiguous.
void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x, const std::vector<int64_t>& shape,
                    const char* op) {
  if (!residual.has_value()) return;
  CHECK_SAME_DEVICE(x, *residual, "x", "residual");
  CHECK_CONTIGUOUS(*residual, "residual");
  CHECK_DTYPE(*residual, x.scalar_type(), "residual");
  TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "neox_rt: ", op, " residual must have the output's shape ",
              fmt(at::IntArrayRef(shape)), ", got ", fmt(residual->sizes()));
}

}  // namespace

at::Tensor scaled_causal_softmax(const at::Tensor& scores, const at::Tensor& query_positions, double scale) {
  CHECK_CUDA(scores, "scores");
  CHECK_SAME_DEVICE(scores, query_positions, "scores", "query_positions");
  CHECK_CONTIGUOUS(scores, "scores");
  CHECK_CONTIGUOUS(query_positions, "query_positions");
  check_float_dtype(scores, "scores");
  CHECK_DTYPE(query_positions, at::kLong, "query_positions");
  TORCH_CHECK(scores.dim() == 4, "neox_rt: scores must be [b, nh, s, t], got ", fmt(scores.sizes()));
  const int64_t b = scores.size(0), nh = scores.size(1), s = scores.size(2), t = scores.size(3);
  CHECK_SHAPE(query_positions, b, s);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto out = at::empty_like(scores);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  NEOX_RT_DISPATCH_FLOAT(scores.scalar_type(), "scaled_causal_softmax", [&] {
    check_cuda(launch_scaled_causal_softmax<scalar_t>(ptr<scalar_t>(scores), ptr<int64_t>(query_positions),
                                                      ptr<scalar_t>(out), b, nh, s, t, static_cast<float>(scale),
                                                      stream),
               "scaled_causal_softmax");
  });
  return out;
}

namespace {

// The shape of a rotary + KV write, as rotary_kv_write and rotary_decode_attention check it.
struct RotaryShape {
  int64_t b, s, nh, cap, hd;
};

// qkv [b, s, nh*3*hd] of a float dtype, int64 positions, fp32 cos / sin [max_pos, rotary_ndims / 2], caches
// [B >= b, nh, T, hd] of qkv's dtype, everything contiguous on qkv's device (positions' shape: the caller's).
RotaryShape check_rotary(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                         const at::Tensor& sin, int64_t rotary_ndims, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const char* op) {
  CHECK_CUDA(qkv, "qkv");
  CHECK_SAME_DEVICE(qkv, positions, "qkv", "positions");
  CHECK_SAME_DEVICE(qkv, cos, "qkv", "cos");
  CHECK_SAME_DEVICE(qkv, sin, "qkv", "sin");
  CHECK_SAME_DEVICE(qkv, k_cache, "qkv", "k_cache");
  CHECK_SAME_DEVICE(qkv, v_cache, "qkv", "v_cache");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qkv, &positions, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->is_contiguous(), "neox_rt: ", op, " needs contiguous qkv, positions, cos, sin and caches");
  check_float_dtype(qkv, "qkv");
  CHECK_DTYPE(positions, at::kLong, "positions");
  CHECK_DTYPE(cos, at::kFloat, "cos");
  CHECK_DTYPE(sin, at::kFloat, "sin");
  CHECK_DTYPE(k_cache, qkv.scalar_type(), "k_cache");
  CHECK_DTYPE(v_cache, qkv.scalar_type(), "v_cache");
  TORCH_CHECK(qkv.dim() == 3, "neox_rt: qkv must be [b, s, nh*3*hd], got ", fmt(qkv.sizes()));
  TORCH_CHECK(k_cache.dim() == 4, "neox_rt: k_cache must be [B, nh, T, hd], got ", fmt(k_cache.sizes()));
  const RotaryShape r{qkv.size(0), qkv.size(1), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "neox_rt: v_cache ", fmt(v_cache.sizes()),
              " must match k_cache ", fmt(k_cache.sizes()));
  TORCH_CHECK(k_cache.size(0) >= r.b, "neox_rt: the cache has ", fmt(k_cache.size(0)), " rows but the batch is ",
              fmt(r.b));
  TORCH_CHECK(qkv.size(2) == r.nh * 3 * r.hd, "neox_rt: qkv last dim ", fmt(qkv.size(2)), " != nh*3*hd = ",
              fmt(r.nh * 3 * r.hd), " (nh, hd from the cache)");
  TORCH_CHECK(rotary_ndims >= 0 && rotary_ndims <= r.hd && rotary_ndims % 2 == 0, "neox_rt: rotary_ndims ",
              fmt(rotary_ndims), " must be even and in [0, head_dim=", fmt(r.hd), "]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= 1 && cos.size(1) == rotary_ndims / 2 && sin.sizes() == cos.sizes(),
              "neox_rt: cos and sin must be [max_pos >= 1, rotary_ndims/2=", fmt(rotary_ndims / 2), "], got ",
              fmt(cos.sizes()), " and ", fmt(sin.sizes()));
  return r;
}

}  // namespace

at::Tensor rotary_kv_write(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                           const at::Tensor& sin, int64_t rotary_ndims, at::Tensor& k_cache, at::Tensor& v_cache,
                           bool pdl) {
  const RotaryShape r = check_rotary(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, "rotary_kv_write");
  const int64_t b = r.b, s = r.s, nh = r.nh, cap = r.cap, hd = r.hd;
  CHECK_SHAPE(positions, b, s);
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto q = at::empty({b, s, nh, hd}, qkv.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int vec = pick_vec(qkv.element_size(), {hd, rotary_ndims / 2 == 0 ? hd : rotary_ndims / 2},
                           {qkv.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()});
  NEOX_RT_DISPATCH_FLOAT(qkv.scalar_type(), "rotary_kv_write", [&] {
    check_cuda(launch_rotary_kv_write<scalar_t>(ptr<scalar_t>(qkv), ptr<int64_t>(positions), ptr<float>(cos),
                                                ptr<float>(sin), ptr<scalar_t>(q), ptr<scalar_t>(k_cache),
                                                ptr<scalar_t>(v_cache), b, s, nh, hd, rotary_ndims, cap,
                                                cos.size(0), vec,
                                                pdl && pdl_supported(), stream),
               "rotary_kv_write");
  });
  return q;
}

// Ticket counters for decode attention's in-kernel merge, one buffer per device: zeroed once when allocated,
// and every launch leaves them zero again. Never freed (a captured CUDA graph keeps the pointer; a grown buffer
// replaces the old one, which stays allocated). Null while a stream capture is under way and the buffer is too
// small (no allocation or memset may run then): that launch uses the separate merge kernel. The runtime warms
// every graph up before capturing it, so captured decode steps get the counters. Two launches running
// concurrently on two streams of one device would share tickets: neox_rt runs decode on one stream per device.
// Shared by decode_attention and paged_decode_attention (paged.cu): a kernel touches them only after
// griddepcontrol.wait, so consecutive launches never overlap on them, PDL or not.
int* decode_counters(int device, int64_t needed, cudaStream_t stream) {
  static std::mutex mu;
  static std::vector<std::pair<int*, int64_t>> buffers;  // per device: pointer, number of ints
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int64_t>(buffers.size()) <= device) buffers.resize(device + 1, {nullptr, 0});
  auto& entry = buffers[device];
  if (entry.second >= needed) return entry.first;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &status), "decode_attention (capture query)");
  if (status != cudaStreamCaptureStatusNone) return nullptr;
  const int64_t count = std::max<int64_t>(needed, int64_t{1} << 16);
  int* p = nullptr;
  check_cuda(cudaMalloc(&p, count * sizeof(int)), "decode_attention (counter allocation)");
  check_cuda(cudaMemsetAsync(p, 0, count * sizeof(int), stream), "decode_attention (counter memset)");
  check_cuda(cudaStreamSynchronize(stream), "decode_attention (counter memset)");
  entry = {p, count};
  return p;
}

namespace {

// What decode_attention and rotary_decode_attention share past their inputs' checks: the head size, alignment, plan
// and variant checks, the split plan (from the capacity and the device only, never from seqlens: no host sync,
// graph-capturable), the partials, the ticket counters and the launch. `q` (decode_attention) or `rot`
// (rotary_decode_attention: q from qkv) gives the query.
struct RotaryInputs {
  const at::Tensor& qkv;
  const at::Tensor& positions;
  const at::Tensor& cos;
  const at::Tensor& sin;
  int64_t rotary_ndims;
};

at::Tensor run_decode_attention(const at::Tensor* q, const RotaryInputs* rot, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& seqlens, int64_t b, int64_t nh,
                                int64_t hd, double scale, bool pdl, int64_t blocks_per_sm, bool merge_kernel,
                                int64_t variant, bool pdl_late, bool split_by_len, const char* op) {
  const at::Tensor& query = q != nullptr ? *q : rot->qkv;
  CHECK_DTYPE(seqlens, at::kLong, "seqlens");
  CHECK_SHAPE(seqlens, b);
  TORCH_CHECK(hd == 32 || hd == 64 || hd == 80 || hd == 96 || hd == 128 || hd == 256,
              "neox_rt: ", op, " supports head sizes 32, 64, 80, 96, 128, 256; got ", fmt(hd));
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&query, &k_cache, &v_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "neox_rt: ", op, " needs 16-byte aligned ",
                q != nullptr ? "q" : "qkv", " and caches");
  TORCH_CHECK(blocks_per_sm >= 0, "neox_rt: blocks_per_sm must be >= 0 (0: the default), got ",
              fmt(blocks_per_sm));
  TORCH_CHECK(variant >= 0 && variant <= 2, "neox_rt: ", op,
              " variant must be 0 (default), 1 (single-buffered) or 2 (pipelined), got ", fmt(variant));
  const bool pipe = variant == 0 ? kDecodePipeDefault : variant == 2;
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t cap = k_cache.size(2);
  TORCH_CHECK(cap <= INT_MAX / hd, "neox_rt: ", op, " supports caches of at most 2^31 / head size = ",
              fmt(INT_MAX / hd), " slots, got ", fmt(cap));
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int per_sm = blocks_per_sm > 0 ? static_cast<int>(blocks_per_sm) : kDecodeBlocksPerSm;
  auto out = at::empty({b, nh, hd}, query.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  NEOX_RT_DISPATCH_FLOAT(query.scalar_type(), op, [&] {
    const int split_len = decode_attention_split_len<scalar_t>(static_cast<int>(hd), static_cast<int>(b),
                                                               static_cast<int>(nh), cap, props->multiProcessorCount,
                                                               per_sm, pipe);
    const int splits = decode_attention_splits(cap, split_len);
    const int64_t parts = splits > 1 ? b * nh * splits : 1;  // one split: the kernel writes out directly
    auto part_out = at::empty({parts * hd}, query.options().dtype(at::kFloat));
    auto part_ml = at::empty({parts * 2}, query.options().dtype(at::kFloat));
    int* counters = splits > 1 && !merge_kernel ? decode_counters(query.get_device(), b * nh, stream) : nullptr;
    DecodeNewToken<scalar_t> nt{};
    if (rot != nullptr)
      nt = {ptr<scalar_t>(rot->qkv), ptr<int64_t>(rot->positions), ptr<float>(rot->cos), ptr<float>(rot->sin),
            ptr<scalar_t>(k_cache), ptr<scalar_t>(v_cache),
            static_cast<int>(rot->rotary_ndims), rot->cos.size(0)};
    check_cuda(launch_decode_attention<scalar_t>(q != nullptr ? ptr<scalar_t>(*q) : nullptr, ptr<scalar_t>(k_cache),
                                                 ptr<scalar_t>(v_cache), ptr<int64_t>(seqlens), ptr<scalar_t>(out),
                                                 ptr<float>(part_out), ptr<float>(part_ml), counters,
                                                 static_cast<int>(b), static_cast<int>(nh), static_cast<int>(hd),
                                                 cap, split_len, static_cast<float>(scale), pdl && pdl_supported(),
                                                 pipe, stream, rot != nullptr ? &nt : nullptr, pdl_late,
                                                 split_by_len),
               op);
  });
  return out;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seqlens, double scale, bool pdl, int64_t blocks_per_sm,
                            bool merge_kernel, int64_t variant, bool pdl_late, bool split_by_len) {
  CHECK_CUDA(q, "q");
  CHECK_SAME_DEVICE(q, k_cache, "q", "k_cache");
  CHECK_SAME_DEVICE(q, v_cache, "q", "v_cache");
  CHECK_SAME_DEVICE(q, seqlens, "q", "seqlens");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache, &seqlens})
    TORCH_CHECK(t->is_contiguous(), "neox_rt: decode_attention needs contiguous q, caches and seqlens");
  check_float_dtype(q, "q");
  CHECK_DTYPE(k_cache, q.scalar_type(), "k_cache");
  CHECK_DTYPE(v_cache, q.scalar_type(), "v_cache");
  TORCH_CHECK(q.dim() == 3, "neox_rt: q must be [b, nh, hd], got ", fmt(q.sizes()));
  const int64_t b = q.size(0), nh = q.size(1), hd = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) >= b && k_cache.size(1) == nh && k_cache.size(3) == hd,
              "neox_rt: k_cache must be [B >= ", fmt(b), ", ", fmt(nh), ", T, ", fmt(hd), "], got ",
              fmt(k_cache.sizes()));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "neox_rt: v_cache ", fmt(v_cache.sizes()),
              " must match k_cache ", fmt(k_cache.sizes()));
  return run_decode_attention(&q, nullptr, k_cache, v_cache, seqlens, b, nh, hd, scale, pdl, blocks_per_sm,
                              merge_kernel, variant, pdl_late, split_by_len, "decode_attention");
}

// decode_attention with the new token's rotary + KV write fused in (rotary_kv_write, then decode_attention, in one
// launch): qkv [b, 1, nh*3*hd], positions [b, 1] (the new slot and rotary position), the caches written at it.
at::Tensor rotary_decode_attention(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                                   const at::Tensor& sin, int64_t rotary_ndims, at::Tensor& k_cache,
                                   at::Tensor& v_cache, const at::Tensor& seqlens, double scale, bool pdl,
                                   int64_t blocks_per_sm, bool merge_kernel, int64_t variant, bool pdl_late,
                                   bool split_by_len) {
  const RotaryShape r = check_rotary(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache,
                                     "rotary_decode_attention");
  CHECK_SAME_DEVICE(qkv, seqlens, "qkv", "seqlens");
  TORCH_CHECK(seqlens.is_contiguous(), "neox_rt: rotary_decode_attention needs contiguous seqlens");
  TORCH_CHECK(r.s == 1, "neox_rt: qkv must be [b, 1, nh*3*hd] (one new token a sequence), got ", fmt(qkv.sizes()));
  CHECK_SHAPE(positions, r.b, 1);
  const RotaryInputs rot{qkv, positions, cos, sin, rotary_ndims};
  return run_decode_attention(nullptr, &rot, k_cache, v_cache, seqlens, r.b, r.nh, r.hd, scale, pdl, blocks_per_sm,
                              merge_kernel, variant, pdl_late, split_by_len, "rotary_decode_attention");
}

namespace {

// Every rank (csrc/kernels/allreduce.cuh), checked.
P2PBuffers p2p_buffers(at::IntArrayRef buffers, int64_t rank, int64_t slot_bytes, const char* op) {
  const int64_t world = static_cast<int64_t>(buffers.size());
  TORCH_CHECK(world >= 2 && world <= kP2PMaxRanks, "neox_rt: ", op, " needs 2 to ", fmt(kP2PMaxRanks),
              " buffers (one a rank), got ", fmt(world));
  TORCH_CHECK(rank >= 0 && rank < world, "neox_rt: ", op, " rank ", fmt(rank), " is not in [0, ", fmt(world), ")");
  TORCH_CHECK(slot_bytes > 0 && slot_bytes % 16 == 0, "neox_rt: ", op, " slot_bytes must be a positive multiple of ",
              "16, got ", fmt(slot_bytes));
  P2PBuffers b{};
  for (int64_t r = 0; r < world; ++r) {
    TORCH_CHECK(buffers[r] != 0 && buffers[r] % 16 == 0, "neox_rt: ", op, " buffer ", fmt(r),
                " is null or not 16-byte aligned");
    b.base[r] = reinterpret_cast<char*>(static_cast<uintptr_t>(buffers[r]));
  }
  b.rank = static_cast<int>(rank);
  b.world = static_cast<int>(world);
  b.slot_bytes = slot_bytes;
  return b;
}

// peers (with xsum): the reducing form, x this rank's partial of one row (launch_p2p_reduce_layernorm).
void layernorm_impl(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, at::Tensor& out1,
                    const at::Tensor* w2, const at::Tensor* b2, at::Tensor* out2, double eps, bool pdl,
                    const P2PBuffers* peers = nullptr, at::Tensor* xsum = nullptr) {
  CHECK_CUDA(x, "x");
  CHECK_CONTIGUOUS(x, "x");
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1, "neox_rt: layernorm needs x [..., hidden]");
  const int64_t n = x.size(-1);
  for (const at::Tensor* p : {&w1, &b1, w2, b2}) {
    if (p == nullptr) continue;
    CHECK_SAME_DEVICE(x, *p, "x", "a LayerNorm weight/bias");
    CHECK_CONTIGUOUS(*p, "a LayerNorm weight/bias");
    CHECK_DTYPE(*p, x.scalar_type(), "a LayerNorm weight/bias (same dtype as x)");
    TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "neox_rt: LayerNorm weight/bias must be [", fmt(n),
                "], got ", fmt(p->sizes()));
  }
  const int vec = pick_vec(x.element_size(), {n},
                           {x.data_ptr(), w1.data_ptr(), b1.data_ptr(), out1.data_ptr(),
                            w2 ? w2->data_ptr() : nullptr, b2 ? b2->data_ptr() : nullptr,
                            out2 ? out2->data_ptr() : nullptr});
  TORCH_CHECK(n <= layernorm_max_hidden(vec), "neox_rt: layernorm supports hidden <= ",
              fmt(layernorm_max_hidden(vec)), " at this alignment, got ", fmt(n));
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (peers != nullptr) {
    TORCH_CHECK(rows == 1, "neox_rt: p2p_reduce_dual_layernorm takes one row, got ", fmt(x.sizes()));
    TORCH_CHECK(vec * x.element_size() % 8 == 0 && 2 * n * x.element_size() <= peers->slot_bytes,
                "neox_rt: p2p_reduce_dual_layernorm needs 8-byte vectors and a row of at most half a slot (",
                fmt(peers->slot_bytes / 2), " bytes), got ", fmt(n * x.element_size()), " bytes");
    NEOX_RT_DISPATCH_FLOAT(x.scalar_type(), "p2p_reduce_dual_layernorm", [&] {
      check_cuda(launch_p2p_reduce_layernorm<scalar_t>(
                     ptr<scalar_t>(x), *peers, ptr<scalar_t>(*xsum), ptr<scalar_t>(w1), ptr<scalar_t>(b1),
                     ptr<scalar_t>(out1), w2 ? ptr<scalar_t>(*w2) : nullptr, b2 ? ptr<scalar_t>(*b2) : nullptr,
                     out2 ? ptr<scalar_t>(*out2) : nullptr, static_cast<int>(n), static_cast<float>(eps), vec,
                     pdl && pdl_supported(), stream),
                 "p2p_reduce_dual_layernorm");
    });
    return;
  }
  NEOX_RT_DISPATCH_FLOAT(x.scalar_type(), "layernorm", [&] {
    check_cuda(launch_layernorm<scalar_t>(ptr<scalar_t>(x), ptr<scalar_t>(w1), ptr<scalar_t>(b1), ptr<scalar_t>(out1),
                                          w2 ? ptr<scalar_t>(*w2) : nullptr, b2 ? ptr<scalar_t>(*b2) : nullptr,
                                          out2 ? ptr<scalar_t>(*out2) : nullptr, rows, static_cast<int>(n),
                                          static_cast<float>(eps), vec,
                                          pdl && pdl_supported(), stream),
               "layernorm");
  });
}

}  // namespace

at::Tensor layernorm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, bool pdl) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  layernorm_impl(x, weight, bias, out, nullptr, nullptr, nullptr, eps, pdl);
  return out;
}

std::tuple<at::Tensor, at::Tensor> dual_layernorm(const at::Tensor& x, const at::Tensor& weight1,
                                                  const at::Tensor& bias1, const at::Tensor& weight2,
                                                  const at::Tensor& bias2, double eps, bool pdl) {
  auto out1 = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto out2 = at::empty_like(x, at::MemoryFormat::Contiguous);
  layernorm_impl(x, weight1, bias1, out1, &weight2, &bias2, &out2, eps, pdl);
  return {out1, out2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> p2p_reduce_dual_layernorm(
    const at::Tensor& x, at::IntArrayRef buffers, int64_t rank, int64_t slot_bytes, const at::Tensor& weight1,
    const at::Tensor& bias1, const at::Tensor& weight2, const at::Tensor& bias2, double eps, bool pdl) {
  const P2PBuffers peers = p2p_buffers(buffers, rank, slot_bytes, "p2p_reduce_dual_layernorm");
  auto xsum = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto out1 = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto out2 = at::empty_like(x, at::MemoryFormat::Contiguous);
  layernorm_impl(x, weight1, bias1, out1, &weight2, &bias2, &out2, eps, pdl, &peers, &xsum);
  return {xsum, out1, out2};
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                int64_t activation, const std::optional<at::Tensor>& residual, int64_t variant, bool pdl) {
  CHECK_CUDA(x, "x");
  CHECK_SAME_DEVICE(x, weight, "x", "weight");
  CHECK_CONTIGUOUS(x, "x");
  CHECK_CONTIGUOUS(weight, "weight");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "neox_rt: gemv supports float16 and bfloat16, got ", x.scalar_type());
  CHECK_DTYPE(weight, x.scalar_type(), "weight");
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "neox_rt: gemv needs x [..., k] and ",
              "weight [n, k]; got x ", fmt(x.sizes()), " and weight ", fmt(weight.sizes()));
  const int64_t k = x.size(-1), n = weight.size(0), m = k == 0 ? 0 : x.numel() / k;
  TORCH_CHECK(m <= gemv_max_rows(), "neox_rt: gemv handles at most ", fmt(gemv_max_rows()), " rows of x, got ", fmt(m),
              " (use F.linear)");
  TORCH_CHECK(k % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "neox_rt: gemv needs in_features % 8 == 0 and 16-byte aligned x and weight");
  TORCH_CHECK(activation >= 0 && activation <= 3, "neox_rt: gemv activation must be 0 (none), 1 (gelu erf), ",
              "2 (gelu tanh) or 3 (relu), got ", fmt(activation));
  if (bias.has_value()) {
    CHECK_SAME_DEVICE(x, *bias, "x", "bias");
    CHECK_CONTIGUOUS(*bias, "bias");
    CHECK_DTYPE(*bias, x.scalar_type(), "bias");
    CHECK_SHAPE(*bias, n);
  }
  TORCH_CHECK(variant >= kGemvAuto && variant <= kGemvVariantLast, "neox_rt: gemv variant must be 0 (auto), ",
              "1 (legacy), 2, 3 or 4 (k split over 1, 2 or 4 warps), 5 or 6 (8-warp blocks of 8 or 4 rows), ",
              "7 or 8 (tensor-core tiles, k over 8 or 16 warps), 9 or 10 (the same, 3 steps in flight), ",
              "11 (8-warp blocks of 16 rows), got ", fmt(variant));
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  check_residual(residual, x, out_shape, "gemv");
  const c10::cuda::CUDAGuard guard(x.device());
  // Programmatic dependent launch exists from sm_90 on; elsewhere the flag is ignored.
  const bool use_pdl = pdl && pdl_supported();
  auto y = at::empty(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    check_cuda(launch_gemv<scalar_t>(ptr<scalar_t>(x), ptr<scalar_t>(weight),
                                     bias.has_value() ? ptr<scalar_t>(*bias) : nullptr,
                                     residual.has_value() ? ptr<scalar_t>(*residual) : nullptr, ptr<scalar_t>(y),
                                     static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                     static_cast<int>(activation), static_cast<int>(variant), use_pdl, stream),
               "gemv");
  };
  if (x.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  return y;
}

namespace {

// One operand set of gemv_pair / gemv_sum: one row of x [..., k] (x.numel() == k), weight [n, k], bias [n].
void check_gemv2_operand(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& like, const char* op, const char* xname, const char* wname) {
  CHECK_CUDA(x, xname);
  CHECK_SAME_DEVICE(like, x, "x1", xname);
  CHECK_SAME_DEVICE(like, weight, "x1", wname);
  CHECK_CONTIGUOUS(x, xname);
  CHECK_CONTIGUOUS(weight, wname);
  TORCH_CHECK(like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16, "neox_rt: ", op,
              " supports float16 and bfloat16, got ", like.scalar_type());
  CHECK_DTYPE(x, like.scalar_type(), xname);
  CHECK_DTYPE(weight, like.scalar_type(), wname);
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "neox_rt: ", op, " needs ", xname,
              " [..., k] and ", wname, " [n, k]; got ", fmt(x.sizes()), " and ", fmt(weight.sizes()));
  TORCH_CHECK(x.numel() == x.size(-1), "neox_rt: ", op, " takes one row of ", xname, ", got ", fmt(x.sizes()));
  TORCH_CHECK(x.size(-1) % 16 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "neox_rt: ", op, " needs in_features % 16 == 0 and 16-byte aligned ", xname, " and ", wname);
  if (bias.has_value()) {
    CHECK_SAME_DEVICE(like, *bias, "x1", "bias");
    CHECK_CONTIGUOUS(*bias, "bias");
    CHECK_DTYPE(*bias, like.scalar_type(), "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "neox_rt: ", op, " bias of ", wname,
                " must have shape [", fmt(weight.size(0)), "], got ", fmt(bias->sizes()));
  }
}

std::vector<int64_t> out_shape_of(const at::Tensor& x, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return shape;
}

template <typename T>
GemvProblem<T> problem(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor* residual, at::Tensor* y, int64_t activation) {
  return GemvProblem<T>{ptr<T>(x), ptr<T>(weight), bias.has_value() ? ptr<T>(*bias) : nullptr,
                        residual != nullptr ? ptr<T>(*residual) : nullptr, y != nullptr ? ptr<T>(*y) : nullptr,
                        static_cast<int>(weight.size(0)), static_cast<int>(weight.size(1)),
                        static_cast<int>(activation)};
}

void check_gemv2_config(int64_t ksplit, int64_t min_blocks, const char* op) {
  TORCH_CHECK(ksplit == 0 || ksplit == 2 || ksplit == 4 || ksplit == 8, "neox_rt: ", op,
              " ksplit must be 0 (auto), 2, 4 or 8, got ", fmt(ksplit));
  TORCH_CHECK(min_blocks == 0 || (min_blocks >= 2 && min_blocks <= 4), "neox_rt: ", op,
              " min_blocks must be 0 (auto), 2, 3 or 4, got ", fmt(min_blocks));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gemv_pair(const at::Tensor& x1, const at::Tensor& weight1,
                                             const std::optional<at::Tensor>& bias1, int64_t activation1,
                                             const at::Tensor& x2, const at::Tensor& weight2,
                                             const std::optional<at::Tensor>& bias2, int64_t activation2,
                                             int64_t ksplit, int64_t min_blocks, bool pdl) {
  check_gemv2_operand(x1, weight1, bias1, x1, "gemv_pair", "x1", "weight1");
  check_gemv2_operand(x2, weight2, bias2, x1, "gemv_pair", "x2", "weight2");
  for (const int64_t a : {activation1, activation2})
    TORCH_CHECK(a >= 0 && a <= 3, "neox_rt: gemv_pair activation must be 0 (none), 1 (gelu erf), 2 (gelu tanh) ",
                "or 3 (relu), got ", fmt(a));
  check_gemv2_config(ksplit, min_blocks, "gemv_pair");
  const c10::cuda::CUDAGuard guard(x1.device());
  const bool use_pdl = pdl && pdl_supported();
  auto y1 = at::empty(out_shape_of(x1, weight1.size(0)), x1.options());
  auto y2 = at::empty(out_shape_of(x2, weight2.size(0)), x1.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    check_cuda(launch_gemv2<scalar_t>(problem<scalar_t>(x1, weight1, bias1, nullptr, &y1, activation1),
                                      problem<scalar_t>(x2, weight2, bias2, nullptr, &y2, activation2), false,
                                      static_cast<int>(ksplit), static_cast<int>(min_blocks), use_pdl, stream),
               "gemv_pair");
  };
  if (x1.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  return {y1, y2};
}

namespace {

// gemv_sum and gemv_sum_norm: y, and with `ln` (the four LayerNorm parameters) LN1(y) and LN2(y) in the sum's launch
// where its ticket counter is at hand (else, while a graph is being captured before the counters exist, in the
// LayerNorm kernel after it).
std::vector<at::Tensor> run_gemv_sum(const char* op, const at::Tensor& x1, const at::Tensor& weight1,
                                     const at::Tensor& x2, const at::Tensor& weight2,
                                     const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
                                     const std::optional<at::Tensor>& residual, int64_t ksplit, int64_t min_blocks,
                                     bool pdl, at::OptionalIntArrayRef push_buffers, int64_t push_rank,
                                     int64_t push_slot_bytes, SumNormParams ln = nullptr,
                                     double eps = 0.0) {
  check_gemv2_operand(x1, weight1, bias1, x1, op, "x1", "weight1");
  check_gemv2_operand(x2, weight2, bias2, x1, op, "x2", "weight2");
  TORCH_CHECK(weight1.size(0) == weight2.size(0), "neox_rt: ", op, " needs weights of the same out_features, got ",
              fmt(weight1.sizes()), " and ", fmt(weight2.sizes()));
  check_gemv2_config(ksplit, min_blocks, op);
  const auto shape = out_shape_of(x1, weight1.size(0));
  check_residual(residual, x1, shape, op);
  const int64_t n = weight1.size(0);
  P2PBuffers push{};
  if (push_buffers.has_value()) {
    push = p2p_buffers(*push_buffers, push_rank, push_slot_bytes, "gemv_sum push");
    TORCH_CHECK(x1.scalar_type() == at::kHalf || x1.scalar_type() == at::kBFloat16, "neox_rt: gemv_sum push ",
                "needs float16 or bfloat16");
    TORCH_CHECK(n % 4 == 0 && 4 * n <= push_slot_bytes, "neox_rt: gemv_sum push needs ",
                "out_features % 4 == 0 and at most a quarter slot (", fmt(push_slot_bytes / 4), "), got ", fmt(n));
  }
  if (ln != nullptr) {
    check_layernorm_params(x1, ln, 4, n, op);
    TORCH_CHECK(sum_norm_ok(static_cast<int>(n), 1), "neox_rt: ", op, " normalises out_features that are a multiple ",
                "of 8 up to ", fmt(kSumNormVecs * 8 * kSumNormMinThreads), ", got ", fmt(n));
  }
  const c10::cuda::CUDAGuard guard(x1.device());
  const bool use_pdl = pdl && pdl_supported();
  auto out = sum_norm_outputs(shape, x1.options(), ln);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int* ticket = ln != nullptr && n > 0 ? sum_norm_ticket(x1.get_device(), stream) : nullptr;
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    check_cuda(launch_gemv2<scalar_t>(
                   problem<scalar_t>(x1, weight1, bias1, residual.has_value() ? &*residual : nullptr, &out[0], 0),
                   problem<scalar_t>(x2, weight2, bias2, nullptr, nullptr, 0), true, static_cast<int>(ksplit),
                   static_cast<int>(min_blocks), use_pdl, stream, push,
                   sum_norm_args<scalar_t>(ln, eps, out, ticket)),
               op);
  };
  if (x1.scalar_type() == at::kHalf) run(static_cast<__half*>(nullptr));
  else run(static_cast<__nv_bfloat16*>(nullptr));
  sum_norm_fallback(out, ln, eps, pdl, n > 0, ticket);
  return out;
}

}  // namespace

at::Tensor gemv_sum(const at::Tensor& x1, const at::Tensor& weight1, const at::Tensor& x2, const at::Tensor& weight2,
                    const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
                    const std::optional<at::Tensor>& residual, int64_t ksplit, int64_t min_blocks, bool pdl,
                    at::OptionalIntArrayRef push_buffers, int64_t push_rank, int64_t push_slot_bytes) {
  return run_gemv_sum("gemv_sum", x1, weight1, x2, weight2, bias1, bias2, residual, ksplit, min_blocks, pdl,
                      push_buffers, push_rank, push_slot_bytes)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemv_sum_norm(
    const at::Tensor& x1, const at::Tensor& weight1, const at::Tensor& x2, const at::Tensor& weight2,
    const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
    const std::optional<at::Tensor>& residual, const at::Tensor& ln_weight1, const at::Tensor& ln_bias1,
    const at::Tensor& ln_weight2, const at::Tensor& ln_bias2, double eps, int64_t ksplit, int64_t min_blocks,
    bool pdl) {
  const at::Tensor* const ln[] = {&ln_weight1, &ln_bias1, &ln_weight2, &ln_bias2};
  auto out = run_gemv_sum("gemv_sum_norm", x1, weight1, x2, weight2, bias1, bias2, residual, ksplit, min_blocks, pdl,
                          std::nullopt, 0, 0, ln, eps);
  return {out[0], out[1], out[2]};
}

at::Tensor p2p_all_reduce(const at::Tensor& x, at::IntArrayRef buffers, int64_t rank, int64_t slot_bytes, bool pdl) {
  CHECK_CUDA(x, "x");
  CHECK_CONTIGUOUS(x, "x");
  check_float_dtype(x, "p2p_all_reduce x");
  const P2PBuffers b = p2p_buffers(buffers, rank, slot_bytes, "p2p_all_reduce");
  const int64_t bytes = x.numel() * x.element_size();
  TORCH_CHECK(bytes % 16 == 0 && 2 * bytes <= slot_bytes && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "neox_rt: p2p_all_reduce needs a 16-byte aligned x of a multiple of 16 bytes, at most ",
              fmt(slot_bytes / 2), " (half a slot); got ", fmt(bytes), " bytes");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool use_pdl = pdl && pdl_supported();
  auto y = at::empty_like(x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  NEOX_RT_DISPATCH_FLOAT(x.scalar_type(), "p2p_all_reduce", [&] {
    check_cuda(launch_p2p_all_reduce<scalar_t>(ptr<scalar_t>(x), ptr<scalar_t>(y), bytes / 8, b, use_pdl, stream),
               "p2p_all_reduce");
  });
  return y;
}

int64_t kernel_arch_of(int64_t device) {
  TORCH_CHECK(device >= 0 && device < at::cuda::device_count(), "neox_rt: kernel_arch: no CUDA device ", fmt(device));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const int arch = kernel_arch();
  TORCH_CHECK(arch > 0, "neox_rt: kernel_arch: the CUDA runtime could not say which architecture the kernels run as");
  return arch;
}

}  // namespace neox_rt
