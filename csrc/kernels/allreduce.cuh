// One-shot all-reduce of a small tensor (decode's hidden state, 12 KB a token for 20B) over peer-to-peer memory
// (NVLink), as one single-block kernel that can sit in the programmatic-dependent-launch chain of the decode graph.
//
// Why: NCCL's all-reduce of 12 KB costs ~7.6 us inside a CUDA graph on two H100s or H200s (bench/NOTES.md, session
// 8), ~0.37 ms of a 20B token at TP=2, and its kernel breaks the PDL chain, so the LayerNorm after it cannot launch
// early. Here every rank PUSHES its input into each peer's buffer, then tells each peer with one release-add on the
// peer's arrival counter, waits until its own counter shows every peer's push, and sums the slots in rank order: one
// NVLink one-way trip (plus the fence that orders the pushes before the signal) instead of NCCL's protocol steps.
//
// Each rank's buffer (symmetric: the same layout on every rank, each mapped into every process):
//   [0, 8)        arrivals[2]: counters the PEERS add to, one per parity
//   [128, 144)    this rank's own state: parity of the next call, expected[2] (what arrivals[p] reached last), error
//   [256, ...)    slots[2][world][slot_bytes]: slots[p][r] holds rank r's input of the last call of parity p
// Calls alternate parity, so a slot is rewritten two calls later, and by then its reader has finished with it: a
// peer can only start call c + 2 after this rank's signal of call c + 1, sent after this rank's call c ended (stream
// order). The counters only grow (wrapping), each rank's expected value grows with them: no reset, no race.
// Every rank must make the same sequence of calls (a collective). A wait longer than kP2PTimeoutNs traps (the process
// gets a CUDA error instead of hanging).
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
  long long slot_bytes;  // one rank's slot (a multiple of 16)
};

struct P2PState {
  unsigned parity, expected[2], error;
};

__device__ __forceinline__ unsigned* p2p_arrivals(char* base) { return reinterpret_cast<unsigned*>(base); }
__device__ __forceinline__ P2PState* p2p_state(char* base) {
  return reinterpret_cast<P2PState*>(base + kP2PStateOffset);
}
__device__ __forceinline__ uint4* p2p_slot(const P2PBuffers& b, char* base, unsigned parity, int src) {
  return reinterpret_cast<uint4*>(base + kP2PHeaderBytes + (static_cast<long long>(parity) * b.world + src) *
                                                              b.slot_bytes);
}

__device__ __forceinline__ void red_release_sys_add(unsigned* p, unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#else
  __threadfence_system();
  atomicAdd(p, v);
#endif
}

__device__ __forceinline__ unsigned ld_acquire_sys(const unsigned* p) {
  unsigned v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
#else
  v = *reinterpret_cast<const volatile unsigned*>(p);
  __threadfence_system();
#endif
  return v;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// 16 bytes of T (8 fp16 / bf16 or 4 fp32) accumulated into fp32.
template <typename T>
__device__ __forceinline__ void add_vec16(float (&acc)[16 / sizeof(T)], const uint4& raw) {
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < static_cast<int>(16 / sizeof(T)); ++e) acc[e] += to_float(v[e]);
}

// y = sum over ranks of x (n16 16-byte vectors, at most slot_bytes / 16), summed in fp32 in rank order (the same
// bits on every rank) and rounded once. One block.
template <typename T, bool PDL>
__global__ void __launch_bounds__(kP2PThreads)
p2p_all_reduce_kernel(const T* x, T* y, long long n16, const __grid_constant__ P2PBuffers b) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ unsigned s_parity;
  if (PDL) pdl_launch_dependents();
  if (PDL) pdl_wait();  // x is the previous kernel's output; the state was last written by this op's previous call
  char* const own = b.base[b.rank];
  P2PState* const st = p2p_state(own);
  if (threadIdx.x == 0) s_parity = st->parity;
  __syncthreads();
  const unsigned parity = s_parity;
  const uint4* const xin = reinterpret_cast<const uint4*>(x);
  // push: this rank's input into its slot on every peer
  for (long long i = threadIdx.x; i < n16; i += blockDim.x) {
    const uint4 v = __ldcg(xin + i);
    for (int r = 0; r < b.world; ++r)
      if (r != b.rank) p2p_slot(b, b.base[r], parity, b.rank)[i] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // every thread's pushes (ordered before this by the barrier) reach the peers first
    for (int r = 0; r < b.world; ++r)
      if (r != b.rank) red_release_sys_add(p2p_arrivals(b.base[r]) + parity, 1u);
    const unsigned target = st->expected[parity] + static_cast<unsigned>(b.world - 1);
    const unsigned* const arrived = p2p_arrivals(own) + parity;
    const unsigned long long t0 = global_timer_ns();
    while (static_cast<int>(ld_acquire_sys(arrived) - target) < 0) {
      if (global_timer_ns() - t0 > kP2PTimeoutNs) {
        st->error = 1u;
        __threadfence_system();
        __trap();  // a peer never came: an error for the process, not a hang
      }
    }
    st->expected[parity] = target;
    st->parity = parity ^ 1u;
  }
  __syncthreads();  // thread 0's acquire, then every thread reads the peers' pushes (through the L2)
  uint4* const out = reinterpret_cast<uint4*>(y);
  for (long long i = threadIdx.x; i < n16; i += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int r = 0; r < b.world; ++r) add_vec16<T>(acc, __ldcg(r == b.rank ? xin + i : p2p_slot(b, own, parity, r) + i));
    uint4 raw;
    T* o = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = from_float<T>(acc[e]);
    out[i] = raw;
  }
}

template <typename T>
cudaError_t launch_p2p_all_reduce(const T* x, T* y, long long n16, const P2PBuffers& b, bool pdl,
                                  cudaStream_t stream) {
  if (n16 == 0) return cudaSuccess;
  return launch_kernel(pdl, p2p_all_reduce_kernel<T, false>, p2p_all_reduce_kernel<T, true>, dim3(1),
                       dim3(kP2PThreads), stream, x, y, n16, b);
}

}  // namespace neox_rt
