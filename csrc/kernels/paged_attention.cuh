// Decode attention (one query per sequence) over a paged KV cache, through per-sequence block tables (#23).
//
// out[i, h] = softmax_j(scale * q[i, h] . k_j) @ v_j over positions j < seqlens[i] of sequence i, where position j
// lives in block block_tables[i, j / bs], slot j % bs of k_cache / v_cache [num_blocks, nh, bs, HD]; fp32 math.
// seqlens[i] <= 0 gives zeros. Table entries at or past a sequence's last block are never dereferenced (they may
// hold -1 or a stale id), and no slot at or past its length is read, so stale or NaN content there never reaches
// the output.
//
// The kernel is decode_attention.cuh's split kernel with its keys found through the table (PagedKeys, the
// policy beside ContiguousKeys): the same lane groups, double-buffered K/V steps, online softmax, merge of the lane
// groups and warps, and merge of the splits by the last block of each (i, h) (atomic ticket, counters left at
// zero for graph replays) or by a second kernel without counters. The grid (splits, nh, b) comes from the table's
// width (capacity = max_blocks * bs), never from seqlens: no host sync, capturable in a CUDA graph, and replays
// with new seqlens and new table contents need nothing else. Blocks past a sequence's length exit at once.
// A split is a whole number of table blocks and of key steps (split_len a multiple of max(bs, STEP)), at most
// kPagedMaxEntries blocks: once the block knows its (i, h), it reads the table entries of its split (in the round
// trip of the length and q, after griddepcontrol.wait) and keeps each as the element offset of that (block, h) in
// shared memory; key j's row is then s_off[j / bs - first] + (j % bs) * HD. Before the wait (with PDL on sm_90 the
// previous kernel may still run) the block asks the L2 for its first step's K and V, one run a table block, from a
// table entry and a length read then: hints only (an entry outside [0, num_blocks) is skipped), every address
// inside the caches. bs: any power of two >= 1 (the launcher checks). Requires HD * sizeof(T) % 16 == 0 and 16-byte
// aligned q and caches.
// Measured on one H100 (fp16, bs 16, L2 warm, back to back, one run beside the dense kernel on the same tokens,
// uncommitted tree of 2026-12-06): b=1 nh=64 hd=96 at 2048 tokens 37.5 us (dense 38.0), b=16 nh=32 hd=128 at 2048
// 179.9 us (177.7), b=64 at 1024 341.6 us (340.5), b=1 at 8192 50.6 us (50.8); bs 32, b=8 at 4096 190.6 us (182.0);
// the Triton paged kernel 89-420 us on the same shapes. The outputs equal the dense kernel's bit for bit there.
#pragma once

#include <climits>

#include "decode_attention.cuh"

namespace neox_rt {

// Table blocks one split may span: the split's entries live in shared memory as int64 offsets (2 KiB). With at most
// kDecodeMaxSplits splits, a table may be kPagedMaxBlocks wide (1M tokens at bs 16).
constexpr int kPagedMaxEntries = 256;
constexpr int kPagedMaxBlocks = kDecodeMaxSplits * kPagedMaxEntries;
constexpr bool kPagedPipe = kDecodePipeDefault;  // the step scheme (the contiguous kernel's default)
static_assert(kPagedMaxEntries % kDecodeThreads == 0, "each thread stages the same number of entries");

// Ask the L2 for [p, p + bytes) (bytes a multiple of 16, p 16-byte aligned) on behalf of this thread alone.
__device__ __forceinline__ void prefetch_l2_thread(const void* p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  for (int off = 0; off < bytes; off += 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + off));
#endif
}

// Keys of sequence i, head h in the paged cache (decode_split_block's policy; see ContiguousKeys): the split's table
// entries staged in shared memory as element offsets of (block, h).
template <typename T, int HD>
struct PagedKeys {
  static constexpr int kStaged = kPagedMaxEntries / kDecodeThreads;  // entries each thread stages
  const T* k;              // [num_blocks, nh, bs, HD]: the whole cache
  const T* v;              // [num_blocks, nh, bs, HD]
  const int* table;        // [max_blocks]: this sequence's row of the block tables
  int64_t* s_off;          // [kPagedMaxEntries] shared: s_off[e] = element offset of (table[first + e], h)
  int64_t head_off;        // h * bs * HD
  int64_t block_stride;    // nh * bs * HD: elements per cache block
  int shift;               // log2(bs)
  int num_blocks;
  int start = 0;           // the split's first position (a multiple of bs)
  int entries = 0;         // table entries the split spans
  int staged[kStaged] = {};

  // A step's key rows: keys j = first + n G (n < N) below lim, each looked up once for its K and its V row.
  template <int N>
  struct StepRows {
    int64_t off[N];
    __device__ __forceinline__ int64_t offset(int n, int /*j*/) const { return off[n]; }
  };
  template <int N, int G>
  __device__ __forceinline__ StepRows<N> step_rows(int first, int lim) const {
    StepRows<N> rows;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const int j = first + n * G;  // below lim: an entry of this split (split_end >= lim)
      rows.off[n] = j < lim ? s_off[(j - start) >> shift] + (j & ((1 << shift) - 1)) * HD : 0;
    }
    return rows;
  }

  // Before griddepcontrol.wait: the L2 gets the first step's keys of each table block it spans (thread t: block t),
  // bounded by a length read now. The entries and the length may be stale (earlier kernels may still write them):
  // hints only, and an entry outside [0, num_blocks) is skipped, so every prefetched address is inside the caches.
  template <int STEP, int OPT, typename Len>
  __device__ __forceinline__ void prefetch_first_step(const Len* seqlen, int split_start, int split_end,
                                                      int64_t capacity) const {
    const int first_keys = split_end - split_start < STEP ? split_end - split_start : STEP;
    const int runs = (first_keys + (1 << shift) - 1) >> shift;  // table blocks the first step spans
    const int t = threadIdx.x;
    int blk = -1;
    if (t < runs) blk = __ldcg(table + (split_start >> shift) + t);  // in the round trip of the length
    const int64_t hint = (OPT & kDecodePrefetchNoHint) ? capacity : __ldcg(seqlen);
    if (t >= runs || static_cast<unsigned>(blk) >= static_cast<unsigned>(num_blocks)) return;
    const int step_end = split_start + first_keys;
    const int lim = hint < step_end ? static_cast<int>(hint > split_start ? hint : split_start) : step_end;
    const int lo = split_start + (t << shift);
    const int keys = lim - lo < (1 << shift) ? lim - lo : (1 << shift);
    if (keys <= 0) return;
    const int64_t off = blk * block_stride + head_off;
    prefetch_l2_thread(k + off, keys * HD * static_cast<int>(sizeof(T)));
    prefetch_l2_thread(v + off, keys * HD * static_cast<int>(sizeof(T)));
  }

  // After the wait: the split's entries into registers (the loads share the length's and q's round trip), ...
  __device__ __forceinline__ void load_table(int split_start, int split_end) {
    start = split_start;
    entries = (split_end - split_start) >> shift;  // exact: split_len and the capacity are multiples of bs
#pragma unroll
    for (int r = 0; r < kStaged; ++r) {
      const int e = threadIdx.x + r * kDecodeThreads;
      if (e < entries) staged[r] = __ldcg(table + (split_start >> shift) + e);
    }
  }
  // ... then into shared memory as offsets (entries past the length are converted too, never dereferenced) ...
  __device__ __forceinline__ void store_table() {
#pragma unroll
    for (int r = 0; r < kStaged; ++r) {
      const int e = threadIdx.x + r * kDecodeThreads;
      if (e < entries) s_off[e] = staged[r] * block_stride + head_off;
    }
  }
  // ... published to the block before its first K/V load (called by every thread of a block that has keys).
  __device__ __forceinline__ void publish() const { __syncthreads(); }
};

template <typename T, int HD, bool PDL, int OPT = kDecodeDefaultOpt>
__global__ void __launch_bounds__(kDecodeThreads, (DecodeLayout<T, HD, kPagedPipe, OPT>::MIN_BLOCKS))
paged_decode_split_kernel(const T* __restrict__ q,               // [b, nh, HD]
                          const T* __restrict__ k_cache,         // [num_blocks, nh, bs, HD]
                          const T* __restrict__ v_cache,         // [num_blocks, nh, bs, HD]
                          const int* __restrict__ block_tables,  // [b, max_blocks]
                          const int* __restrict__ seqlens,       // [b]
                          T* __restrict__ out,                   // [b, nh, HD]
                          float* __restrict__ part_out,          // [b, nh, splits, HD]
                          float* __restrict__ part_ml,           // [b, nh, splits, 2] (max, sum)
                          int* __restrict__ counters,            // [b, nh] zeros, or null (separate merge)
                          int nh, int num_blocks, int block_shift, int max_blocks, int split_len, int splits,
                          float scale_log2, bool pdl_late) {
  __shared__ int64_t s_off[kPagedMaxEntries];
  const int h = blockIdx.y, i = blockIdx.z;
  const int64_t block_elems = static_cast<int64_t>(HD) << block_shift;  // bs * HD
  PagedKeys<T, HD> kv{k_cache, v_cache, block_tables + static_cast<int64_t>(i) * max_blocks, s_off,
                      h * block_elems, nh * block_elems, block_shift, num_blocks};
  const int64_t capacity = static_cast<int64_t>(max_blocks) << block_shift;
  decode_split_block<T, HD, PDL, kPagedPipe, OPT>(kv, q, seqlens, out, part_out, part_ml, counters, nh, capacity,
                                                  split_len, splits, scale_log2, pdl_late, 0);
}

// Keys per split: decode_attention_split_len_hd's plan (about blocks_per_sm blocks per SM over the grid, at most
// kDecodeMaxSplits splits), rounded to whole table blocks and key steps, at most kPagedMaxEntries blocks. From the
// shapes only (never seqlens). 0 when the table is wider than kPagedMaxBlocks.
template <typename T, int HD>
inline int paged_decode_split_len_hd(int b, int nh, int max_blocks, int block_size, int sms, int blocks_per_sm) {
  constexpr int STEP = DecodeLayout<T, HD, kPagedPipe>::STEP;
  static_assert(STEP <= kPagedMaxEntries, "kPagedMaxEntries * bs must be a whole number of steps");
  if (max_blocks > kPagedMaxBlocks) return 0;
  const int64_t capacity = static_cast<int64_t>(max_blocks) * block_size;
  const int64_t unit = block_size > STEP ? block_size : STEP;  // powers of two: a multiple of both
  const int64_t most = static_cast<int64_t>(kPagedMaxEntries) * block_size;  // a multiple of unit
  const int64_t heads = static_cast<int64_t>(b) * nh > 0 ? static_cast<int64_t>(b) * nh : 1;
  const int64_t want = (static_cast<int64_t>(sms) * blocks_per_sm + heads - 1) / heads;  // splits per head
  int64_t len = (capacity + (want > 0 ? want : 1) - 1) / (want > 0 ? want : 1);
  const int64_t min_len = (capacity + kDecodeMaxSplits - 1) / kDecodeMaxSplits;
  len = len > min_len ? len : min_len;
  len = (len + unit - 1) / unit * unit;
  len = len > unit ? len : unit;
  return static_cast<int>(len < most ? len : most);
}

template <typename T, int HD>
cudaError_t launch_paged_decode_attention_hd(const T* q, const T* k_cache, const T* v_cache, const int* block_tables,
                                             const int* seqlens, T* out, float* part_out, float* part_ml,
                                             int* counters, int b, int nh, int num_blocks, int block_size,
                                             int max_blocks, int split_len, float scale, bool pdl,
                                             cudaStream_t stream, bool pdl_late = false) {
  if (b == 0 || nh == 0) return cudaSuccess;
  if (block_size < 1 || (block_size & (block_size - 1)) != 0) return cudaErrorInvalidValue;
  int shift = 0;
  while ((1 << shift) < block_size) ++shift;
  const int64_t capacity = static_cast<int64_t>(max_blocks) * block_size;
  if (max_blocks < 0 || max_blocks > kPagedMaxBlocks || capacity > INT_MAX / HD) return cudaErrorInvalidValue;
  if (capacity == 0) return cudaMemsetAsync(out, 0, sizeof(T) * static_cast<size_t>(b) * nh * HD, stream);
  constexpr int STEP = DecodeLayout<T, HD, kPagedPipe>::STEP;
  if (num_blocks < 1 || split_len < 1 || split_len % block_size != 0 || split_len % STEP != 0 ||
      split_len / block_size > kPagedMaxEntries)
    return cudaErrorInvalidValue;  // a split must be whole table blocks and steps, at most kPagedMaxEntries blocks
  const int splits = decode_attention_splits(capacity, split_len);
  if (splits > kDecodeMaxSplits) return cudaErrorInvalidValue;
  const float scale_log2 = scale * 1.4426950408889634f;
  const cudaError_t err =
      launch_kernel(pdl, paged_decode_split_kernel<T, HD, false>, paged_decode_split_kernel<T, HD, true>,
                    dim3(splits, nh, b), dim3(kDecodeThreads), stream, q, k_cache, v_cache, block_tables, seqlens,
                    out, part_out, part_ml, counters, nh, num_blocks, shift, max_blocks, split_len, splits,
                    scale_log2, pdl_late);
  if (err != cudaSuccess || counters != nullptr || splits == 1) return err;
  decode_attention_reduce_kernel<T, HD, int><<<dim3(nh, b), kDecodeThreads, 0, stream>>>(
      part_out, part_ml, seqlens, out, nh, capacity, split_len, splits);
  return cudaGetLastError();
}

// Split length for launch_paged_decode_attention (see paged_decode_split_len_hd); 0 for an unsupported head size or
// a table wider than kPagedMaxBlocks.
template <typename T>
inline int paged_decode_split_len(int head_dim, int b, int nh, int max_blocks, int block_size, int sms,
                                  int blocks_per_sm) {
  switch (head_dim) {
#define NEOX_RT_PAGED_SPLIT_LEN(HD) \
  case HD:                          \
    return paged_decode_split_len_hd<T, HD>(b, nh, max_blocks, block_size, sms, blocks_per_sm);
    NEOX_RT_DECODE_HEAD_SIZES(NEOX_RT_PAGED_SPLIT_LEN)
#undef NEOX_RT_PAGED_SPLIT_LEN
    default:
      return 0;
  }
}

// head_dim one of 32, 64, 80, 96, 128, 256 and block_size a power of two (cudaErrorInvalidValue otherwise);
// split_len from paged_decode_split_len. part_out [b * nh * splits * HD] and part_ml [b * nh * splits * 2] floats,
// splits = decode_attention_splits(max_blocks * block_size, split_len) (unused when splits == 1); counters: null (a
// second kernel merges) or b * nh ints that are zero (zero again after the kernel). block_tables [b, max_blocks]
// (rows contiguous) and seqlens [b] int32. `pdl` needs sm_90 (the caller checks the device); pdl_late as
// launch_decode_attention's.
template <typename T>
cudaError_t launch_paged_decode_attention(const T* q, const T* k_cache, const T* v_cache, const int* block_tables,
                                          const int* seqlens, T* out, float* part_out, float* part_ml, int* counters,
                                          int b, int nh, int head_dim, int num_blocks, int block_size, int max_blocks,
                                          int split_len, float scale, bool pdl, cudaStream_t stream,
                                          bool pdl_late = false) {
  switch (head_dim) {
#define NEOX_RT_PAGED_DECODE(HD)                                                                                   \
  case HD:                                                                                                         \
    return launch_paged_decode_attention_hd<T, HD>(q, k_cache, v_cache, block_tables, seqlens, out, part_out,   \
                                                   part_ml, counters, b, nh, num_blocks, block_size, max_blocks, \
                                                   split_len, scale, pdl, stream, pdl_late);
    NEOX_RT_DECODE_HEAD_SIZES(NEOX_RT_PAGED_DECODE)
#undef NEOX_RT_PAGED_DECODE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace neox_rt
