// Decode-attention probe (one GPU, no torch): the options of the split kernel (kDecode* in
// kernels/decode_attention.cuh; the first variant is the default) and split plans side by side in one process, at
// the GPT-NeoX-20B (64 heads of 96) and Pythia-1.4B (16 heads of 128) shapes, fp16, timed two ways as
// bench/kernels.py does: one call with the L2 cold and clean, and calls queued back to back with programmatic
// dependent launch over rotating caches (each call cold in L2). A pure read of the same bytes (16-byte loads, 8 in
// flight per thread, same launch) is timed beside them. Built with -DNEOX_RT_DECODE_TRACE it also records, per
// block, %globaltimer at the kernel's trace points for one cold call and for a chain of back-to-back calls (20B,
// b=1, 2048 cached), and prints where the time goes. Each option's output is compared with the default kernel's.
// Usage: decode_probe [out.json]; prints a table, writes JSON rows (and raw trace records).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "check_cuda.h"
#include "kernels/decode_attention.cuh"
#include "read_kernel.cuh"


using neox_rt::kDecodeThreads;
using T = __half;
constexpr int kCap = 2048;

__global__ void fill_kernel(T* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned x = unsigned(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = __float2half((int(x & 0xffff) - 32768) / 32768.f);  // [-1, 1), never all zero
  }
}

__global__ void spin_kernel(long long ns) {
  const long long t0 = clock64();
  while (clock64() - t0 < ns) {
  }
}

struct Inputs {
  int b = 1, nh = 64, hd = 96;
  std::vector<T*> q, k, v;  // rotating copies
  int64_t* seqlens = nullptr;
  T* out = nullptr;
  float* part_out = nullptr;
  float* part_ml = nullptr;
  int* counters = nullptr;
};

static size_t cache_elems(const Inputs& in) { return size_t(in.b) * in.nh * kCap * in.hd; }

static Inputs make_inputs(int nh, int hd, int b, int len, int copies, int q_copies) {
  Inputs in;
  in.b = b;
  in.nh = nh;
  in.hd = hd;
  for (int c = 0; c < copies; ++c) {  // K and V of a copy in one allocation: the pure read is one launch
    T* k;
    CK(cudaMalloc(&k, 2 * cache_elems(in) * sizeof(T)));
    T* v = k + cache_elems(in);
    fill_kernel<<<1024, 256>>>(k, cache_elems(in), 17u + c);
    fill_kernel<<<1024, 256>>>(v, cache_elems(in), 91u + c);
    in.k.push_back(k);
    in.v.push_back(v);
  }
  for (int c = 0; c < q_copies; ++c) {
    T* q;
    CK(cudaMalloc(&q, size_t(b) * nh * hd * sizeof(T)));
    fill_kernel<<<64, 256>>>(q, size_t(b) * nh * hd, 5u);  // the same q in every copy
    in.q.push_back(q);
  }
  std::vector<int64_t> lens(b, len);
  CK(cudaMalloc(&in.seqlens, b * sizeof(int64_t)));
  CK(cudaMemcpy(in.seqlens, lens.data(), b * sizeof(int64_t), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&in.out, size_t(b) * nh * hd * sizeof(T)));
  CK(cudaMalloc(&in.part_out, size_t(b) * nh * neox_rt::kDecodeMaxSplits * hd * sizeof(float)));
  CK(cudaMalloc(&in.part_ml, size_t(b) * nh * neox_rt::kDecodeMaxSplits * 2 * sizeof(float)));
  CK(cudaMalloc(&in.counters, size_t(b) * nh * sizeof(int)));
  CK(cudaMemset(in.counters, 0, size_t(b) * nh * sizeof(int)));
  CK(cudaDeviceSynchronize());
  return in;
}

static void free_inputs(Inputs& in) {
  for (T* k : in.k) CK(cudaFree(k));  // K and V of a copy share one allocation
  for (T* q : in.q) CK(cudaFree(q));
  for (void* p : {static_cast<void*>(in.seqlens), static_cast<void*>(in.out), static_cast<void*>(in.part_out),
                  static_cast<void*>(in.part_ml), static_cast<void*>(in.counters)})
    CK(cudaFree(p));
  in = Inputs();
}

struct Variant {
  std::string name;
  int opt, bps;
  std::function<int(int b, int nh, int sms, int bps)> split_len;
  std::function<cudaError_t(const Inputs&, int call, int split_len, bool pdl, cudaStream_t)> launch;
  int regs = 0, local = 0;
};

template <int HD, int OPT>
static Variant variant(const char* name, int bps) {
  Variant v;
  v.name = name;
  v.opt = OPT;
  v.bps = bps;
  v.split_len = [](int b, int nh, int sms, int per_sm) {
    return neox_rt::decode_attention_split_len_hd<T, HD, true, OPT>(b, nh, kCap, sms, per_sm);
  };
  v.launch = [](const Inputs& in, int call, int split_len, bool pdl, cudaStream_t s) {
    const int c = call % int(in.k.size());
    const int splits = neox_rt::decode_attention_splits(kCap, split_len);
    return neox_rt::launch_decode_split<T, HD, true, OPT>(
        in.q[call % in.q.size()], in.k[c], in.v[c], in.seqlens, in.out, in.part_out, in.part_ml, in.counters, in.b,
        in.nh, kCap, split_len, splits, (1.f / std::sqrt(float(HD))) * 1.4426950408889634f, pdl, s);
  };
  cudaFuncAttributes a;
  CK(cudaFuncGetAttributes(&a, neox_rt::decode_attention_split_kernel<T, HD, true, true, OPT>));
  v.regs = a.numRegs;
  v.local = int(a.localSizeBytes);
  return v;
}

// L2 flush that leaves the L2 clean: read a buffer larger than the L2.
static int4* g_flush = nullptr;
static size_t g_flush_n = 0;
static int* g_sink = nullptr;
static void flush_l2(cudaStream_t s) {
  read_kernel<false><<<int((g_flush_n + 2047) / 2048), 256, 0, s>>>(g_flush, g_flush_n, g_sink);
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median over `reps` runs (after `warm` discarded) of the us between two events around body(r), divided by `per`;
// before(r) runs ahead of the first event.
static double median_us(int reps, int warm, const std::function<void(int)>& before,
                        const std::function<void(int)>& body, double per, cudaStream_t s) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int r = 0; r < reps + warm; ++r) {
    before(r);
    CK(cudaEventRecord(e0, s));
    body(r);
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= warm) t.push_back(ms * 1e3 / per);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return median(t);
}

// One call, L2 cold: median us over reps.
static double time_cold(const std::function<cudaError_t(int, cudaStream_t)>& fn, cudaStream_t s, int reps = 31) {
  return median_us(
      reps, 2, [&](int) { flush_l2(s); }, [&](int r) { CK(fn(r, s)); }, 1, s);
}

// `calls` calls queued behind a spin kernel, each on the next rotating copy: per-call us, median over reps.
static double time_b2b(const std::function<cudaError_t(int, cudaStream_t)>& fn, cudaStream_t s, int calls = 48,
                       int reps = 7) {
  return median_us(
      reps, 1,
      [&](int) {
        flush_l2(s);
        spin_kernel<<<1, 1, 0, s>>>(200000);  // ~100 us: the launches below queue up behind it
      },
      [&](int) {
        for (int c = 0; c < calls; ++c) CK(fn(c, s));
      },
      calls, s);
}

static std::vector<float> output(const Inputs& in) {
  std::vector<T> h(size_t(in.b) * in.nh * in.hd);
  CK(cudaMemcpy(h.data(), in.out, h.size() * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = __half2float(h[i]);
  return f;
}

#ifdef NEOX_RT_DECODE_TRACE
// Run fn (which launches `calls` calls) with tracing on; print per-call phase statistics.
static void trace(const char* what, const std::function<void(cudaStream_t)>& fn, int calls, int blocks,
                  const std::vector<T*>& qs, cudaStream_t s, FILE* js) {
  const unsigned cap = unsigned(calls) * blocks;
  unsigned long long* buf;
  CK(cudaMalloc(&buf, size_t(cap) * 8 * sizeof(unsigned long long)));
  CK(cudaMemset(buf, 0, size_t(cap) * 8 * sizeof(unsigned long long)));
  const unsigned zero = 0;
  CK(cudaMemcpyToSymbol(neox_rt::g_decode_trace, &buf, sizeof(buf)));
  CK(cudaMemcpyToSymbol(neox_rt::g_decode_trace_next, &zero, sizeof(zero)));
  CK(cudaMemcpyToSymbol(neox_rt::g_decode_trace_cap, &cap, sizeof(cap)));
  CK(cudaDeviceSynchronize());
  fn(s);
  CK(cudaStreamSynchronize(s));
  unsigned long long* null = nullptr;
  CK(cudaMemcpyToSymbol(neox_rt::g_decode_trace, &null, sizeof(null)));
  std::vector<unsigned long long> h(size_t(cap) * 8);
  CK(cudaMemcpy(h.data(), buf, h.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  CK(cudaFree(buf));
  unsigned long long t_min = ~0ull;
  for (unsigned r = 0; r < cap; ++r)
    if (h[r * 8]) t_min = std::min(t_min, h[r * 8]);
  if (js && calls == 1)  // the raw records of a single call: SM, block, the six trace points (us)
    for (unsigned r = 0; r < cap; ++r) {
      const unsigned long long* x = &h[size_t(r) * 8];
      if (!x[0]) continue;
      std::fprintf(js, "{\"raw\": \"%s\", \"sm\": %u, \"block\": %u, \"t\": [", what, unsigned(x[7] >> 32),
                   unsigned(x[7] & 0xffffffffu));
      for (int k = 0; k < 6; ++k)
        std::fprintf(js, "%s%.3f", k ? ", " : "", x[k] ? (x[k] - t_min) * 1e-3 : -1.0);
      std::fprintf(js, "]}\n");
    }
  std::printf("trace %s (%d calls, %d blocks each; us from the first block's entry)\n", what, calls, blocks);
  std::printf("  call | entry first/last | len known med | 1st step done med/max | stream end min/med/max | "
              "ticket max | merge end max | SMs idle before end (avg us)\n");
  double prev_end = 0;
  for (int c = 0; c < calls; ++c) {
    std::vector<double> e0, e1, e2, e3, e4, e5;
    std::vector<double> sm_last(1024, -1);
    for (unsigned r = 0; r < cap; ++r) {
      const unsigned long long* x = &h[size_t(r) * 8];
      if (!x[0] || x[6] != reinterpret_cast<unsigned long long>(qs[c % qs.size()])) continue;
      if (qs.size() < size_t(calls) && size_t(r) / blocks != size_t(c)) continue;  // calls share q: by order
      auto rel = [&](unsigned long long t) { return t ? (t - t_min) * 1e-3 : NAN; };
      e0.push_back(rel(x[0]));
      if (x[1]) e1.push_back(rel(x[1]));
      if (x[2]) e2.push_back(rel(x[2]));
      if (x[3]) e3.push_back(rel(x[3]));
      if (x[4]) e4.push_back(rel(x[4]));
      if (x[5]) e5.push_back(rel(x[5]));
      const double done = rel(x[5] ? x[5] : x[4] ? x[4] : x[3]);
      const int sm = int(x[7] >> 32) & 1023;
      sm_last[sm] = std::max(sm_last[sm], done);
    }
    if (e0.empty()) continue;
    auto mn = [](std::vector<double>& v) { return v.empty() ? NAN : *std::min_element(v.begin(), v.end()); };
    auto mx = [](std::vector<double>& v) { return v.empty() ? NAN : *std::max_element(v.begin(), v.end()); };
    auto md = [](std::vector<double> v) { return v.empty() ? NAN : median(v); };
    double end = 0;
    for (double t : sm_last) end = std::max(end, t);
    double idle = 0;
    int sms = 0;
    for (double t : sm_last)
      if (t >= 0) idle += end - t, ++sms;
    std::printf("  %4d | %6.2f %6.2f | %6.2f | %6.2f %6.2f | %6.2f %6.2f %6.2f | %6.2f | %6.2f | %5.2f (%d SMs)\n", c,
                mn(e0), mx(e0), md(e1), md(e2), mx(e2), mn(e3), md(e3), mx(e3), mx(e4), mx(e5), idle / sms, sms);
    if (js)
      std::fprintf(js,
                   "{\"trace\": \"%s\", \"call\": %d, \"entry_first\": %.3f, \"entry_last\": %.3f, \"len_known_med\": "
                   "%.3f, \"first_step_med\": %.3f, \"first_step_max\": %.3f, \"stream_end_min\": %.3f, "
                   "\"stream_end_med\": %.3f, \"stream_end_max\": %.3f, \"ticket_max\": %.3f, \"merge_end_max\": "
                   "%.3f, \"sm_idle_avg\": %.3f, \"gap_from_prev_end\": %.3f}\n",
                   what, c, mn(e0), mx(e0), md(e1), md(e2), mx(e2), mn(e3), md(e3), mx(e3), mx(e4), mx(e5),
                   idle / sms, c ? md(e1) - prev_end : 0.0);
    prev_end = end;
  }
}
#endif

int main(int argc, char** argv) {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("decode_probe: no GPU, nothing to do\n");
    return 0;
  }
  FILE* js = argc > 1 ? std::fopen(argv[1], "w") : nullptr;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("decode_probe on %s (%d SMs), capacity %d, fp16\n", prop.name, sms, kCap);
  g_flush_n = (size_t(256) << 20) / 16;
  CK(cudaMalloc(&g_flush, g_flush_n * 16));
  CK(cudaMemset(g_flush, 1, g_flush_n * 16));
  CK(cudaMalloc(&g_sink, sizeof(int)));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const bool pdl = prop.major >= 9;

  using namespace neox_rt;
  // kDecodeNarrow changes head size 96 only; the 1.4B shape (head size 128) shows the prefetch alone.
  auto variants = [](auto hd_tag) {
    constexpr int HD = decltype(hd_tag)::value;
    return std::vector<Variant>{
        variant<HD, kDecodeDefaultOpt>("default (narrow+prefetch)", 4),
        variant<HD, 0>("session 4 (wide groups)", 4),
        variant<HD, kDecodeNarrow>("narrow", 4),
        variant<HD, kDecodeNarrow | kDecodePrefetchNoHint>("narrow+prefetch, no length hint", 4),
        variant<HD, kDecodeDefaultOpt>("default bps=3", 3),
    };
  };
  struct Model {
    const char* name;
    int nh, hd;
    std::vector<Variant> vars;
  };
  std::vector<Model> models = {{"gpt-neox-20b", 64, 96, variants(std::integral_constant<int, 96>())},
                               {"pythia-1.4b", 16, 128, variants(std::integral_constant<int, 128>())}};
  for (auto& v : models[0].vars)
    std::printf("  hd 96: %-36s %3d registers, %d bytes local\n", v.name.c_str(), v.regs, v.local);

  struct Case {
    int b, len, copies;
  };
  const Case cases[] = {{1, 2048, 4}, {16, 2048, 1}, {1, 128, 4}, {1, 1024, 4}};
  std::printf("\n%-13s %-3s %-5s %-36s %9s %9s %8s %8s %10s\n", "model", "b", "L", "variant", "cold us", "b2b us",
              "cold", "b2b", "max |diff|");
  for (Model& md : models)
  for (const Case& cs : cases) {
    if (md.hd != 96 && cs.b == 16) continue;
    std::vector<Variant>& vars = md.vars;
    Inputs in = make_inputs(md.nh, md.hd, cs.b, cs.len, cs.copies, 1);
    const double bytes = 2.0 * cs.b * md.nh * cs.len * md.hd * sizeof(T) + 2.0 * cs.b * md.nh * md.hd * sizeof(T);
    // the pure read of the same bytes (K and V of a copy are contiguous when the cache is full)
    if (cs.len == kCap) {
      const size_t n = 2 * cache_elems(in) * sizeof(T) / 16;
      auto rd = [&](int call, cudaStream_t st) {
        const int c = call % int(in.k.size());
        return launch_kernel(pdl, read_kernel<false>, read_kernel<true>, dim3(unsigned((n + 2047) / 2048)),
                             dim3(256), st, reinterpret_cast<const int4*>(in.k[c]), n, g_sink);
      };
      const double tc = time_cold(rd, s), tb = time_b2b(rd, s);
      std::printf("%-13s %-3d %-5d %-36s %9.2f %9.2f %6.0fGB %6.0fGB\n", md.name, cs.b, cs.len, "pure read", tc, tb,
                  bytes / tc * 1e-3, bytes / tb * 1e-3);
      if (js)
        std::fprintf(js, "{\"model\": \"%s\", \"b\": %d, \"L\": %d, \"variant\": \"pure read\", \"cold_us\": %.3f, "
                     "\"b2b_us\": %.3f, \"bytes\": %.0f}\n", md.name, cs.b, cs.len, tc, tb, bytes);
    }
    std::vector<float> ref;
    for (auto& v : vars) {
      const int sl = v.split_len(cs.b, md.nh, sms, v.bps);
      auto fn = [&](int call, cudaStream_t st) { return v.launch(in, call, sl, pdl, st); };
      CK(cudaMemset(in.out, 0xff, size_t(cs.b) * md.nh * md.hd * sizeof(T)));
      CK(fn(0, s));
      CK(cudaStreamSynchronize(s));
      std::vector<float> o = output(in);
      double diff = 0;
      if (ref.empty()) ref = o;
      for (size_t i = 0; i < o.size(); ++i)
        diff = std::isfinite(o[i]) ? std::max(diff, double(std::fabs(o[i] - ref[i]))) : INFINITY;
      const double tc = time_cold(fn, s), tb = time_b2b(fn, s);
      std::printf("%-13s %-3d %-5d %-36s %9.2f %9.2f %6.0fGB %6.0fGB %10.2g  splits=%d\n", md.name, cs.b, cs.len,
                  v.name.c_str(), tc, tb, bytes / tc * 1e-3, bytes / tb * 1e-3, diff,
                  decode_attention_splits(kCap, sl));
      if (js)
        std::fprintf(js,
                     "{\"model\": \"%s\", \"b\": %d, \"L\": %d, \"variant\": \"%s\", \"opt\": %d, \"blocks_per_sm\": "
                     "%d, \"splits\": %d, \"registers\": %d, \"cold_us\": %.3f, \"b2b_us\": %.3f, \"bytes\": %.0f, "
                     "\"max_abs_diff\": %.3g}\n",
                     md.name, cs.b, cs.len, v.name.c_str(), v.opt, v.bps, decode_attention_splits(kCap, sl), v.regs, tc,
                     tb, bytes, diff);
      if (diff > 2e-3) std::printf("  ^ output differs from the default kernel's\n");
    }
#ifdef NEOX_RT_DECODE_TRACE
    if (md.hd == 96 && cs.b == 1 && cs.len == kCap) {
      Inputs tin = make_inputs(md.nh, md.hd, 1, cs.len, 4, 8);  // 8 q copies: the trace tells the calls apart by q
      for (int vi : {0, 1}) {
        Variant& v = vars[vi];
        const int sl = v.split_len(1, md.nh, sms, v.bps);
        const int blocks = md.nh * decode_attention_splits(kCap, sl);
        trace((v.name + " cold").c_str(), [&](cudaStream_t st) { flush_l2(st); CK(v.launch(tin, 0, sl, pdl, st)); },
              1, blocks, tin.q, s, js);
        trace((v.name + " back to back").c_str(),
              [&](cudaStream_t st) {
                flush_l2(st);
                spin_kernel<<<1, 1, 0, st>>>(200000);
                for (int c = 0; c < 8; ++c) CK(v.launch(tin, c, sl, pdl, st));
              },
              8, blocks, tin.q, s, js);
      }
      free_inputs(tin);
    }
#endif
    free_inputs(in);
  }
  if (js) std::fclose(js);
  return 0;
}
