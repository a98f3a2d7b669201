// Two single-row GEMVs in one launch, for the parallel-residual GPT-NeoX layer at batch 1 (decode):
//  - pair (gemv_pair_kernel): y1 = act1(x1 W1^T + b1), y2 = act2(x2 W2^T + b2), two independent problems (the layer's
//    column-parallel linears: QKV from LN1(x), h->4h from LN2(x)); the first blocks take the first problem, the
//    rest the second.
//  - sum (gemv_sum_kernel): y = x1 W1^T + x2 W2^T + b1 + b2 + residual, one GEMV over the concatenated k (the layer's
//    row-parallel linears, attention's dense and 4h->h, whose outputs the layer adds anyway: x + attn + mlp). The
//    sum is accumulated in fp32 and rounded once.
// Why: at TP=2 a 20B layer spends ~18 us above its weight floor in four GEMVs, whose weight runs are half as long as
// at TP=1 while each launch's ramp-up and drain are not (bench/NOTES.md, session 7); two launches pay two ramps.
// Measured (bench/NOTES.md, session 9): 20B rank 0 of TP=2 on one H100 7.44 vs 7.80 ms a token with four GEMVs, TP=1
// 14.06 vs 14.43; TP=2 on two H100s 7.86 vs 8.22.
// The scheme is gemv_kernel's wide configuration (gemv.cuh): blocks of 8 warps, a group of KSPLIT warps owns 4 rows
// of W and splits its k (in sum: each warp takes its KSPLIT-th of k1, then of k2), each lane keeps one 16-byte
// streaming (evict-first) load per row in flight, double-buffered; x through L1 after griddepcontrol.wait, the first
// weights asked for before it. Blocks own 32 / KSPLIT rows. Needs k1, k2 % (8 * KSPLIT) == 0 and 16-byte aligned x
// and W (fp16 / bf16).
#pragma once

#include <algorithm>

#include "allreduce.cuh"
#include "common.cuh"
#include "gemv.cuh"
#include "layernorm.cuh"  // SumNorm, sum_norm_tail

namespace neox_rt {

// One single-row GEMV: y[n] = act(x[k] . W[n, :] + bias[n]) + residual[n].
template <typename T>
struct GemvProblem {
  const T* x;         // [k]
  const T* w;         // [n, k]
  const T* bias;      // [n] or null
  const T* residual;  // [n] or null
  T* y;               // [n]
  int n, k, act;
};

constexpr int kGemv2Warps = 8, kGemv2RowsPerGroup = 4;

// gemv2_body's epilogue, by a group's first warp: lane o < 4 sums the group's partials of row n0 + o, adds the
// bias(es), the activation and the residual, rounds and stores; SUM with a push sends the 4 rows to the peers.
template <typename T, int KSPLIT, bool SUM>
__device__ __forceinline__ void gemv2_store(const GemvProblem<T>& p1, const GemvProblem<T>& p2, bool second,
                                            const float (&partial)[kGemv2Warps][kGemv2RowsPerGroup], int n0,
                                            const P2PBuffers& push, unsigned push_seq) {
  constexpr int NPW = kGemv2RowsPerGroup;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = second ? p2.n : p1.n;
  T result = from_float<T>(0.f);
  if (lane < NPW && n0 + lane < n) {
    const int f = n0 + lane;
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < KSPLIT; ++q) v += partial[warp + q][lane];
    const T* const bias = second ? p2.bias : p1.bias;
    const T* const residual = second ? p2.residual : p1.residual;
    if (bias != nullptr) v += to_float(bias[f]);
    if (SUM && p2.bias != nullptr) v += to_float(p2.bias[f]);
    float out = apply_activation(v, second ? p2.act : p1.act);
    if (residual != nullptr) out += to_float(__ldcg(residual + f));
    result = from_float<T>(out);
    (second ? p2.y : p1.y)[f] = result;
  }
  if (SUM && push.world > 0) {  // lanes 0-3 hold rows n0..n0+3: lane 0 sends them as one line to every peer
    static_assert(sizeof(T) == 2, "a pushed line holds 4 outputs of 2 bytes");
    const unsigned bits = *reinterpret_cast<const unsigned short*>(&result);
    const unsigned r1 = __shfl_sync(0xffffffffu, bits, 1), r2 = __shfl_sync(0xffffffffu, bits, 2),
                   r3 = __shfl_sync(0xffffffffu, bits, 3);
    if (lane == 0) {
      const uint4 line = make_uint4(bits | (r1 << 16), push_seq, r2 | (r3 << 16), push_seq);
      for (int r = 0; r < push.world; ++r)
        if (r != push.rank) st_volatile_v4(p2p_slot(push, push.base[r], push_seq & 1u, push.rank) + n0 / NPW, line);
    }
  }
}

// SUM: one problem over k1 + k2 (p1's n, bias, residual and y; p2's x, W and bias); else blocks [0, blocks1) take p1
// and the rest p2. SUM with push.world > 0: each group also pushes its 4 outputs, flagged, into its slot on every
// peer (allreduce.cuh's lines, 4 rows of 2 bytes a line, n % 4 == 0), for the next LayerNorm to reduce.
// SUM with NORM: then the next layer's dual LayerNorm of y in the grid's last block (layernorm.cuh's sum_norm_tail).
template <typename T, int KSPLIT, bool SUM, bool PDL, bool NORM = false>
__device__ __forceinline__ void gemv2_body(const GemvProblem<T>& p1, const GemvProblem<T>& p2, int blocks1,
                                           const P2PBuffers& push, const SumNorm<T>& ln = SumNorm<T>{}) {
  static_assert(SUM || !NORM, "the LayerNorm follows a sum");
  constexpr int VEC = 16 / sizeof(T), NPW = kGemv2RowsPerGroup, WARPS = kGemv2Warps, SPAN = 32 * VEC;
  static_assert(WARPS % KSPLIT == 0, "KSPLIT divides the warps");
  __shared__ float partial[WARPS][NPW];
  if (PDL) pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / KSPLIT, part = warp % KSPLIT;
  const bool second = !SUM && static_cast<int>(blockIdx.x) >= blocks1;
  // this block's problem, field by field (selects on the kernel parameters, no copy of either to local memory)
  const T* const px = second ? p2.x : p1.x;
  const T* const pw = second ? p2.w : p1.w;
  const int n = second ? p2.n : p1.n, k = second ? p2.k : p1.k;
  const int blk = second ? static_cast<int>(blockIdx.x) - blocks1 : static_cast<int>(blockIdx.x);
  const int n0 = (blk * (WARPS / KSPLIT) + group) * NPW;
  const bool active = n0 < n;  // an idle warp still waits and meets the barrier below
  // this warp's columns: [part * ka, (part + 1) * ka) of the first segment, then (sum) the same share of the second
  const int ka = k / KSPLIT, kb = SUM ? p2.k / KSPLIT : 0, total = ka + kb;
  const T* xa = px + static_cast<int64_t>(part) * ka;
  const T* xb = SUM ? p2.x + static_cast<int64_t>(part) * kb : nullptr;
  const T* wa[NPW];
  const T* wb[NPW];
#pragma unroll
  for (int o = 0; o < NPW; ++o) {
    const int64_t row = active && n0 + o < n ? n0 + o : 0;
    wa[o] = pw + row * k + static_cast<int64_t>(part) * ka;
    wb[o] = SUM ? p2.w + row * p2.k + static_cast<int64_t>(part) * kb : nullptr;
  }
  auto load_w = [&](Vec<T, VEC> (&buf)[NPW], int c) {
#pragma unroll
    for (int o = 0; o < NPW; ++o) buf[o] = load_vec_stream<T, VEC>(!SUM || c < ka ? wa[o] + c : wb[o] + (c - ka));
  };

  Vec<T, VEC> cur[NPW], nxt[NPW];
  const int c0 = lane * VEC;
  if (active && c0 < total) load_w(cur, c0);  // weights do not depend on the previous kernel: asked for first
  if (PDL) pdl_wait();
  // push: the sequence number of the LayerNorm that will reduce this output (the last reduction set it, and it has
  // completed: the kernels before this one waited in turn), read now so that the epilogue does not wait for it
  unsigned push_seq = 0;
  if (SUM && push.world > 0 && part == 0 && lane == 0)
    push_seq = *reinterpret_cast<volatile unsigned*>(&p2p_state(push.base[push.rank])->seq) + 1u;
  float acc[NPW];
#pragma unroll
  for (int o = 0; o < NPW; ++o) acc[o] = 0.f;
  auto fma_chunk = [&](const Vec<T, VEC> (&buf)[NPW], int c) {
    const Vec<T, VEC> xv = load_vec_ca<T, VEC>(!SUM || c < ka ? xa + c : xb + (c - ka));
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xf = to_float(xv.v[e]);
#pragma unroll
      for (int o = 0; o < NPW; ++o) acc[o] += xf * to_float(buf[o].v[e]);
    }
  };
  // two chunks an iteration, the buffers taking turns (no register moves between them)
#pragma unroll 1
  for (int c = c0; active && c < total; c += 2 * SPAN) {
    if (c + SPAN < total) load_w(nxt, c + SPAN);
    fma_chunk(cur, c);
    if (c + SPAN >= total) break;
    if (c + 2 * SPAN < total) load_w(cur, c + 2 * SPAN);
    fma_chunk(nxt, c + SPAN);
  }
#pragma unroll
  for (int o = 0; o < NPW; ++o) {
    const float v = warp_sum(acc[o]);
    if (lane == 0) partial[warp][o] = v;
  }
  __syncthreads();
  // the group's first warp: lane o writes row n0 + o (with NORM every thread then meets the ticket's barriers)
  if (part == 0 && active) gemv2_store<T, KSPLIT, SUM>(p1, p2, second, partial, n0, push, push_seq);
  if constexpr (NORM) sum_norm_tail<T, WARPS * 32>(p1.y, ln, 1, p1.n);
}

// MINB: blocks per SM the registers are fitted to (__launch_bounds__): 3 (up to 80 registers, 24 warps an SM), 4 (64,
// 32 warps) or 2 (128, 16 warps). One H100, 20B rank 0 of TP=2: 3 blocks 7.44 ms (ad8624d); 4 blocks 8.50 (f1b37c9's
// form of the loop, the pair spilling) and 2 blocks 8.26 (a5eed32, before the loop lost its spills) in earlier runs.
template <typename T, int KSPLIT, int MINB, bool PDL>
__global__ void __launch_bounds__(kGemv2Warps * 32, MINB)
gemv_pair_kernel(const __grid_constant__ GemvProblem<T> p1, const __grid_constant__ GemvProblem<T> p2, int blocks1) {
  gemv2_body<T, KSPLIT, false, PDL>(p1, p2, blocks1, P2PBuffers{});
}

template <typename T, int KSPLIT, int MINB, bool PDL, bool NORM = false>
__global__ void __launch_bounds__(kGemv2Warps * 32, MINB)
gemv_sum_kernel(const __grid_constant__ GemvProblem<T> p1, const __grid_constant__ GemvProblem<T> p2, int blocks1,
                const __grid_constant__ P2PBuffers push, const __grid_constant__ SumNorm<T> ln) {
  gemv2_body<T, KSPLIT, true, PDL, NORM>(p1, p2, blocks1, push, ln);
}

// Warps splitting each row's k (2, 4 or 8: blocks of 16, 8 or 4 rows). Auto (0): as gemv_auto_wide for one GEMV,
// 16 rows a block where the narrowest output has >= 6144 rows (long-lived blocks won in the decode graph), else 8;
// halved (down to 2) until it divides every k into whole vectors.
inline int gemv2_ksplit(int requested, int n_min, int k1, int k2) {
  int ks = requested > 0 ? requested : (n_min >= 6144 ? 2 : 4);
  while (ks > 2 && (k1 % (8 * ks) != 0 || k2 % (8 * ks) != 0)) ks /= 2;
  return ks;
}

template <typename T, int KSPLIT, int MINB>
cudaError_t launch_gemv2_ks(const GemvProblem<T>& p1, const GemvProblem<T>& p2, bool sum, const P2PBuffers& push,
                            bool pdl, cudaStream_t stream, const SumNorm<T>& ln) {
  constexpr int rows = kGemv2Warps / KSPLIT * kGemv2RowsPerGroup;
  const int blocks1 = (p1.n + rows - 1) / rows;
  const dim3 block(kGemv2Warps * 32);
  if (sum && ln.ticket != nullptr)
    return launch_kernel(pdl, gemv_sum_kernel<T, KSPLIT, MINB, false, true>,
                         gemv_sum_kernel<T, KSPLIT, MINB, true, true>, dim3(blocks1), block, stream, p1, p2, blocks1,
                         push, ln);
  if (sum)
    return launch_kernel(pdl, gemv_sum_kernel<T, KSPLIT, MINB, false>, gemv_sum_kernel<T, KSPLIT, MINB, true>,
                         dim3(blocks1), block, stream, p1, p2, blocks1, push, ln);
  const dim3 grid(blocks1 + (p2.n + rows - 1) / rows);
  return launch_kernel(pdl, gemv_pair_kernel<T, KSPLIT, MINB, false>, gemv_pair_kernel<T, KSPLIT, MINB, true>, grid,
                       block, stream, p1, p2, blocks1);
}

// sum: p2.n == p1.n; p2's x, W and bias join p1's (p2's residual and y unused). k1, k2 % 16 == 0, 16-byte aligned x
// and W. ksplit: 0 auto, else 2, 4 or 8 (reduced where a k does not divide); min_blocks: 0 auto (fp16 3, bf16 2), 2,
// 3 or 4. push (sum only; world 0: none): the output also goes, flagged, to every peer's slot (n % 4 == 0, n <= the
// lines of a slot). ln (sum only, without a push; its ticket null: none): LN_a(y) and LN_b(y) too (sum_norm_tail).
template <typename T>
cudaError_t launch_gemv2(const GemvProblem<T>& p1, const GemvProblem<T>& p2, bool sum, int ksplit, int min_blocks,
                         bool pdl, cudaStream_t stream, const P2PBuffers& push = P2PBuffers{},
                         const SumNorm<T>& ln = SumNorm<T>{}) {
  if (p1.k % 16 != 0 || p2.k % 16 != 0 || (sum && p1.n != p2.n)) return cudaErrorInvalidValue;
  if (push.world > 0 && (!sum || p1.n % kGemv2RowsPerGroup != 0 || 4LL * p1.n > push.slot_bytes))
    return cudaErrorInvalidValue;
  if (ln.ticket != nullptr && (!sum || push.world > 0 || !sum_norm_ok(p1.n, 1) || ln.w_a == nullptr ||
                               ln.b_a == nullptr || ln.w_b == nullptr || ln.b_b == nullptr || ln.out_a == nullptr ||
                               ln.out_b == nullptr))
    return cudaErrorInvalidValue;
  if (p1.n == 0 && (sum || p2.n == 0)) return cudaSuccess;
  const int n_min = sum ? p1.n : std::min(p1.n > 0 ? p1.n : p2.n, p2.n > 0 ? p2.n : p1.n);
  const int ks = gemv2_ksplit(ksplit, n_min, p1.k, p2.k);
#define NEOX_RT_GEMV2(MINB_)                                                   \
  switch (ks) {                                                                \
    case 8: return launch_gemv2_ks<T, 8, MINB_>(p1, p2, sum, push, pdl, stream, ln);  \
    case 4: return launch_gemv2_ks<T, 4, MINB_>(p1, p2, sum, push, pdl, stream, ln);  \
    default: return launch_gemv2_ks<T, 2, MINB_>(p1, p2, sum, push, pdl, stream, ln); \
  }
  // auto: 3 blocks an SM in fp16 (68 / 60 registers, no spills); 2 in bf16, whose conversions spill at 80 registers
  if (min_blocks == 0) min_blocks = std::is_same<T, __nv_bfloat16>::value ? 2 : 3;
  if (min_blocks == 2) NEOX_RT_GEMV2(2);
  if (min_blocks == 4) NEOX_RT_GEMV2(4);
  NEOX_RT_GEMV2(3);
#undef NEOX_RT_GEMV2
}

}  // namespace neox_rt
