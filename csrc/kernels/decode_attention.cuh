// Decode attention (one query per sequence) over a KV cache, split over the cached length (flash-decoding).
//
// out[i, h] = softmax_j(scale * q[i, h] . k[i, h, j]) @ v[i, h, j] over slots j < seqlens[i]; fp32 math.
//
// Kernel 1, grid (splits, nh, b): block (split, h, i) covers slots [split * split_len, +split_len). The cache of
// one head is contiguous ([B, nh, T, HD]), so a block step is one contiguous run of STEP keys: lane group g
// (LPK lanes, VPL 16-byte vectors of the key row each) owns keys g, g + G, ..., g + (N-1) G of the step. All of a
// step's K and V loads (N keys x 2 per lane) are issued before the first is used; with PIPE (the default) the
// next step's loads are issued before the current step is computed (two register buffers of N keys each), so a
// block always has loads in flight; the scores are reduced over the LPK lanes of a group with shuffles, each group
// keeps its own online softmax (max m, sum l, accumulator over its lane's dims), and the groups of the block
// merge through shuffles and shared memory at the end. Blocks past seqlens[i] exit at once. The grid comes
// from the cache capacity, never from seqlens, so there is no host sync and the launch can be captured in a
// CUDA graph.
// The merge of the splits: with `counters` (one int per (i, h), zero before the launch), the last block of a
// (i, h) to finish (atomic ticket) merges all its splits' partials and resets the counter to zero, so one
// launch does everything and graph replays find the counters zeroed. Without counters, a second kernel
// (grid (nh, b)) merges. A sequence that fits in one split is written directly, without partials.
// Programmatic dependent launch (sm_90, `pdl`): the kernel lets its dependents launch at once, asks the L2 for its
// first step of old cache slots (kDecodePrefetch), then waits for its inputs (griddepcontrol.wait) before reading.
// rotary_decode_attention runs the same kernel with the decode step's rotary + KV write inside (DecodeNewToken).
// Requires HD * sizeof(T) % 16 == 0 and 16-byte aligned q and caches (every head size of the family).
// The split kernel's body (decode_split_block) takes where the keys live as a policy (ContiguousKeys here, PagedKeys
// in paged_attention.cuh), so the paged kernel shares the steps, the softmax and the merges; the contiguous kernel's
// code is unchanged by it (same SASS for every instantiation, sm_75 and sm_90, checked with cuobjdump).
#pragma once

#include <climits>
#include <type_traits>

#include "common.cuh"
#include "rotary_kv_write.cuh"  // rotate_dims (the fused rotary of rotary_decode_attention)

namespace neox_rt {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxSplits = 256;  // the planner never makes more (the merge keeps one weight per split in smem)
// Defaults from bench/kernels.py --sweep on one H100 (20B shapes, L2 cold, commit aa77ce1): pipelined steps with
// about 4 blocks per SM, b=1 at 2048 cached 26.1 us (single-buffered 28.3; 8 blocks per SM 28.5 / 30.7),
// b=16 at 2048 275.6 us (291.6), b=1 at 128 10.3 us (11.0).
constexpr int kDecodeBlocksPerSm = 4;      // default split plan: about this many blocks per SM over the grid
constexpr bool kDecodePipeDefault = true;  // default step scheme (variant 0): double-buffered

// Options of the split kernel (template bit mask), both in the default (kDecodeDefaultOpt); OPT = 0 is the
// session-4 kernel, kept for csrc/standalone/decode_probe.cu's same-run comparisons:
// - kDecodeNarrow: lane groups as wide as the largest power of two dividing the vectors of a key row where a lane
//   then loads at most 4 vectors (head size 96 in fp16: groups of 4 lanes with 3 vectors each instead of 16 lanes
//   of which 4 load nothing); other head sizes are unchanged;
// - kDecodePrefetch: before waiting on the previous kernel, the block asks the L2 for its first step of K and V
//   (one bulk prefetch on sm_90, one line per thread before), bounded by a length read before the wait (at worst
//   stale: it only bounds the prefetch); it reads old cache slots only, and the L2 is coherent, so it is safe
//   while the previous kernel writes the newest slot.
// Measured on one H100 (probe, 20B shape, b=1 at 2048 cached, 4d52970): cold 25.3 -> 24.4 us, back to back 23.2 ->
// 20.5 us (81% of copy bandwidth); b=16 275.1 -> 270.4 us.
// Tried and dropped (NOTES, session 5): issuing the first step's loads before the length is known (no gain beside
// the prefetch, slower at short lengths), prefetching the whole split (slower), merging the splits of a head in a
// thread-block cluster through distributed shared memory (clusters of 8 do not all fit at once: slower).
constexpr int kDecodeNarrow = 4;
constexpr int kDecodePrefetch = 2;
constexpr int kDecodePrefetchNoHint = 8;  // probe only: the prefetch bounded by the capacity alone (its first form)
constexpr int kDecodeDefaultOpt = kDecodeNarrow | kDecodePrefetch;

constexpr int largest_pow2_divisor(int v) { return v % 32 == 0 ? 32 : (v & 1) ? 1 : 2 * largest_pow2_divisor(v / 2); }

// PIPE: the block's steps are double-buffered (the next step's K/V loads are issued before the current step is
// computed), with half the keys per step so the registers stay the same; otherwise each step's loads are issued,
// then used (single-buffered).
template <typename T, int HD, bool PIPE = false, int OPT = kDecodeDefaultOpt>
struct DecodeLayout {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static_assert(HD % VEC == 0, "a key row must be whole 16-byte vectors");
  static constexpr int VPK = HD / VEC;  // vectors per key row
  static constexpr int WIDE = VPK > 16 ? 32 : VPK > 8 ? 16 : VPK > 4 ? 8 : VPK > 2 ? 4 : VPK > 1 ? 2 : 1;
  static constexpr int NARROW = largest_pow2_divisor(VPK);  // no idle lanes; used where a lane needs <= 4 vectors
  static constexpr int LPK = (OPT & kDecodeNarrow) && VPK / NARROW <= 4 ? NARROW : WIDE;
  static constexpr int VPL = (VPK + LPK - 1) / LPK;  // vectors of a key row per lane
  static constexpr int G = kDecodeThreads / LPK;     // lane groups (keys side by side) per block
  static constexpr int N_SINGLE = VPL >= 8 ? 1 : 8 / VPL;  // 8 x 16 bytes of K (and of V) per lane per step
  static constexpr int N = PIPE ? (N_SINGLE > 1 ? N_SINGLE / 2 : 1) : N_SINGLE;  // keys per lane group per step
  static constexpr int STEP = G * N;                 // keys per block step
  // Blocks per SM the registers must allow: 4 (<= 128 registers) keeps 4 x 128 x 16 loads of 16 bytes in flight
  // per SM; bf16 needs more registers for the same code (216 on sm_90) and would spill under 128.
  static constexpr int MIN_BLOCKS = std::is_same<T, __nv_bfloat16>::value ? 2 : 4;
};

#ifdef NEOX_RT_DECODE_TRACE
// Probe builds only (csrc/standalone/decode_probe.cu): thread 0 of each block takes a record (8 x u64) at entry
// and writes %globaltimer at trace points 0-5, the q pointer (which call) at 6 and SM id << 32 | linear block
// index at 7. Records are numbered in order of entry across launches.
__device__ unsigned long long* g_decode_trace = nullptr;
__device__ unsigned int g_decode_trace_next = 0;
__device__ unsigned int g_decode_trace_cap = 0;
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define NEOX_RT_DECODE_TRACE_BEGIN(qptr)                                                                     \
  long long trace_rec_ = -1;                                                                                 \
  if (threadIdx.x == 0 && g_decode_trace != nullptr) {                                                       \
    const unsigned r_ = atomicAdd(&g_decode_trace_next, 1u);                                                 \
    if (r_ < g_decode_trace_cap) {                                                                           \
      trace_rec_ = r_;                                                                                       \
      unsigned smid_;                                                                                        \
      asm volatile("mov.u32 %0, %%smid;" : "=r"(smid_));                                                     \
      const unsigned long long blk_ = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);        \
      g_decode_trace[trace_rec_ * 8 + 6] = reinterpret_cast<unsigned long long>(qptr);                       \
      g_decode_trace[trace_rec_ * 8 + 7] = (static_cast<unsigned long long>(smid_) << 32) | blk_;            \
      g_decode_trace[trace_rec_ * 8 + 0] = global_timer_ns();                                                \
    }                                                                                                        \
  }
#define NEOX_RT_DECODE_TRACE_AT(slot) \
  if (trace_rec_ >= 0) g_decode_trace[trace_rec_ * 8 + (slot)] = global_timer_ns()
#else
#define NEOX_RT_DECODE_TRACE_BEGIN(qptr)
#define NEOX_RT_DECODE_TRACE_AT(slot) ((void)0)
#endif

// Ask the L2 for [p, p + bytes) (bytes a multiple of 16, p 16-byte aligned) on behalf of the whole block.
__device__ __forceinline__ void prefetch_l2_block(const void* p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0 && bytes > 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  for (int off = threadIdx.x * 128; off < bytes; off += blockDim.x * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + off));
#endif
}

// Keys per split (a multiple of the block step): about `blocks_per_sm` blocks per SM over the whole grid, from
// the shapes only (never seqlens). Shared by the extension's launcher and the standalone tests.
template <typename T, int HD, bool PIPE, int OPT = kDecodeDefaultOpt>
inline int decode_attention_split_len_hd(int b, int nh, int64_t capacity, int sms, int blocks_per_sm) {
  constexpr int STEP = DecodeLayout<T, HD, PIPE, OPT>::STEP;
  const int64_t heads = static_cast<int64_t>(b) * nh > 0 ? static_cast<int64_t>(b) * nh : 1;
  const int64_t want = (static_cast<int64_t>(sms) * blocks_per_sm + heads - 1) / heads;  // splits per head
  int64_t len = (capacity + (want > 0 ? want : 1) - 1) / (want > 0 ? want : 1);
  const int64_t min_len = (capacity + kDecodeMaxSplits - 1) / kDecodeMaxSplits;  // at most kDecodeMaxSplits splits
  len = len > min_len ? len : min_len;
  len = (len + STEP - 1) / STEP * STEP;
  return static_cast<int>(len > STEP ? len : STEP);
}

inline int decode_attention_splits(int64_t capacity, int split_len) { return ceil_div(capacity, split_len); }

// Split by length (`len_unit` > 0): the plan above splits the CAPACITY, which a graph needs (the grid is fixed), so a
// short sequence in a long cache falls into one or two long splits (a 1056-slot cache of 20B's 64 heads: 128-slot
// splits, so the first 128 keys are read by one block a head). Instead the sequence's own length is split over the
// same grid, in whole steps of len_unit slots and never longer than the plan's split_len (a multiple of the step):
// the same grid, the same partials, the length read after the wait as before. len_unit 0: the plan's split_len.
__host__ __device__ __forceinline__ int decode_len_split(int64_t len, int splits, int split_len, int len_unit) {
  if (len_unit <= 0) return split_len;
  int64_t s = len > 0 ? (len + splits - 1) / splits : 0;
  s = (s + len_unit - 1) / len_unit * len_unit;
  if (s < len_unit) s = len_unit;
  return s < split_len ? static_cast<int>(s) : split_len;
}

__device__ __forceinline__ float softmax_weight(float m, float big) { return m == -INFINITY ? 0.f : exp2f(m - big); }

// Merge the `used` splits of (i, h) = bh into out[bh]: out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - M).
// The whole block (kDecodeThreads threads) takes part: one load per thread for the maxima and sums, the weights
// in shared memory, then each thread owns dims and keeps 8 partial loads in flight, rather than one thread per dim
// walking every split's maximum, sum and partial in turn (at 16 splits both measured the same; this one bounds
// the chain for long caches). Loads bypass L1 (__ldcg): other blocks wrote the partials during this kernel.
template <typename T, int HD>
__device__ __forceinline__ void merge_splits(const float* part_out, const float* part_ml, int64_t bh, int splits,
                                             int used, T* out) {
  __shared__ float s_w[kDecodeMaxSplits];
  __shared__ float s_red[32];
  const float* ml = part_ml + bh * splits * 2;
  float m_local = -INFINITY;
  for (int sp = threadIdx.x; sp < used; sp += kDecodeThreads) m_local = fmaxf(m_local, __ldcg(ml + 2 * sp));
  const float big = block_max(m_local, s_red);
  float den = 0.f;
  for (int sp = threadIdx.x; sp < used; sp += kDecodeThreads) {
    const float w = softmax_weight(__ldcg(ml + 2 * sp), big);
    s_w[sp] = w;
    den += w * __ldcg(ml + 2 * sp + 1);
  }
  den = block_sum(den, s_red);  // its barriers also publish s_w
  const float* po = part_out + bh * splits * HD;
  for (int d = threadIdx.x; d < HD; d += kDecodeThreads) {
    float num = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < used; ++sp) num += s_w[sp] * __ldcg(po + static_cast<int64_t>(sp) * HD + d);
    out[bh * HD + d] = from_float<T>(num / den);
  }
}

// Where the keys and values of one (sequence i, head h) live, for decode_split_block, the body the contiguous and
// the paged kernels (paged_attention.cuh) share: step_rows(first, lim) gives the rows of a step's keys j = first +
// n G (n < N, j < lim), key j's K row starting rows.offset(n, j) elements past `k`, its V row as far past `v` (one
// look-up a key for both). Hooks around the body: prefetch_first_step (before griddepcontrol.wait: hints only),
// load_table / store_table (after the wait, in the round trip of the length and q) and publish (once the block
// knows it has keys, before its first K/V load). The contiguous cache needs only the prefetch.
template <typename T, int HD>
struct ContiguousKeys {
  const T* k;  // [T, HD]: the keys of this (i, h), slot j at j * HD
  const T* v;  // [T, HD]
  // A step's key rows (see decode_split_block's load_step): key j at j * HD.
  struct StepRows {
    __device__ __forceinline__ int offset(int /*n*/, int j) const { return j * HD; }
  };
  template <int N, int G>
  __device__ __forceinline__ StepRows step_rows(int /*first*/, int /*lim*/) const { return {}; }
  template <int STEP, int OPT, typename Len>
  __device__ __forceinline__ void prefetch_first_step(const Len* seqlen, int start, int split_end,
                                                      int64_t capacity) const {
    // Old slots only, so safe before the wait (the L2 is coherent). The length read here may be stale (the
    // previous kernels may still be writing it): it only bounds the prefetch, so that blocks past the sequence
    // do not pull in slots nobody reads; the real length is read after the wait.
    const int64_t hint = (OPT & kDecodePrefetchNoHint) ? capacity : __ldcg(seqlen);
    const int lim = hint < split_end ? static_cast<int>(hint > start ? hint : start) : split_end;
    const int keys = lim - start < STEP ? lim - start : STEP;
    prefetch_l2_block(k + static_cast<int64_t>(start) * HD, keys * HD * static_cast<int>(sizeof(T)));
    prefetch_l2_block(v + static_cast<int64_t>(start) * HD, keys * HD * static_cast<int>(sizeof(T)));
  }
  __device__ __forceinline__ void load_table(int /*start*/, int /*split_end*/) {}
  __device__ __forceinline__ void store_table() {}
  __device__ __forceinline__ void publish() const {}
};

// The new token of a decode step, for decode_split_block: NoNewToken (q given, rotated, the new k and v already in
// the cache: decode_attention) or DecodeNewToken (rotary_decode_attention: rotary + KV write fused into the attention
// launch, one kernel boundary a layer fewer). With DecodeNewToken every block reads its head's q, k, v from the QKV
// projection's output into shared memory and rotates q and k there (the same bits as rotary_kv_write) once its first
// K/V loads are in flight. The block whose split holds the new slot positions[i] writes k and v there (slots outside
// the cache are not written, as rotary_kv_write); no other block reads that slot. Where the new token is its
// sequence's last (a decode step), that block reads its other keys from the cache and takes the new one from shared
// memory as one more entry of its merge (no store-then-load on its path: the output is the two kernels' up to the
// order of the sums); otherwise it writes the slot, passes a barrier and reads it back with the rest.
// First form (write, barrier, read back in the writer block, q rotated before any K/V load): +0.06 ms a token on
// pythia-1.4b int4 against the two kernels on one H100 (bench/NOTES.md, session 20).
struct NoNewToken {};
template <typename T>
struct DecodeNewToken {
  const T* qkv;               // [b, nh * 3 * HD]: head h's q, k, v at h * 3 * HD + {0, 1, 2} * HD
  const int64_t* positions;   // [b]: the new token's cache slot and rotary position
  const float* cos_table;     // [max_pos, rd / 2]
  const float* sin_table;     // [max_pos, rd / 2]
  T* k_cache;                 // [B, nh, T, HD]: written at the new slot
  T* v_cache;
  int rd;                     // rotary dims (even, <= HD)
  int64_t max_pos;            // rows of the tables (positions past them use the last row, as rotary_kv_write)
};

// The split kernel's work for block (split, h, i), with the keys where `kv` says (ContiguousKeys or PagedKeys).
// PDL: the next kernel may launch at the block's start, or with `pdl_late` only after the block's own wait, so that
// it starts after every kernel before this one has finished (the quantized sum's BFIRST reads the layer's 4h output
// before its own wait: csrc/kernels/quant_gemm.cuh). len_unit > 0: the splits divide the sequence's length instead of
// the capacity (decode_len_split; contiguous keys only: the paged kernel passes 0), the last split's range reaching
// to the capacity for the new slot's write, and no L2 prefetch before the wait (its range is not known yet).
template <typename T, int HD, bool PDL, bool PIPE, int OPT, typename Keys, typename Len, typename NewToken = NoNewToken>
__device__ __forceinline__ void decode_split_block(Keys& kv, const T* q, const Len* seqlens, T* out, float* part_out,
                                                   float* part_ml, int* counters, int nh, int64_t capacity,
                                                   int split_len, int splits, float scale_log2, bool pdl_late,
                                                   int len_unit, const NewToken& nt = NewToken()) {
  constexpr bool ROT = !std::is_same<NewToken, NoNewToken>::value;
  using L = DecodeLayout<T, HD, PIPE, OPT>;
  constexpr int VEC = L::VEC, VPK = L::VPK, LPK = L::LPK, VPL = L::VPL, G = L::G, N = L::N;
  constexpr int NW = kDecodeThreads / 32;
  const int split = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(i) * nh + h;
  // Slot indices are 32-bit in the loops (fewer registers; the launcher checks capacity * HD < 2^31).
  int start = split * split_len;
  int split_end = start + split_len < capacity ? start + split_len : static_cast<int>(capacity);
  if (PDL && !pdl_late) pdl_launch_dependents();
  NEOX_RT_DECODE_TRACE_BEGIN(q);
  if ((OPT & (kDecodePrefetch | kDecodePrefetchNoHint)) && len_unit <= 0)
    kv.template prefetch_first_step<L::STEP, OPT>(seqlens + i, start, split_end, capacity);
  if (PDL) pdl_wait();  // q, the newest cache slot and seqlens come from earlier kernels
  if (PDL && pdl_late) pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = threadIdx.x / LPK, lig = threadIdx.x % LPK;  // lane group (key) and lane in the group (dims)
  // seqlens[i] and this lane's slice of q (vectors lig, lig + LPK, ... of the row, in fp32, scaled into log2 units)
  // are loaded together: q's address does not depend on the length, so the block waits one memory round trip
  // before its first K/V loads, not two.
  // Both through the L2 only (__ldcg): with PDL the previous kernels may still be running when this one starts.
  const int64_t len_raw = __ldcg(seqlens + i);
  const int slen = decode_len_split(len_raw < capacity ? len_raw : capacity, splits, split_len, len_unit);
  if (len_unit > 0) {
    start = split * slen;
    split_end = split == splits - 1 || start + slen >= capacity ? static_cast<int>(capacity) : start + slen;
  }
  kv.load_table(start, split_end);
  float qf[VPL][VEC];
  // ROT (module comment at DecodeNewToken): the new token's q, k, v as the projection wrote them (s_raw), q and k
  // rotated (s_rot): raw rows in the round trip of the length and the position, the tables' rows asked for as soon
  // as the position is known, and the rotation done after the block's first K/V loads are on their way, so that it
  // adds no round trip before them.
  constexpr int NR = ROT ? (2 * HD + kDecodeThreads - 1) / kDecodeThreads : 1;  // q and k dims a thread rotates
  __shared__ __align__(16) T s_raw[ROT ? 3 : 1][ROT ? HD : VEC];
  __shared__ __align__(16) T s_rot[ROT ? 2 : 1][ROT ? HD : VEC];
  int64_t pos = 0;
  float rcos[NR], rsin[NR];
  if constexpr (ROT) {
    pos = __ldcg(nt.positions + i);
    const T* row = nt.qkv + bh * 3 * HD;
    for (int v = threadIdx.x; v < 3 * VPK; v += kDecodeThreads)
      *reinterpret_cast<Vec<T, VEC>*>(&s_raw[v / VPK][(v % VPK) * VEC]) = load_vec_cg<T, VEC>(row + v * VEC);
    const int half = nt.rd / 2;
    const int64_t p_tab = pos < 0 ? 0 : (pos >= nt.max_pos ? nt.max_pos - 1 : pos);
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const int d = (threadIdx.x + r * kDecodeThreads) % HD;
      const int f = d < half ? d : d - half;
      rcos[r] = d < nt.rd ? __ldg(nt.cos_table + p_tab * half + f) : 0.f;
      rsin[r] = d < nt.rd ? __ldg(nt.sin_table + p_tab * half + f) : 0.f;
    }
  } else {
#pragma unroll
    for (int u = 0; u < VPL; ++u) {
      const int vi = lig + u * LPK;
      if (vi < VPK) {
        const Vec<T, VEC> qv = load_vec_cg<T, VEC>(q + bh * HD + vi * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[u][e] = to_float(qv.v[e]) * scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[u][e] = 0.f;
      }
    }
  }
  kv.store_table();
  // ROT: q and k rotated into s_rot (the same arithmetic as rotary_kv_write), this lane's q from there, and the block
  // whose split holds the new slot writes k and v there. Every thread of the block calls it (barriers inside).
  const bool writer = ROT && pos >= start && pos < split_end;  // split_end <= capacity: slots outside are nobody's
  auto rotate_and_write = [&]() {
    if constexpr (ROT) {
      __syncthreads();  // s_raw complete
      const int half = nt.rd / 2;
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        const int e = threadIdx.x + r * kDecodeThreads;
        if (e < 2 * HD) {
          const int part = e / HD, d = e % HD;
          T y = s_raw[part][d];
          if (d < nt.rd) {
            const bool first = d < half;
            const float xp = to_float(s_raw[part][first ? d + half : d - half]);
            y = from_float<T>(rotate_value(to_float(y), xp, rcos[r], first ? -rsin[r] : rsin[r]));
          }
          s_rot[part][d] = y;
        }
      }
      __syncthreads();  // s_rot complete
#pragma unroll
      for (int u = 0; u < VPL; ++u) {
        const int vi = lig + u * LPK;
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[u][e] = vi < VPK ? to_float(s_rot[0][vi * VEC + e]) * scale_log2 : 0.f;
      }
      if (writer) {
        for (int v = threadIdx.x; v < 2 * VPK; v += kDecodeThreads) {
          const bool is_k = v < VPK;
          const int vi = is_k ? v : v - VPK;
          const T* src = is_k ? &s_rot[1][vi * VEC] : &s_raw[2][vi * VEC];
          store_vec<T, VEC>((is_k ? nt.k_cache : nt.v_cache) + (bh * capacity + pos) * HD + vi * VEC,
                            *reinterpret_cast<const Vec<T, VEC>*>(src));
        }
      }
    }
  };
  // Issue every load of a step (all K, then all V) before the first is used; keys at or past `lim` are not loaded.
  // Key j = base + g + n G of the step starts rows.offset(n, j) elements past kv.k (its K row) and kv.v (its V row).
  using StepRows = decltype(kv.template step_rows<N, G>(0, 0));
  auto load_rows = [&](Vec<T, VEC> (&dst)[N][VPL], const T* cache, const StepRows& rows, int base, int lim) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const int j = base + g + n * G;
#pragma unroll
      for (int u = 0; u < VPL; ++u) {
        const int vi = lig + u * LPK;
        if (j < lim && vi < VPK) dst[n][u] = load_vec_stream<T, VEC>(cache + rows.offset(n, j) + vi * VEC);
      }
    }
  };
  auto load_step = [&](Vec<T, VEC> (&kr)[N][VPL], Vec<T, VEC> (&vr)[N][VPL], int base, int lim) {
    const StepRows rows = kv.template step_rows<N, G>(base + g, lim);
    load_rows(kr, kv.k, rows, base, lim);
    load_rows(vr, kv.v, rows, base, lim);
  };
  const int len = static_cast<int>(len_raw < capacity ? len_raw : capacity);
  if (len <= 0 || start >= len) {  // nothing to attend to in this split
    // zeros rather than NaN where the sequence is empty (written by split 0 only)
    if (len <= 0 && split == 0)
      for (int d = threadIdx.x; d < HD; d += kDecodeThreads) out[bh * HD + d] = from_float<T>(0.f);
    if (writer) rotate_and_write();  // the new slot is still written (block-uniform: the barriers are safe)
    return;  // the merge only reads splits below len
  }
  kv.publish();
  // ROT: the new key, when it is the sequence's last (the decode step), is taken from s_rot / s_raw by this block's
  // merge (fast_new) rather than read back from the cache it writes; otherwise the block writes it and waits for the
  // write before reading keys (a barrier orders the stores before the block's loads).
  const bool fast_new = writer && pos == len - 1;
  const int end = fast_new ? static_cast<int>(pos) : (split_end < len ? split_end : len);
  const int used = (len + slen - 1) / slen;
  bool rotated = false;
  if (ROT && (writer && !fast_new)) {
    rotate_and_write();
    __syncthreads();
    rotated = true;
  }
  NEOX_RT_DECODE_TRACE_AT(1);

  float m = -INFINITY, l = 0.f;
  float acc[VPL][VEC];
#pragma unroll
  for (int u = 0; u < VPL; ++u)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[u][e] = 0.f;

  // Scores of the step's keys, then this group's online-softmax update.
  auto compute_step = [&](const Vec<T, VEC> (&kr)[N][VPL], const Vec<T, VEC> (&vr)[N][VPL], int base) {
    float s[N];
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const int j = base + g + n * G;
      float dot = 0.f;
#pragma unroll
      for (int u = 0; u < VPL; ++u) {
        const int vi = lig + u * LPK;
        if (j < end && vi < VPK) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot += qf[u][e] * to_float(kr[n][u].v[e]);
        }
      }
#pragma unroll
      for (int o = LPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      s[n] = j < end ? dot : -INFINITY;
    }
    float step_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < N; ++n) step_max = fmaxf(step_max, s[n]);
    if (step_max != -INFINITY) {  // this group has at least one key in the step
      const float m_new = fmaxf(m, step_max);
      const float corr = softmax_weight(m, m_new);
      l *= corr;
#pragma unroll
      for (int u = 0; u < VPL; ++u)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[u][e] *= corr;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float p = softmax_weight(s[n], m_new);  // 0 for keys past the end (their V was not loaded)
        l += p;
        if (p != 0.f) {
#pragma unroll
          for (int u = 0; u < VPL; ++u) {
            if (lig + u * LPK < VPK) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[u][e] += p * to_float(vr[n][u].v[e]);
            }
          }
        }
      }
      m = m_new;
    }
  };

  if (!PIPE) {
    if (ROT && !rotated) rotate_and_write();
    for (int base = start; base < end; base += L::STEP) {
      Vec<T, VEC> kr[N][VPL], vr[N][VPL];
      load_step(kr, vr, base, end);
      compute_step(kr, vr, base);
    }
  } else {  // two register buffers, unrolled by two so that neither is indexed at run time
    Vec<T, VEC> k0[N][VPL], v0[N][VPL], k1[N][VPL], v1[N][VPL];
    load_step(k0, v0, start, end);
    if (ROT && !rotated) rotate_and_write();  // its table loads and barriers behind the first step's K/V loads
    int base = start;
    while (true) {
      if (base + L::STEP < end) load_step(k1, v1, base + L::STEP, end);
      compute_step(k0, v0, base);
      if (base == start) NEOX_RT_DECODE_TRACE_AT(2);
      base += L::STEP;
      if (base >= end) break;
      if (base + L::STEP < end) load_step(k0, v0, base + L::STEP, end);
      compute_step(k1, v1, base);
      base += L::STEP;
      if (base >= end) break;
    }
  }
  NEOX_RT_DECODE_TRACE_AT(3);

  // Merge the lane groups of a warp (same lig, other g): xor over the lane bits above the group's.
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, o);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, o);
    const float big = fmaxf(m, m_o);
    const float a = softmax_weight(m, big), c = softmax_weight(m_o, big);
    l = a * l + c * l_o;
#pragma unroll
    for (int u = 0; u < VPL; ++u)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[u][e] = a * acc[u][e] + c * __shfl_xor_sync(0xffffffffu, acc[u][e], o);
    m = big;
  }
  // Then the warps, through shared memory (a warp holds whole groups: LPK <= 32); ROT: one more entry, the new key
  // where this block takes it from shared memory (fast_new: weight 2^(score - max), its v), else nothing.
  constexpr int NE = NW + (ROT ? 1 : 0);
  __shared__ float s_m[NE], s_l[NE];
  __shared__ float s_acc[NE][HD];
  __shared__ int s_last;
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
  if constexpr (ROT) {
    if (warp == 0) {  // the new key's score: q (as qf: rounded, then scaled) . k, both rotated
      float dot = 0.f;
      if (fast_new)
        for (int d = lane; d < HD; d += 32) dot += to_float(s_rot[0][d]) * scale_log2 * to_float(s_rot[1][d]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (lane == 0) {
        s_m[NW] = fast_new ? dot : -INFINITY;
        s_l[NW] = fast_new ? 1.f : 0.f;
      }
    }
    for (int d = threadIdx.x; d < HD; d += kDecodeThreads) s_acc[NW][d] = fast_new ? to_float(s_raw[2][d]) : 0.f;
  }
  if (lane < LPK) {
#pragma unroll
    for (int u = 0; u < VPL; ++u) {
      const int vi = lig + u * LPK;
      if (vi < VPK) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s_acc[warp][vi * VEC + e] = acc[u][e];
      }
    }
  }
  __syncthreads();
  float bm = -INFINITY;
#pragma unroll
  for (int w = 0; w < NE; ++w) bm = fmaxf(bm, s_m[w]);
  float bl = 0.f;
#pragma unroll
  for (int w = 0; w < NE; ++w) bl += softmax_weight(s_m[w], bm) * s_l[w];

  if (used == 1) {  // the whole sequence is in this split: normalize and write the output
    for (int d = threadIdx.x; d < HD; d += kDecodeThreads) {
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < NE; ++w) o += softmax_weight(s_m[w], bm) * s_acc[w][d];
      out[bh * HD + d] = from_float<T>(o / bl);
    }
    return;
  }
  const int64_t part = bh * splits + split;
  for (int d = threadIdx.x; d < HD; d += kDecodeThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < NE; ++w) o += softmax_weight(s_m[w], bm) * s_acc[w][d];
    part_out[part * HD + d] = o;
  }
  if (threadIdx.x == 0) {
    part_ml[part * 2] = bm;
    part_ml[part * 2 + 1] = bl;
  }
  if (counters == nullptr) return;  // the merge kernel follows

  // Last block of this (i, h) merges: publish the partials, take a ticket. The barrier orders the block's partial
  // writes before thread 0's ticket, whose acq_rel atomic (sm_70+) releases them to the GPU and, in the last
  // block, acquires the other blocks' (one memory round trip instead of a fence and then the atomic).
  __syncthreads();
  if (threadIdx.x == 0) {
    const int ticket = atomic_add_acq_rel_gpu(counters + bh, 1);
    s_last = ticket == used - 1;
    if (s_last) counters[bh] = 0;  // every other block of this (i, h) has taken its ticket: ready for the next launch
  }
  __syncthreads();  // the rest of the block sees the acquired partials through thread 0 (cumulativity)
  NEOX_RT_DECODE_TRACE_AT(4);
  if (!s_last) return;
  merge_splits<T, HD>(part_out, part_ml, bh, splits, used, out);
  NEOX_RT_DECODE_TRACE_AT(5);
}

// NewToken: NoNewToken (decode_attention) or DecodeNewToken (rotary_decode_attention: q null, the caches written at
// the new slot through nt's pointers, read through k_cache / v_cache).
template <typename T, int HD, bool PDL, bool PIPE, int OPT = kDecodeDefaultOpt, typename NewToken = NoNewToken>
__global__ void __launch_bounds__(kDecodeThreads, (DecodeLayout<T, HD, PIPE, OPT>::MIN_BLOCKS))
decode_attention_split_kernel(const T* __restrict__ q,               // [b, nh, HD]
                              const T* __restrict__ k_cache,         // [B, nh, T, HD]
                              const T* __restrict__ v_cache,         // [B, nh, T, HD]
                              const int64_t* __restrict__ seqlens,   // [b]
                              T* __restrict__ out,                   // [b, nh, HD]
                              float* __restrict__ part_out,          // [b, nh, splits, HD]
                              float* __restrict__ part_ml,           // [b, nh, splits, 2] (max, sum)
                              int* __restrict__ counters,            // [b, nh] zeros, or null (separate merge)
                              int nh, int64_t capacity, int split_len, int splits, float scale_log2,
                              bool pdl_late, int len_unit, const NewToken nt) {
  const int h = blockIdx.y, i = blockIdx.z;
  const int64_t bh = static_cast<int64_t>(i) * nh + h;
  ContiguousKeys<T, HD> kv{k_cache + bh * capacity * HD, v_cache + bh * capacity * HD};
  decode_split_block<T, HD, PDL, PIPE, OPT>(kv, q, seqlens, out, part_out, part_ml, counters, nh, capacity,
                                            split_len, splits, scale_log2, pdl_late, len_unit, nt);
}

// Len: seqlens' type (int64 for the contiguous cache, int32 for the paged one).
template <typename T, int HD, typename Len = int64_t>
__global__ void __launch_bounds__(kDecodeThreads)
decode_attention_reduce_kernel(const float* __restrict__ part_out,    // [b, nh, splits, HD]
                               const float* __restrict__ part_ml,     // [b, nh, splits, 2]
                               const Len* __restrict__ seqlens,       // [b]
                               T* __restrict__ out,                   // [b, nh, HD]
                               int nh, int64_t capacity, int split_len, int splits, int len_unit = 0) {
  const int h = blockIdx.x, i = blockIdx.y;
  const int64_t len = seqlens[i] < capacity ? seqlens[i] : capacity;
  const int slen = decode_len_split(len, splits, split_len, len_unit);  // the split kernel's
  const int used = len <= 0 ? 0 : static_cast<int>((len + slen - 1) / slen);
  if (used <= 1) return;  // written by the split kernel (zeros for an empty sequence)
  merge_splits<T, HD>(part_out, part_ml, static_cast<int64_t>(i) * nh + h, splits, used, out);
}

template <typename T, int HD, bool PIPE, int OPT = kDecodeDefaultOpt, typename NewToken = NoNewToken>
cudaError_t launch_decode_split(const T* q, const T* k_cache, const T* v_cache, const int64_t* seqlens, T* out,
                                float* part_out, float* part_ml, int* counters, int b, int nh, int64_t capacity,
                                int split_len, int splits, float scale_log2, bool pdl, cudaStream_t stream,
                                const NewToken& nt = NewToken(), bool pdl_late = false, bool by_len = false) {
  return launch_kernel(pdl, decode_attention_split_kernel<T, HD, false, PIPE, OPT, NewToken>,
                       decode_attention_split_kernel<T, HD, true, PIPE, OPT, NewToken>, dim3(splits, nh, b),
                       dim3(kDecodeThreads), stream, q, k_cache, v_cache, seqlens, out, part_out, part_ml, counters,
                       nh, capacity, split_len, splits, scale_log2, pdl_late,
                       by_len ? DecodeLayout<T, HD, PIPE, OPT>::STEP : 0, nt);
}

// nt: null (decode_attention: q given) or the fused rotary + KV write's inputs (rotary_decode_attention; q unused).
template <typename T, int HD>
cudaError_t launch_decode_attention_hd(const T* q, const T* k_cache, const T* v_cache, const int64_t* seqlens,
                                       T* out, float* part_out, float* part_ml, int* counters, int b, int nh,
                                       int64_t capacity, int split_len, float scale, bool pdl, bool pipe,
                                       cudaStream_t stream, const DecodeNewToken<T>* nt = nullptr,
                                       bool pdl_late = false, bool by_len = false) {
  const int splits = decode_attention_splits(capacity, split_len);
  if (b == 0 || nh == 0) return cudaSuccess;
  const float scale_log2 = scale * 1.4426950408889634f;
  if (splits > kDecodeMaxSplits) return cudaErrorInvalidValue;  // split_len too short for the capacity
  if (capacity > INT_MAX / HD) return cudaErrorInvalidValue;  // slot offsets within a head are 32-bit
  if (nt != nullptr && (nt->rd < 0 || nt->rd > HD || nt->rd % 2 != 0 || nt->max_pos < 1))
    return cudaErrorInvalidValue;
  if (splits == 0) {  // an empty cache: every output is zero (and no slot to write)
    return cudaMemsetAsync(out, 0, sizeof(T) * static_cast<size_t>(b) * nh * HD, stream);
  }
  auto go = [&](const auto& token) {
    using NT = std::decay_t<decltype(token)>;
    return pipe ? launch_decode_split<T, HD, true, kDecodeDefaultOpt, NT>(q, k_cache, v_cache, seqlens, out, part_out,
                                                                         part_ml, counters, b, nh, capacity, split_len,
                                                                         splits, scale_log2, pdl, stream, token,
                                                                         pdl_late, by_len)
                : launch_decode_split<T, HD, false, kDecodeDefaultOpt, NT>(q, k_cache, v_cache, seqlens, out,
                                                                          part_out, part_ml, counters, b, nh, capacity,
                                                                          split_len, splits, scale_log2, pdl, stream,
                                                                          token, pdl_late, by_len);
  };
  const cudaError_t err = nt != nullptr ? go(*nt) : go(NoNewToken{});
  if (err != cudaSuccess || counters != nullptr || splits == 1) return err;
  const int len_unit = !by_len ? 0
                       : pipe ? DecodeLayout<T, HD, true>::STEP
                              : DecodeLayout<T, HD, false>::STEP;  // launch_decode_split's (kDecodeDefaultOpt)
  decode_attention_reduce_kernel<T, HD><<<dim3(nh, b), kDecodeThreads, 0, stream>>>(part_out, part_ml, seqlens, out, nh,
                                                                         capacity, split_len, splits, len_unit);
  return cudaGetLastError();
}

#define NEOX_RT_DECODE_HEAD_SIZES(X) X(32) X(64) X(80) X(96) X(128) X(256)

// Split length for launch_decode_attention (see decode_attention_split_len_hd); 0 for an unsupported head size.
template <typename T>
inline int decode_attention_split_len(int head_dim, int b, int nh, int64_t capacity, int sms, int blocks_per_sm,
                                      bool pipe) {
  switch (head_dim) {
#define NEOX_RT_SPLIT_LEN(HD)                                                                 \
  case HD:                                                                                    \
    return pipe ? decode_attention_split_len_hd<T, HD, true>(b, nh, capacity, sms, blocks_per_sm) \
                : decode_attention_split_len_hd<T, HD, false>(b, nh, capacity, sms, blocks_per_sm);
    NEOX_RT_DECODE_HEAD_SIZES(NEOX_RT_SPLIT_LEN)
#undef NEOX_RT_SPLIT_LEN
    default:
      return 0;
  }
}

// head_dim must be one of 32, 64, 80, 96, 128, 256 (returns cudaErrorInvalidValue otherwise). part_out
// [b * nh * splits * HD] and part_ml [b * nh * splits * 2] floats, splits = decode_attention_splits(capacity,
// split_len); counters: null (a second kernel merges) or b * nh ints that are zero (they are zero again after
// the kernel). `pdl` needs sm_90 (the caller checks the device). `pipe`: the double-buffered steps (split_len
// from decode_attention_split_len with the same `pipe`).
// nt: as launch_decode_attention_hd (rotary_decode_attention passes the new token's inputs and null q). pdl_late:
// with pdl, the blocks trigger the next launch after their own wait (decode_split_block). by_len: the splits divide
// each sequence's length rather than the capacity (decode_len_split; same grid, same workspace).
template <typename T>
cudaError_t launch_decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* seqlens, T* out,
                                    float* part_out, float* part_ml, int* counters, int b, int nh, int head_dim,
                                    int64_t capacity, int split_len, float scale, bool pdl, bool pipe,
                                    cudaStream_t stream, const DecodeNewToken<T>* nt = nullptr,
                                    bool pdl_late = false, bool by_len = false) {
  switch (head_dim) {
#define NEOX_RT_DECODE(HD)                                                                                      \
  case HD:                                                                                                      \
    return launch_decode_attention_hd<T, HD>(q, k_cache, v_cache, seqlens, out, part_out, part_ml, counters, b, \
                                             nh, capacity, split_len, scale, pdl, pipe, stream, nt, pdl_late,     \
                                             by_len);
    NEOX_RT_DECODE_HEAD_SIZES(NEOX_RT_DECODE)
#undef NEOX_RT_DECODE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace neox_rt
