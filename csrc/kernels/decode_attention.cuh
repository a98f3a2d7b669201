// Decode attention (one query per sequence) over a KV cache, split over the cached length (flash-decoding).
//
// out[i, h] = softmax_j(scale * q[i, h] . k[i, h, j]) @ v[i, h, j] over slots j < seqlens[i]; fp32 math.
// Kernel 1: grid (splits, nh, b); block (split, h, i) covers slots [split * split_len, +split_len) and writes
//   the split's max m, sum l = sum exp(score - m) and unnormalized output acc = sum exp(score - m) v.
//   Blocks past seqlens[i] exit at once. The grid comes from the cache capacity, never from seqlens, so
//   there is no host sync and the launch can be captured in a CUDA graph.
// Kernel 2: grid (nh, b); merges the valid splits of each (i, h): M = max m, out = sum e^(m-M) acc / sum e^(m-M) l.
// Each warp takes one key at a time; lane owns pairs of dims (d = 2 * (lane + 32 * r)), so HD may be any even
// size up to 256 (the family uses 32, 64, 80, 96, 128, 256).
#pragma once

#include "common.cuh"

namespace neox_rt {

constexpr int kDecodeThreads = 128;  // 4 warps per split

template <typename T> struct Pair;
template <> struct Pair<float> { using type = float2; };
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T>
__device__ __forceinline__ float2 load_pair(const T* p) {
  const typename Pair<T>::type v = *reinterpret_cast<const typename Pair<T>::type*>(p);
  return make_float2(to_float(v.x), to_float(v.y));
}

template <typename T, int HD>
__global__ void __launch_bounds__(kDecodeThreads)
decode_attention_split_kernel(const T* __restrict__ q,               // [b, nh, HD]
                              const T* __restrict__ k_cache,         // [B, nh, T, HD]
                              const T* __restrict__ v_cache,         // [B, nh, T, HD]
                              const int64_t* __restrict__ seqlens,   // [b]
                              float* __restrict__ part_out,          // [b, nh, splits, HD]
                              float* __restrict__ part_ml,           // [b, nh, splits, 2] (max, sum)
                              int nh, int64_t capacity, int split_len, int splits, float scale_log2) {
  static_assert(HD % 2 == 0 && HD <= 256, "head size must be even and <= 256");
  constexpr int R = (HD / 2 + 31) / 32;  // dim pairs per lane
  constexpr int NW = kDecodeThreads / 32;
  const int split = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
  const int64_t len = seqlens[i] < capacity ? seqlens[i] : capacity;
  const int64_t start = static_cast<int64_t>(split) * split_len;
  if (start >= len) return;  // the reduce kernel only reads splits below len
  const int64_t end = start + split_len < len ? start + split_len : len;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  const int64_t bh = static_cast<int64_t>(i) * nh + h;
  const T* qp = q + bh * HD;
  float2 qv[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int d = 2 * (lane + 32 * r);
    qv[r] = d < HD ? load_pair(qp + d) : make_float2(0.f, 0.f);
    qv[r].x *= scale_log2;  // scores in log2 units: exp2(score) == exp(scale * q.k)
    qv[r].y *= scale_log2;
  }
  const T* kb = k_cache + bh * capacity * HD;
  const T* vb = v_cache + bh * capacity * HD;

  float m = -INFINITY, l = 0.f;
  float2 acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = make_float2(0.f, 0.f);

  for (int64_t j = start + warp; j < end; j += NW) {
    const T* kj = kb + j * HD;
    float dot = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int d = 2 * (lane + 32 * r);
      if (d < HD) {
        const float2 kv = load_pair(kj + d);
        dot += qv[r].x * kv.x + qv[r].y * kv.y;
      }
    }
    const float score = warp_sum(dot);
    const float m_new = fmaxf(m, score);
    const float correction = exp2f(m - m_new);  // 0 on the first key (m = -inf)
    const float weight = exp2f(score - m_new);
    l = l * correction + weight;
    const T* vj = vb + j * HD;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int d = 2 * (lane + 32 * r);
      if (d < HD) {
        const float2 vv = load_pair(vj + d);
        acc[r].x = acc[r].x * correction + weight * vv.x;
        acc[r].y = acc[r].y * correction + weight * vv.y;
      }
    }
    m = m_new;
  }

  // Merge the warps of this block.
  __shared__ float s_m[NW], s_l[NW];
  __shared__ float s_acc[NW][HD];
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int d = 2 * (lane + 32 * r);
    if (d < HD) {
      s_acc[warp][d] = acc[r].x;
      s_acc[warp][d + 1] = acc[r].y;
    }
  }
  __syncthreads();
  float bm = -INFINITY;
#pragma unroll
  for (int w = 0; w < NW; ++w) bm = fmaxf(bm, s_m[w]);
  const int64_t part = bh * splits + split;
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) o += s_m[w] == -INFINITY ? 0.f : exp2f(s_m[w] - bm) * s_acc[w][d];
    part_out[part * HD + d] = o;
  }
  if (threadIdx.x == 0) {
    float bl = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) bl += s_m[w] == -INFINITY ? 0.f : exp2f(s_m[w] - bm) * s_l[w];
    part_ml[part * 2] = bm;
    part_ml[part * 2 + 1] = bl;
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(HD)
decode_attention_reduce_kernel(const float* __restrict__ part_out,    // [b, nh, splits, HD]
                               const float* __restrict__ part_ml,     // [b, nh, splits, 2]
                               const int64_t* __restrict__ seqlens,   // [b]
                               T* __restrict__ out,                   // [b, nh, HD]
                               int nh, int64_t capacity, int split_len, int splits) {
  const int h = blockIdx.x, i = blockIdx.y, d = threadIdx.x;
  const int64_t len = seqlens[i] < capacity ? seqlens[i] : capacity;
  const int64_t bh = static_cast<int64_t>(i) * nh + h;
  const int used = len <= 0 ? 0 : static_cast<int>((len + split_len - 1) / split_len);
  float big = -INFINITY;
  for (int sp = 0; sp < used; ++sp) big = fmaxf(big, part_ml[(bh * splits + sp) * 2]);
  float num = 0.f, den = 0.f;
  for (int sp = 0; sp < used; ++sp) {
    const float w = exp2f(part_ml[(bh * splits + sp) * 2] - big);
    den += w * part_ml[(bh * splits + sp) * 2 + 1];
    num += w * part_out[(bh * splits + sp) * HD + d];
  }
  // An empty sequence (seqlens[i] == 0) has nothing to attend to: write zeros rather than NaN.
  out[bh * HD + d] = from_float<T>(den > 0.f ? num / den : 0.f);
}

// Splits: ceil(capacity / split_len). The caller allocates part_out [b*nh*splits*HD] and
// part_ml [b*nh*splits*2] floats.
inline int decode_attention_splits(int64_t capacity, int split_len) { return ceil_div(capacity, split_len); }

template <typename T, int HD>
cudaError_t launch_decode_attention_hd(const T* q, const T* k_cache, const T* v_cache, const int64_t* seqlens,
                                       T* out, float* part_out, float* part_ml, int b, int nh, int64_t capacity,
                                       int split_len, float scale, cudaStream_t stream) {
  const int splits = decode_attention_splits(capacity, split_len);
  if (b == 0 || nh == 0) return cudaSuccess;
  const float scale_log2 = scale * 1.4426950408889634f;
  if (splits > 0) {
    decode_attention_split_kernel<T, HD><<<dim3(splits, nh, b), kDecodeThreads, 0, stream>>>(
        q, k_cache, v_cache, seqlens, part_out, part_ml, nh, capacity, split_len, splits, scale_log2);
  }
  decode_attention_reduce_kernel<T, HD><<<dim3(nh, b), HD, 0, stream>>>(part_out, part_ml, seqlens, out, nh,
                                                                         capacity, split_len, splits);
  return cudaGetLastError();
}

// head_dim must be one of 32, 64, 80, 96, 128, 256 (returns cudaErrorInvalidValue otherwise).
template <typename T>
cudaError_t launch_decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* seqlens, T* out,
                                    float* part_out, float* part_ml, int b, int nh, int head_dim, int64_t capacity,
                                    int split_len, float scale, cudaStream_t stream) {
  switch (head_dim) {
#define NEOX_RT_DECODE(HD)                                                                              \
  case HD:                                                                                              \
    return launch_decode_attention_hd<T, HD>(q, k_cache, v_cache, seqlens, out, part_out, part_ml, b, nh, \
                                             capacity, split_len, scale, stream);
    NEOX_RT_DECODE(32)
    NEOX_RT_DECODE(64)
    NEOX_RT_DECODE(80)
    NEOX_RT_DECODE(96)
    NEOX_RT_DECODE(128)
    NEOX_RT_DECODE(256)
#undef NEOX_RT_DECODE
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace neox_rt
