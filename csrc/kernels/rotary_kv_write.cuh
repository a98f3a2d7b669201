// Fused NeoX rotary embedding + KV-cache write, one pass over the fused QKV projection.
//
// qkv is per head: feature head*3*hd + part*hd + d (part 0 = q, 1 = k, 2 = v). For token (i, j) at position
// p = positions[i, j], the first rd = rotary_ndims dims of q and k are rotated (rotate-half pairing, dim d
// with d + rd/2, angles cos/sin[p], fp32 math); the rest pass through. k and v go to cache row i, slot p;
// the rotated q is returned. Each thread moves VEC consecutive elements of one head (VEC * sizeof(T) bytes,
// 16 where head size, rd/2 and alignment allow), so a vector never straddles the rotated/pass-through
// boundary or the two rotary halves. With PDL (sm_90 programmatic dependent launch) the kernel lets its dependent
// (decode attention, which then prefetches old cache slots) launch at once and waits for qkv before reading it.
#pragma once

#include "common.cuh"

namespace neox_rt {

// One rotated value, x cos + x_partner sin (sin negated for the first half), fp32 products and sum each rounded
// once (no contraction: the rotary kernel and the fused decode attention (decode_attention.cuh) give the same bits,
// as the reference's separate fp32 operations do).
__device__ __forceinline__ float rotate_value(float x, float xp, float cs, float sn) {
  return __fadd_rn(__fmul_rn(x, cs), __fmul_rn(xp, sn));
}

// Rotate the VEC values of x, dims d0 .. d0 + VEC - 1 of a head whose row starts at `row` (partners read from
// there through the L2, one value at a time: any rd / 2 alignment), at table row p_tab. Dims at or past rd pass.
template <typename T, int VEC>
__device__ __forceinline__ void rotate_dims(Vec<T, VEC>& x, const T* row, int d0, int rd, const float* cos_table,
                                            const float* sin_table, int64_t p_tab) {
  const int half = rd / 2;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int d = d0 + e;
    if (d < rd) {
      const bool first = d < half;
      const int f = first ? d : d - half;
      const float xp = to_float(load_vec_cg<T, 1>(row + (first ? d + half : d - half)).v[0]);
      const float cs = __ldg(cos_table + p_tab * half + f);
      const float sn = __ldg(sin_table + p_tab * half + f);
      x.v[e] = from_float<T>(rotate_value(to_float(x.v[e]), xp, cs, first ? -sn : sn));
    }
  }
}

template <typename T, int VEC, bool PDL>
__global__ void rotary_kv_write_kernel(const T* __restrict__ qkv,             // [b, s, nh*3*hd]
                                       const int64_t* __restrict__ positions, // [b, s]
                                       const float* __restrict__ cos_table,   // [max_pos, rd/2]
                                       const float* __restrict__ sin_table,   // [max_pos, rd/2]
                                       T* __restrict__ q_out,                 // [b, s, nh, hd]
                                       T* __restrict__ k_cache,               // [B, nh, T, hd]
                                       T* __restrict__ v_cache,               // [B, nh, T, hd]
                                       int s, int nh, int hd, int rd, int64_t capacity, int64_t max_pos) {
  if (PDL) {
    pdl_launch_dependents();
    pdl_wait();  // qkv and positions come from earlier kernels
  }
  // qkv and positions through the L2 only: with PDL the previous kernel may still be running when this one starts.
  const int64_t token = blockIdx.x;  // i * s + j
  const int64_t i = token / s;
  int64_t p = __ldcg(positions + token);
  const bool in_cache = p >= 0 && p < capacity;       // slots outside the cache are not written
  const int64_t p_tab = p < 0 ? 0 : (p >= max_pos ? max_pos - 1 : p);
  const int half = rd / 2;
  const int chunks_per_head = hd / VEC;
  const T* src = qkv + token * static_cast<int64_t>(nh) * 3 * hd;
  for (int c = threadIdx.x; c < nh * chunks_per_head; c += blockDim.x) {
    const int h = c / chunks_per_head;
    const int d0 = (c - h * chunks_per_head) * VEC;
    const T* head = src + static_cast<int64_t>(h) * 3 * hd;
    Vec<T, VEC> q = load_vec_cg<T, VEC>(head + d0);
    Vec<T, VEC> k = load_vec_cg<T, VEC>(head + hd + d0);
    const Vec<T, VEC> v = load_vec_cg<T, VEC>(head + 2 * hd + d0);
    if (d0 < rd) {
      // out[d] = x[d] * cos - x[d + half] * sin (first half); x[d] * cos + x[d - half] * sin (second half)
      const bool first = d0 < half;
      const int partner = first ? d0 + half : d0 - half;
      const int f0 = first ? d0 : d0 - half;  // frequency index
      const Vec<T, VEC> qp = load_vec_cg<T, VEC>(head + partner);
      const Vec<T, VEC> kp = load_vec_cg<T, VEC>(head + hd + partner);
      const float sign = first ? -1.f : 1.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float cs = cos_table[p_tab * half + f0 + e];
        const float sn = sin_table[p_tab * half + f0 + e] * sign;
        q.v[e] = from_float<T>(rotate_value(to_float(q.v[e]), to_float(qp.v[e]), cs, sn));
        k.v[e] = from_float<T>(rotate_value(to_float(k.v[e]), to_float(kp.v[e]), cs, sn));
      }
    }
    store_vec<T, VEC>(q_out + (token * nh + h) * hd + d0, q);
    if (in_cache) {
      const int64_t slot = ((i * nh + h) * capacity + p) * hd + d0;
      store_vec<T, VEC>(k_cache + slot, k);
      store_vec<T, VEC>(v_cache + slot, v);
    }
  }
}

// vec: elements per thread (1, 2, 4 or 8; the launcher picks the largest that divides hd and rd/2 and keeps
// every pointer aligned). tokens = b * s. `pdl` needs sm_90 (the caller checks the device).
template <typename T>
cudaError_t launch_rotary_kv_write(const T* qkv, const int64_t* positions, const float* cos_table,
                                   const float* sin_table, T* q_out, T* k_cache, T* v_cache, int b, int s, int nh,
                                   int hd, int rd, int64_t capacity, int64_t max_pos, int vec, bool pdl,
                                   cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(b) * s;
  if (tokens == 0) return cudaSuccess;
  const int work = nh * hd / vec;
  int threads = ((work + 31) / 32) * 32;
  threads = threads > 512 ? 512 : threads;
  const dim3 grid(static_cast<unsigned>(tokens));
#define NEOX_RT_ROTARY(V)                                                                                   \
  launch_kernel(pdl, rotary_kv_write_kernel<T, V, false>, rotary_kv_write_kernel<T, V, true>, grid, dim3(threads), \
                stream, qkv, positions, cos_table, sin_table, q_out, k_cache, v_cache, s, nh, hd, rd, capacity,     \
                max_pos)
  switch (vec) {
    case 8: return NEOX_RT_ROTARY(8);
    case 4: return NEOX_RT_ROTARY(4);
    case 2: return NEOX_RT_ROTARY(2);
    default: return NEOX_RT_ROTARY(1);
  }
#undef NEOX_RT_ROTARY
}

}  // namespace neox_rt
