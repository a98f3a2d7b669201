// Weight-only quantized linear layers for 1-64 rows of x (decode and small batches), W8A16 and W4A16:
//   y[m, n] = act(x[m, :] . W[n, :] + bias[n]) + residual[m, n],
// W dequantized exactly as the formats' `dequantize(dtype)` does (neox_rt/quant/formats.py): each weight computed
// from its integers and rounded ONCE to x's dtype, the dot products accumulated in fp32, bias, activation and residual
// applied in fp32 before the single rounding of y. The kernels add no error beyond the order of the sums, except
// variant 5 (FOLD, below), which does not round the weights at all: closer to the exact product, not bit-identical.
//  - int8 (QuantInt8): qweight int8 [n, k] in [-127, 127], scales [n]: W = q * s.
//  - int4 (QuantInt4): qweight int32 [n, k / 8] (value i of a row in word i / 8 at bits 4 (i % 8)), scales and uint8
//    zeros [n, k / G]: W = (q - zero) * scale.
//
// Floor: decode is a stream of the packed weight, read once. Bytes moved = n k (int8) or n k / 2 + 3 n k / G (int4;
// scales and zeros, 2.3% at G = 128) plus x, bias and y (negligible at one row). At ~3.0 TB/s achievable on an H100
// (80 GB HBM3): 20B per token, every layer quantized and the fp16 lm head (0.62 GB): int8 20.6 GB -> 6.9 ms, int4
// 11.0 GB -> 3.7 ms. Per layer (TP=1): int8 qkv 113 MB 37.7 us, dense 37.7 MB 12.6 us, h->4h and 4h->h 151 MB
// 50.3 us; int4 qkv 58.0 MB 19.3 us, dense 6.4 us, h->4h and 4h->h 25.8 us. Above ~16 rows the floor moves: every
// block reads x again from L2 (m * 2 / (16 CT) bytes of x a weight, CT the tiles of a warp below), so at 64 rows
// int8 with CT = 2 moves 4 bytes of x (L2) per byte of W (DRAM) and the L2 becomes the limit.
// Where it stands (one H100, one row; table at QuantVariant below; bench/quant_kernels.py, bench/NOTES.md session 14):
// int8 at 89-93% of the floor back to back on 20B's big layers (qkv 40.9 us), int4 at 70-80% with the LEAN kernel
// (qkv 27.9 us vs 19.6, 4h->h 32.8 vs 26.1). Neither is stream-bound: 80 registers leave 6 warps a scheduler, and a
// warp stalls on x's loads (Nsight Compute: 55-71% of the stall cycles on the L1TEX scoreboard).
//
// Design (one kernel family for every row count and both formats, templated on the format):
//  - Tensor cores with "swapped" operands: W is the A operand of mma.sync m16n8k16 (16 output channels x 16 k; two
//    m16n8k8 on sm_75, which has no k16 for f16 and no bf16 at all: bf16 needs sm_80), x the B operand (16 k x 8
//    rows of x). One to eight tiles of 8 rows of x (NT) cover 1-64 rows; decode (one row) wastes 7 columns of B,
//    which costs nothing in a memory-bound kernel. No shared-memory staging, no cp.async, no ldmatrix.
//  - A dot product does not care about the order of k, so each lane owns a contiguous run of k: in a chunk (64 bytes
//    of a row: 64 int8 or 128 int4 values), lane (g = lane / 4, t = lane % 4) loads the 16 bytes at byte 16 t of rows
//    f0 + g and f0 + g + 8 of each of its CT tiles of 16 rows, one 16-byte streaming load (ld.global.cs, evict-first:
//    the weights must not push the KV cache and activations out of L2) per row, and x row g (+ 8 j) at the same k.
//    Each mma k-step takes one pair of values from every lane (the A and B fragments of m16n8k8 hold k = 2t, 2t + 1
//    of their row / column at lane (g, t)), so the same permutation of k on both sides is free.
//  - Chunks are dealt to the WARPS warps of a block round robin (warp w: chunks w, w + WARPS, ...): k is split over
//    the warps, so 20B's 4h->h (n 6144, k 24576) runs 384 blocks of 8 warps; the block's warps read adjacent 64-byte
//    pieces of a row at a time. Each lane keeps a ring of S chunks in flight (S CT 2 16-byte loads, 96-128 bytes a
//    lane: QuantConfig; ~96 KB an SM at one row), the first S asked for before griddepcontrol.wait.
//  - Dequantization in registers, two values a 32-bit op: int8 fp16: the byte's sign flipped (q + 128), placed under
//    0x64 (prmt: the half 1024 + q + 128), minus 1152 (exact); int8 bf16: the byte under fp32 2^23 (prmt), minus
//    2^23 + 128, the upper half of the float is the bf16 (exact for |q| < 256); int4: each nibble pair (i, i + 4) of a
//    word masked under the magic (0x6400 fp16: 1024 + q; 0x4300 bf16: 128 + q) and the (magic + zero) of its group
//    subtracted, then times the scale: fma.rn.{f16,bf16}x2 with -0.0, the exact product q s (or (q - z) s) rounded
//    once, which is what fp32-then-round gives. x's pairs are permuted to (i, i + 4) with prmt to match (int4).
//  - FOLD (variant 5, fp16, sm_80+): the zero point and the scale out of the per-weight work, since the kernel is
//    bound by its instructions, not the stream (LEAN int4: 192 warp instructions per KB of weight, 13 of them per
//    8 weights). int4 (a chunk one group: group_size % 128 == 0; up to 16 rows): the mma takes the pairs as masked,
//    16 q + 16384 or 16 q + 1024 (5 integer ops a word), into the chunk's own fp32 sums; a second mma per k16 step,
//    whose A is the row's constant -(16384 + 16 z) / -(1024 + 16 z) against the same x, removes magic and zero point;
//    the group's scale multiplies the sums once a chunk. int8: q exactly, the row's scale once on the warps' sum.
//    Main loop (sm_90a SASS, one row): int4 122 instructions a KB (LEAN 192), 202 per 2 KB with two tiles (336);
//    int8 60 (97), 109 per 2 KB (167); no spills, within LEAN's register bounds. Error: each weight exact rather than
//    rounded to fp16 (half an ulp of fp16 at most, the difference to "dequantize, then matmul"), and the int4 sums
//    cancel 16384 x in fp32 (a few units of 2^-24 of 16384 |x| a k16 step: ~2^-16 of a chunk's sum, far below the
//    2^-11 of y's rounding).
//  - The warps' partial tiles meet in shared memory (WARPS x CT NT x 4 x 32 floats <= 32 KB), summed in warp order
//    (deterministic: a CUDA-graph replay equals eager bit for bit); bias, activation, residual are applied once per
//    output, fp32 until the rounding of y.
//  - Programmatic dependent launch (sm_90) as the GEMV: launch_dependents at the start, the weights' first loads (and
//    int8 scales) before griddepcontrol.wait, x and the residual after it, never through the read-only path.
//  - A parallel-residual layer's linears in two launches instead of four (tiled weights, 1-8 rows; below):
//    quant_gemm_pair_kernel runs QKV and h->4h as one grid (optionally with the dual LayerNorm before them, each block
//    normalising x into shared memory), quant_gemm_sum_kernel dense and 4h->h into the same sums (BFIRST: 4h->h's
//    chunks first, x included, before the dependent launch's wait, while decode attention runs).
// Requirements (the launchers return cudaErrorInvalidValue otherwise; the torch launcher checks them first): rows of
// x 1-64; int8 k % 64 == 0; int4 k % 128 == 0, group % 32 == 0 and k % group == 0; x, qweight 16-byte aligned and
// contiguous; scales of x's dtype; bf16 on sm_80+ only (cudaErrorNotSupported); int4 in bf16: zeros < 128 (128 + zero
// must be a bf16 integer; a 4-bit zero point is at most 16, GPTQ v1's + 1 included).
#pragma once

#include "common.cuh"
#include "gemv.cuh"  // apply_activation, mma_16x8x16, gemv_mma_supported
#include "layernorm.cuh"  // sum_norm_tail

namespace neox_rt {

// The two formats. A chunk is 64 bytes of a row of qweight; a lane reads 16 of them, KL values of k.
struct QuantInt8 {
  static constexpr int kChunkK = 64;  // values of k in a chunk
  static constexpr bool kGrouped = false;
  static __host__ __device__ __forceinline__ int64_t row_bytes(int k) { return k; }
};
struct QuantInt4 {
  static constexpr int kChunkK = 128;
  static constexpr bool kGrouped = true;
  static __host__ __device__ __forceinline__ int64_t row_bytes(int k) { return k / 2; }
};

namespace quant_detail {

template <typename T> struct Bits;  // half2 constants of the dtype
template <> struct Bits<__half> {
  static constexpr uint32_t kOne = 0x3C003C00u;       // 1.0, 1.0
  static constexpr uint32_t kNegZero = 0x80008000u;   // -0.0, -0.0: q * s + (-0) == round(q * s)
  static constexpr uint32_t kInt4Magic = 0x64006400u; // 1024 + q for a nibble q in the mantissa
  static constexpr uint32_t kNegMagic = 0xE400u;      // -(1024 + z) is 0xE400 | z for z < 1024
};
template <> struct Bits<__nv_bfloat16> {
  static constexpr uint32_t kOne = 0x3F803F80u;
  static constexpr uint32_t kNegZero = 0x80008000u;
  static constexpr uint32_t kInt4Magic = 0x43004300u; // 128 + q
  static constexpr uint32_t kNegMagic = 0xC300u;      // -(128 + z) is 0xC300 | z for z < 128
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// a * b + c on two values of T, rounded once (explicit .rn: never contracted or reassociated).
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, __half>::value) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
#if __CUDA_ARCH__ >= 800
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
    __trap();  // the launchers never run bf16 below sm_80
#endif
  }
#endif
  return d;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Pairs of q (exact integers of T) of the 8 int8 in words w0, w1 of a lane's run, in k order: {0,1} {2,3} {4,5} {6,7}.
template <typename T>
__device__ __forceinline__ void int8_pairs(uint32_t w0, uint32_t w1, uint32_t (&q)[4]) {
  const uint32_t u0 = w0 ^ 0x80808080u, u1 = w1 ^ 0x80808080u;  // q + 128 in [1, 255], unsigned
  if constexpr (std::is_same<T, __half>::value) {
    constexpr uint32_t kMagic = 0x64646464u, kNeg1152 = 0xE480E480u;  // 1024 + (q + 128) - 1152 = q
    q[0] = fma2<T>(prmt(u0, kMagic, 0x5140), Bits<T>::kOne, kNeg1152);
    q[1] = fma2<T>(prmt(u0, kMagic, 0x5342), Bits<T>::kOne, kNeg1152);
    q[2] = fma2<T>(prmt(u1, kMagic, 0x5140), Bits<T>::kOne, kNeg1152);
    q[3] = fma2<T>(prmt(u1, kMagic, 0x5342), Bits<T>::kOne, kNeg1152);
  } else {
    // fp32 2^23 + (q + 128) minus 2^23 + 128: q exactly, whose upper 16 bits are its bf16 (8 significant bits)
    constexpr uint32_t kMagic = 0x4B000000u;
    constexpr float kSub = 8388736.f;
    float f[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[i] = __uint_as_float(prmt(u0, kMagic, 0x7650 + i)) - kSub;
      f[4 + i] = __uint_as_float(prmt(u1, kMagic, 0x7650 + i)) - kSub;
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) q[p] = prmt(__float_as_uint(f[2 * p]), __float_as_uint(f[2 * p + 1]), 0x7632);
  }
}

// Pairs (q - z) of the 8 nibbles of word w: {0,4} {1,5} {2,6} {3,7}. neg_mz: -(magic + z) twice.
template <typename T>
__device__ __forceinline__ void int4_pairs(uint32_t w, uint32_t neg_mz, uint32_t (&q)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
    q[i] = fma2<T>(((w >> (4 * i)) & 0x000F000Fu) | Bits<T>::kInt4Magic, Bits<T>::kOne, neg_mz);
}

// The same pairs from 5 integer ops a word (fp16 only): nibbles (0, 4) and (2, 6) masked under the magic as 1024 + q,
// (1, 5) and (3, 7) in place as 1024 + 16 q, scaled by 1/16 in the subtraction: (1024 + 16 q) / 16 - (64 + z), exact.
// neg_lo: -(1024 + z) twice; neg_hi: -(64 + z) twice (neg_lo + 960, exact for z < 1024).
// (a & b) | c in ONE instruction: the compiler splits it in two when b and c are both immediates.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ void int4_pairs_lean(uint32_t w, uint32_t neg_lo, uint32_t neg_hi, uint32_t (&q)[4]) {
  constexpr uint32_t kMask = 0x000F000Fu, kMaskHi = 0x00F000F0u, kMagic = 0x64006400u, kSixteenth = 0x2C002C00u;
  const uint32_t w8 = w >> 8;
  q[0] = fma2<__half>(and_or(w, kMask, kMagic), Bits<__half>::kOne, neg_lo);
  q[1] = fma2<__half>(and_or(w, kMaskHi, kMagic), kSixteenth, neg_hi);
  q[2] = fma2<__half>(and_or(w8, kMask, kMagic), Bits<__half>::kOne, neg_lo);
  q[3] = fma2<__half>(and_or(w8, kMaskHi, kMagic), kSixteenth, neg_hi);
}

// FOLD (fp16 only): the pairs as the mma takes them, no zero point, no scale, 5 integer ops a word, each value 16 q
// plus a constant, exact: {0,4} {2,6} masked under 0x7400 (16384 + 16 q: the unit of 16384 is 16), {1,5} {3,7} in
// place under 0x6400 (1024 + 16 q). One LOP3 a pair, b & (a | c): b = mask | magic (the immediate), c = kFoldBits,
// which has both magics' bits and none under either mask, so that all four share one register of constants; its 0xF4
// bytes also give the correction's -(16384 + 16 z) (fold_neg_lo).
constexpr uint32_t kFoldBits = 0xF400F400u;
__device__ __forceinline__ uint32_t masked_magic(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xC8;" : "=r"(d) : "r"(a), "r"(b), "r"(kFoldBits));
  return d;
}

__device__ __forceinline__ void int4_pairs_raw(uint32_t w, uint32_t (&q)[4]) {
  constexpr uint32_t kLo = 0x740F740Fu, kHi = 0x64F064F0u;  // mask | magic: 16384 + 16 q, 1024 + 16 q
  const uint32_t w8 = w >> 8;
  q[0] = masked_magic(w, kLo);
  q[1] = masked_magic(w, kHi);
  q[2] = masked_magic(w8, kLo);
  q[3] = masked_magic(w8, kHi);
}

// -(16384 + 16 z) twice from scale bits | z << 16: z under kFoldBits' 0xF4 bytes (exact for any uint8 z). The
// constant is the PRMT's first source, so a register (the LOP3s'), and the selector the immediate: 3 instructions a
// chunk fewer than the other way round.
__device__ __forceinline__ uint32_t fold_neg_lo(uint32_t sz) { return prmt(kFoldBits, sz, 0x3616); }

// a + b on two halves, rounded once (explicit .rn: never contracted)
__device__ __forceinline__ uint32_t add_f16x2(uint32_t a, uint32_t b) {
  uint32_t d = 0;
#if defined(__CUDA_ARCH__)
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#endif
  return d;
}

// d = A B (C = 0, the zero register): a chunk's first product into its fresh FOLD sums (no zeroing instructions).
__device__ __forceinline__ void mma_16x8x16_f16_first(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                      uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
#else
  d[0] = d[1] = d[2] = d[3] = 0.f;
  mma_16x8x16<__half>(d, a0, a1, a2, a3, b0, b1);
#endif
}

// x's 8 values at the lane's 8 k, as B fragments in the order of the weight pairs: natural (int8) or (i, i + 4).
template <typename F>
__device__ __forceinline__ void x_pairs(const uint4& v, uint32_t (&b)[4]) {
  if constexpr (F::kGrouped) {
    b[0] = prmt(v.x, v.z, 0x5410);  // {x0, x4}
    b[1] = prmt(v.x, v.z, 0x7632);  // {x1, x5}
    b[2] = prmt(v.y, v.w, 0x5410);  // {x2, x6}
    b[3] = prmt(v.y, v.w, 0x7632);  // {x3, x7}
  } else {
    b[0] = v.x, b[1] = v.y, b[2] = v.z, b[3] = v.w;
  }
}

}  // namespace quant_detail

// A block owns 16 CT output channels (f0 = 16 CT blockIdx.x) and splits k over its WARPS warps (chunks round robin).
// NT tiles of 8 rows of x; S chunks in flight a lane. Rows of W past n read row n - 1, rows of x past m read row
// m - 1: valid memory whose products land only in outputs that are never stored (each output column of the mma
// depends on its own column of B alone, each row on its own row of A).
constexpr int kQuantTiled = 3;  // TILED (quant_gemm_accumulate): the weight and (int4) its scale words tiled

// FOLD runs where LEAN does (sm_80 and up) and in fp16 only (quant_gemm_accumulate's comment).
template <typename T, bool LEAN, bool FOLD>
__device__ __forceinline__ constexpr bool quant_fold_active() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return false;
#else
  return LEAN && FOLD && std::is_same<T, __half>::value;
#endif
}

// A lane's 8 values of x: from global memory through L1 (ld.global.ca), or (XS) from the block's shared memory, or
// (CG) through L2 only (ld.global.cg: x read before the dependent launch's wait, see quant_gemm_sum_kernel's BFIRST).
template <bool XS, typename T, bool CG = false>
__device__ __forceinline__ Vec<T, 8> load_x8(const T* p) {
  if constexpr (XS) {
    Vec<T, 8> v;
    *reinterpret_cast<uint4*>(&v) = *reinterpret_cast<const uint4*>(p);
    return v;
  } else if constexpr (CG) {
    return load_vec_cg<T, 8>(p);
  } else {
    return load_vec_ca<T, 8>(p);
  }
}

struct NoPrologue {
  __device__ __forceinline__ void operator()() const {}
};

// The main loop of a block: this warp's chunks of the block's 16 CT channels (from f0) into acc (fp32, added to what
// it holds), the first S chunks asked for before griddepcontrol.wait where `wait` (PDL) is set, then `prologue()`
// (the block's work that needs the previous kernel's output before x is read: NORM's LayerNorm), then the loop. XS: x
// is in the block's shared memory; XCG: x is read through L2 only (load_x8).
template <typename T, typename F, int NT, int CT, int S, int WARPS, bool LEAN, bool FOLD, int TILED, bool XS = false,
          bool XCG = false, typename Prologue = NoPrologue>
__device__ __forceinline__ void quant_gemm_accumulate(
    const T* __restrict__ x,               // [m, k]
    const uint8_t* __restrict__ qweight,   // [n, row_bytes(k)]: int8 [n, k] or int32 [n, k / 8]
    const T* __restrict__ scales,          // int8 [n]; int4 [n, k / group]
    const uint8_t* __restrict__ zeros,     // int4 [n, k / group]; int8 unused
    int m, int n, int k, int group_size, int f0, bool wait, float (&acc)[CT][NT][4],
    const Prologue& prologue = Prologue()) {
  static_assert(sizeof(T) == 2, "fp16 / bf16");
  using namespace quant_detail;
  constexpr int KL = F::kChunkK / 4;  // values of k a lane holds of a chunk: 16 (int8) or 32 (int4)
  constexpr int SUB = KL / 8;         // 8-k pieces of the lane's run (each: 4 pairs, two k16 mma per x tile)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row_bytes = F::row_bytes(k);
  const int nchunks = k / F::kChunkK;
  const int mine = nchunks > warp ? (nchunks - warp + WARPS - 1) / WARPS : 0;  // this warp's chunks
  const int groups = F::kGrouped ? k / group_size : 1;
  // group of a lane's run: (4 chunk + t) / (G / 32), from floats: the quotient's fraction is >= 0.5 / (G / 32)
  // away from the next integer, far above float error for k < 2^24
  const float inv_gchunk = F::kGrouped ? 1.f / static_cast<float>(group_size / 32) : 0.f;

  int rows[CT][2];  // row indices, not pointers: 32-bit registers
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[c][h] = min(f0 + 16 * c + 8 * h + g, n - 1);
  const uint8_t* const wlane = qweight + 16 * t;
  // LEAN: a warp's chunk i of a row sits at a constant stride from its first (64 WARPS bytes; its group at
  // 128 WARPS / group_size groups, the launcher runs LEAN only where group_size divides 128 WARPS), so the loads
  // address from per-row bases with immediate offsets; int4 in fp16 also dequantizes with 5 integer ops a word
  // (int4_pairs_lean).
  // (sm_80 and up: on sm_75, whose two k8 mma need more registers, two configurations would spill)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kLean = false;
  if constexpr (TILED != 0) __trap();  // the tiled layout is read by the LEAN loop only (launchers refuse it here)
#else
  constexpr bool kLean = LEAN;
#endif
  constexpr bool kLeanInt4 = kLean && F::kGrouped && std::is_same<T, __half>::value;
  // FOLD (sm_80 and up as LEAN; fp16; the launcher runs int4 only where a chunk is one group, group_size % 128 == 0,
  // and up to 16 rows): the zero point and the scale out of the per-weight work. int4: the mma takes the pairs as
  // int4_pairs_raw leaves them (16 q + 16384 or + 1024) into the chunk's own sums, and after each such k16 step a
  // correction mma against the same x whose A is a constant of the row, -(16384 + 16 z) at the lo pairs and
  // -(1024 + 16 z) at the hi pairs, removes the magic and the zero point (the sums: 16 sum (q - z) x); the group's
  // scale multiplies them once a chunk (one FFMA a register), the 1/16 once at the end. int8: q exactly
  // (int8_pairs with its exact -1152: folding that into a correction mma too saved 4-10 instructions a chunk at one
  // row, cost up to 117 at 17-64 rows and doubled the mma) and the row's scale once, on the warps' sum. Not
  // bit-identical to "dequantize, then matmul": no weight is rounded to fp16 (the products are exact), and the fp32
  // sums of the int4 path cancel 16384 x against its correction.
  constexpr bool kFold = quant_fold_active<T, LEAN, FOLD>();
  constexpr bool kFoldInt4 = kFold && F::kGrouped;
  int woff[CT][2], soff[CT][2];  // 32-bit offsets (the launcher runs LEAN only where n row_bytes < 2^31)
  const int gstride = F::kGrouped && kLean ? 128 * WARPS / group_size : 0;
  // TILED (LEAN only): qweight in the tiled layout, [n / 16][row_bytes / 64][2][8][4][16 bytes]: a tile of 16 rows
  // (n padded to 16 with zero rows), its chunks one after another, each chunk's 1 KB as rows 0-7 then 8-15 with
  // lane (g, t)'s 16 bytes at 16 lane, so that a warp's load of a chunk's half-tile is 512 contiguous bytes; int4's
  // scales and zeros as one word a row and group, scale bits | zero << 16, [n / 16][groups][16] (passed as `scales`).
  constexpr bool kTiledW = TILED & 1, kTiledS = F::kGrouped && (TILED & 2);
  constexpr int kChunkStride = kTiledW ? 1024 : 64;  // bytes from a row's chunk to its next
  constexpr int kGroupStride = kTiledS ? 16 : 1;     // elements from a row's group to its next
  if constexpr (kLean) {
    const int grp0 = F::kGrouped ? (128 * warp + 32 * t) / group_size : 0;
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int tile = min(f0 / 16 + c, (n + 15) / 16 - 1);  // tiled: tiles past the last read the last
        woff[c][h] = kTiledW ? tile * 16 * static_cast<int>(row_bytes) + 1024 * warp + 512 * h + 16 * lane
                             : rows[c][h] * static_cast<int>(row_bytes) + 16 * t + 64 * warp;
        soff[c][h] = kTiledS ? (tile * groups + grp0) * 16 + 8 * h + g : rows[c][h] * groups + grp0;
      }
  }

  // FOLD int4 asks for a chunk's scales and zeros two chunks ahead, not S (their latency, not their bytes, matters):
  // 4 registers fewer at four chunks in flight
  constexpr int SZ = kFoldInt4 && S % 2 == 0 ? 2 : S;
  uint4 wq[S][CT][2];         // the ring: S chunks of the lane's 16 bytes of each row
  uint32_t sz[SZ][CT][2];     // int4: scale bits | zero << 16 of the chunk's group, per row (slot i % SZ)
  uint32_t scale2[CT][2];     // int8: the row's scale, twice
  auto load_sz = [&](int s, int i) {  // FOLD int4
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int idx = soff[c][h] + kGroupStride * gstride * i;
        sz[s][c][h] = kTiledS ? __ldg(reinterpret_cast<const uint32_t*>(scales) + idx)
                            : static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(scales) + idx)) |
                                  (static_cast<uint32_t>(__ldg(zeros + idx)) << 16);
      }
  };
  // FOLD: the rows' weights of this iteration's first chunk, pointers carried by the loop (its chunks at immediate
  // offsets; not for int4 at 9-16 rows, whose registers would spill)
  constexpr bool kWeightPtrs = kFold && !(F::kGrouped && NT > 1);
  const uint8_t* wit[kWeightPtrs ? CT : 1][2];
  if constexpr (kWeightPtrs) {
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) wit[c][h] = qweight + woff[c][h];
  }
  auto load_chunk = [&](int s, int i) {
    const int chunk = warp + WARPS * i;
    if constexpr (kWeightPtrs) {  // i: this iteration's chunk i (< 2 S)
#pragma unroll
      for (int c = 0; c < CT; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) wq[s][c][h] = __ldcs(reinterpret_cast<const uint4*>(wit[c][h] + kChunkStride * WARPS * i));
    } else if constexpr (kFoldInt4) {
#pragma unroll
      for (int c = 0; c < CT; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wq[s][c][h] = __ldcs(reinterpret_cast<const uint4*>(qweight + (woff[c][h] + kChunkStride * WARPS * i)));
    } else if constexpr (kLean) {
#pragma unroll
      for (int c = 0; c < CT; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wq[s][c][h] = __ldcs(reinterpret_cast<const uint4*>(qweight + (woff[c][h] + kChunkStride * WARPS * i)));
          if constexpr (F::kGrouped) {
            const int idx = soff[c][h] + kGroupStride * gstride * i;
            sz[s][c][h] = kTiledS ? __ldg(reinterpret_cast<const uint32_t*>(scales) + idx)
                                : static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(scales) + idx)) |
                                      (static_cast<uint32_t>(__ldg(zeros + idx)) << 16);
          }
        }
    } else {
#pragma unroll
      for (int c = 0; c < CT; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wq[s][c][h] = __ldcs(reinterpret_cast<const uint4*>(wlane + rows[c][h] * row_bytes + 64 * chunk));
          if constexpr (F::kGrouped) {
            const int grp = static_cast<int>((static_cast<float>(4 * chunk + t) + 0.5f) * inv_gchunk);
            const int64_t idx = static_cast<int64_t>(rows[c][h]) * groups + grp;
            sz[s][c][h] = static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(scales) + idx)) |
                          (static_cast<uint32_t>(__ldg(zeros + idx)) << 16);
          }
        }
    }
  };

  // weights (and their scales) do not depend on the previous kernel: asked for before waiting
  if constexpr (!F::kGrouped) {
#pragma unroll
    for (int c = 0; c < CT; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        scale2[c][h] = static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(scales) + rows[c][h])) *
                       0x10001u;
  }
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (s < mine) load_chunk(s, s);
  if constexpr (kFoldInt4) {
#pragma unroll
    for (int s = 0; s < SZ; ++s)
      if (s < mine) load_sz(s, s);
  }
  if (wait) pdl_wait();
  prologue();

  const T* const xlane = x + KL * t;
  int xrow[NT];  // offsets of the lane's rows of x (m k < 2^31: m <= 64); FOLD: from its first row
#pragma unroll
  for (int j = 0; j < NT; ++j) xrow[j] = min(g + 8 * j, m - 1) * k;
  // FOLD: the lane's x of this iteration's first chunk in its first row, a pointer carried by the loop (the chunks of
  // an iteration at immediate offsets from it, the other rows at xrow[j])
  const T* xit = xlane + xrow[0] + F::kChunkK * warp;
  if constexpr (kFold) {
#pragma unroll
    for (int j = NT - 1; j >= 0; --j) xrow[j] -= xrow[0];
  }
  // Unrolled by S so that every slot is a fixed set of registers: chunk i is in slot i % S; once used, the slot is
  // refilled S chunks ahead.
#pragma unroll 1
  for (int i0 = 0; i0 < mine; i0 += S) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int i = i0 + s;
      if (i < mine) {
        const int kx = (warp + WARPS * i) * F::kChunkK;  // the chunk's first k
        uint32_t neg_mz[CT][2], neg_hi[CT][2], sc2[CT][2];
        float fold_scale[CT][2];                 // FOLD int4: the group's scale of row g (h = 0) and g + 8 (h = 1)
        float part[kFoldInt4 ? CT : 1][NT][4];  // FOLD int4: the chunk's own sums, 16 sum (q - z) x
#pragma unroll
        for (int c = 0; c < CT; ++c)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if constexpr (kFoldInt4) {
              // the correction's A: -(16384 + 16 z) and -(1024 + 16 z) = -(16384 + 16 z) + 15360, exact
              const uint32_t v = sz[s % SZ][c][h];
              neg_mz[c][h] = fold_neg_lo(v);
              neg_hi[c][h] = add_f16x2(neg_mz[c][h], 0x73807380u);
              fold_scale[c][h] = __half2float(__ushort_as_half(static_cast<unsigned short>(v & 0xFFFFu)));
            } else if constexpr (F::kGrouped) {
              neg_mz[c][h] = (Bits<T>::kNegMagic | (sz[s][c][h] >> 16)) * 0x10001u;
              if constexpr (kLeanInt4) neg_hi[c][h] = fma2<T>(neg_mz[c][h], Bits<T>::kOne, 0x63806380u);  // + 960
              sc2[c][h] = (sz[s][c][h] & 0xFFFFu) * 0x10001u;
            } else {
              sc2[c][h] = scale2[c][h];
            }
          }
#pragma unroll
        for (int kk = 0; kk < SUB; ++kk) {
          uint32_t a[CT][2][4];  // [tile][row g, g + 8][pair]: W of 8 k, dequantized
#pragma unroll
          for (int c = 0; c < CT; ++c)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if constexpr (kFoldInt4) {
                int4_pairs_raw(word_of(wq[s][c][h], kk), a[c][h]);
              } else if constexpr (kLeanInt4) {
                int4_pairs_lean(word_of(wq[s][c][h], kk), neg_mz[c][h], neg_hi[c][h], a[c][h]);
              } else if constexpr (F::kGrouped) {
                int4_pairs<T>(word_of(wq[s][c][h], kk), neg_mz[c][h], a[c][h]);
              } else {
                int8_pairs<T>(word_of(wq[s][c][h], 2 * kk), word_of(wq[s][c][h], 2 * kk + 1), a[c][h]);
              }
              if constexpr (!kFold) {
#pragma unroll
                for (int p = 0; p < 4; ++p) a[c][h][p] = fma2<T>(a[c][h][p], sc2[c][h], Bits<T>::kNegZero);
              }
            }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            // x (L1 / L2) arrives while the next chunks' weights (DRAM) are in flight
            const Vec<T, 8> xv = kFold ? load_x8<XS, T, XCG>(xit + xrow[j] + (WARPS * F::kChunkK * s + 8 * kk))
                                       : load_x8<XS, T, XCG>(xlane + xrow[j] + kx + 8 * kk);
            uint32_t b[4];
            x_pairs<F>(*reinterpret_cast<const uint4*>(&xv), b);
#pragma unroll
            for (int c = 0; c < CT; ++c) {
              if constexpr (kFoldInt4) {
                // each k16 step: the raw pairs, then their correction (A: -(16384 + 16 z) at the lo pairs,
                // -(1024 + 16 z) at the hi pairs of each row, the same for every k) against the same x (in this
                // order the compiler fills the gap between dependent mma: 3 NOP a chunk, 6 the other way round)
                if (kk == 0) {
                  mma_16x8x16_f16_first(part[c][j], a[c][0][0], a[c][1][0], a[c][0][1], a[c][1][1], b[0], b[1]);
                } else {
                  mma_16x8x16<T>(part[c][j], a[c][0][0], a[c][1][0], a[c][0][1], a[c][1][1], b[0], b[1]);
                }
                mma_16x8x16<T>(part[c][j], neg_mz[c][0], neg_mz[c][1], neg_hi[c][0], neg_hi[c][1], b[0], b[1]);
                mma_16x8x16<T>(part[c][j], a[c][0][2], a[c][1][2], a[c][0][3], a[c][1][3], b[2], b[3]);
                mma_16x8x16<T>(part[c][j], neg_mz[c][0], neg_mz[c][1], neg_hi[c][0], neg_hi[c][1], b[2], b[3]);
              } else {
                mma_16x8x16<T>(acc[c][j], a[c][0][0], a[c][1][0], a[c][0][1], a[c][1][1], b[0], b[1]);
                mma_16x8x16<T>(acc[c][j], a[c][0][2], a[c][1][2], a[c][0][3], a[c][1][3], b[2], b[3]);
              }
            }
          }
        }
        if constexpr (kFoldInt4) {
          // the chunk's sum, 16 sum (q - z) x, times its group's scale (the 1/16 once, at the end); registers 0, 1
          // are row g, 2, 3 row g + 8
#pragma unroll
          for (int c = 0; c < CT; ++c)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int r = 0; r < 4; ++r) acc[c][j][r] = fmaf(fold_scale[c][r >> 1], part[c][j][r], acc[c][j][r]);
        }
        if (i + S < mine) load_chunk(s, kWeightPtrs ? s + S : i + S);
        if constexpr (kFoldInt4) {
          if (i + SZ < mine) load_sz(s % SZ, i + SZ);
        }
      }
    }
    if constexpr (kFold) xit += WARPS * F::kChunkK * S;
    if constexpr (kWeightPtrs) {
#pragma unroll
      for (int c = 0; c < CT; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) wit[c][h] += kChunkStride * WARPS * S;
    }
  }

}

// The block's outputs: the warps' partial tiles summed in shared memory in warp order, then bias (bias2 too where
// given: a sum of two linears), activation and residual in fp32, y rounded once.
template <typename T, typename F, int NT, int CT, int WARPS, bool LEAN, bool FOLD>
__device__ __forceinline__ void quant_gemm_store(const float (&acc)[CT][NT][4],
                                                 float (&partial)[WARPS][CT * NT * 4][32],
                                                 const T* __restrict__ scales,    // FOLD int8: the rows' scales
                                                 const T* __restrict__ bias,      // [n] or null
                                                 const T* __restrict__ bias2,     // [n] or null
                                                 const T* __restrict__ residual,  // [m, n] or null
                                                 T* __restrict__ y,               // [m, n]
                                                 int m, int n, int f0, int act) {
  constexpr bool kFold = quant_fold_active<T, LEAN, FOLD>();
  constexpr bool kFoldInt4 = kFold && F::kGrouped, kFoldInt8 = kFold && !F::kGrouped;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][(c * NT + j) * 4 + i][lane] = acc[c][j][i];
  __syncthreads();
  // output (channel f0 + 16 c + r, row q of x) sits in tile c, x tile q / 8, lane 4 (r % 8) + (q % 8) / 2, register
  // 2 (r / 8) + q % 2; channels fastest, so that neighbouring threads store neighbouring outputs
  for (int o = threadIdx.x; o < 16 * CT * 8 * NT; o += WARPS * 32) {
    const int f = o % (16 * CT), q = o / (16 * CT);
    if (q >= m || f0 + f >= n) continue;
    const int c = f >> 4, r = f & 15;
    const int src_lane = 4 * (r & 7) + ((q & 7) >> 1), src_reg = (c * NT + (q >> 3)) * 4 + 2 * (r >> 3) + (q & 1);
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < WARPS; ++p) v += partial[p][src_reg][src_lane];
    if constexpr (kFoldInt8) v *= to_float(scales[f0 + f]);  // FOLD int8: the row's scale, once
    if constexpr (kFoldInt4) v *= 0.0625f;                    // FOLD int4: the pairs' 16 q, exact
    const int64_t idx = static_cast<int64_t>(q) * n + f0 + f;
    if (bias != nullptr) v += to_float(bias[f0 + f]);
    if (bias2 != nullptr) v += to_float(bias2[f0 + f]);
    float out = apply_activation(v, act);
    if (residual != nullptr) out += to_float(__ldcg(residual + idx));
    y[idx] = from_float<T>(out);
  }
}

template <int CT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[CT][NT][4]) {
#pragma unroll
  for (int c = 0; c < CT; ++c)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[c][j][i] = 0.f;
}

// A block owns 16 CT output channels (f0 = 16 CT blockIdx.x) and splits k over its WARPS warps (chunks round robin).
// NT tiles of 8 rows of x; S chunks in flight a lane. Rows of W past n read row n - 1, rows of x past m read row
// m - 1: valid memory whose products land only in outputs that are never stored (each output column of the mma
// depends on its own column of B alone, each row on its own row of A).
template <typename T, typename F, int NT, int CT, int S, int WARPS, int MIN_BLOCKS, bool PDL, bool LEAN = false,
          bool FOLD = false, int TILED = 0>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
quant_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const T* __restrict__ scales,
                  const uint8_t* __restrict__ zeros, const T* __restrict__ bias, const T* __restrict__ residual,
                  T* __restrict__ y, int m, int n, int k, int group_size, int act) {
  __shared__ float partial[WARPS][CT * NT * 4][32];
  if (PDL) pdl_launch_dependents();
  const int f0 = blockIdx.x * 16 * CT;
  float acc[CT][NT][4];
  zero_acc(acc);
  quant_gemm_accumulate<T, F, NT, CT, S, WARPS, LEAN, FOLD, TILED>(x, qweight, scales, zeros, m, n, k, group_size, f0,
                                                                   PDL, acc);
  quant_gemm_store<T, F, NT, CT, WARPS, LEAN, FOLD>(acc, partial, scales, bias, nullptr, residual, y, m, n, f0, act);
}

// One linear of a fused launch (quant_gemm_pair_kernel, quant_gemm_sum_kernel): tiled weights, read by the LEAN loop.
template <typename T>
struct QuantOperand {
  const T* x;               // [m, k]
  const uint8_t* qweight;   // tiled: int8 [n_pad, k] or int32 [n_pad, k / 8]
  const T* scales;          // int8 [n]; int4 the scale words [n_pad / 16, k / group, 16]
  int k;
  int group_size;
};

// NORM (quant_gemm_pair_kernel): the dual LayerNorm before the pair, done by every block for its own linear into
// shared memory, instead of a kernel of its own. At most this many values of x (m k: 32 KB in fp16, beside the
// partial sums' 8 KB: three blocks a SM), k a multiple of 8.
constexpr int kQuantNormMaxElems = 16384;

template <typename T>
struct QuantNorm {  // the layer's input and its two LayerNorms (a's and b's)
  const T* x;       // [m, k]
  const T* w_a;
  const T* b_a;
  const T* w_b;
  const T* b_b;
  float eps;
};

// out[r] = LN(x[r]) over k (fp32 statistics in two passes, mean, then the centred sum of squares, as
// layernorm_kernel computes them), rounded to T, for the m rows of x, in shared memory [m, k]: x is copied there as
// it is summed (through L2 only, ld.global.cg: the previous kernel wrote it), then normalised in place, each thread
// on its own vectors; every thread ends at the barrier. Nothing is held in registers across the passes: the weights'
// first chunks, asked for before the dependent launch's wait, are in flight in the registers meanwhile.
template <typename T, int THREADS>
__device__ __forceinline__ void layernorm_rows_to_shared(const T* __restrict__ x, const T* __restrict__ w,
                                                         const T* __restrict__ b, float eps, int m, int k, T* out,
                                                         float* scratch) {
  const int nvec = k / 8;
  for (int r = 0; r < m; ++r) {
    T* const row = out + r * k;
    float sum = 0.f;
#pragma unroll 1
    for (int c = threadIdx.x; c < nvec; c += THREADS) {
      const Vec<T, 8> xv = load_vec_cg<T, 8>(x + static_cast<int64_t>(r) * k + 8 * c);
      *reinterpret_cast<uint4*>(row + 8 * c) = *reinterpret_cast<const uint4*>(&xv);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += to_float(xv.v[e]);
    }
    const float mean = block_sum(sum, scratch) / k;
    float sq = 0.f;
#pragma unroll 1
    for (int c = threadIdx.x; c < nvec; c += THREADS) {
      Vec<T, 8> xv;
      *reinterpret_cast<uint4*>(&xv) = *reinterpret_cast<const uint4*>(row + 8 * c);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float d = to_float(xv.v[e]) - mean;
        sq += d * d;
      }
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / k + eps);
#pragma unroll 1
    for (int c = threadIdx.x; c < nvec; c += THREADS) {
      Vec<T, 8> xv;
      *reinterpret_cast<uint4*>(&xv) = *reinterpret_cast<const uint4*>(row + 8 * c);
      const Vec<T, 8> wv = load_vec<T, 8>(w + 8 * c), bv = load_vec<T, 8>(b + 8 * c);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        xv.v[e] = from_float<T>((to_float(xv.v[e]) - mean) * rstd * to_float(wv.v[e]) + to_float(bv.v[e]));
      *reinterpret_cast<uint4*>(row + 8 * c) = *reinterpret_cast<const uint4*>(&xv);
    }
  }
  __syncthreads();
}

// The parallel-residual layer's column-parallel pair (QKV from LN1(x), h->4h from LN2(x)) in ONE launch: blocks
// [0, blocks_a) compute a's tiles of channels, the others b's, each block exactly as quant_gemm_kernel's (the same
// loop, the same order of sums: bit for bit the separate launches of the same configuration). One launch instead of
// two saves a kernel boundary (the grid's drain, the dependent launch's wait, the first loads' latency) a layer.
// NORM: the dual LayerNorm too (a.x and b.x unused): each block normalises norm.x with its linear's LayerNorm into
// shared memory after the dependent launch's wait (its weights' first chunks already asked for) and reads x from
// there: one kernel a layer less again.
template <typename T, typename F, int NT, int CT, int S, int WARPS, int MIN_BLOCKS, bool PDL, bool NORM = false>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
quant_gemm_pair_kernel(QuantOperand<T> a, QuantOperand<T> b, const T* __restrict__ bias_a,
                       const T* __restrict__ bias_b, T* __restrict__ y_a, T* __restrict__ y_b, int m, int n_a,
                       int n_b, int blocks_a, int act_a, int act_b, QuantNorm<T> norm) {
  __shared__ float partial[WARPS][CT * NT * 4][32];
  __shared__ alignas(16) T xs[NORM ? kQuantNormMaxElems : 8];
  __shared__ float scratch[32];
  if (PDL) pdl_launch_dependents();
  float acc[CT][NT][4];
  zero_acc(acc);
  const bool first = static_cast<int>(blockIdx.x) < blocks_a;
  const int f0 = (first ? blockIdx.x : blockIdx.x - blocks_a) * 16 * CT;
  const T* const scales = first ? a.scales : b.scales;
  const int n = first ? n_a : n_b, k = first ? a.k : b.k;
  auto normalise = [&] {
    if constexpr (NORM)
      layernorm_rows_to_shared<T, WARPS * 32>(norm.x, first ? norm.w_a : norm.w_b, first ? norm.b_a : norm.b_b,
                                              norm.eps, m, k, xs, scratch);
  };
  quant_gemm_accumulate<T, F, NT, CT, S, WARPS, true, false, kQuantTiled, NORM>(
      NORM ? xs : (first ? a.x : b.x), first ? a.qweight : b.qweight, scales, nullptr, m, n, k,
      first ? a.group_size : b.group_size, f0, PDL, acc, normalise);
  quant_gemm_store<T, F, NT, CT, WARPS, true, false>(acc, partial, scales, first ? bias_a : bias_b, nullptr, nullptr,
                                                     first ? y_a : y_b, m, n, f0, first ? act_a : act_b);
}

// The layer's row-parallel pair summed (attention's dense and 4h->h, the same out_features): y = x_a W_a^T +
// x_b W_b^T + bias_a + bias_b + residual, each block's warps running a's chunks, then b's, into the same fp32 sums
// (a's first chunks asked for before the dependent launch's wait; b's are asked for when a's loop ends: one memory
// latency a block, where two launches pay a kernel boundary). y is rounded once.
// SUMNORM: then the next layer's dual LayerNorm of y by the last block to finish (layernorm.cuh's sum_norm_tail): the
// LayerNorm's kernel and its boundary are gone; the next pair reads LN_a(y) and LN_b(y) as the LayerNorm kernel's.
// BFIRST: b's chunks first, ALL of them before the dependent launch's wait (b.x read through L2 only), then a's (its
// first chunks asked for before the wait, x_a after it). In a decode layer b.x is the pair's output (4h) and a.x
// attention's (dense's input): the 4h->h stream runs while attention does, where a-first only asks for S chunks.
// Only where b.x is complete when this kernel starts: the kernel before it in the stream either does not trigger
// its dependents early (no PDL) or triggers them only after its own wait, as decode attention does with `pdl_late`
// (decode_attention.cuh), so that every kernel before that one has finished (launch_quant_gemm_sum's comment).
template <typename T, typename F, int NT, int CT, int S, int WARPS, int MIN_BLOCKS, bool PDL, bool SUMNORM = false,
          bool BFIRST = false>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
quant_gemm_sum_kernel(QuantOperand<T> a, QuantOperand<T> b, const T* __restrict__ bias_a,
                      const T* __restrict__ bias_b, const T* __restrict__ residual, T* __restrict__ y, int m, int n,
                      SumNorm<T> ln) {
  __shared__ float partial[WARPS][CT * NT * 4][32];
  if (PDL) pdl_launch_dependents();
  const int f0 = blockIdx.x * 16 * CT;
  float acc[CT][NT][4];
  zero_acc(acc);
  if constexpr (BFIRST) {
    quant_gemm_accumulate<T, F, NT, CT, S, WARPS, true, false, kQuantTiled, false, true>(
        b.x, b.qweight, b.scales, nullptr, m, n, b.k, b.group_size, f0, false, acc);
    int ka;  // opaque, as kb below
    asm volatile("mov.b32 %0, %1;" : "=r"(ka) : "r"(a.k));
    quant_gemm_accumulate<T, F, NT, CT, S, WARPS, true, false, kQuantTiled>(
        a.x, a.qweight, a.scales, nullptr, m, n, ka, a.group_size, f0, PDL, acc);
  } else {
    quant_gemm_accumulate<T, F, NT, CT, S, WARPS, true, false, kQuantTiled>(
        a.x, a.qweight, a.scales, nullptr, m, n, a.k, a.group_size, f0, PDL, acc);
    // b's row offsets are computed after a's loop (an opaque k: hoisted above it, they spilled a register there)
    int kb;
    asm volatile("mov.b32 %0, %1;" : "=r"(kb) : "r"(b.k));
    quant_gemm_accumulate<T, F, NT, CT, S, WARPS, true, false, kQuantTiled>(
        b.x, b.qweight, b.scales, nullptr, m, n, kb, b.group_size, f0, false, acc);
  }
  quant_gemm_store<T, F, NT, CT, WARPS, true, false>(acc, partial, a.scales, bias_a, bias_b, residual, y, m, n, f0,
                                                     0);
  if constexpr (SUMNORM) sum_norm_tail<T, WARPS * 32>(y, ln, m, n);
}

// Variants (the `variant` argument; bench sweeps): 0 auto, 1 one tile of 16 channels a warp (CT = 1, 3-4 chunks in
// flight), 2 two tiles (CT = 2, 2 chunks in flight: x read once for 32 channels). Above 16 rows only CT = 2 exists
// (variant 1 runs it too), except on a tiled narrow layer (QuantConfigWide: one tile at every row count). Auto: CT = 1
// up to 8 rows, and up to 16 for int8; CT = 2 above. Measured on one H100 (L2 cold, fp16, a ctypes probe of this
// header, copy 3024 GB/s), us, CT = 1 / CT = 2:
//   20B qkv (18432 x 6144) 1 row:   int8 50.9 / 54.0, int4 38.9 / 38.0;   16 rows: int8 53.0 / 64.2, int4 53.7 / 45.9
//   20B 4h->h (6144 x 24576) 1 row: int8 64.4 / 72.9, int4 45.4 / 51.4;   16 rows: int8 65.6 / 76.6, int4 65.4 / 62.3
// (the Triton tiles, same run: qkv int8 69.2, int4 1401; 4h->h int8 109.9, int4 2966; cuBLAS on the fp16 weight 90.2
// and 113.8). 64 rows: int8 qkv 114 us, 4h->h 141 (cuBLAS fp16 89, 117): there x from L2 and the dequantization, not
// the weight stream, set the time.
// (Those are the plain kernel, session 12. The LEAN kernel at ea4f514, one row, cold / back to back, us: int4 qkv
// 35.3 / 28.0 one tile, 34.1 / 27.9 two; h->4h 44.4 / 36.4, 39.0 / 32.4; 4h->h 40.3 / 32.8, 43.7 / 37.9; the plain
// kernel 37.3 / 30.0, 46.7 / 38.7, 44.1 / 37.0 in the same run; int8 unchanged.)
// 3: LEAN (constant-stride addressing; int4 in fp16: int4_pairs_lean) with its own choice of tiles (launch_quant_gemm);
// 4: LEAN with two tiles. Auto is 3 wherever LEAN runs (sm_80 and up, groups dividing 512, n row_bytes < 2^31), the
// plain kernel with 1 or 2's tiles elsewhere.
// 5: FOLD (the top comment) with LEAN's choice of tiles, in fp16 where LEAN runs; int4 only for groups of a multiple
// of 128 and up to 16 rows (kFoldInt4MaxTiles). Everywhere else (bf16, other groups, more rows) 5 runs 3. Its loop
// also addresses x and the weights from pointers carried by the loop (immediate offsets within an iteration) and asks
// for int4's scales and zeros two chunks ahead instead of S. Not measured on a GPU yet (written on the CPU machine:
// SASS counts above); auto stays 3 until it is.
enum QuantVariant : int {
  kQuantAuto = 0, kQuantOneTile = 1, kQuantTwoTiles = 2, kQuantLean = 3, kQuantLeanTwoTiles = 4, kQuantFold = 5,
  kQuantVariantLast = 5
};

inline int quant_max_rows() { return 64; }

// FOLD int4 up to this many tiles of 8 rows of x. Above, its chunk sums (a second set of accumulators, 4 CT NT
// registers) spill in the 4-warp configurations (32 and 96 bytes at 32 and 64 rows), and its mma, twice LEAN's
// (4 a k16 step, tile and tile of rows), would outnumber the rest of the loop: variant 5 runs LEAN there.
constexpr int kFoldInt4MaxTiles = 2;

// The configurations with a FOLD kernel: fp16; int4 up to kFoldInt4MaxTiles tiles of rows, and with one tile of
// channels only at one tile of rows (above 8 rows variant 5 takes two for int4; one would spill 8 bytes on sm_80).
template <typename T, typename F, int NT, int CT>
constexpr bool quant_fold_config() {
  return std::is_same<T, __half>::value && (!F::kGrouped || (NT <= kFoldInt4MaxTiles && (NT == 1 || CT == 2)));
}

// Per configuration (NT tiles of 8 rows of x, CT tiles of 16 channels a warp): warps of a block (the partial sums,
// WARPS x CT NT x 4 x 32 floats, stay <= 32 KB of shared memory), chunks in flight a lane (S) and the blocks a SM the
// registers are fitted to (__launch_bounds__), chosen so that no configuration spills on sm_75 or sm_90 (ptxas
// -warn-spills, scripts/compile_cuda.sh): 80 registers at three 8-warp blocks, 128 at two; the 4-warp blocks of 17-64
// rows 168 at three, 255 at two.
template <int NT, int CT> struct QuantConfig;
template <> struct QuantConfig<1, 1> { static constexpr int kWarps = 8, kSteps = 4, kMinBlocks = 3; };  // decode
template <> struct QuantConfig<2, 1> { static constexpr int kWarps = 8, kSteps = 3, kMinBlocks = 3; };
template <> struct QuantConfig<1, 2> { static constexpr int kWarps = 8, kSteps = 2, kMinBlocks = 2; };
template <> struct QuantConfig<2, 2> { static constexpr int kWarps = 8, kSteps = 2, kMinBlocks = 2; };
template <> struct QuantConfig<4, 2> { static constexpr int kWarps = 4, kSteps = 2, kMinBlocks = 3; };
template <> struct QuantConfig<8, 2> { static constexpr int kWarps = 4, kSteps = 2, kMinBlocks = 2; };
// A narrow layer (tiled weights, a grid of at most one block a SM at one tile of channels a block, e.g. pythia-1.4b's
// dense and 4h->h: 128 blocks): one tile of channels a block at every row count and 16 warps a block (8 at 33-64 rows,
// whose partial sums would pass 32 KB), k split finer, so that every SM holds a block and twice the warps and loads.
// Decode: bench/NOTES.md session 18, 1.4b int4 4h->h 8.4 -> 5.9 us, dense 3.2 -> 2.7 on an H100. Above 8 rows the
// 4-warp CT = 2 configurations fill 64 of 132 SMs there (1.4b int8 4h->h at 32 rows 39.8 us against cuBLAS's 18.1).
// One block a SM: 128 registers a thread at 16 warps.
template <int NT> struct QuantConfigWide;
template <> struct QuantConfigWide<1> { static constexpr int kWarps = 16, kSteps = 4, kMinBlocks = 1; };
template <> struct QuantConfigWide<2> { static constexpr int kWarps = 16, kSteps = 3, kMinBlocks = 1; };
template <> struct QuantConfigWide<4> { static constexpr int kWarps = 16, kSteps = 2, kMinBlocks = 1; };
template <> struct QuantConfigWide<8> { static constexpr int kWarps = 8, kSteps = 2, kMinBlocks = 1; };

template <typename T, typename F, int NT, int CT, bool LEAN = false, bool FOLD = false, int TILED = 0,
          bool WIDE = false>
cudaError_t launch_quant_gemm_config(const T* x, const void* qweight, const T* scales, const uint8_t* zeros,
                                     const T* bias, const T* residual, T* y, int m, int n, int k, int group_size,
                                     int act, bool pdl, cudaStream_t stream) {
  using C = std::conditional_t<WIDE, QuantConfigWide<NT>, QuantConfig<NT, CT>>;
  constexpr int WARPS = C::kWarps, S = C::kSteps, MIN_BLOCKS = C::kMinBlocks;
  const dim3 grid((n + 16 * CT - 1) / (16 * CT)), block(WARPS * 32);
  const auto* q = static_cast<const uint8_t*>(qweight);
  return launch_kernel(pdl, quant_gemm_kernel<T, F, NT, CT, S, WARPS, MIN_BLOCKS, false, LEAN, FOLD, TILED>,
                       quant_gemm_kernel<T, F, NT, CT, S, WARPS, MIN_BLOCKS, true, LEAN, FOLD, TILED>, grid, block,
                       stream, x, q, scales, zeros, bias, residual, y, m, n, k, group_size, act);
}

// The tiled layout (TILED in quant_gemm_kernel: the weight as neox_rt/quant/formats.py's tile_rows leaves it, int4's
// scales and zeros as words scale bits | zero << 16 [n / 16][groups][16]) is read by the LEAN loop only: where LEAN can
// run (quant_tiled_ok), every variant runs it (1 and 2 with their tiles).

template <typename F>
inline bool quant_lean_ok(int n, int k, int group_size) {
  // LEAN needs the group to divide 128 WARPS (WARPS is 4 or 8: dividing 512 suffices) and 32-bit offsets into the
  // weight (n rounded up to a tile of 16 rows)
  return (!F::kGrouped || 512 % group_size == 0) &&
         static_cast<int64_t>((n + 15) / 16 * 16) * F::row_bytes(k) + 512 < (int64_t{1} << 31);
}

template <typename T, typename F>
cudaError_t launch_quant_gemm(const T* x, const void* qweight, const T* scales, const uint8_t* zeros, const T* bias,
                              const T* residual, T* y, int m, int n, int k, int group_size, int act, int variant,
                              bool tiled, bool pdl, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (m < 0 || m > quant_max_rows() || k <= 0 || k % F::kChunkK != 0 || variant < kQuantAuto ||
      variant > kQuantVariantLast)
    return cudaErrorInvalidValue;
  if (F::kGrouped && (group_size <= 0 || group_size % 32 != 0 || k % group_size != 0)) return cudaErrorInvalidValue;
  if (!gemv_mma_supported<T>()) return cudaErrorNotSupported;  // bf16 mma needs sm_80
  // elsewhere the LEAN variants run the plain kernel
  const bool lean_ok = quant_lean_ok<F>(n, k, group_size);
  if (tiled && (!lean_ok || kernel_arch() < 80)) return cudaErrorInvalidValue;
  if (variant == kQuantAuto) variant = kQuantLean;
  const bool lean = tiled || (lean_ok && variant >= kQuantLean);
  // FOLD: fp16 only (16384 + 16 q is not exact in bf16's 8 bits), and int4 only where a chunk (128 values) is one group
  // (its sums share one scale and zero point a row) and up to 16 rows (kFoldInt4MaxTiles); elsewhere variant 5 runs
  // LEAN (or the plain kernel where LEAN cannot run)
  constexpr bool kFoldable = std::is_same<T, __half>::value;  // bf16 never instantiates a FOLD kernel
  const bool fold = kFoldable && lean && variant == kQuantFold &&
                    (!F::kGrouped || (group_size % 128 == 0 && m <= 8 * kFoldInt4MaxTiles));
  // Tiles a warp: forced by variants 1, 2 and 4; else one up to 8 rows (16 for int8), two above, and LEAN int4 takes two
  // at up to 8 rows where the grid still fills the card twice over (h->4h and 20B's qkv, not 4h->h or dense:
  // bench/quant_kernels.py on the H100). Tiled narrow layers (QuantConfigWide): one at every row count.
  const bool narrow = tiled && (n + 15) / 16 <= device_sm_count();
  const int ct = variant == kQuantOneTile || variant == kQuantTwoTiles ? variant
                 : variant == kQuantLeanTwoTiles                       ? 2
                 : narrow                                              ? 1
                 : m <= 8 ? (lean && F::kGrouped && n >= 8192 ? 2 : 1)
                 : m <= 16 && !F::kGrouped ? 1 : 2;
#define NEOX_RT_QUANT_LAUNCH(NT_, CT_, LEAN_, FOLD_, TILED_, ...)                                                     \
  launch_quant_gemm_config<T, F, NT_, CT_, LEAN_, FOLD_, TILED_, ##__VA_ARGS__>(                                      \
      x, qweight, scales, zeros, bias, residual, y, m, n, k, group_size, act, pdl, stream)
#define NEOX_RT_QUANT_CONFIG(NT_, CT_)                                                                                \
  {                                                                                                                   \
    constexpr bool kFoldCfg = quant_fold_config<T, F, NT_, CT_>();                                                    \
    if (tiled) return fold ? NEOX_RT_QUANT_LAUNCH(NT_, CT_, true, kFoldCfg, kQuantTiled)                              \
                           : NEOX_RT_QUANT_LAUNCH(NT_, CT_, true, false, kQuantTiled);                                \
    return fold ? NEOX_RT_QUANT_LAUNCH(NT_, CT_, true, kFoldCfg, 0)                                                   \
           : lean ? NEOX_RT_QUANT_LAUNCH(NT_, CT_, true, false, 0)                                                    \
                  : NEOX_RT_QUANT_LAUNCH(NT_, CT_, false, false, 0);                                                  \
  }
#define NEOX_RT_QUANT_WIDE(NT_)                                                                                       \
  {                                                                                                                   \
    constexpr bool kFoldCfg = NT_ == 1 && quant_fold_config<T, F, 1, 1>();                                            \
    return fold ? NEOX_RT_QUANT_LAUNCH(NT_, 1, true, kFoldCfg, kQuantTiled, true)                                     \
                : NEOX_RT_QUANT_LAUNCH(NT_, 1, true, false, kQuantTiled, true);                                       \
  }
  // tiled, one tile a block where the grid is at most one block a SM (QuantConfigWide; FOLD at up to 8 rows only:
  // variant 5 runs LEAN above)
  if (narrow && ct == 1) {
    if (m <= 8) NEOX_RT_QUANT_WIDE(1);
    if (m <= 16) NEOX_RT_QUANT_WIDE(2);
    if (m <= 32) NEOX_RT_QUANT_WIDE(4);
    NEOX_RT_QUANT_WIDE(8);
  }
  if (m <= 8) {
    if (ct == 1) NEOX_RT_QUANT_CONFIG(1, 1);
    NEOX_RT_QUANT_CONFIG(1, 2);
  }
  if (m <= 16) {
    if (ct == 1) NEOX_RT_QUANT_CONFIG(2, 1);
    NEOX_RT_QUANT_CONFIG(2, 2);
  }
  if (m <= 32) NEOX_RT_QUANT_CONFIG(4, 2);
  NEOX_RT_QUANT_CONFIG(8, 2);
#undef NEOX_RT_QUANT_WIDE
#undef NEOX_RT_QUANT_CONFIG
#undef NEOX_RT_QUANT_LAUNCH
}

// The fused launches of a parallel-residual layer's pairs of linears (quant_gemm_pair_kernel, quant_gemm_sum_kernel):
// tiled weights of one format (sm_80 and up, LEAN's bounds), 1-8 rows of x (decode and small batches), the auto
// variant's configuration.
inline int quant_fused_max_rows() { return 8; }

template <typename F, typename T>
inline bool quant_operand_ok(const QuantOperand<T>& o, int n) {
  return n > 0 && o.k > 0 && o.k % F::kChunkK == 0 &&
         (!F::kGrouped || (o.group_size > 0 && o.group_size % 32 == 0 && o.k % o.group_size == 0)) &&
         quant_lean_ok<F>(n, o.k, o.group_size);
}

template <typename T, typename F>
cudaError_t quant_fused_check(const QuantOperand<T>& a, int n_a, const QuantOperand<T>& b, int n_b, int m) {
  if (m < 0 || m > quant_fused_max_rows() || !quant_operand_ok<F>(a, n_a) || !quant_operand_ok<F>(b, n_b))
    return cudaErrorInvalidValue;
  if (!gemv_mma_supported<T>()) return cudaErrorNotSupported;
  return kernel_arch() >= 80 ? cudaSuccess : cudaErrorInvalidValue;  // the tiled layout: the LEAN loop, sm_80+
}

// y_a = act_a(x_a W_a^T + bias_a), y_b = act_b(x_b W_b^T + bias_b) in one launch. Tiles of channels a warp: one for
// both, two where both layers fill the card twice over (int4, n >= 8192: 20B's qkv and h->4h), as the single launches
// choose at up to 8 rows, and two for either format with the LayerNorm inside (half the blocks normalise x: on one
// H100, 1.4b at one row, int4 with an int8 LM head 0.74 -> 0.70 ms a token, int8 0.87 -> 0.80; bench/NOTES.md
// sessions 20 and 21); 4 warps a block, with twice the blocks a SM of the single launch's 8 (each warp streams twice
// the chunks: a third of a 20B int4 warp's chunks drained its ring at 8. One H100, with an int8 LM head, 20B int4
// 4.86 -> 4.74-4.78 ms a token, 1.4b int4 0.70 -> 0.66, bench/NOTES.md session 22; 20B int8 7.55 -> 7.51, 1.4b int8
// 0.83 -> 0.77, session 23). Where a single launch takes another number of tiles or warps (or a narrow layer's 16)
// the sums' order differs from it, not their error.
// With `norm` (its x not null): y_a from LN_a(norm.x), y_b from LN_b(norm.x) (a.x, b.x unused; a.k == b.k, the
// hidden size: a multiple of 8, and m k <= kQuantNormMaxElems). `ct`: the tiles a warp (0: as above; 1 or 2 forced,
// for A/B runs). `warps`: the warps a block (0: 4; 8 or 4 forced, for tests and A/B runs).

// The pair's configuration: QuantConfig's at one row, its warps a block W, the blocks a SM scaled to keep the warps a SM.
template <int CT, int W>
struct QuantPairConfig {
  using C = QuantConfig<1, CT>;
  static constexpr int kWarps = W, kSteps = C::kSteps, kMinBlocks = C::kMinBlocks * C::kWarps / W;
};

template <typename T, typename F>
cudaError_t launch_quant_gemm_pair(const QuantOperand<T>& a, const QuantOperand<T>& b, const T* bias_a,
                                   const T* bias_b, T* y_a, T* y_b, int m, int n_a, int n_b, int act_a, int act_b,
                                   bool pdl, cudaStream_t stream, const QuantNorm<T>& norm = QuantNorm<T>{},
                                   int ct = 0, int warps = 0) {
  if (const cudaError_t e = quant_fused_check<T, F>(a, n_a, b, n_b, m); e != cudaSuccess) return e;
  if (ct < 0 || ct > 2 || (warps != 0 && warps != 8 && warps != 4)) return cudaErrorInvalidValue;
  const bool normed = norm.x != nullptr;
  if (normed && (a.k != b.k || a.k % 8 != 0 || static_cast<int64_t>(m) * a.k > kQuantNormMaxElems ||
                 norm.w_a == nullptr || norm.b_a == nullptr || norm.w_b == nullptr || norm.b_b == nullptr))
    return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  auto go_warps = [&](auto ct, auto w) {
    constexpr int CT = decltype(ct)::value;
    using C = QuantPairConfig<CT, decltype(w)::value>;
    const int blocks_a = ceil_div(n_a, 16 * CT), blocks_b = ceil_div(n_b, 16 * CT);
    const dim3 grid(blocks_a + blocks_b), block(C::kWarps * 32);
    if (normed)
      return launch_kernel(pdl, quant_gemm_pair_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, false, true>,
                           quant_gemm_pair_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, true, true>, grid,
                           block, stream, a, b, bias_a, bias_b, y_a, y_b, m, n_a, n_b, blocks_a, act_a, act_b, norm);
    return launch_kernel(pdl, quant_gemm_pair_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, false>,
                         quant_gemm_pair_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, true>, grid, block,
                         stream, a, b, bias_a, bias_b, y_a, y_b, m, n_a, n_b, blocks_a, act_a, act_b, norm);
  };
  auto go = [&](auto ct) {
    if (warps == 8) return go_warps(ct, std::integral_constant<int, 8>{});
    return go_warps(ct, std::integral_constant<int, 4>{});
  };
  if (ct == 2 || (ct == 0 && (normed || (F::kGrouped && min(n_a, n_b) >= 8192))))
    return go(std::integral_constant<int, 2>{});
  return go(std::integral_constant<int, 1>{});
}

// y = x_a W_a^T + x_b W_b^T + bias_a + bias_b + residual (W_a, W_b of n output features) in one launch, in the
// configuration the single launch takes for a layer of n channels at up to 8 rows: a narrow layer's 16 warps
// (QuantConfigWide) where the grid is at most one block a SM, else two tiles a warp for int4 at n >= 8192, one
// elsewhere. With `ln` (its ticket not null): also LN_a(y) and LN_b(y) (quant_gemm_sum_kernel's SUMNORM; n a multiple
// of 8 within sum_norm_ok, up to kSumNormMaxRows rows). `b_first`: quant_gemm_sum_kernel's BFIRST (b's chunks, all
// before the dependent launch's wait, then a's); the caller's promise that b.x is complete when this launch starts:
// the kernel before it does not trigger early (decode attention launched with `pdl_late`, or no PDL at all). The
// same sums in another order (a's chunks after b's).
template <typename T, typename F>
cudaError_t launch_quant_gemm_sum(const QuantOperand<T>& a, const QuantOperand<T>& b, const T* bias_a,
                                  const T* bias_b, const T* residual, T* y, int m, int n, bool pdl,
                                  cudaStream_t stream, const SumNorm<T>& ln = SumNorm<T>{}, bool b_first = false) {
  if (const cudaError_t e = quant_fused_check<T, F>(a, n, b, n, m); e != cudaSuccess) return e;
  const bool normed = ln.ticket != nullptr;
  if (normed && (!sum_norm_ok(n, m) || ln.w_a == nullptr || ln.b_a == nullptr || ln.w_b == nullptr ||
                 ln.b_b == nullptr || ln.out_a == nullptr || ln.out_b == nullptr))
    return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  auto go_order = [&](auto ct, auto wide, auto bfirst) {
    constexpr int CT = decltype(ct)::value;
    constexpr bool BF = decltype(bfirst)::value;
    using C = std::conditional_t<decltype(wide)::value, QuantConfigWide<1>, QuantConfig<1, CT>>;
    const dim3 grid(ceil_div(n, 16 * CT)), block(C::kWarps * 32);
    if (normed)
      return launch_kernel(
          pdl, quant_gemm_sum_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, false, true, BF>,
          quant_gemm_sum_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, true, true, BF>, grid, block,
          stream, a, b, bias_a, bias_b, residual, y, m, n, ln);
    return launch_kernel(pdl, quant_gemm_sum_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, false, false, BF>,
                         quant_gemm_sum_kernel<T, F, 1, CT, C::kSteps, C::kWarps, C::kMinBlocks, true, false, BF>,
                         grid, block, stream, a, b, bias_a, bias_b, residual, y, m, n, ln);
  };
  auto go = [&](auto ct, auto wide) {
    return b_first ? go_order(ct, wide, std::true_type{}) : go_order(ct, wide, std::false_type{});
  };
  if ((n + 15) / 16 <= device_sm_count()) return go(std::integral_constant<int, 1>{}, std::true_type{});
  if (F::kGrouped && n >= 8192) return go(std::integral_constant<int, 2>{}, std::false_type{});
  return go(std::integral_constant<int, 1>{}, std::false_type{});
}

// W8A16: qweight int8 [n, k], scales [n] of x's dtype. k % 64 == 0, m <= 64.
template <typename T>
cudaError_t launch_quant_linear_int8(const T* x, const int8_t* qweight, const T* scales, const T* bias,
                                     const T* residual, T* y, int m, int n, int k, int act, int variant, bool pdl,
                                     cudaStream_t stream) {
  return launch_quant_gemm<T, QuantInt8>(x, qweight, scales, nullptr, bias, residual, y, m, n, k, 0, act, variant,
                                         false, pdl, stream);
}

// W8A16, tiled: qweight int8 [n rounded up to 16, k] in the tiled layout, scales [n]. sm_80+, LEAN's bounds.
template <typename T>
cudaError_t launch_quant_linear_int8_tiled(const T* x, const int8_t* qweight, const T* scales, const T* bias,
                                           const T* residual, T* y, int m, int n, int k, int act, int variant,
                                           bool pdl, cudaStream_t stream) {
  return launch_quant_gemm<T, QuantInt8>(x, qweight, scales, nullptr, bias, residual, y, m, n, k, 0, act, variant,
                                         true, pdl, stream);
}

// W4A16: qweight int32 [n, k / 8], scales [n, k / group] of x's dtype, zeros uint8 [n, k / group]. k % 128 == 0,
// group % 32 == 0, k % group == 0, m <= 64.
template <typename T>
cudaError_t launch_quant_linear_int4(const T* x, const int32_t* qweight, const T* scales, const uint8_t* zeros,
                                     const T* bias, const T* residual, T* y, int m, int n, int k, int group_size,
                                     int act, int variant, bool pdl, cudaStream_t stream) {
  return launch_quant_gemm<T, QuantInt4>(x, qweight, scales, zeros, bias, residual, y, m, n, k, group_size, act,
                                         variant, false, pdl, stream);
}

// W4A16, tiled: qweight int32 [n rounded up to 16, k / 8] in the tiled layout, scale_zero int32 [n / 16, k / group,
// 16] (scale bits | zero << 16; scales of x's dtype). sm_80+, LEAN's bounds (groups dividing 512).
template <typename T>
cudaError_t launch_quant_linear_int4_tiled(const T* x, const int32_t* qweight, const int32_t* scale_zero,
                                           const T* bias, const T* residual, T* y, int m, int n, int k,
                                           int group_size, int act, int variant, bool pdl, cudaStream_t stream) {
  return launch_quant_gemm<T, QuantInt4>(x, qweight, reinterpret_cast<const T*>(scale_zero), nullptr, bias, residual,
                                         y, m, n, k, group_size, act, variant, true, pdl, stream);
}

}  // namespace neox_rt
