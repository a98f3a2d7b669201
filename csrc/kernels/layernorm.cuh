// LayerNorm and the dual LayerNorm of a parallel-residual layer, from one read of x.
//
// out = (x - mean) / sqrt(var + eps) * w + b over the last dim; fp32 statistics computed two-pass from
// registers (mean first, then the centred sum of squares: no cancellation), the input dtype out. The dual
// form writes LN1(x) and LN2(x) from the same registers. One block per row; each thread keeps up to MAXV
// vectors of VEC elements (VEC * sizeof(T) = 16 bytes where hidden and alignment allow). For a few rows (decode)
// the weights and biases are prefetched into L2 first (they do not depend on x: one DRAM trip less after the
// statistics). With PDL (sm_90, the launcher's `pdl`) the prefetch is issued before griddepcontrol.wait and x is
// read through the L2 only (ld.global.cg: the kernel that writes it may still be running when this one starts; see
// gemv.cuh).
// The reducing form (p2p_reduce_layernorm): x is this rank's partial sum of a tensor-parallel layer, the peers' are
// in this rank's peer-to-peer slots (pushed by gemv_sum, csrc/kernels/allreduce.cuh's flagged lines); the block
// waits for them, sums the partials in rank order in fp32 (rounded once, as p2p_all_reduce), writes that sum (the
// residual stream) and normalises it: the all-reduce and the LayerNorm after it in one kernel. One row.
#pragma once

#include <algorithm>

#include "allreduce.cuh"
#include "common.cuh"

namespace neox_rt {

constexpr int kLayerNormMaxVecs = 8;  // vectors per thread held in registers
constexpr int kP2PReduceThreads = 512;  // the reducing form's block where n has that many vectors (64K registers)
// Up to this many rows every block prefetches the parameters (at 2048 rows it cost 20B's dual LayerNorm 34.8 -> 42.0 us
// on one H100, 0ac76b5; at one row 10.6 -> 9.2 us for the single one: bench/NOTES.md, session 6).
constexpr int kLayerNormPrefetchRows = 32;

// Prefetch into L2 the 128-byte lines of p's first nvec vectors, the block's threads taking one line each in turn.
template <typename T, int VEC>
__device__ __forceinline__ void prefetch_vectors_l2(const T* p, int nvec) {
  constexpr int kVecBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kPerLine = kVecBytes < 128 ? 128 / kVecBytes : 1;  // vectors per line
  for (int c = threadIdx.x * kPerLine; c < nvec; c += blockDim.x * kPerLine)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + static_cast<int64_t>(c) * VEC));
}

template <typename T, int VEC, bool DUAL, bool PDL, bool REDUCE = false>
__global__ void layernorm_kernel(const T* __restrict__ x,     // [rows, n]
                                 const T* __restrict__ w1,    // [n]
                                 const T* __restrict__ b1,    // [n]
                                 T* __restrict__ out1,        // [rows, n]
                                 const T* __restrict__ w2,    // [n] (DUAL only)
                                 const T* __restrict__ b2,    // [n] (DUAL only)
                                 T* __restrict__ out2,        // [rows, n] (DUAL only)
                                 int n, float eps,
                                 const __grid_constant__ P2PBuffers peers,  // (REDUCE only)
                                 T* __restrict__ xsum) {                    // [n] the reduced x (REDUCE only)
  static_assert(!REDUCE || (VEC * sizeof(T)) % 8 == 0, "a vector is whole 8-byte lines");
  constexpr int kLines = REDUCE ? static_cast<int>(VEC * sizeof(T)) / 8 : 1;  // pushed lines a vector
  __shared__ float scratch[32];
  if (PDL) pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const int nvec = n / VEC;
  const T* xr = x + row * n;
  if (gridDim.x <= kLayerNormPrefetchRows) {  // decode; with many rows the parameters stay in L2 after the first
    prefetch_vectors_l2<T, VEC>(w1, nvec);
    prefetch_vectors_l2<T, VEC>(b1, nvec);
    if (DUAL) {
      prefetch_vectors_l2<T, VEC>(w2, nvec);
      prefetch_vectors_l2<T, VEC>(b2, nvec);
    }
  }
  if (PDL) pdl_wait();
  unsigned seq = 0;
  P2PState* st = nullptr;
  if (REDUCE) {
    st = p2p_state(peers.base[peers.rank]);
    seq = *reinterpret_cast<volatile unsigned*>(&st->seq) + 1u;
  }
  float xs[kLayerNormMaxVecs][VEC];
  float sum = 0.f;
#pragma unroll
  for (int r = 0; r < kLayerNormMaxVecs; ++r) {
    const int c = threadIdx.x + r * blockDim.x;
    if (c < nvec) {
      Vec<T, VEC> v = PDL || REDUCE ? load_vec_cg<T, VEC>(xr + c * VEC) : load_vec<T, VEC>(xr + c * VEC);
      if (REDUCE) {  // x + the peers' partials in rank order, fp32, rounded once
        float acc[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
        for (int q = 0; q < peers.world; ++q) {
          if (q == peers.rank) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += to_float(v.v[e]);
            continue;
          }
          uint2 d[kLines];
          p2p_wait_lines<kLines>(p2p_slot(peers, peers.base[peers.rank], seq & 1u, q) + c * kLines, seq, st, d);
          const T* dv = reinterpret_cast<const T*>(d);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += to_float(dv[e]);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) v.v[e] = from_float<T>(acc[e]);
        store_vec<T, VEC>(xsum + c * VEC, v);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        xs[r][e] = to_float(v.v[e]);
        sum += xs[r][e];
      }
    }
  }
  const float mean = block_sum(sum, scratch) / n;
  if (REDUCE && threadIdx.x == 0) st->seq = seq;  // every thread read it before block_sum's barriers
  float sq = 0.f;
#pragma unroll
  for (int r = 0; r < kLayerNormMaxVecs; ++r) {
    const int c = threadIdx.x + r * blockDim.x;
    if (c < nvec) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        xs[r][e] -= mean;
        sq += xs[r][e] * xs[r][e];
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / n + eps);
#pragma unroll
  for (int r = 0; r < kLayerNormMaxVecs; ++r) {
    const int c = threadIdx.x + r * blockDim.x;
    if (c < nvec) {
      const Vec<T, VEC> wv = load_vec<T, VEC>(w1 + c * VEC), bv = load_vec<T, VEC>(b1 + c * VEC);
      Vec<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(xs[r][e] * rstd * to_float(wv.v[e]) + to_float(bv.v[e]));
      store_vec<T, VEC>(out1 + row * n + c * VEC, o);
      if (DUAL) {
        const Vec<T, VEC> wv2 = load_vec<T, VEC>(w2 + c * VEC), bv2 = load_vec<T, VEC>(b2 + c * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          o.v[e] = from_float<T>(xs[r][e] * rstd * to_float(wv2.v[e]) + to_float(bv2.v[e]));
        store_vec<T, VEC>(out2 + row * n + c * VEC, o);
      }
    }
  }
}

// Largest hidden size a launch handles with `vec` elements per vector: 1024 threads * MAXV vectors.
inline int layernorm_max_hidden(int vec) { return 1024 * kLayerNormMaxVecs * vec; }

// vec in {1, 2, 4, 8} must divide n and keep all pointers aligned; n <= layernorm_max_hidden(vec).
// w2/b2/out2 null for a single LayerNorm. `pdl` needs sm_90 (the caller checks the device).
template <typename T>
cudaError_t launch_layernorm(const T* x, const T* w1, const T* b1, T* out1, const T* w2, const T* b2, T* out2,
                             int64_t rows, int n, float eps, int vec, bool pdl, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (n % vec != 0 || n > layernorm_max_hidden(vec)) return cudaErrorInvalidValue;
  const int nvec = n / vec;
  // Enough threads that each holds at most MAXV vectors; at least 4 warps, whole warps only.
  int threads = (nvec + kLayerNormMaxVecs - 1) / kLayerNormMaxVecs;
  threads = ((threads + 31) / 32) * 32;
  threads = threads < 128 ? 128 : (threads > 1024 ? 1024 : threads);
  const bool dual = out2 != nullptr;
  const dim3 grid(static_cast<unsigned>(rows)), block(threads);
  const P2PBuffers none{};
  T* const no_sum = nullptr;
#define NEOX_RT_LN(V)                                                                                              \
  return dual ? launch_kernel(pdl, layernorm_kernel<T, V, true, false>, layernorm_kernel<T, V, true, true>, grid,  \
                              block, stream, x, w1, b1, out1, w2, b2, out2, n, eps, none, no_sum)                  \
              : launch_kernel(pdl, layernorm_kernel<T, V, false, false>, layernorm_kernel<T, V, false, true>, grid, \
                              block, stream, x, w1, b1, out1, w2, b2, out2, n, eps, none, no_sum);
  switch (vec) {
    case 8: NEOX_RT_LN(8)
    case 4: NEOX_RT_LN(4)
    case 2: NEOX_RT_LN(2)
    default: NEOX_RT_LN(1)
  }
#undef NEOX_RT_LN
}

// The all-reduce of a tensor-parallel layer's partial x [n] (this rank's; the peers' pushed by gemv_sum into this
// rank's slots) fused with the LayerNorm(s) after it: xsum = the sum over ranks, out1 = LN1(xsum), out2 = LN2(xsum)
// (w2/b2/out2 null: one LayerNorm). One row; vec (elements a thread's vector) as launch_layernorm, vec * sizeof(T)
// a multiple of 8; n <= the lines of a slot. Every rank calls it once per gemv_sum push, in the same order.
template <typename T>
cudaError_t launch_p2p_reduce_layernorm(const T* x, const P2PBuffers& peers, T* xsum, const T* w1, const T* b1,
                                        T* out1, const T* w2, const T* b2, T* out2, int n, float eps, int vec,
                                        bool pdl, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n % vec != 0 || n > layernorm_max_hidden(vec) || (vec * sizeof(T)) % 8 != 0 ||
      2LL * n * static_cast<long long>(sizeof(T)) > peers.slot_bytes)
    return cudaErrorInvalidValue;
  // as many threads as the registers allow (~104 a thread: 512), each waiting for its vectors' lines: at 128 threads
  // (six vectors a thread for 20B, waited for in turn) the fused form measured slower than the separate all-reduce
  int threads = (n / vec + kLayerNormMaxVecs - 1) / kLayerNormMaxVecs;
  threads = std::max(threads, std::min(n / vec, kP2PReduceThreads));
  threads = ((threads + 31) / 32) * 32;
  threads = threads < 128 ? 128 : (threads > 1024 ? 1024 : threads);
  const bool dual = out2 != nullptr;
  const dim3 grid(1), block(threads);
#define NEOX_RT_LN_REDUCE(V)                                                                                    \
  return dual ? launch_kernel(pdl, layernorm_kernel<T, V, true, false, true>,                                    \
                              layernorm_kernel<T, V, true, true, true>, grid, block, stream, x, w1, b1, out1, w2, \
                              b2, out2, n, eps, peers, xsum)                                                     \
              : launch_kernel(pdl, layernorm_kernel<T, V, false, false, true>,                                   \
                              layernorm_kernel<T, V, false, true, true>, grid, block, stream, x, w1, b1, out1, w2, \
                              b2, out2, n, eps, peers, xsum);
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) NEOX_RT_LN_REDUCE(8)
    if (vec == 4) NEOX_RT_LN_REDUCE(4)
  } else {
    if (vec == 4) NEOX_RT_LN_REDUCE(4)
    if (vec == 2) NEOX_RT_LN_REDUCE(2)
  }
  return cudaErrorInvalidValue;
#undef NEOX_RT_LN_REDUCE
}

// ---- The next layer's dual LayerNorm in a sum's launch (quant_gemm_sum_kernel's SUMNORM, gemv_sum_kernel's NORM) ----
// A decode layer's output y is the sum of its two row-parallel linears, and the next parallel-residual layer first
// normalises it twice (LN1(y) for its QKV, LN2(y) for its h->4h). Instead of a LayerNorm kernel between the two
// layers, each block of the sum takes a ticket after storing its part of y, and the last block (every y stored)
// normalises the rows: the LayerNorm's launch and one kernel boundary go. Up to kSumNormMaxRows rows (one after
// another), n a multiple of 8 of at most kSumNormVecs vectors of 8 a thread of a 256-thread block (n <= 8192).
template <typename T>
struct SumNorm {
  const T* w_a;
  const T* b_a;
  const T* w_b;
  const T* b_b;
  float eps;
  T* out_a;     // [m, n]: LN_a(y)
  T* out_b;     // [m, n]: LN_b(y)
  int* ticket;  // zero before the launch; the last block leaves it zero
};
constexpr int kSumNormVecs = 4;
constexpr int kSumNormMaxRows = 8;
constexpr int kSumNormMinThreads = 256;  // the smallest block of the sums that take it

inline bool sum_norm_ok(int n, int m) {
  return n > 0 && n % 8 == 0 && n / 8 <= kSumNormVecs * kSumNormMinThreads && m >= 0 && m <= kSumNormMaxRows;
}

// Called by every thread of every block after the block's stores of y [m, n]: the last block to arrive normalises
// the rows with both LayerNorms, one row at a time by the whole block, its values held in registers (read through
// L2: other blocks stored them), fp32 statistics in two passes (the mean, then the centred sum of squares, as
// layernorm_kernel computes them), each output rounded once; then it puts the ticket back to zero.
template <typename T, int THREADS>
__device__ __forceinline__ void sum_norm_tail(const T* y, const SumNorm<T>& ln, int m, int n) {
  static_assert(THREADS >= kSumNormMinThreads, "sum_norm_ok's bound assumes at least 256 threads");
  constexpr int V = kSumNormVecs;
  __shared__ float scratch[32];
  __shared__ bool last;
  __threadfence();  // this block's y, visible to the grid before its ticket
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ln.ticket, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // every other block's y, stored before its ticket, is read after it
  const int nvec = n / 8;
  for (int r = 0; r < m; ++r) {
    const int64_t row = static_cast<int64_t>(r) * n;
    Vec<T, 8> xv[V];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = threadIdx.x + i * THREADS;
      if (c < nvec) {
        xv[i] = load_vec_cg<T, 8>(y + row + 8 * c);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += to_float(xv[i].v[e]);
      }
    }
    const float mean = block_sum(sum, scratch) / n;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (threadIdx.x + i * THREADS < nvec) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float d = to_float(xv[i].v[e]) - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / n + ln.eps);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = threadIdx.x + i * THREADS;
      if (c < nvec) {
        const Vec<T, 8> wa = load_vec<T, 8>(ln.w_a + 8 * c), ba = load_vec<T, 8>(ln.b_a + 8 * c);
        const Vec<T, 8> wb = load_vec<T, 8>(ln.w_b + 8 * c), bb = load_vec<T, 8>(ln.b_b + 8 * c);
        Vec<T, 8> oa, ob;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float d = (to_float(xv[i].v[e]) - mean) * rstd;
          oa.v[e] = from_float<T>(d * to_float(wa.v[e]) + to_float(ba.v[e]));
          ob.v[e] = from_float<T>(d * to_float(wb.v[e]) + to_float(bb.v[e]));
        }
        *reinterpret_cast<uint4*>(ln.out_a + row + 8 * c) = *reinterpret_cast<const uint4*>(&oa);
        *reinterpret_cast<uint4*>(ln.out_b + row + 8 * c) = *reinterpret_cast<const uint4*>(&ob);
      }
    }
  }
  if (threadIdx.x == 0) *ln.ticket = 0;
}

}  // namespace neox_rt
