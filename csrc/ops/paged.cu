// Launcher of decode attention over the paged KV cache (csrc/kernels/paged_attention.cuh), registered in
// bindings.cpp: checks its inputs, sets the device guard and the current stream, and dispatches on q's dtype. A
// translation unit of its own (ops.cu holds the dense-cache ops); the checks are ops/checks.h's, and the merge's ticket
// counters are ops.cu's per-device buffer (decode_counters), shared with decode_attention.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "kernels/paged_attention.cuh"
#include "ops/checks.h"
#include "ops/decode_workspace.h"
#include "ops/ops.h"

namespace neox_rt {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seqlens, double scale, bool pdl,
                                  int64_t blocks_per_sm, bool merge_kernel, bool pdl_late) {
  TORCH_CHECK(q.is_cuda(), "neox_rt: q must be a CUDA tensor, got ", q.device());
  CHECK_SAME_DEVICE(q, k_cache, "q", "k_cache");
  CHECK_SAME_DEVICE(q, v_cache, "q", "v_cache");
  CHECK_SAME_DEVICE(q, block_tables, "q", "block_tables");
  CHECK_SAME_DEVICE(q, seqlens, "q", "seqlens");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache, &block_tables, &seqlens})
    TORCH_CHECK(t->is_contiguous(), "neox_rt: paged_decode_attention needs contiguous q, caches, block_tables and ",
                "seqlens (call .contiguous() first)");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "neox_rt: q must be float16, bfloat16 or float32, got ", dt);
  CHECK_DTYPE(k_cache, dt, "k_cache");
  CHECK_DTYPE(v_cache, dt, "v_cache");
  CHECK_DTYPE(block_tables, at::kInt, "block_tables");
  CHECK_DTYPE(seqlens, at::kInt, "seqlens");
  TORCH_CHECK(q.dim() == 3, "neox_rt: q must be [b, nh, hd], got ", fmt(q.sizes()));
  const int64_t b = q.size(0), nh = q.size(1), hd = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) == nh && k_cache.size(3) == hd, "neox_rt: k_cache must be ",
              "[num_blocks, ", fmt(nh), ", block_size, ", fmt(hd), "] (nh, hd from q), got ", fmt(k_cache.sizes()));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "neox_rt: v_cache ", fmt(v_cache.sizes()), " must match k_cache ",
              fmt(k_cache.sizes()));
  TORCH_CHECK(hd == 32 || hd == 64 || hd == 80 || hd == 96 || hd == 128 || hd == 256,
              "neox_rt: paged_decode_attention supports head sizes 32, 64, 80, 96, 128, 256; got ", fmt(hd));
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(2);
  TORCH_CHECK(num_blocks >= 1 && num_blocks <= INT_MAX, "neox_rt: paged_decode_attention needs a cache of 1 to ",
              fmt(INT_MAX), " blocks, got ", fmt(num_blocks));
  TORCH_CHECK(bs >= 1 && (bs & (bs - 1)) == 0 && bs <= INT_MAX / hd, "neox_rt: the cache's block size (dim 2) must ",
              "be a power of two, got ", fmt(bs));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == b, "neox_rt: block_tables must be [b=", fmt(b),
              ", max_blocks], got ", fmt(block_tables.sizes()));
  TORCH_CHECK(seqlens.dim() == 1 && seqlens.size(0) == b, "neox_rt: seqlens must be [b=", fmt(b), "], got ",
              fmt(seqlens.sizes()));
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(max_blocks <= kPagedMaxBlocks, "neox_rt: paged_decode_attention supports block tables of at most ",
              fmt(kPagedMaxBlocks), " blocks, got ", fmt(max_blocks));
  TORCH_CHECK(max_blocks * bs <= INT_MAX / hd, "neox_rt: paged_decode_attention supports tables of at most 2^31 / ",
              "head size = ", fmt(INT_MAX / hd), " positions (max_blocks * block_size), got ", fmt(max_blocks * bs));
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "neox_rt: paged_decode_attention needs 16-byte aligned q and caches");
  TORCH_CHECK(blocks_per_sm >= 0, "neox_rt: blocks_per_sm must be >= 0 (0: the default), got ", fmt(blocks_per_sm));
  const c10::cuda::CUDAGuard guard(q.device());
  // Split length from the table's width and the device only (never from seqlens: no host sync, graph-capturable).
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int per_sm = blocks_per_sm > 0 ? static_cast<int>(blocks_per_sm) : kDecodeBlocksPerSm;
  auto out = at::empty_like(q);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const int split_len =
        paged_decode_split_len<scalar_t>(static_cast<int>(hd), static_cast<int>(b), static_cast<int>(nh),
                                         static_cast<int>(max_blocks), static_cast<int>(bs),
                                         props->multiProcessorCount, per_sm);
    const int splits = decode_attention_splits(max_blocks * bs, split_len);
    const int64_t parts = splits > 1 ? b * nh * splits : 1;  // one split: the kernel writes out directly
    auto part_out = at::empty({parts * hd}, q.options().dtype(at::kFloat));
    auto part_ml = at::empty({parts * 2}, q.options().dtype(at::kFloat));
    int* counters = splits > 1 && !merge_kernel ? decode_counters(q.get_device(), b * nh, stream) : nullptr;
    const cudaError_t err = launch_paged_decode_attention<scalar_t>(
        ptr<scalar_t>(q), ptr<scalar_t>(k_cache), ptr<scalar_t>(v_cache), ptr<int>(block_tables), ptr<int>(seqlens),
        ptr<scalar_t>(out), ptr<float>(part_out), ptr<float>(part_ml), counters, static_cast<int>(b),
        static_cast<int>(nh), static_cast<int>(hd), static_cast<int>(num_blocks), static_cast<int>(bs),
        static_cast<int>(max_blocks), split_len, static_cast<float>(scale), pdl && pdl_supported(), stream,
        pdl_late);
    TORCH_CHECK(err == cudaSuccess, "neox_rt: paged_decode_attention launch failed: ", cudaGetErrorString(err));
  };
  if (dt == at::kHalf) run(static_cast<__half*>(nullptr));
  else if (dt == at::kBFloat16) run(static_cast<__nv_bfloat16*>(nullptr));
  else run(static_cast<float*>(nullptr));
  return out;
}

}  // namespace neox_rt
