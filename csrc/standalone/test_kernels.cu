// Standalone test of the framework-free kernels against CPU references (no torch). Built by CMakeLists.txt as
// neox_rt_kernel_test; exits 0 with a notice where no GPU is present. Inputs are random, never zero; outputs are
// NaN-poisoned before each launch so an unwritten element fails. fp32 kernels are checked at 1e-4 (relative to
// the output scale); fp16 at 2e-3 (one fp16 rounding of the output plus fp32 reassociation).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "check_cuda.h"
#include "kernels/decode_attention.cuh"
#include "kernels/gemv.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/rotary_kv_write.cuh"
#include "kernels/softmax.cuh"


using neox_rt::from_float;
static std::mt19937 rng(0);
static int failures = 0;

static std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

template <typename T> static std::vector<T> cast(const std::vector<float>& v) {
  std::vector<T> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = T(v[i]);
  return o;
}
template <typename T> static float f(T x) { return float(x); }

template <typename T> struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    CK(cudaMalloc(&p, n * sizeof(T) + 16));
    CK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit Dev(size_t count) : n(count) {
    CK(cudaMalloc(&p, n * sizeof(T) + 16));
    CK(cudaMemset(p, 0xff, n * sizeof(T)));  // NaN poison for float types
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <typename T>
static void compare(const char* what, const std::vector<T>& got, const std::vector<double>& want, double rtol) {
  double scale = 1e-6, err = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = f(got[i]);
    err = std::isfinite(g) ? std::max(err, std::fabs(g - want[i])) : INFINITY;
  }
  const bool ok = err <= rtol * scale;
  std::printf("%-40s max err %.3g (scale %.3g) %s\n", what, err, scale, ok ? "ok" : "FAIL");
  failures += !ok;
}

template <typename T> static void test_softmax(int b, int nh, int s, int t, double rtol, const char* name) {
  auto x = randn(size_t(b) * nh * s * t, 3.f);
  std::vector<int64_t> pos(size_t(b) * s);
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < s; ++j) pos[size_t(i) * s + j] = (t - s) + j - i;  // offset queries, one per row
  Dev<T> dx(cast<T>(x)), dy(x.size());
  Dev<int64_t> dp(pos);
  const float scale = 0.125f;
  CK(neox_rt::launch_scaled_causal_softmax<T>(dx.p, dp.p, dy.p, b, nh, s, t, scale, 0));
  CK(cudaDeviceSynchronize());
  std::vector<double> want(x.size());
  auto xr = cast<T>(x);
  for (int r = 0; r < b * nh * s; ++r) {
    const int64_t p = pos[size_t(r / (nh * s)) * s + r % s];
    double m = -INFINITY, sum = 0;
    for (int j = 0; j <= p && j < t; ++j) m = std::max(m, double(f(xr[size_t(r) * t + j])) * scale);
    for (int j = 0; j <= p && j < t; ++j) sum += std::exp(double(f(xr[size_t(r) * t + j])) * scale - m);
    for (int j = 0; j < t; ++j)
      want[size_t(r) * t + j] = j <= p ? std::exp(double(f(xr[size_t(r) * t + j])) * scale - m) / sum : 0.0;
  }
  compare(name, dy.get(), want, rtol);
}

template <typename T> static void test_layernorm(int rows, int n, double rtol, const char* name) {
  auto x = randn(size_t(rows) * n, 2.f), w1 = randn(n), b1 = randn(n), w2 = randn(n), b2 = randn(n);
  for (auto& v : x) v += 1.5f;  // a non-zero mean exercises the centring
  auto xt = cast<T>(x), w1t = cast<T>(w1), b1t = cast<T>(b1), w2t = cast<T>(w2), b2t = cast<T>(b2);
  Dev<T> dx(xt), dw1(w1t), db1(b1t), dw2(w2t), db2(b2t), o1(x.size()), o2(x.size());
  const int vec = n % (16 / int(sizeof(T))) == 0 ? 16 / int(sizeof(T)) : 1;
  CK(neox_rt::launch_layernorm<T>(dx.p, dw1.p, db1.p, o1.p, dw2.p, db2.p, o2.p, rows, n, 1e-5f, vec, false, 0));
  CK(cudaDeviceSynchronize());
  std::vector<double> want1(x.size()), want2(x.size());
  for (int r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int j = 0; j < n; ++j) mean += f(xt[size_t(r) * n + j]);
    mean /= n;
    for (int j = 0; j < n; ++j) var += std::pow(f(xt[size_t(r) * n + j]) - mean, 2);
    const double rstd = 1 / std::sqrt(var / n + 1e-5);
    for (int j = 0; j < n; ++j) {
      const double z = (f(xt[size_t(r) * n + j]) - mean) * rstd;
      want1[size_t(r) * n + j] = z * f(w1t[j]) + f(b1t[j]);
      want2[size_t(r) * n + j] = z * f(w2t[j]) + f(b2t[j]);
    }
  }
  compare(name, o1.get(), want1, rtol);
  compare(name, o2.get(), want2, rtol);
}

template <typename T>
static void test_decode(int b, int nh, int hd, int cap, double rtol, const char* name, bool in_kernel_merge = false,
                        bool pipe = false) {
  auto q = randn(size_t(b) * nh * hd), k = randn(size_t(b) * nh * cap * hd), v = randn(size_t(b) * nh * cap * hd);
  std::vector<int64_t> len(b);
  for (int i = 0; i < b; ++i) len[i] = std::max(1, cap - 7 * i);
  auto qt = cast<T>(q), kt = cast<T>(k), vt = cast<T>(v);
  Dev<T> dq(qt), dk(kt), dv(vt), dout(q.size());
  Dev<int64_t> dl(len);
  const int split_len = 64, splits = neox_rt::decode_attention_splits(cap, split_len);
  Dev<float> po(size_t(b) * nh * splits * hd), pml(size_t(b) * nh * splits * 2);
  Dev<int> counters(std::vector<int>(size_t(b) * nh, 0));
  const float scale = 1.f / std::sqrt(float(hd));
  CK(neox_rt::launch_decode_attention<T>(dq.p, dk.p, dv.p, dl.p, dout.p, po.p, pml.p,
                                          in_kernel_merge ? counters.p : nullptr, b, nh, hd, cap, split_len, scale,
                                          false, pipe, 0));
  CK(cudaDeviceSynchronize());
  std::vector<double> want(q.size());
  for (int i = 0; i < b; ++i)
    for (int h = 0; h < nh; ++h) {
      const size_t bh = size_t(i) * nh + h;
      std::vector<double> sc(len[i]);
      double m = -INFINITY, sum = 0;
      for (int j = 0; j < len[i]; ++j) {
        double d = 0;
        for (int e = 0; e < hd; ++e) d += f(qt[bh * hd + e]) * f(kt[(bh * cap + j) * hd + e]);
        sc[j] = d * scale;
        m = std::max(m, sc[j]);
      }
      for (auto& x : sc) sum += (x = std::exp(x - m));
      for (int e = 0; e < hd; ++e) {
        double o = 0;
        for (int j = 0; j < len[i]; ++j) o += sc[j] * f(vt[(bh * cap + j) * hd + e]);
        want[bh * hd + e] = o / sum;
      }
    }
  compare(name, dout.get(), want, rtol);
}

template <typename T> static void test_rotary(int b, int s, int nh, int hd, int rd, double rtol, const char* name) {
  const int cap = 64, max_pos = 64, half = rd / 2;
  auto qkv = randn(size_t(b) * s * nh * 3 * hd);
  std::vector<float> cs(size_t(max_pos) * std::max(half, 1)), sn(cs.size());
  for (int p = 0; p < max_pos; ++p)
    for (int i = 0; i < half; ++i) {
      const double a = p / std::pow(10000.0, 2.0 * i / rd);
      cs[size_t(p) * half + i] = float(std::cos(a));
      sn[size_t(p) * half + i] = float(std::sin(a));
    }
  std::vector<int64_t> pos(size_t(b) * s);
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < s; ++j) pos[size_t(i) * s + j] = 3 * i + j;
  auto qkvt = cast<T>(qkv);
  Dev<T> dqkv(qkvt), dq(size_t(b) * s * nh * hd), dk(size_t(b) * nh * cap * hd), dv(size_t(b) * nh * cap * hd);
  Dev<float> dc(cs), ds(sn);
  Dev<int64_t> dp(pos);
  const int vec = (hd % 2 == 0 && (half == 0 || half % 2 == 0)) ? 2 : 1;
  CK(neox_rt::launch_rotary_kv_write<T>(dqkv.p, dp.p, dc.p, ds.p, dq.p, dk.p, dv.p, b, s, nh, hd, rd, cap, max_pos,
                                        vec, false, 0));
  CK(cudaDeviceSynchronize());
  std::vector<double> wq(size_t(b) * s * nh * hd);
  std::vector<double> wk, wv;
  std::vector<T> gk, gv;
  auto hk = dk.get(), hv = dv.get();
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < s; ++j)
      for (int h = 0; h < nh; ++h) {
        const size_t tok = size_t(i) * s + j, p = pos[tok];
        const T* head = &qkvt[(tok * nh + h) * 3 * hd];
        for (int d = 0; d < hd; ++d) {
          double qo = f(head[d]), ko = f(head[hd + d]);
          if (d < rd) {
            const int fi = d < half ? d : d - half, pd = d < half ? d + half : d - half;
            const double c = cs[p * half + fi], sg = (d < half ? -1 : 1) * sn[p * half + fi];
            qo = f(head[d]) * c + f(head[pd]) * sg;
            ko = f(head[hd + d]) * c + f(head[hd + pd]) * sg;
          }
          wq[(tok * nh + h) * hd + d] = qo;
          const size_t slot = ((size_t(i) * nh + h) * cap + p) * hd + d;
          wk.push_back(ko);
          wv.push_back(f(head[2 * hd + d]));
          gk.push_back(hk[slot]);
          gv.push_back(hv[slot]);
        }
      }
  compare(name, dq.get(), wq, rtol);
  compare(name, gk, wk, rtol);
  compare(name, gv, wv, 0.0);
}

template <typename T>
static void test_gemv(int m, int n, int k, int act, double rtol, const char* name, int variant = 0,
                      bool with_residual = false) {
  auto x = randn(size_t(m) * k), w = randn(size_t(n) * k, 0.05f), bias = randn(n), res = randn(size_t(m) * n);
  auto xt = cast<T>(x), wt = cast<T>(w), bt = cast<T>(bias), rt = cast<T>(res);
  Dev<T> dx(xt), dw(wt), db(bt), dr(rt), dy(size_t(m) * n);
  CK(neox_rt::launch_gemv<T>(dx.p, dw.p, db.p, with_residual ? dr.p : nullptr, dy.p, m, n, k, act, variant, false,
                             0));
  CK(cudaDeviceSynchronize());
  std::vector<double> want(size_t(m) * n);
  for (int r = 0; r < m; ++r)
    for (int o = 0; o < n; ++o) {
      double acc = f(bt[o]);
      for (int e = 0; e < k; ++e) acc += double(f(xt[size_t(r) * k + e])) * f(wt[size_t(o) * k + e]);
      if (act == neox_rt::kActGeluErf) acc = 0.5 * acc * (1 + std::erf(acc / std::sqrt(2.0)));
      if (act == neox_rt::kActGeluTanh) acc = 0.5 * acc * (1 + std::tanh(0.7978845608 * (acc + 0.044715 * acc * acc * acc)));
      if (act == neox_rt::kActRelu) acc = std::max(acc, 0.0);
      if (with_residual) acc += f(rt[size_t(r) * n + o]);
      want[size_t(r) * n + o] = acc;
    }
  compare(name, dy.get(), want, rtol);
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA GPU: kernel tests skipped (the build itself is the compile check)\n");
    return 0;
  }
  test_softmax<float>(2, 3, 5, 2500, 1e-4, "softmax fp32 t=2500");
  test_softmax<__half>(1, 2, 1, 17, 2e-3, "softmax fp16 t=17");
  test_layernorm<float>(3, 6144, 1e-4, "layernorm fp32 n=6144");
  test_layernorm<__half>(5, 2560, 4e-3, "layernorm fp16 n=2560");
  test_layernorm<__half>(2, 1001, 4e-3, "layernorm fp16 n=1001 (scalar)");
  for (int hd : {32, 64, 80, 96, 128, 256}) {
    char name[64];
    std::snprintf(name, sizeof name, "decode fp32 hd=%d", hd);
    test_decode<float>(3, 2, hd, 300, 1e-4, name);
  }
  test_decode<__half>(2, 2, 96, 17, 2e-3, "decode fp16 hd=96 T=17");
  test_decode<__nv_bfloat16>(2, 2, 128, 200, 1.6e-2, "decode bf16 hd=128 T=200");
  test_decode<__half>(3, 4, 96, 700, 2e-3, "decode fp16 hd=96 T=700 in-kernel merge", true);
  test_decode<__half>(3, 4, 96, 700, 2e-3, "decode fp16 hd=96 T=700 pipelined", true, true);
  test_rotary<float>(2, 3, 4, 96, 24, 1e-5, "rotary fp32 hd=96 rd=24");
  test_rotary<float>(1, 1, 2, 80, 20, 1e-5, "rotary fp32 hd=80 rd=20");
  test_gemv<__half>(1, 301, 512, neox_rt::kActGeluErf, 2e-3, "gemv fp16 m=1 gelu");
  test_gemv<__half>(5, 64, 1024, neox_rt::kActGeluTanh, 2e-3, "gemv fp16 m=5 gelu_tanh");
  test_gemv<__nv_bfloat16>(16, 33, 256, neox_rt::kActNone, 1.6e-2, "gemv bf16 m=16");
  test_gemv<__half>(1, 97, 1032, neox_rt::kActNone, 2e-3, "gemv fp16 m=1 k=1032 residual", 0, true);
  test_gemv<__half>(2, 130, 4096, neox_rt::kActNone, 2e-3, "gemv fp16 m=2 residual", 0, true);
  test_gemv<__half>(3, 77, 520, neox_rt::kActRelu, 2e-3, "gemv fp16 m=3 legacy residual", 1, true);
  test_gemv<__half>(1, 45, 4096, neox_rt::kActNone, 2e-3, "gemv fp16 m=1 k split 4", neox_rt::kGemvSplit4, true);
  test_gemv<__half>(1, 301, 512, neox_rt::kActGeluErf, 2e-3, "gemv fp16 m=1 wide 8 rows", neox_rt::kGemvWide8, true);
  test_gemv<__half>(1, 45, 4096, neox_rt::kActNone, 2e-3, "gemv fp16 m=1 wide 4 rows", neox_rt::kGemvWide4, true);
  test_gemv<__half>(1, 301, 1536, neox_rt::kActGeluTanh, 2e-3, "gemv fp16 m=1 wide 16 rows", neox_rt::kGemvWide16,
                    true);
  test_gemv<__nv_bfloat16>(2, 37, 1024, neox_rt::kActGeluTanh, 1.6e-2, "gemv bf16 m=2 wide 4 rows",
                           neox_rt::kGemvWide4, true);
  test_gemv<__half>(1, 97, 1032, neox_rt::kActNone, 2e-3, "gemv fp16 m=1 wide, k % 64 != 0 (legacy)",
                    neox_rt::kGemvWide4, true);
  test_gemv<__nv_bfloat16>(2, 37, 1040, neox_rt::kActGeluTanh, 1.6e-2, "gemv bf16 m=2 k split 2",
                           neox_rt::kGemvSplit2, true);
  test_gemv<__half>(12, 45, 768, neox_rt::kActGeluTanh, 2e-3, "gemv fp16 m=12 tensor cores, 8 warps",
                    neox_rt::kGemvMma8, true);
  test_gemv<__half>(9, 17, 384, neox_rt::kActNone, 2e-3, "gemv fp16 m=9 tensor cores, 16 warps", neox_rt::kGemvMma16,
                    true);
  test_gemv<__nv_bfloat16>(4, 64, 2048, neox_rt::kActGeluErf, 1.6e-2, "gemv bf16 m=4 tensor cores, 3 steps",
                           neox_rt::kGemvMma8Deep, true);
  test_gemv<__half>(16, 40, 2560, neox_rt::kActNone, 2e-3, "gemv fp16 m=16 tensor cores, 16 warps, 3 steps",
                    neox_rt::kGemvMma16Deep, true);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "all kernel tests passed", failures);
  return failures ? 1 : 0;
}
