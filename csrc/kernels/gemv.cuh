// Small-batch linear layer (GEMV-like): y[m, n] = act(x[m, :] . W[n, :] + bias[n]) + residual[m, n], m <= 16.
//
// Decode is memory-bound on W: every byte of W is read once, with 16-byte streaming loads (evict-first: the
// weights must not push the activations and the KV cache out of L2), and applied to all m rows of x (x is small
// and stays in L1/L2), accumulating in fp32; bias, activation and residual add are fused into the epilogue.
//
// Configurations (GemvVariant), measured side by side by bench/kernels.py --sweep:
//  - wide (m <= 2, k % 64 == 0): blocks of 8 warps; each warp owns a slice of k of 4 rows and keeps one 16-byte load
//    per row and lane in flight, double-buffered (4 rows a block with k over 8 warps, or 8 rows with k over 4);
//    kGemvAuto takes it for every single-row call it fits (decode), 8 rows a block where n <= 4096.
//  - stream (m <= 2): a row of W is owned by one warp, or split along k over 2 or 4 warps of the block (KSPLIT);
//    each warp keeps 2 x UNROLL 16-byte loads per lane in flight (double-buffered chunks of 32 * 8 * UNROLL
//    elements); kGemvAuto takes it (k split over 4 warps) at 2 rows for long rows and narrow layers.
//  - legacy: the first version (two rows per warp, one load per lane in flight); used for m > 2.
// Programmatic dependent launch (sm_90, opt-in by the launcher's `pdl`): the kernel asks for its dependents to be
// launched as soon as all its blocks run, and issues its first weight loads BEFORE waiting for the previous
// kernel (griddepcontrol.wait), so the weight stream of this layer overlaps the tail of the one before.
// Requires k % 8 == 0 and 16-byte aligned x and W (fp16 / bf16).
#pragma once

#include "common.cuh"

namespace neox_rt {

enum Activation : int { kActNone = 0, kActGeluErf = 1, kActGeluTanh = 2, kActRelu = 3 };
// kGemvAuto: per shape, the legacy configuration or the stream kernel with k split over warps
// (gemv_auto_ksplit); kGemvSplitN: the stream kernel with k split over N warps;
// kGemvLegacy: the first version; the wide configurations: 8-warp blocks, each warp owning a slice of k of 4 rows
// with its loads of every row in flight together (short blocks with much in flight, like a pure streaming read):
// kGemvWide4 4 rows a block (k over 8 warps), kGemvWide8 8 rows (two groups of 4 warps, k over 4). (2 chunks of 4
// rows in flight per lane spills at 128 registers.) More than 2 rows of x always take the legacy configuration (two
// rows of W per warp share each x load; measured faster there).
enum GemvVariant : int {
  kGemvAuto = 0, kGemvLegacy = 1, kGemvSplit1 = 2, kGemvSplit2 = 3, kGemvSplit4 = 4, kGemvWide8 = 5, kGemvWide4 = 6,
  kGemvVariantLast = kGemvWide4
};

__device__ __forceinline__ float apply_activation(float v, int act) {
  switch (act) {
    case kActGeluErf: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kActGeluTanh: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case kActRelu: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

constexpr int kGemvWarps = 4;  // warps per block (but the wide configurations: 8)

template <typename T, int MT, int NPW, int UNROLL, int KSPLIT, bool PDL, int WARPS = kGemvWarps>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 8 ? 3 : 1)  // wide: <= 85 registers, 3 blocks of 8 warps
gemv_kernel(const T* __restrict__ x,         // [m, k]
            const T* __restrict__ w,         // [n, k]
            const T* __restrict__ bias,      // [n] or null
            const T* __restrict__ residual,  // [m, n] or null
            T* __restrict__ y,               // [m, n]
            int m, int n, int k, int act) {
  // KSPLIT consecutive warps share NPW rows, each taking one KSPLIT-th of k (k % (8 * KSPLIT) == 0); their
  // partial sums meet in shared memory. Long rows (4h->h) then run as many short, evenly scheduled blocks.
  static_assert(WARPS % KSPLIT == 0, "KSPLIT divides the warps of a block");
  constexpr int VEC = 16 / sizeof(T);
  constexpr int SPAN = 32 * VEC;          // elements of a row one warp covers per load
  constexpr int STEP = SPAN * UNROLL;     // elements per chunk
  __shared__ float partial[KSPLIT > 1 ? WARPS : 1][NPW][MT];
  if (PDL) pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / KSPLIT, part = warp % KSPLIT;
  const int n0 = (blockIdx.x * (WARPS / KSPLIT) + group) * NPW;
  const bool active = n0 < n;  // an idle warp still waits below, so no block can finish before its inputs exist
  const int kpart = k / KSPLIT;
  const int kbeg = part * kpart, kend = kbeg + kpart;

  const T* wrow[NPW];
#pragma unroll
  for (int o = 0; o < NPW; ++o) wrow[o] = w + static_cast<int64_t>(active && n0 + o < n ? n0 + o : 0) * k;

  Vec<T, VEC> cur[UNROLL][NPW], nxt[UNROLL][NPW];
  auto load_chunk = [&](Vec<T, VEC> (&buf)[UNROLL][NPW], int c) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int o = 0; o < NPW; ++o) {
        const int col = c + u * SPAN;
        if (col < kend) buf[u][o] = load_vec_stream<T, VEC>(wrow[o] + col);
      }
  };

  const int c0 = kbeg + lane * VEC;
  if (active) load_chunk(cur, c0);  // weights do not depend on the previous kernel: load before waiting
  if (PDL) pdl_wait();
  if (KSPLIT == 1 && !active) return;  // with KSPLIT > 1 every warp reaches the __syncthreads below

  float acc[NPW][MT];
#pragma unroll
  for (int o = 0; o < NPW; ++o)
#pragma unroll
    for (int r = 0; r < MT; ++r) acc[o][r] = 0.f;

  for (int c = c0; active && c < kend; c += STEP) {
    const bool more = c + STEP < kend;
    if (more) load_chunk(nxt, c + STEP);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int col = c + u * SPAN;
      if (col < kend) {
#pragma unroll
        for (int r = 0; r < MT; ++r) {
          if (r < m) {
            // x (and the residual below) never through the read-only path: with PDL the kernel that writes them
            // may still be running when this one starts (rotary and decode attention read stale q/qkv that way);
            // x as an ordinary L1-cached load (through the L2 only it cost 5% of a 20B decode step).
            const Vec<T, VEC> xv = load_vec_ca<T, VEC>(x + static_cast<int64_t>(r) * k + col);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float xf = to_float(xv.v[e]);
#pragma unroll
              for (int o = 0; o < NPW; ++o) acc[o][r] += xf * to_float(cur[u][o].v[e]);
            }
          }
        }
      }
    }
    if (more) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int o = 0; o < NPW; ++o) cur[u][o] = nxt[u][o];
    }
  }
  if (KSPLIT > 1) {
#pragma unroll
    for (int o = 0; o < NPW; ++o)
#pragma unroll
      for (int r = 0; r < MT; ++r) {
        const float v = warp_sum(acc[o][r]);
        if (lane == 0) partial[warp][o][r] = v;
      }
    __syncthreads();
    if (part != 0 || !active) return;
#pragma unroll
    for (int o = 0; o < NPW; ++o)
#pragma unroll
      for (int r = 0; r < MT; ++r) {
        float v = 0.f;
#pragma unroll
        for (int p = 0; p < KSPLIT; ++p) v += partial[warp + p][o][r];
        acc[o][r] = v;  // the warp total, read by lane 0 below
      }
  }
#pragma unroll
  for (int o = 0; o < NPW; ++o) {
#pragma unroll
    for (int r = 0; r < MT; ++r) {
      const float v = KSPLIT > 1 ? acc[o][r] : warp_sum(acc[o][r]);
      if (lane == 0 && r < m && n0 + o < n) {
        const int64_t idx = static_cast<int64_t>(r) * n + n0 + o;
        const float b = bias != nullptr ? to_float(bias[n0 + o]) : 0.f;
        float out = apply_activation(v + b, act);
        if (residual != nullptr) out += to_float(__ldcg(residual + idx));
        y[idx] = from_float<T>(out);
      }
    }
  }
}

inline int gemv_max_rows() { return 16; }

template <typename T, int MT, int NPW, int UNROLL, int KSPLIT, int WARPS = kGemvWarps>
cudaError_t launch_gemv_config(const T* x, const T* w, const T* bias, const T* residual, T* y, int m, int n, int k,
                               int act, bool pdl, cudaStream_t stream) {
  constexpr int per_block = (WARPS / KSPLIT) * NPW;
  const dim3 grid((n + per_block - 1) / per_block), block(WARPS * 32);
  return launch_kernel(pdl, gemv_kernel<T, MT, NPW, UNROLL, KSPLIT, false, WARPS>,
                       gemv_kernel<T, MT, NPW, UNROLL, KSPLIT, true, WARPS>, grid, block, stream, x, w, bias, residual,
                       y, m, n, k, act);
}

// kGemvAuto at m <= 2 where gemv_auto_wide (below) does not choose (2 rows, or k % 64 != 0), from an older
// bench/kernels.py --sweep on one H100 (L2 cold, m = 1) and the decode profiles:
// the legacy configuration (a warp per two rows) where it already has many warps with short rows, n >= 6144 and
// k <= 8192 (20B qkv 83.6 us vs 85.3 with k split over 2 warps / 88.9 unsplit; dense 34.6 vs 36.7 / 40.7;
// h->4h 108.7 vs 108.4 / 112.6); otherwise the stream kernel with k split over 4 warps (20B 4h->h, k = 24576:
// 113 us vs 121 legacy, 141 unsplit), which also gives the narrow layers of small models (pythia-1.4b dense and
// 4h->h, n = 2048: 1024 warps in the legacy configuration, 7.8 per SM) 8x more warps.
// Returns the KSPLIT, or 0 for the legacy configuration.
inline int gemv_auto_ksplit(int n, int k) {
  if (n >= 6144 && k <= 8192) return 0;
  if ((k / 8) % 4 == 0) return 4;
  return (k / 8) % 2 == 0 ? 2 : 1;
}

// kGemvAuto at m == 1 with k % 64 == 0 (every GPT-NeoX / Pythia layer): the wide configurations, faster than all of
// the above in the same sweep (one H100, L2 cold, us, d7f8ef5; bench/NOTES.md): 20B qkv 80.2 (auto before 90.0,
// cuBLAS 85.0), dense 32.1 (36.0, 31.7), h->4h 103.4 (111.4, 109.1), 4h->h 106.3 (113.4, 111.7); 8 rows a block
// where n <= 4096 (fewer, fuller blocks for narrow layers: pythia-1.4b dense 8.2 vs 9.3 with 4 rows and 10.2 before,
// 4h->h 17.3 vs 19.5 / 20.6), 4 rows above (1.4b qkv 14.8 vs 15.2, h->4h 17.5 vs 18.3). Returns the variant, or
// kGemvAuto where the older choice stands (more rows, other k).
inline int gemv_auto_wide(int m, int n, int k) {
  if (m != 1 || k % 64 != 0) return kGemvAuto;
  return n <= 4096 ? kGemvWide8 : kGemvWide4;
}

// m in 1..16 (rounded up to 1, 2, 4, 8 or 16 rows of registers), k % 8 == 0, 16-byte aligned x and w.
// residual (nullable) is [m, n] like y. `pdl` needs sm_90 (the caller checks the device).
template <typename T>
cudaError_t launch_gemv(const T* x, const T* w, const T* bias, const T* residual, T* y, int m, int n, int k,
                        int act, int variant, bool pdl, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > gemv_max_rows() || k % (16 / static_cast<int>(sizeof(T))) != 0) return cudaErrorInvalidValue;
  if (variant == kGemvAuto) variant = gemv_auto_wide(m, n, k);
  if (variant == kGemvAuto && m <= 2 && gemv_auto_ksplit(n, k) == 0) variant = kGemvLegacy;
  const bool wide = variant == kGemvWide8 || variant == kGemvWide4;
  if (wide && m <= 2 && k % 64 == 0) {  // k split over up to 8 warps in whole 16-byte vectors
#define NEOX_RT_GEMV_WIDE(MT_)                                                                                    \
  return variant == kGemvWide8                                                                                     \
             ? launch_gemv_config<T, MT_, 4, 1, 4, 8>(x, w, bias, residual, y, m, n, k, act, pdl, stream)           \
             : launch_gemv_config<T, MT_, 4, 1, 8, 8>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
    if (m <= 1) NEOX_RT_GEMV_WIDE(1);
    NEOX_RT_GEMV_WIDE(2);
#undef NEOX_RT_GEMV_WIDE
  }
  if (wide) variant = kGemvLegacy;  // more rows, or k not a multiple of 64
  if (variant == kGemvLegacy || m > 2) {
    if (m <= 1) return launch_gemv_config<T, 1, 2, 1, 1>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
    if (m <= 2) return launch_gemv_config<T, 2, 2, 1, 1>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
    if (m <= 4) return launch_gemv_config<T, 4, 2, 1, 1>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
    if (m <= 8) return launch_gemv_config<T, 8, 2, 1, 1>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
    return launch_gemv_config<T, 16, 2, 1, 1>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
  }
  int ksplit;
  switch (variant) {
    case kGemvAuto: ksplit = gemv_auto_ksplit(n, k); break;
    case kGemvSplit1: ksplit = 1; break;
    case kGemvSplit2: ksplit = 2; break;
    case kGemvSplit4: ksplit = 4; break;
    default: return cudaErrorInvalidValue;
  }
  if (k % (8 * ksplit) != 0) ksplit = 1;
#define NEOX_RT_GEMV_STREAM(MT_, KS_) \
  launch_gemv_config<T, MT_, 1, 4, KS_>(x, w, bias, residual, y, m, n, k, act, pdl, stream)
  if (m <= 1) {
    if (ksplit == 4) return NEOX_RT_GEMV_STREAM(1, 4);
    if (ksplit == 2) return NEOX_RT_GEMV_STREAM(1, 2);
    return NEOX_RT_GEMV_STREAM(1, 1);
  }
  if (ksplit == 4) return NEOX_RT_GEMV_STREAM(2, 4);
  if (ksplit == 2) return NEOX_RT_GEMV_STREAM(2, 2);
  return NEOX_RT_GEMV_STREAM(2, 1);
#undef NEOX_RT_GEMV_STREAM
}

}  // namespace neox_rt
