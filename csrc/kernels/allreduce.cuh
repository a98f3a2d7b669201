// One-shot all-reduce of a small tensor (decode's hidden state, 12 KB a token for 20B) over peer-to-peer memory
// (NVLink), as one single-block kernel that can sit in the programmatic-dependent-launch chain of the decode graph.
//
// Why: NCCL's all-reduce of 12 KB costs ~7.6 us inside a CUDA graph (two H200s, bench/NOTES.md, session 8), ~0.37
// ms of a 20B token at TP=2 on two H100s, and its kernel breaks the PDL chain, so the LayerNorm after it cannot
// launch early. Measured on two H100s (session 10): 20B TP=2 7.68 ms with this kernel, 7.48 with its push and
// reduction fused into the kernels around it (gemv_fused.cuh, layernorm.cuh), 7.88 with NCCL. Here every rank PUSHES its input into each peer's buffer and reads the peers' pushes from its own: one
// NVLink one-way trip. The pushes carry their own flags (NCCL's "LL" scheme): each 16-byte store holds 8 bytes of
// data as two 4-byte halves, each beside the call's sequence number, and an 8-byte half arrives whole, so a reader
// that sees the sequence number in both flag words has the data: no fence, no separate signal.
//
// Each rank's buffer (symmetric: the same layout on every rank, each mapped into every process):
//   [128, 136)    this rank's own state: the sequence number of its last call, error
//   [256, ...)    slots[2][world][slot_bytes]: slots[p][r] holds rank r's input of the last call of parity p, as
//                 16-byte lines {data0, seq, data1, seq} (a slot carries slot_bytes / 2 of data)
// Calls alternate parity (seq & 1), so a slot is rewritten two calls later, and by then its reader has finished with
// it: a peer can only start call c + 2 after this rank's push of call c + 1, made after this rank's call c ended
// (stream order); the lines left from call c - 2 carry another sequence number. Every rank must make the same sequence
// of calls (a collective). A wait longer than kP2PTimeoutNs traps (the process gets a CUDA error, not a hang).
#pragma once

#include "common.cuh"

namespace neox_rt {

constexpr int kP2PMaxRanks = 8;
constexpr int kP2PHeaderBytes = 256;
constexpr int kP2PStateOffset = 128;
constexpr int kP2PThreads = 512;
constexpr unsigned long long kP2PTimeoutNs = 20ull * 1000 * 1000 * 1000;  // 20 s

struct P2PBuffers {
  char* base[kP2PMaxRanks];  // every rank's buffer as mapped in this process; base[rank] is this rank's own
  int rank, world;
  long long slot_bytes;  // one rank's slot (a multiple of 16): slot_bytes / 2 of data
};

struct P2PState {
  unsigned seq, error;
};

__device__ __forceinline__ P2PState* p2p_state(char* base) {
  return reinterpret_cast<P2PState*>(base + kP2PStateOffset);
}
__device__ __forceinline__ uint4* p2p_slot(const P2PBuffers& b, char* base, unsigned parity, int src) {
  return reinterpret_cast<uint4*>(base + kP2PHeaderBytes + (static_cast<long long>(parity) * b.world + src) *
                                                              b.slot_bytes);
}

__device__ __forceinline__ void st_volatile_v4(uint4* p, const uint4& v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ uint4 ld_volatile_v4(const uint4* p) {
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The line {data0, seq, data1, seq} at p, once both flag words show seq (spinning; a trap after kP2PTimeoutNs).
__device__ __forceinline__ uint2 p2p_wait_line(const uint4* p, unsigned seq, P2PState* st) {
  uint4 w = ld_volatile_v4(p);
  if (w.y != seq || w.w != seq) {
    const unsigned long long t0 = global_timer_ns();
    do {
      if (global_timer_ns() - t0 > kP2PTimeoutNs) {
        st->error = 1u;
        __threadfence_system();
        __trap();  // a peer never came: an error for the process, not a hang
      }
      w = ld_volatile_v4(p);
    } while (w.y != seq || w.w != seq);
  }
  return make_uint2(w.x, w.z);
}

// L consecutive lines at p, their loads issued together, then each waited for as p2p_wait_line does.
template <int L>
__device__ __forceinline__ void p2p_wait_lines(const uint4* p, unsigned seq, P2PState* st, uint2 (&out)[L]) {
  uint4 w[L];
#pragma unroll
  for (int l = 0; l < L; ++l) w[l] = ld_volatile_v4(p + l);
#pragma unroll
  for (int l = 0; l < L; ++l) {
    if (w[l].y != seq || w[l].w != seq) {
      const uint2 d = p2p_wait_line(p + l, seq, st);
      w[l].x = d.x;
      w[l].z = d.y;
    }
    out[l] = make_uint2(w[l].x, w[l].z);
  }
}

// 8 bytes of T (4 fp16 / bf16 or 2 fp32) accumulated into fp32.
template <typename T>
__device__ __forceinline__ void add_vec8(float (&acc)[8 / sizeof(T)], const uint2& raw) {
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < static_cast<int>(8 / sizeof(T)); ++e) acc[e] += to_float(v[e]);
}

// y = sum over ranks of x (n8 8-byte units, at most slot_bytes / 16 of them), summed in fp32 in rank order (the same
// bits on every rank) and rounded once. One block.
template <typename T, bool PDL>
__global__ void __launch_bounds__(kP2PThreads)
p2p_all_reduce_kernel(const T* x, T* y, long long n8, const __grid_constant__ P2PBuffers b) {
  constexpr int VEC = 8 / sizeof(T);
  if (PDL) pdl_launch_dependents();
  if (PDL) pdl_wait();  // x is the previous kernel's output; the state was last written by this op's previous call
  char* const own = b.base[b.rank];
  P2PState* const st = p2p_state(own);
  const unsigned seq = *reinterpret_cast<volatile unsigned*>(&st->seq) + 1u;
  const unsigned parity = seq & 1u;
  const uint2* const xin = reinterpret_cast<const uint2*>(x);
  // push: this rank's input, flagged, into its slot on every peer
  for (long long i = threadIdx.x; i < n8; i += blockDim.x) {
    const uint2 v = __ldcg(xin + i);
    const uint4 line = make_uint4(v.x, seq, v.y, seq);
    for (int r = 0; r < b.world; ++r)
      if (r != b.rank) st_volatile_v4(p2p_slot(b, b.base[r], parity, b.rank) + i, line);
  }
  // the peers' pushes into this rank's slots, summed in rank order
  uint2* const out = reinterpret_cast<uint2*>(y);
  for (long long i = threadIdx.x; i < n8; i += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int r = 0; r < b.world; ++r)
      add_vec8<T>(acc, r == b.rank ? __ldcg(xin + i) : p2p_wait_line(p2p_slot(b, own, parity, r) + i, seq, st));
    uint2 raw;
    T* o = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = from_float<T>(acc[e]);
    out[i] = raw;
  }
  __syncthreads();
  if (threadIdx.x == 0) st->seq = seq;
}

template <typename T>
cudaError_t launch_p2p_all_reduce(const T* x, T* y, long long n8, const P2PBuffers& b, bool pdl,
                                  cudaStream_t stream) {
  if (n8 == 0) return cudaSuccess;
  return launch_kernel(pdl, p2p_all_reduce_kernel<T, false>, p2p_all_reduce_kernel<T, true>, dim3(1),
                       dim3(kP2PThreads), stream, x, y, n8, b);
}

}  // namespace neox_rt
