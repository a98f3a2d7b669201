// Two single-row GEMVs in one launch, for the parallel-residual GPT-NeoX layer at batch 1 (decode):
//  - pair (gemv_pair_kernel): y1 = act1(x1 W1^T + b1), y2 = act2(x2 W2^T + b2), two independent problems (the layer's
//    column-parallel linears: QKV from LN1(x), h->4h from LN2(x)); the first blocks take the first problem, the
//    rest the second.
//  - sum (gemv_sum_kernel): y = x1 W1^T + x2 W2^T + b1 + b2 + residual, one GEMV over the concatenated k (the layer's
//    row-parallel linears, attention's dense and 4h->h, whose outputs the layer adds anyway: x + attn + mlp). The
//    sum is accumulated in fp32 and rounded once.
// Why: at TP=2 a 20B layer spends ~18 us above its weight floor in four GEMVs, whose weight runs are half as long as
// at TP=1 while each launch's ramp-up and drain are not (bench/NOTES.md, session 7); two launches pay two ramps.
// The scheme is gemv_kernel's wide configuration (gemv.cuh): blocks of 8 warps, a group of KSPLIT warps owns 4 rows
// of W and splits its k (in sum: each warp takes its KSPLIT-th of k1, then of k2), each lane keeps one 16-byte
// streaming (evict-first) load per row in flight, double-buffered; x through L1 after griddepcontrol.wait.
// Before the wait (the previous kernel may still run: LayerNorm before the pair, rotary + attention before the sum,
// DRAM idle but for them) each warp asks for more than the register buffers hold: chunk 0 and chunk pre + 1 into
// registers and chunks 1..pre (`pre`, up to kGemv2MaxPre) into shared memory with cp.async, so a resident block has
// (pre + 2) x 2 KB a warp on the way while it waits. Blocks own 32 / KSPLIT rows. Needs k1, k2 % (8 * KSPLIT) == 0
// and 16-byte aligned x and W (fp16 / bf16).
#pragma once

#include <algorithm>
#include <atomic>

#include "common.cuh"
#include "gemv.cuh"

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
  const T* ln_w;      // [k]: with the pair's LayerNorm (gemv_pair_ln), x is normalized with these first
  const T* ln_b;      // [k]
};

constexpr int kGemv2Warps = 8, kGemv2RowsPerGroup = 4;
// Chunks per warp prefetched into shared memory before the grid dependency wait: 2 KB a warp each (4 rows x 32 lanes
// x 16 bytes), 16 KB a block; 3: 48 KB a block, 144 KB an SM at 3 blocks.
constexpr int kGemv2MaxPre = 3;
constexpr int kGemv2PreBytes = kGemv2Warps * kGemv2RowsPerGroup * 32 * 16;  // shared memory a block per chunk
constexpr int kGemv2MaxLnHidden = 16384;  // gemv_pair_ln: the normalized x in shared memory (32 KB in fp16)

// SUM: one problem over k1 + k2 (p1's n, bias, residual and y; p2's x, W and bias); else blocks [0, blocks1) take p1
// and the rest p2. pre: chunks per warp prefetched into shared memory (dynamic, pre * kGemv2PreBytes a block).
// LN (pair only): x is the layer input, and each block first computes its problem's LayerNorm of it (fp32, two-pass
// statistics as layernorm.cuh, rounded to T) into shared memory (after the prefetch slots), which the loop reads
// instead of x: the dual LayerNorm kernel and its launch disappear from the layer.
template <typename T, int KSPLIT, bool SUM, bool LN, bool PDL>
__device__ __forceinline__ void gemv2_body(const GemvProblem<T>& p1, const GemvProblem<T>& p2, int blocks1,
                                           int pre, float eps) {
  constexpr int VEC = 16 / sizeof(T), NPW = kGemv2RowsPerGroup, WARPS = kGemv2Warps, SPAN = 32 * VEC;
  static_assert(WARPS % KSPLIT == 0, "KSPLIT divides the warps");
  __shared__ float partial[WARPS][NPW];
  extern __shared__ uint4 gemv2_prefetched[];  // [WARPS][pre][NPW][32]
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
  // row o of the group: n0 + o, clamped to n - 1 past the end (valid memory; its output is never stored). A base
  // pointer per segment and a row stride, not a pointer per row: fewer registers live across the loop.
  const int last = active ? min(NPW - 1, n - 1 - n0) : 0;
  const T* const wa = pw + static_cast<int64_t>(active ? n0 : 0) * k + static_cast<int64_t>(part) * ka;
  const T* const wb = SUM ? p2.w + static_cast<int64_t>(active ? n0 : 0) * p2.k + static_cast<int64_t>(part) * kb
                          : nullptr;
  auto w_at = [&](int o, int c) {
    const int64_t r = min(o, last);
    return !SUM || c < ka ? wa + r * k + c : wb + r * p2.k + (c - ka);
  };
  auto load_w = [&](Vec<T, VEC> (&buf)[NPW], int c) {
#pragma unroll
    for (int o = 0; o < NPW; ++o) buf[o] = load_vec_stream<T, VEC>(w_at(o, c));
  };
  // chunk j of this warp: columns c0 + j * SPAN (c0 = lane * VEC) of its share; slot (j - 1, o) of its shared memory
  uint4* const slots = gemv2_prefetched + static_cast<int64_t>(warp) * pre * NPW * 32 + lane;
  const int c0 = lane * VEC;

  // weights do not depend on the previous kernel: chunks 0 .. pre + 1 are asked for before waiting
  Vec<T, VEC> cur[NPW], nxt[NPW];
  if (active && c0 < total) {
    load_w(cur, c0);
#pragma unroll 1
    for (int j = 1; j <= pre && c0 + j * SPAN < total; ++j)
#pragma unroll
      for (int o = 0; o < NPW; ++o) cp_async16_evict_first(slots + ((j - 1) * NPW + o) * 32, w_at(o, c0 + j * SPAN));
    if (c0 + (pre + 1) * SPAN < total) load_w(nxt, c0 + (pre + 1) * SPAN);
  }
  if (PDL) pdl_wait();
  T* const xn = reinterpret_cast<T*>(gemv2_prefetched + static_cast<int64_t>(WARPS) * pre * NPW * 32);  // LN: [k]
  if (LN) {
    __shared__ float scratch[32];
    const int nv = k / VEC;
    float sum = 0.f;
    for (int v = threadIdx.x; v < nv; v += blockDim.x) {
      const Vec<T, VEC> xv = load_vec_ca<T, VEC>(px + v * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += to_float(xv.v[e]);
    }
    const float mean = block_sum(sum, scratch) / k;
    float sq = 0.f;
    for (int v = threadIdx.x; v < nv; v += blockDim.x) {  // x again, from L1
      const Vec<T, VEC> xv = load_vec_ca<T, VEC>(px + v * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = to_float(xv.v[e]) - mean;
        sq += d * d;
      }
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / k + eps);
    const T* const lw = second ? p2.ln_w : p1.ln_w;
    const T* const lb = second ? p2.ln_b : p1.ln_b;
    for (int v = threadIdx.x; v < nv; v += blockDim.x) {
      const Vec<T, VEC> xv = load_vec_ca<T, VEC>(px + v * VEC);
      const Vec<T, VEC> wv = load_vec<T, VEC>(lw + v * VEC), bv = load_vec<T, VEC>(lb + v * VEC);
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        out.v[e] = from_float<T>((to_float(xv.v[e]) - mean) * rstd * to_float(wv.v[e]) + to_float(bv.v[e]));
      *reinterpret_cast<Vec<T, VEC>*>(xn + v * VEC) = out;
    }
    __syncthreads();
  }
  cp_async_wait_all();  // this thread's own copies (each lane reads back only what it asked for)
  float acc[NPW];
#pragma unroll
  for (int o = 0; o < NPW; ++o) acc[o] = 0.f;
  auto x_at = [&](int c) {
    if (LN) return *reinterpret_cast<const Vec<T, VEC>*>(xn + static_cast<int64_t>(part) * ka + c);
    return load_vec_ca<T, VEC>(!SUM || c < ka ? xa + c : xb + (c - ka));
  };
  auto fma_chunk = [&](const Vec<T, VEC> (&buf)[NPW], int c) {
    const Vec<T, VEC> xv = x_at(c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xf = to_float(xv.v[e]);
#pragma unroll
      for (int o = 0; o < NPW; ++o) acc[o] += xf * to_float(buf[o].v[e]);
    }
  };
  if (active && c0 < total) {
    fma_chunk(cur, c0);
    if (c0 + (pre + 2) * SPAN < total) load_w(cur, c0 + (pre + 2) * SPAN);
#pragma unroll 1
    for (int j = 1; j <= pre && c0 + j * SPAN < total; ++j) {  // the prefetched chunks, a row at a time
      float xf[VEC];
      const Vec<T, VEC> xv = x_at(c0 + j * SPAN);
#pragma unroll
      for (int e = 0; e < VEC; ++e) xf[e] = to_float(xv.v[e]);
#pragma unroll
      for (int o = 0; o < NPW; ++o) {
        const uint4 raw = slots[((j - 1) * NPW + o) * 32];
        const Vec<T, VEC>& wv = *reinterpret_cast<const Vec<T, VEC>*>(&raw);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[o] += xf[e] * to_float(wv.v[e]);
      }
    }
    // steady state: nxt holds chunk c, cur is on the way with chunk c + SPAN; the buffers take turns (no register
    // moves between them)
#pragma unroll 1
    for (int c = c0 + (pre + 1) * SPAN; c < total; c += 2 * SPAN) {
      fma_chunk(nxt, c);
      if (c + 2 * SPAN < total) load_w(nxt, c + 2 * SPAN);
      if (c + SPAN >= total) break;
      fma_chunk(cur, c + SPAN);
      if (c + 3 * SPAN < total) load_w(cur, c + 3 * SPAN);
    }
  }
#pragma unroll
  for (int o = 0; o < NPW; ++o) {
    const float v = warp_sum(acc[o]);
    if (lane == 0) partial[warp][o] = v;
  }
  __syncthreads();
  // the group's first warp: lane o writes row n0 + o
  if (part == 0 && active && lane < NPW && n0 + lane < n) {
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
    (second ? p2.y : p1.y)[f] = from_float<T>(out);
  }
}

// MINB: blocks per SM the registers are fitted to (__launch_bounds__): 3 (up to 80 registers, 24 warps an SM), 4 (64,
// 32 warps) or 2 (128, 16 warps).
template <typename T, int KSPLIT, int MINB, bool LN, bool PDL>
__global__ void __launch_bounds__(kGemv2Warps * 32, MINB)
gemv_pair_kernel(const __grid_constant__ GemvProblem<T> p1, const __grid_constant__ GemvProblem<T> p2, int blocks1,
                 int pre, float eps) {
  gemv2_body<T, KSPLIT, false, LN, PDL>(p1, p2, blocks1, pre, eps);
}

template <typename T, int KSPLIT, int MINB, bool PDL>
__global__ void __launch_bounds__(kGemv2Warps * 32, MINB)
gemv_sum_kernel(const __grid_constant__ GemvProblem<T> p1, const __grid_constant__ GemvProblem<T> p2, int blocks1,
                int pre) {
  gemv2_body<T, KSPLIT, true, false, PDL>(p1, p2, blocks1, pre, 0.f);
}

// Warps splitting each row's k (2, 4 or 8: blocks of 16, 8 or 4 rows). Auto (0): as gemv_auto_wide for one GEMV,
// 16 rows a block where the narrowest output has >= 6144 rows (long-lived blocks won in the decode graph), else 8;
// halved (down to 2) until it divides every k into whole vectors.
inline int gemv2_ksplit(int requested, int n_min, int k1, int k2) {
  int ks = requested > 0 ? requested : (n_min >= 6144 ? 2 : 4);
  while (ks > 2 && (k1 % (8 * ks) != 0 || k2 % (8 * ks) != 0)) ks /= 2;
  return ks;
}

// Chunks per warp to prefetch into shared memory: `requested` (0..kGemv2MaxPre), or -1 auto: as many as fit MINB
// blocks an SM with 8 KB to spare, at most kGemv2MaxPre; none below sm_80 (no cp.async). Asked once per device.
inline int gemv2_prefetch_chunks(int requested, int min_blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> smem_known[kMaxDevices];  // 0 not asked yet, else shared memory per SM + 1 (0 below sm_80)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  int per_sm = dev >= 0 && dev < kMaxDevices ? smem_known[dev].load(std::memory_order_relaxed) - 1 : -1;
  if (per_sm < 0) {
    int major = 0, bytes = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
      return 0;
    per_sm = major >= 8 ? bytes : 0;
    if (dev >= 0 && dev < kMaxDevices) smem_known[dev].store(per_sm + 1, std::memory_order_relaxed);
  }
  const int fit = std::max(0, (per_sm / min_blocks - 8192) / kGemv2PreBytes);
  return std::min(requested >= 0 ? requested : kGemv2MaxPre, std::min(fit, kGemv2MaxPre));
}

template <typename T, int KSPLIT, int MINB>
cudaError_t launch_gemv2_ks(const GemvProblem<T>& p1, const GemvProblem<T>& p2, bool sum, bool ln, float eps,
                            int prefetch, bool pdl, cudaStream_t stream) {
  constexpr int rows = kGemv2Warps / KSPLIT * kGemv2RowsPerGroup;
  const int blocks1 = (p1.n + rows - 1) / rows;
  const dim3 block(kGemv2Warps * 32);
  const int pre = gemv2_prefetch_chunks(prefetch, MINB);
  // the prefetch slots, then (LN) the normalized x: k elements rounded up to 16 bytes
  const size_t smem = static_cast<size_t>(pre) * kGemv2PreBytes +
                      (ln ? (static_cast<size_t>(p1.k) * sizeof(T) + 15) / 16 * 16 : 0);
  // above 48 KB of dynamic shared memory a kernel must be opted in (a host-side attribute, cheap; set every launch)
  auto opt_in = [&](auto* plain, auto* programmatic) {
    cudaError_t err = cudaSuccess;
    if (smem > 48 * 1024 - 1024) {
      err = cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err == cudaSuccess)
        err = cudaFuncSetAttribute(programmatic, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    }
    return err;
  };
  if (sum) {
    auto plain = gemv_sum_kernel<T, KSPLIT, MINB, false>;
    auto programmatic = gemv_sum_kernel<T, KSPLIT, MINB, true>;
    if (const cudaError_t err = opt_in(plain, programmatic); err != cudaSuccess) return err;
    return launch_kernel_smem(pdl, plain, programmatic, dim3(blocks1), block, smem, stream, p1, p2, blocks1, pre);
  }
  const dim3 grid(blocks1 + (p2.n + rows - 1) / rows);
  auto launch = [&](auto* plain, auto* programmatic) {
    if (const cudaError_t err = opt_in(plain, programmatic); err != cudaSuccess) return err;
    return launch_kernel_smem(pdl, plain, programmatic, grid, block, smem, stream, p1, p2, blocks1, pre, eps);
  };
  if (ln) return launch(gemv_pair_kernel<T, KSPLIT, MINB, true, false>, gemv_pair_kernel<T, KSPLIT, MINB, true, true>);
  return launch(gemv_pair_kernel<T, KSPLIT, MINB, false, false>, gemv_pair_kernel<T, KSPLIT, MINB, false, true>);
}

// sum: p2.n == p1.n; p2's x, W and bias join p1's (p2's residual and y unused). ln (pair only): p1.x == p2.x is the
// layer input, normalized per block with each problem's ln_w / ln_b and eps first (p1.k == p2.k). k1, k2 % 16 == 0,
// 16-byte aligned x and W. ksplit: 0 auto, else 2, 4 or 8 (reduced where a k does not divide); min_blocks: 0 auto
// (fp16 3, bf16 2), 2, 3 or 4; prefetch: chunks per warp into shared memory before the wait, -1 as many as fit
// (gemv2_prefetch_chunks), else 0..3.
template <typename T>
cudaError_t launch_gemv2(const GemvProblem<T>& p1, const GemvProblem<T>& p2, bool sum, bool ln, float eps,
                         int ksplit, int min_blocks, int prefetch, bool pdl, cudaStream_t stream) {
  if (p1.k % 16 != 0 || p2.k % 16 != 0 || (sum && p1.n != p2.n)) return cudaErrorInvalidValue;
  if (ln && (sum || p1.k != p2.k || p1.x != p2.x || p1.ln_w == nullptr || p1.ln_b == nullptr ||
             p2.ln_w == nullptr || p2.ln_b == nullptr))
    return cudaErrorInvalidValue;
  if (p1.n == 0 && (sum || p2.n == 0)) return cudaSuccess;
  const int n_min = sum ? p1.n : std::min(p1.n > 0 ? p1.n : p2.n, p2.n > 0 ? p2.n : p1.n);
  const int ks = gemv2_ksplit(ksplit, n_min, p1.k, p2.k);
#define NEOX_RT_GEMV2(MINB_)                                                                       \
  switch (ks) {                                                                                    \
    case 8: return launch_gemv2_ks<T, 8, MINB_>(p1, p2, sum, ln, eps, prefetch, pdl, stream);     \
    case 4: return launch_gemv2_ks<T, 4, MINB_>(p1, p2, sum, ln, eps, prefetch, pdl, stream);     \
    default: return launch_gemv2_ks<T, 2, MINB_>(p1, p2, sum, ln, eps, prefetch, pdl, stream);    \
  }
  // auto: 3 blocks an SM in fp16 (76-78 registers, no spills); 2 in bf16, whose conversions spill at 80 registers
  if (min_blocks == 0) min_blocks = std::is_same<T, __nv_bfloat16>::value ? 2 : 3;
  if (min_blocks == 2) NEOX_RT_GEMV2(2);
  if (min_blocks == 4) NEOX_RT_GEMV2(4);
  NEOX_RT_GEMV2(3);
#undef NEOX_RT_GEMV2
}

}  // namespace neox_rt
