// Small-batch linear layer (GEMV-like): y[m, n] = act(x[m, :] . W[n, :] + bias[n]) + residual[m, n], m <= 16.
//
// Decode is memory-bound on W: every byte of W is read once, with 16-byte streaming loads (evict-first: the
// weights must not push the activations and the KV cache out of L2), and applied to all m rows of x (x is small
// and stays in L1/L2), accumulating in fp32; bias, activation and residual add are fused into the epilogue.
//
// Configurations (GemvVariant), measured side by side by bench/kernels.py --sweep:
//  - wide (m <= 2, k % 64 == 0): blocks of 8 warps; each warp owns a slice of k of 4 rows and keeps one 16-byte load
//    per row and lane in flight, double-buffered (4 rows a block with k over 8 warps, 8 rows with k over 4, or 16
//    rows with k over 2);
//    kGemvAuto takes it for every single-row call it fits (decode): 16 rows a block (k over 2 warps) for wide layers,
//    8 rows where n <= 4096 (gemv_auto_wide).
//  - stream (m <= 2): a row of W is owned by one warp, or split along k over 2 or 4 warps of the block (KSPLIT);
//    each warp keeps 2 x UNROLL 16-byte loads per lane in flight (double-buffered chunks of 32 * 8 * UNROLL
//    elements); kGemvAuto takes it (k split over 4 warps) at 2 rows where k % 64 != 0, for long rows and narrow
//    layers.
//  - tensor cores (2-16 rows, k % 64 == 0; gemv_mma_kernel): blocks of 16 rows of W with k over 8 or 16 warps, the
//    row products on mma.sync (m16n8k16; two m16n8k8 on sm_75), 2-3 steps of W in flight per warp; kGemvAuto takes
//    it for every call of 2-16 rows it fits (gemv_auto_mma).
//  - legacy: the first version (two rows per warp, one load per lane in flight); used for m > 2 where k % 64 != 0.
// Programmatic dependent launch (sm_90, opt-in by the launcher's `pdl`): the kernel asks for its dependents to be
// launched as soon as all its blocks run, and issues its first weight loads BEFORE waiting for the previous
// kernel (griddepcontrol.wait), so the weight stream of this layer overlaps the tail of the one before.
// Requires k % 8 == 0 and 16-byte aligned x and W (fp16 / bf16).
#pragma once

#include <atomic>

#include "common.cuh"

namespace neox_rt {

enum Activation : int { kActNone = 0, kActGeluErf = 1, kActGeluTanh = 2, kActRelu = 3 };
// kGemvAuto: per shape, the legacy configuration or the stream kernel with k split over warps
// (gemv_auto_ksplit); kGemvSplitN: the stream kernel with k split over N warps;
// kGemvLegacy: the first version; the wide configurations: 8-warp blocks, each warp owning a slice of k of 4 rows
// with its loads of every row in flight together (short blocks with much in flight, like a pure streaming read):
// kGemvWide4 4 rows a block (k over 8 warps), kGemvWide8 8 rows (two groups of 4 warps, k over 4). (2 chunks of 4
// rows in flight per lane spills at 128 registers.) More than 2 rows of x take the tensor-core tiles, or the legacy
// configuration where k % 64 != 0 (two rows of W per warp share each x load).
// kGemvWide16: 16 rows a block (four groups of 2 warps, k over 2): kGemvAuto's single-row choice for wide layers
// (gemv_auto_wide).
// kGemvMma8 / kGemvMma16: tensor-core tiles for 2-16 rows of x (gemv_mma_kernel below), a block owning 16 rows of
// W with k split over its 8 or 16 warps, 2 steps of W in flight per warp; kGemvMma8Deep / kGemvMma16Deep: 3 steps.
enum GemvVariant : int {
  kGemvAuto = 0, kGemvLegacy = 1, kGemvSplit1 = 2, kGemvSplit2 = 3, kGemvSplit4 = 4, kGemvWide8 = 5, kGemvWide4 = 6,
  kGemvMma8 = 7, kGemvMma16 = 8, kGemvMma8Deep = 9, kGemvMma16Deep = 10, kGemvWide16 = 11,
  kGemvVariantLast = kGemvWide16
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

// D += A B for one m16n8k16 tile (A 16x16 row-major, B 16x8 column-major, fp32 D), the operands given as the 32-bit
// registers of the PTX fragment layout (lane = 4 * group + t: A {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g,
// k 2t+8..}, {row g+8, k 2t+8..}; B {k 2t.., column g}, {k 2t+8.., column g}; D {row g, columns 2t, 2t+1}, {row
// g+8, columns 2t, 2t+1}). sm_80+: one instruction; sm_75 (fp16 only; the T4 has no bf16): two m16n8k8.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, __half>::value) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a2), "r"(a3), "r"(b1));
#endif
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // launch_gemv never takes this kernel for bf16 below sm_80
#endif
  }
#endif
}

// Tensor-core GEMV for 2-16 rows of x (variants kGemvMma*). A block owns 16 rows of W (output features f0..f0+15)
// and splits k over its WARPS warps; in each step a warp multiplies a 16 x 32U slice of W with the matching 32U
// columns of up to 8 (NT = 1) or 16 (NT = 2) rows of x: W is A of m16n8k16 (16 features), x^T is B (8 rows of x
// per tile). The order of k inside a tile is free as long as A and B agree, so each lane loads whole 16-byte
// vectors: lane (g, t) reads W rows f0+g and f0+g+8 and x row g (and g+8) at the same 8 columns
// 32u + 8t .. 32u + 8t + 7, and feeds columns 0-3 of its vectors to one mma and 4-7 to a second. W streams once
// (evict-first), S steps in flight per warp, the first S asked for before griddepcontrol.wait; x is loaded through
// L1 (never the read-only path, see gemv_kernel) while the next steps' weights are in flight. The warps' partial
// tiles meet in shared memory; bias, activation and residual are applied once per output. Needs k % (8 * WARPS) == 0.
template <typename T, int NT, int U, int S, int WARPS, bool EVEN, bool PDL>
__global__ void __launch_bounds__(WARPS * 32, WARPS >= 24 ? 1 : 24 / WARPS)  // 24 warps per SM: <= 85 registers
gemv_mma_kernel(const T* __restrict__ x,         // [m, k]
                const T* __restrict__ w,         // [n, k]
                const T* __restrict__ bias,      // [n] or null
                const T* __restrict__ residual,  // [m, n] or null
                T* __restrict__ y,               // [m, n]
                int m, int n, int k, int act) {
  // EVEN: k / WARPS is a multiple of STEP (every 20B and Pythia layer at 8 warps but 160m's), no bounds per load
  static_assert(sizeof(T) == 2, "fp16 / bf16");
  constexpr int STEP = 32 * U;  // columns of k per warp and step
  __shared__ float partial[WARPS][NT * 4][32];
  if (PDL) pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int f0 = blockIdx.x * 16;
  const int kpart = k / WARPS;
  const int64_t kbeg = static_cast<int64_t>(warp) * kpart + t * 8;
  // Rows of W past n read row n - 1, columns of x past m read row m - 1: valid memory whose products land only in
  // outputs that are never stored (each output column of the mma depends on its own column of B alone).
  const T* pa = w + static_cast<int64_t>(min(f0 + g, n - 1)) * k + kbeg;
  const T* pb = w + static_cast<int64_t>(min(f0 + g + 8, n - 1)) * k + kbeg;
  const T* px[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) px[j] = x + static_cast<int64_t>(min(g + 8 * j, m - 1)) * k + kbeg;

  uint4 wa[S][U], wb[S][U], cx[U][NT];  // S steps of W in flight (a ring of register slots), x for one step
  // c: this warp's column offset of the step (relative to its slice); the lane's columns start 8t further
  auto in_range = [&](int c, int u) { return EVEN || c + u * 32 + t * 8 < kpart; };
  auto load_w = [&](uint4 (&ba)[U], uint4 (&bb)[U], int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (in_range(c, u)) {
        ba[u] = __ldcs(reinterpret_cast<const uint4*>(pa + c + u * 32));
        bb[u] = __ldcs(reinterpret_cast<const uint4*>(pb + c + u * 32));
      } else {
        ba[u] = bb[u] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto load_x = [&](uint4 (&bx)[U][NT], int c) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (in_range(c, u)) {
          const Vec<T, 8> v = load_vec_ca<T, 8>(px[j] + c + u * 32);
          bx[u][j] = *reinterpret_cast<const uint4*>(&v);
        } else {
          bx[u][j] = make_uint4(0, 0, 0, 0);
        }
      }
  };

  // weights do not depend on the previous kernel: the first S steps are asked for before waiting
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (s * STEP < kpart) load_w(wa[s], wb[s], s * STEP);
  if (PDL) pdl_wait();
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  // Unrolled by S so that every slot is a fixed set of registers: step c + s STEP is in slot s; once used, the
  // slot is refilled S steps ahead (moving a slot whose load is pending would wait for it).
#pragma unroll 1
  for (int c = 0; c < kpart; c += S * STEP) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int cs = c + s * STEP;
      if (cs < kpart) {
        load_x(cx, cs);  // x (L1 / L2) arrives while the weights of the next steps (DRAM) are in flight
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            mma_16x8x16<T>(acc[j], wa[s][u].x, wb[s][u].x, wa[s][u].y, wb[s][u].y, cx[u][j].x, cx[u][j].y);  // 0-3
            mma_16x8x16<T>(acc[j], wa[s][u].z, wb[s][u].z, wa[s][u].w, wb[s][u].w, cx[u][j].z, cx[u][j].w);  // 4-7
          }
        if (cs + S * STEP < kpart) load_w(wa[s], wb[s], cs + S * STEP);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][j * 4 + i][lane] = acc[j][i];
  __syncthreads();
  // output (feature f0 + r, row q of x) sits in lane 4 (r % 8) + (q % 8) / 2, register 2 (r / 8) + q % 2, tile q / 8
  for (int o = threadIdx.x; o < 16 * 8 * NT; o += WARPS * 32) {
    const int r = o & 15, q = o >> 4;
    if (q >= m || f0 + r >= n) continue;
    const int src_lane = 4 * (r & 7) + ((q & 7) >> 1), src_reg = (q >> 3) * 4 + 2 * (r >> 3) + (q & 1);
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < WARPS; ++p) v += partial[p][src_reg][src_lane];
    const int64_t idx = static_cast<int64_t>(q) * n + f0 + r;
    float out = apply_activation(v + (bias != nullptr ? to_float(bias[f0 + r]) : 0.f), act);
    if (residual != nullptr) out += to_float(__ldcg(residual + idx));
    y[idx] = from_float<T>(out);
  }
}

// The mma configurations need sm_80 for bf16 (fp16 runs on sm_75 as two k8 instructions): asked of the code this
// build runs as (kernel_arch), not of the device, which may run a 7.5 build's PTX.
template <typename T>
inline bool gemv_mma_supported() {
  return !std::is_same<T, __nv_bfloat16>::value || kernel_arch() >= 80;
}

template <typename T, int NT, int S, int WARPS>
cudaError_t launch_gemv_mma(const T* x, const T* w, const T* bias, const T* residual, T* y, int m, int n, int k,
                            int act, bool pdl, cudaStream_t stream) {
  constexpr int U = 2;
  const dim3 grid((n + 15) / 16), block(WARPS * 32);
  if ((k / WARPS) % (32 * U) == 0)
    return launch_kernel(pdl, gemv_mma_kernel<T, NT, U, S, WARPS, true, false>,
                         gemv_mma_kernel<T, NT, U, S, WARPS, true, true>, grid, block, stream, x, w, bias, residual, y,
                         m, n, k, act);
  return launch_kernel(pdl, gemv_mma_kernel<T, NT, U, S, WARPS, false, false>,
                       gemv_mma_kernel<T, NT, U, S, WARPS, false, true>, grid, block, stream, x, w, bias, residual, y,
                       m, n, k, act);
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

// kGemvAuto at m == 1 with k % 64 == 0 (every GPT-NeoX / Pythia layer), the 8-warp wide configurations:
//  - n >= 6144 and k % 512 == 0: 16 rows a block, k over 2 warps (each warp streams 4 rows for a long run). In the
//    decode graph (one H100, e0cf1a2, same run, 20B per token): 14.44 ms vs 14.68 with 4 rows a block (k over 8
//    warps, the earlier choice), 14.56 with 8; rank 0 of TP=2 (bench/tp_latency.py --simulate-tp 2) 7.80 vs 8.06 /
//    7.86. As one cold call 4 rows had measured best (d7f8ef5: 20B qkv 80.2 us, dense 32.1, h->4h 103.4, 4h->h 106.3),
//    but in the graph, where each GEMV starts under its predecessor's tail, fewer, longer-lived blocks win. Below
//    6144 rows (384 blocks) too few blocks: at TP=4 the 20B qkv (4608 rows) measured 18.1 us back to back vs 16.6
//    with 4 rows a block (one H200).
//  - n <= 4096: 8 rows a block (pythia-1.4b dense 8.2 vs 9.3 us with 4 rows and 10.2 before, 4h->h 17.3 vs 19.5).
//  - otherwise 4 rows a block (k over 8 warps), but for short rows (k / 8 < 512 and not whole 256-element chunks:
//    lanes idle in a warp's last chunk) k over 4 or 2 warps where that gives each warp whole chunks.
// Returns the variant, or kGemvAuto where the older choice stands (more rows, other k).
inline int gemv_auto_wide(int m, int n, int k) {
  if (m != 1 || k % 64 != 0) return kGemvAuto;
  if (n <= 4096) return kGemvWide8;
  if (n >= 6144 && k % 512 == 0) return kGemvWide16;
  if (k / 8 >= 512 || (k / 8) % 256 == 0) return kGemvWide4;
  if ((k / 4) % 256 == 0) return kGemvWide8;
  if ((k / 2) % 256 == 0) return kGemvWide16;
  return kGemvWide4;
}

// kGemvAuto at 2-16 rows of x: the tensor-core tiles, faster than the older configurations at every 20B and
// pythia-1.4b shape from 2 rows on (one H100, L2 cold, bench/kernels.py --sweep, 1978a62; 20B dense at 2 rows 31.4
// vs 37.6 us, 4h->h 111.8 vs 117.5). Narrow layers (n <= 4096: at most 256 blocks, fewer than 3 per SM) split k
// over 16 warps (1.4b 4h->h 16.8 vs 19.1 us, dense 7.8 vs 8.4); wider ones over 8 warps, with 3 steps of W in
// flight up to 8 rows (one H200, 4ff2756: 20B dense at 4 rows back to back 19.1 vs 19.9 us; at 16 rows, where the
// accumulators double, the third step made it slower: 23.4 vs 19.6). Returns the variant, or kGemvAuto (k % 64 != 0:
// the legacy configuration).
inline int gemv_auto_mma(int m, int n, int k) {
  if (m < 2 || k % 64 != 0) return kGemvAuto;
  if (n <= 4096 && k % 128 == 0) return kGemvMma16;
  return m <= 8 ? kGemvMma8Deep : kGemvMma8;
}

// m in 1..16 (rounded up to 1, 2, 4, 8 or 16 rows of registers), k % 8 == 0, 16-byte aligned x and w.
// residual (nullable) is [m, n] like y. `pdl` needs sm_90 (the caller checks the device).
template <typename T>
cudaError_t launch_gemv(const T* x, const T* w, const T* bias, const T* residual, T* y, int m, int n, int k,
                        int act, int variant, bool pdl, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m > gemv_max_rows() || k % (16 / static_cast<int>(sizeof(T))) != 0) return cudaErrorInvalidValue;
  if (variant == kGemvAuto) variant = gemv_auto_wide(m, n, k);
  if (variant == kGemvAuto) variant = gemv_auto_mma(m, n, k);
  if (variant >= kGemvMma8 && variant <= kGemvMma16Deep) {
    const int warps = variant == kGemvMma16 || variant == kGemvMma16Deep ? 16 : 8;
    const bool deep = variant == kGemvMma8Deep || variant == kGemvMma16Deep;
    if (k % (8 * warps) == 0 && gemv_mma_supported<T>()) {
#define NEOX_RT_GEMV_MMA(S_, W_)                                                                               \
  return m <= 8 ? launch_gemv_mma<T, 1, S_, W_>(x, w, bias, residual, y, m, n, k, act, pdl, stream)            \
                : launch_gemv_mma<T, 2, S_, W_>(x, w, bias, residual, y, m, n, k, act, pdl, stream);
      if (warps == 16 && deep) NEOX_RT_GEMV_MMA(3, 16);
      if (warps == 16) NEOX_RT_GEMV_MMA(2, 16);
      if (deep) NEOX_RT_GEMV_MMA(3, 8);
      NEOX_RT_GEMV_MMA(2, 8);
#undef NEOX_RT_GEMV_MMA
    }
    variant = kGemvLegacy;
  }
  if (variant == kGemvAuto && m <= 2 && gemv_auto_ksplit(n, k) == 0) variant = kGemvLegacy;
  const bool wide = variant == kGemvWide8 || variant == kGemvWide4 || variant == kGemvWide16;
  if (wide && m <= 2 && k % 64 == 0) {  // k split over up to 8 warps in whole 16-byte vectors
#define NEOX_RT_GEMV_WIDE(MT_)                                                                                    \
  return variant == kGemvWide8                                                                                     \
             ? launch_gemv_config<T, MT_, 4, 1, 4, 8>(x, w, bias, residual, y, m, n, k, act, pdl, stream)           \
         : variant == kGemvWide16                                                                                  \
             ? launch_gemv_config<T, MT_, 4, 1, 2, 8>(x, w, bias, residual, y, m, n, k, act, pdl, stream)           \
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
