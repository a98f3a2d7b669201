// Quantized-linear probe (one GPU, no torch): configurations of quant_gemm_kernel (kernels/quant_gemm.cuh) at one
// row of x on the GPT-NeoX-20B and Pythia-1.4B decode linears, fp16, int4 (groups of 128) and int8, side by side in
// one process: the launcher's own choices (LEAN, FOLD) against other warps a block, chunks in flight and tiles, and
// the weight in the row-major layout against the tiled one (TILED: a warp's load of a half-tile is 512 contiguous
// bytes instead of eight 64-byte pieces of eight rows). Timed as bench/kernels.py does back to back: calls queued
// with programmatic dependent launch over rotating copies of the weight (each call cold in L2), the median of 5
// rounds of 48 calls; a pure read of the same bytes (16-byte streaming loads, 8 in flight a thread) beside them.
// Each configuration's output is compared with the launcher's LEAN output (FOLD differs by fp16 rounding; a tiled
// configuration must equal its row-major twin bit for bit).
// Usage: quant_probe [out.json]; prints a table, writes JSON rows.
// quant_probe --fused [out.json]: the fused launches instead (quant_gemm_pair_kernel on QKV + h->4h,
// quant_gemm_sum_kernel on dense + 4h->h, tiled weights, one row), the launcher's configuration against other tiles,
// warps a block and blocks a SM, beside the pure reads of the two weights one after the other; each configuration's
// outputs compared with the launcher's (the same sums in another order: within fp16 rounding).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <cuda_profiler_api.h>

#include "check_cuda.h"
#include "kernels/quant_gemm.cuh"
#include "read_kernel.cuh"

using T = __half;
using neox_rt::QuantInt4;
using neox_rt::QuantInt8;

__global__ void fill_half(T* p, size_t n, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned x = unsigned(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = __float2half(scale * ((int(x & 0xffff) - 32768) / 32768.f));
  }
}

// bytes: any value (int4 words), or int8 in [-127, 127] (signed), or zeros in [0, 15]
__global__ void fill_bytes(uint8_t* p, size_t n, unsigned seed, int mode) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned x = unsigned(i) * 2246822519u ^ seed;
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    uint8_t b = uint8_t(x >> 8);
    if (mode == 1) b = uint8_t(int8_t(int(x % 255u) - 127));
    if (mode == 2) b = uint8_t(x % 16u);
    p[i] = b;
  }
}

// row-major [n, rb] -> tiled [n_pad / 16][rb / 64][2][8][4][16 bytes], rows past n zero
__global__ void tile_kernel(const uint8_t* src, uint8_t* dst, int n, int64_t rb, int64_t pieces) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < pieces; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tile = e / rb, r = e % rb, c = r / 64, q = r % 64;
    const int h = int(q / 32), lane = int(q % 32), g = lane / 4, t = lane % 4;
    const int64_t row = 16 * tile + 8 * h + g;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row < n) v = *reinterpret_cast<const uint4*>(src + row * rb + 64 * c + 16 * t);
    reinterpret_cast<uint4*>(dst)[e] = v;
  }
}

__global__ void pack_sz_kernel(const T* s, const uint8_t* z, uint32_t* dst, int n, int groups, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tile = e / (16 * groups), r = e % (16 * groups), grp = r / 16, row = 16 * tile + r % 16;
    uint32_t v = 0;
    if (row < n)
      v = uint32_t(__half_as_ushort(s[row * groups + grp])) | (uint32_t(z[row * groups + grp]) << 16);
    dst[e] = v;
  }
}

struct Layer {
  std::string model, name;
  int n, k;
  bool int4;
  int64_t rb() const { return int4 ? k / 2 : k; }
  int n_pad() const { return (n + 15) / 16 * 16; }
  int64_t wbytes() const { return int64_t(n) * rb(); }
  int64_t sbytes() const { return int4 ? int64_t(n) * (k / 128) * 3 : int64_t(n) * 2; }
};

struct Weights {
  std::vector<uint8_t*> q, qt;  // rotating copies: row-major, tiled
  std::vector<uint32_t*> szt;   // int4: scale bits | zero << 16, tiled [n_pad / 16][groups][16]
  std::vector<T*> s;
  std::vector<uint8_t*> z;
  T *x = nullptr, *y = nullptr;
};

static Weights make_weights(const Layer& L, int copies) {
  Weights w;
  for (int c = 0; c < copies; ++c) {
    uint8_t *q, *qt, *z = nullptr;
    T* s;
    CK(cudaMalloc(&q, L.wbytes()));
    CK(cudaMalloc(&qt, int64_t(L.n_pad()) * L.rb()));
    fill_bytes<<<2048, 256>>>(q, L.wbytes(), 7u + c, L.int4 ? 0 : 1);
    tile_kernel<<<2048, 256>>>(q, qt, L.n, L.rb(), int64_t(L.n_pad()) * L.rb() / 16);
    const size_t ns = L.int4 ? size_t(L.n) * (L.k / 128) : size_t(L.n);
    CK(cudaMalloc(&s, ns * sizeof(T)));
    fill_half<<<256, 256>>>(s, ns, 3u + c, L.int4 ? 0.02f : 0.003f);
    uint32_t* szt = nullptr;
    if (L.int4) {
      CK(cudaMalloc(&z, ns));
      fill_bytes<<<256, 256>>>(z, ns, 11u + c, 2);
      const int64_t total = int64_t(L.n_pad()) * (L.k / 128);
      CK(cudaMalloc(&szt, total * sizeof(uint32_t)));
      pack_sz_kernel<<<256, 256>>>(s, z, szt, L.n, L.k / 128, total);
    }
    w.szt.push_back(szt);
    w.q.push_back(q);
    w.qt.push_back(qt);
    w.s.push_back(s);
    w.z.push_back(z);
  }
  CK(cudaMalloc(&w.x, size_t(L.k) * sizeof(T)));
  fill_half<<<64, 256>>>(w.x, L.k, 5u, 1.f);
  CK(cudaMalloc(&w.y, size_t(L.n_pad()) * sizeof(T)));
  CK(cudaDeviceSynchronize());
  return w;
}

static void free_weights(Weights& w) {
  for (auto* p : w.q) CK(cudaFree(p));
  for (auto* p : w.qt) CK(cudaFree(p));
  for (auto* p : w.s) CK(cudaFree(p));
  for (auto* p : w.z)
    if (p) CK(cudaFree(p));
  for (auto* p : w.szt)
    if (p) CK(cudaFree(p));
  CK(cudaFree(w.x));
  CK(cudaFree(w.y));
  w = Weights();
}

using Launch = std::function<cudaError_t(const Layer&, const Weights&, int copy, bool pdl, cudaStream_t)>;
struct Config {
  std::string name;
  bool int4;
  Launch launch;
  int regs = 0, local = 0;
};

// one configuration of the kernel, one row of x
// a kernel's registers and local (spilled) bytes a thread, for the probe's printout
template <typename K>
static void kernel_resources(K kernel, int& regs, int& local) {
  cudaFuncAttributes a;
  CK(cudaFuncGetAttributes(&a, kernel));
  regs = a.numRegs;
  local = int(a.localSizeBytes);
}

template <typename F, int CT, int S, int WARPS, int MINB, bool LEAN, bool FOLD, int TILED>
static Config config(const char* name) {
  Config c;
  c.name = name;
  c.int4 = F::kGrouped;
  c.launch = [](const Layer& L, const Weights& w, int i, bool pdl, cudaStream_t st) {
    const dim3 grid((L.n + 16 * CT - 1) / (16 * CT)), block(WARPS * 32);
    const uint8_t* q = (TILED & 1) ? w.qt[i] : w.q[i];
    const T* sc = (TILED & 2) && F::kGrouped ? reinterpret_cast<const T*>(w.szt[i]) : w.s[i];
    return neox_rt::launch_kernel(pdl, neox_rt::quant_gemm_kernel<T, F, 1, CT, S, WARPS, MINB, false, LEAN, FOLD, TILED>,
                                  neox_rt::quant_gemm_kernel<T, F, 1, CT, S, WARPS, MINB, true, LEAN, FOLD, TILED>,
                                  grid, block, st, static_cast<const T*>(w.x), q, sc,
                                  static_cast<const uint8_t*>(w.z[i]), static_cast<const T*>(nullptr),
                                  static_cast<const T*>(nullptr), w.y, 1, L.n, L.k, 128, 0);
  };
  kernel_resources(neox_rt::quant_gemm_kernel<T, F, 1, CT, S, WARPS, MINB, true, LEAN, FOLD, TILED>, c.regs, c.local);
  return c;
}

// the launcher itself (variant 3 LEAN or 5 FOLD), row-major or tiled
static Config launcher(const char* name, bool int4, int variant, bool tiled = false) {
  Config c;
  c.name = name;
  c.int4 = int4;
  c.launch = [int4, variant, tiled](const Layer& L, const Weights& w, int i, bool pdl, cudaStream_t st) {
    if (tiled && int4)
      return neox_rt::launch_quant_linear_int4_tiled<T>(w.x, reinterpret_cast<const int32_t*>(w.qt[i]),
                                                        reinterpret_cast<const int32_t*>(w.szt[i]), nullptr, nullptr,
                                                        w.y, 1, L.n, L.k, 128, 0, variant, pdl, st);
    if (tiled)
      return neox_rt::launch_quant_linear_int8_tiled<T>(w.x, reinterpret_cast<const int8_t*>(w.qt[i]), w.s[i],
                                                        nullptr, nullptr, w.y, 1, L.n, L.k, 0, variant, pdl, st);
    if (int4)
      return neox_rt::launch_quant_linear_int4<T>(w.x, reinterpret_cast<const int32_t*>(w.q[i]), w.s[i], w.z[i],
                                                  nullptr, nullptr, w.y, 1, L.n, L.k, 128, 0, variant, pdl, st);
    return neox_rt::launch_quant_linear_int8<T>(w.x, reinterpret_cast<const int8_t*>(w.q[i]), w.s[i], nullptr,
                                                nullptr, w.y, 1, L.n, L.k, 0, variant, pdl, st);
  };
  return c;
}

static float back_to_back_us(const std::function<cudaError_t(int, bool, cudaStream_t)>& call, int copies,
                             cudaStream_t st) {
  constexpr int kCalls = 48, kRounds = 5;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 8; ++i) CK(call(i % copies, true, st));
  std::vector<float> t;
  for (int r = 0; r < kRounds; ++r) {
    CK(cudaEventRecord(e0, st));
    for (int i = 0; i < kCalls; ++i) CK(call(i % copies, true, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(1000.f * ms / kCalls);
  }
  std::sort(t.begin(), t.end());
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return t[kRounds / 2];
}

static std::vector<float> output(const Layer& L, const Weights& w) {
  std::vector<__half> h(L.n);
  CK(cudaMemcpy(h.data(), w.y, L.n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> f(L.n);
  for (int i = 0; i < L.n; ++i) f[i] = __half2float(h[i]);
  return f;
}

// --fused: the pair and the sum (tiled weights) at configurations (CT, S, WARPS, MINB) beside the launchers'.
using FusedLaunch = std::function<cudaError_t(const Layer&, const Weights&, const Layer&, const Weights&, int copy,
                                              bool pdl, cudaStream_t)>;
struct FusedConfig {
  std::string name;
  bool int4, sum;
  FusedLaunch launch;
  int regs = 0, local = 0;
};

template <typename F>
static neox_rt::QuantOperand<T> operand(const Layer& L, const Weights& w, int i) {
  const T* sc = F::kGrouped ? reinterpret_cast<const T*>(w.szt[i]) : w.s[i];
  return neox_rt::QuantOperand<T>{w.x, w.qt[i], sc, L.k, 128};
}

template <typename F, int CT, int S, int WARPS, int MINB>
static FusedConfig pair_config(const char* name) {
  FusedConfig c{name, F::kGrouped, false, nullptr};
  c.launch = [](const Layer& A, const Weights& wa, const Layer& B, const Weights& wb, int i, bool pdl,
                cudaStream_t st) {
    const int blocks_a = (A.n + 16 * CT - 1) / (16 * CT), blocks_b = (B.n + 16 * CT - 1) / (16 * CT);
    return neox_rt::launch_kernel(pdl, neox_rt::quant_gemm_pair_kernel<T, F, 1, CT, S, WARPS, MINB, false>,
                                  neox_rt::quant_gemm_pair_kernel<T, F, 1, CT, S, WARPS, MINB, true>,
                                  dim3(blocks_a + blocks_b), dim3(WARPS * 32), st, operand<F>(A, wa, i),
                                  operand<F>(B, wb, i), static_cast<const T*>(nullptr),
                                  static_cast<const T*>(nullptr), wa.y, wb.y, 1, A.n, B.n, blocks_a, 0, 0,
                                  neox_rt::QuantNorm<T>{});
  };
  kernel_resources(neox_rt::quant_gemm_pair_kernel<T, F, 1, CT, S, WARPS, MINB, true>, c.regs, c.local);
  return c;
}

template <typename F, int CT, int S, int WARPS, int MINB>
static FusedConfig sum_config(const char* name) {
  FusedConfig c{name, F::kGrouped, true, nullptr};
  c.launch = [](const Layer& A, const Weights& wa, const Layer& B, const Weights& wb, int i, bool pdl,
                cudaStream_t st) {
    return neox_rt::launch_kernel(pdl, neox_rt::quant_gemm_sum_kernel<T, F, 1, CT, S, WARPS, MINB, false>,
                                  neox_rt::quant_gemm_sum_kernel<T, F, 1, CT, S, WARPS, MINB, true>,
                                  dim3((A.n + 16 * CT - 1) / (16 * CT)), dim3(WARPS * 32), st, operand<F>(A, wa, i),
                                  operand<F>(B, wb, i), static_cast<const T*>(nullptr),
                                  static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), wa.y, 1, A.n,
                                  neox_rt::SumNorm<T>{});
  };
  kernel_resources(neox_rt::quant_gemm_sum_kernel<T, F, 1, CT, S, WARPS, MINB, true>, c.regs, c.local);
  return c;
}

template <typename F>
static FusedConfig fused_launcher(const char* name, bool sum) {
  FusedConfig c{name, F::kGrouped, sum, nullptr};
  c.launch = [sum](const Layer& A, const Weights& wa, const Layer& B, const Weights& wb, int i, bool pdl,
                   cudaStream_t st) {
    if (sum)
      return neox_rt::launch_quant_gemm_sum<T, F>(operand<F>(A, wa, i), operand<F>(B, wb, i), nullptr, nullptr,
                                                  nullptr, wa.y, 1, A.n, pdl, st);
    return neox_rt::launch_quant_gemm_pair<T, F>(operand<F>(A, wa, i), operand<F>(B, wb, i), nullptr, nullptr, wa.y,
                                                 wb.y, 1, A.n, B.n, 0, 0, pdl, st);
  };
  return c;
}

static int fused_main(const char* out_path, cudaStream_t st) {
  using neox_rt::QuantInt4;
  using neox_rt::QuantInt8;
  // name: t<CT> s<S> w<WARPS> mb<MINB>; the launcher's own first (the reference of the comparison)
  std::vector<FusedConfig> cfgs = {
      fused_launcher<QuantInt4>("int4 pair (launcher)", false),
      pair_config<QuantInt4, 2, 2, 8, 2>("int4 pair t2 s2 w8 mb2"),
      pair_config<QuantInt4, 2, 2, 4, 4>("int4 pair t2 s2 w4 mb4"),
      pair_config<QuantInt4, 2, 2, 2, 8>("int4 pair t2 s2 w2 mb8"),
      pair_config<QuantInt4, 2, 3, 4, 3>("int4 pair t2 s3 w4 mb3"),
      pair_config<QuantInt4, 2, 3, 4, 4>("int4 pair t2 s3 w4 mb4"),
      pair_config<QuantInt4, 2, 4, 4, 3>("int4 pair t2 s4 w4 mb3"),
      pair_config<QuantInt4, 2, 2, 4, 5>("int4 pair t2 s2 w4 mb5"),
      pair_config<QuantInt4, 2, 2, 8, 3>("int4 pair t2 s2 w8 mb3"),
      pair_config<QuantInt4, 1, 4, 8, 3>("int4 pair t1 s4 w8 mb3"),
      pair_config<QuantInt4, 1, 4, 4, 6>("int4 pair t1 s4 w4 mb6"),
      pair_config<QuantInt4, 1, 4, 2, 12>("int4 pair t1 s4 w2 mb12"),
      pair_config<QuantInt4, 1, 3, 4, 8>("int4 pair t1 s3 w4 mb8"),
      fused_launcher<QuantInt4>("int4 sum (launcher)", true),
      sum_config<QuantInt4, 1, 4, 8, 3>("int4 sum t1 s4 w8 mb3"),
      sum_config<QuantInt4, 1, 4, 4, 6>("int4 sum t1 s4 w4 mb6"),
      sum_config<QuantInt4, 2, 2, 8, 2>("int4 sum t2 s2 w8 mb2"),
      sum_config<QuantInt4, 2, 2, 4, 4>("int4 sum t2 s2 w4 mb4"),
      fused_launcher<QuantInt8>("int8 pair (launcher)", false),
      pair_config<QuantInt8, 1, 4, 8, 3>("int8 pair t1 s4 w8 mb3"),
      pair_config<QuantInt8, 1, 4, 4, 6>("int8 pair t1 s4 w4 mb6"),
      pair_config<QuantInt8, 1, 4, 2, 12>("int8 pair t1 s4 w2 mb12"),
      pair_config<QuantInt8, 2, 2, 8, 2>("int8 pair t2 s2 w8 mb2"),
      pair_config<QuantInt8, 2, 2, 4, 4>("int8 pair t2 s2 w4 mb4"),
      fused_launcher<QuantInt8>("int8 sum (launcher)", true),
      sum_config<QuantInt8, 1, 4, 8, 3>("int8 sum t1 s4 w8 mb3"),
      sum_config<QuantInt8, 1, 4, 4, 6>("int8 sum t1 s4 w4 mb6"),
  };
  for (const auto& c : cfgs)
    if (c.regs) std::printf("%-28s %3d registers, %d bytes local\n", c.name.c_str(), c.regs, c.local);
  struct Two {
    std::string model, name;
    Layer a, b;
    bool sum;
  };
  std::vector<Two> twos;
  for (bool int4 : {true, false})
    for (const auto& [model, h, f] : {std::tuple<const char*, int, int>{"gpt-neox-20b", 6144, 24576},
                                      std::tuple<const char*, int, int>{"pythia-1.4b", 2048, 8192}}) {
      twos.push_back({model, "qkv+h->4h", {"", "qkv", 3 * h, h, int4}, {"", "h->4h", f, h, int4}, false});
      twos.push_back({model, "dense+4h->h", {"", "dense", h, h, int4}, {"", "4h->h", h, f, int4}, true});
    }
  FILE* js = out_path ? std::fopen(out_path, "w") : nullptr;
  if (js) std::fprintf(js, "{\"mode\": \"fused\", \"rows\": [\n");
  bool first_row = true;
  int* sink;
  CK(cudaMalloc(&sink, sizeof(int)));
  std::printf("\n%-14s %-12s %-28s %9s %8s %8s %10s\n", "model", "layers", "config", "us", "GB/s", "%read", "max|d|");
  for (const auto& P : twos) {
    const int64_t bytes = P.a.wbytes() + P.a.sbytes() + P.b.wbytes() + P.b.sbytes();
    const int copies = int(std::max<int64_t>(2, (256ll << 20) / bytes + 1));
    Weights wa = make_weights(P.a, copies), wb = make_weights(P.b, copies);
    auto read = [&](const Layer& L, const Weights& w, int i, bool pdl, cudaStream_t s) {
      const size_t vecs = size_t(L.wbytes()) / 16;
      return neox_rt::launch_kernel(pdl, read_kernel<false>, read_kernel<true>, dim3(unsigned((vecs + 2047) / 2048)),
                                    dim3(256), s, reinterpret_cast<const int4*>(w.q[i]), vecs, sink);
    };
    const float read_us = back_to_back_us(
        [&](int i, bool pdl, cudaStream_t s) {
          const cudaError_t e = read(P.a, wa, i, pdl, s);
          return e != cudaSuccess ? e : read(P.b, wb, i, pdl, s);
        },
        copies, st);
    const char* fmt = P.a.int4 ? "int4" : "int8";
    std::printf("%-14s %-12s %-28s %9.2f %8.0f\n", P.model.c_str(), P.name.c_str(),
                (std::string(fmt) + " pure reads").c_str(), read_us, bytes / (read_us * 1e3));
    std::vector<float> ref_a, ref_b;
    for (const auto& c : cfgs) {
      if (c.int4 != P.a.int4 || c.sum != P.sum) continue;
      CK(c.launch(P.a, wa, P.b, wb, 0, false, st));
      CK(cudaStreamSynchronize(st));
      const std::vector<float> oa = output(P.a, wa), ob = P.sum ? std::vector<float>() : output(P.b, wb);
      if (ref_a.empty()) ref_a = oa, ref_b = ob;
      float d = 0.f, mx = 0.f;
      for (const auto& [o, ref] : {std::pair{&oa, &ref_a}, std::pair{&ob, &ref_b}})
        for (size_t i = 0; i < o->size(); ++i)
          d = std::max(d, std::fabs((*o)[i] - (*ref)[i])), mx = std::max(mx, std::fabs((*ref)[i]));
      const float us = back_to_back_us(
          [&](int i, bool pdl, cudaStream_t s) { return c.launch(P.a, wa, P.b, wb, i, pdl, s); }, copies, st);
      std::printf("%-14s %-12s %-28s %9.2f %8.0f %7.0f%% %10.2e\n", P.model.c_str(), P.name.c_str(), c.name.c_str(),
                  us, bytes / (us * 1e3), 100.0 * read_us / us, d / mx);
      if (js)
        std::fprintf(js,
                     "%s{\"model\": \"%s\", \"layers\": \"%s\", \"format\": \"%s\", \"config\": \"%s\", \"us\": %.3f, "
                     "\"gb_s\": %.1f, \"read_us\": %.3f, \"bytes\": %lld, \"rel_diff_vs_launcher\": %.3e, "
                     "\"registers\": %d, \"local_bytes\": %d}",
                     first_row ? "" : ",\n", P.model.c_str(), P.name.c_str(), fmt, c.name.c_str(), us,
                     bytes / (us * 1e3), read_us, static_cast<long long>(bytes), d / mx, c.regs, c.local);
      first_row = false;
    }
    free_weights(wa);
    free_weights(wb);
  }
  if (js) {
    std::fprintf(js, "\n]}\n");
    std::fclose(js);
  }
  return 0;
}

int main(int argc, char** argv) {
  // --ncu: one profiled launch (cudaProfilerStart / Stop around it) of a few configurations on 20B's qkv and 4h->h,
  // for `ncu --profile-from-start off`; no timing
  const bool ncu = argc > 1 && std::string(argv[1]) == "--ncu";
  const char* out_path = argc > 1 && !ncu ? argv[1] : nullptr;
  const std::vector<std::string> ncu_cfgs = {"int4 LEAN ct1 s4 w8", "int4 LEAN ct1 s4 w8 T3", "int4 FOLD ct1 s4 w8 T3",
                                             "int8 FOLD ct1 s4 w8 T1"};
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  if (argc > 1 && std::string(argv[1]) == "--fused") return fused_main(argc > 2 ? argv[2] : nullptr, st);

  using namespace neox_rt;
  std::vector<Config> cfgs = {
      launcher("int4 LEAN (auto)", true, kQuantLean),
      launcher("int4 FOLD (variant 5)", true, kQuantFold),
      config<QuantInt4, 1, 4, 8, 3, true, false, 0>("int4 LEAN ct1 s4 w8"),
      config<QuantInt4, 1, 4, 8, 3, true, false, 1>("int4 LEAN ct1 s4 w8 T1"),
      config<QuantInt4, 1, 4, 8, 3, true, false, 3>("int4 LEAN ct1 s4 w8 T3"),
      config<QuantInt4, 1, 4, 8, 3, true, true, 0>("int4 FOLD ct1 s4 w8"),
      config<QuantInt4, 1, 4, 8, 3, true, true, 1>("int4 FOLD ct1 s4 w8 T1"),
      config<QuantInt4, 1, 4, 8, 3, true, true, 3>("int4 FOLD ct1 s4 w8 T3"),
      config<QuantInt4, 2, 2, 8, 2, true, false, 0>("int4 LEAN ct2 s2 w8"),
      config<QuantInt4, 2, 2, 8, 2, true, false, 3>("int4 LEAN ct2 s2 w8 T3"),
      config<QuantInt4, 2, 2, 8, 2, true, true, 0>("int4 FOLD ct2 s2 w8"),
      config<QuantInt4, 2, 2, 8, 2, true, true, 1>("int4 FOLD ct2 s2 w8 T1"),
      config<QuantInt4, 2, 2, 8, 2, true, true, 3>("int4 FOLD ct2 s2 w8 T3"),
      config<QuantInt4, 1, 4, 4, 6, true, true, 0>("int4 FOLD ct1 s4 w4"),
      config<QuantInt4, 1, 4, 4, 6, true, true, 3>("int4 FOLD ct1 s4 w4 T3"),
      config<QuantInt4, 1, 4, 4, 6, true, false, 3>("int4 LEAN ct1 s4 w4 T3"),
      config<QuantInt4, 1, 2, 8, 4, true, true, 3>("int4 FOLD ct1 s2 w8 mb4 T3"),
      config<QuantInt4, 1, 2, 8, 4, true, false, 3>("int4 LEAN ct1 s2 w8 mb4 T3"),
      config<QuantInt4, 1, 2, 4, 8, true, true, 3>("int4 FOLD ct1 s2 w4 mb8 T3"),
      config<QuantInt4, 1, 3, 8, 3, true, true, 3>("int4 FOLD ct1 s3 w8 T3"),
      config<QuantInt4, 1, 4, 16, 1, true, true, 3>("int4 FOLD ct1 s4 w16 T3"),
      config<QuantInt4, 1, 4, 16, 1, true, false, 3>("int4 LEAN ct1 s4 w16 T3"),
      launcher("int4 LEAN (auto) T3", true, kQuantLean, true),
      launcher("int4 FOLD (variant 5) T3", true, kQuantFold, true),
      launcher("int8 LEAN (auto)", false, kQuantLean),
      launcher("int8 FOLD (variant 5)", false, kQuantFold),
      config<QuantInt8, 1, 4, 8, 3, true, true, 0>("int8 FOLD ct1 s4 w8"),
      config<QuantInt8, 1, 4, 8, 3, true, true, 1>("int8 FOLD ct1 s4 w8 T1"),
      config<QuantInt8, 1, 4, 8, 3, true, false, 1>("int8 LEAN ct1 s4 w8 T1"),
      config<QuantInt8, 1, 4, 4, 6, true, true, 1>("int8 FOLD ct1 s4 w4 T1"),
      config<QuantInt8, 1, 2, 8, 4, true, true, 1>("int8 FOLD ct1 s2 w8 mb4 T1"),
      config<QuantInt8, 1, 3, 8, 3, true, true, 1>("int8 FOLD ct1 s3 w8 T1"),
      config<QuantInt8, 1, 4, 16, 1, true, true, 1>("int8 FOLD ct1 s4 w16 T1"),
      config<QuantInt8, 1, 4, 16, 1, true, false, 1>("int8 LEAN ct1 s4 w16 T1"),
      launcher("int8 LEAN (auto) T1", false, kQuantLean, true),
      launcher("int8 FOLD (variant 5) T1", false, kQuantFold, true),
  };
  std::vector<Layer> layers;
  for (bool int4 : {true, false}) {
    layers.push_back({"gpt-neox-20b", "qkv", 18432, 6144, int4});
    layers.push_back({"gpt-neox-20b", "dense", 6144, 6144, int4});
    layers.push_back({"gpt-neox-20b", "h->4h", 24576, 6144, int4});
    layers.push_back({"gpt-neox-20b", "4h->h", 6144, 24576, int4});
    layers.push_back({"pythia-1.4b", "qkv", 6144, 2048, int4});
    layers.push_back({"pythia-1.4b", "dense", 2048, 2048, int4});
    layers.push_back({"pythia-1.4b", "h->4h", 8192, 2048, int4});
    layers.push_back({"pythia-1.4b", "4h->h", 2048, 8192, int4});
  }
  for (const auto& c : cfgs)
    if (c.regs) std::printf("%-30s %3d registers, %d bytes local\n", c.name.c_str(), c.regs, c.local);

  FILE* js = out_path ? std::fopen(out_path, "w") : nullptr;
  if (js) std::fprintf(js, "{\"device\": \"%s\", \"rows\": [\n", prop.name);
  bool first_row = true;
  int* sink;
  CK(cudaMalloc(&sink, sizeof(int)));
  std::printf("\n%-14s %-6s %-5s %-30s %9s %8s %8s %10s\n", "model", "layer", "fmt", "config", "us", "GB/s",
              "%read", "max|d|");
  for (const auto& L : layers) {
    if (ncu) {
      if (L.model != "gpt-neox-20b" || (L.name != "qkv" && L.name != "4h->h")) continue;
      Weights w = make_weights(L, 1);
      for (const auto& c : cfgs) {
        if (c.int4 != L.int4 || std::find(ncu_cfgs.begin(), ncu_cfgs.end(), c.name) == ncu_cfgs.end()) continue;
        CK(c.launch(L, w, 0, false, st));
        CK(cudaStreamSynchronize(st));
        CK(cudaProfilerStart());
        CK(c.launch(L, w, 0, false, st));
        CK(cudaStreamSynchronize(st));
        CK(cudaProfilerStop());
        std::printf("profiled %s on %s %s\n", c.name.c_str(), L.name.c_str(), L.int4 ? "int4" : "int8");
      }
      free_weights(w);
      continue;
    }
    const int64_t bytes = L.wbytes() + L.sbytes();
    const int copies = int(std::max<int64_t>(2, (256ll << 20) / bytes + 1));
    Weights w = make_weights(L, copies);
    // the pure read of the packed weight's bytes
    const size_t vecs = size_t(L.wbytes()) / 16;
    const float read_us = back_to_back_us(
        [&](int i, bool pdl, cudaStream_t s) {
          const dim3 grid(unsigned((vecs + 2047) / 2048)), block(256);
          return launch_kernel(pdl, read_kernel<false>, read_kernel<true>, grid, block, s,
                               reinterpret_cast<const int4*>(w.q[i]), vecs, sink);
        },
        copies, st);
    const double read_gbs = bytes / (read_us * 1e3);
    std::printf("%-14s %-6s %-5s %-30s %9.2f %8.0f\n", L.model.c_str(), L.name.c_str(), L.int4 ? "int4" : "int8",
                "pure read", read_us, read_gbs);
    std::vector<float> ref;
    std::map<std::string, std::vector<float>> twins;
    for (const auto& c : cfgs) {
      if (c.int4 != L.int4) continue;
      CK(c.launch(L, w, 0, false, st));
      CK(cudaStreamSynchronize(st));
      const std::vector<float> o = output(L, w);
      if (ref.empty()) ref = o;
      float d = 0.f, mx = 0.f;
      for (int i = 0; i < L.n; ++i) d = std::max(d, std::fabs(o[i] - ref[i])), mx = std::max(mx, std::fabs(ref[i]));
      const size_t tpos = c.name.find(" T");
      const bool tiled = tpos != std::string::npos;
      const std::string base = tiled ? c.name.substr(0, tpos) : c.name;
      float dt = -1.f;  // a tiled configuration against the row-major one of its name
      if (tiled && twins.count(base)) {
        dt = 0.f;
        for (int i = 0; i < L.n; ++i) dt = std::max(dt, std::fabs(o[i] - twins[base][i]));
      }
      if (!tiled) twins[base] = o;
      const float us = back_to_back_us([&](int i, bool pdl, cudaStream_t s) { return c.launch(L, w, i, pdl, s); },
                                       copies, st);
      const double gbs = bytes / (us * 1e3);
      std::printf("%-14s %-6s %-5s %-30s %9.2f %8.0f %7.0f%% %10.2e%s\n", L.model.c_str(), L.name.c_str(),
                  L.int4 ? "int4" : "int8", c.name.c_str(), us, gbs, 100.0 * read_us / us, d / mx,
                  dt < 0 ? "" : dt == 0 ? "  (= row-major twin)" : "  (DIFFERS from its twin)");
      if (js)
        std::fprintf(js,
                     "%s{\"model\": \"%s\", \"layer\": \"%s\", \"format\": \"%s\", \"config\": \"%s\", \"us\": %.3f, "
                     "\"gb_s\": %.1f, \"read_us\": %.3f, \"bytes\": %lld, \"rel_diff_vs_lean\": %.3e, "
                     "\"diff_vs_twin\": %.3e, \"registers\": %d, \"local_bytes\": %d}",
                     first_row ? "" : ",\n", L.model.c_str(), L.name.c_str(), L.int4 ? "int4" : "int8",
                     c.name.c_str(), us, gbs, read_us, static_cast<long long>(bytes), d / mx, dt, c.regs, c.local);
      first_row = false;
    }
    free_weights(w);
  }
  if (js) {
    std::fprintf(js, "\n]}\n");
    std::fclose(js);
  }
  return 0;
}
