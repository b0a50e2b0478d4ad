// d2norm's CPU kernels (loaded and compiled on first use by d2norm/layers/native.py; see its docstring).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define D2NORM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define D2NORM_CLONES
#endif

// Sum of f(p[i]) over a row in K independent double lanes, then the tail. The adds of one lane form a dependency
// chain; long rows use K = 32 (four AVX-512 / eight AVX2 accumulators hide the add latency), short rows K = 8
// (one vector: the chains of consecutive rows overlap instead, and there is no 32-lane set-up per row).
template <int K, typename T, typename F>
__attribute__((always_inline)) static inline double lane_sum(const T* p, int64_t n, F f) {
  double s[K];
  for (int j = 0; j < K; ++j) s[j] = 0.0;
  int64_t i = 0;
  for (; i + K <= n; i += K)
    for (int j = 0; j < K; ++j) s[j] += f(static_cast<double>(p[i + j]));
  for (int j = 8; j < K; ++j) s[j % 8] += s[j];
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += f(static_cast<double>(p[i + j]));
  double tot = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) tot += f(static_cast<double>(p[i]));
  return tot;
}

template <int K, typename T>
__attribute__((always_inline)) static inline void moments_of_row(const T* p, int64_t n, double* mean_out,
                                                                 double* var_out) {
  const double m = lane_sum<K>(p, n, [](double v) { return v; }) / static_cast<double>(n);
  const double sq = lane_sum<K>(p, n, [m](double v) { const double d = v - m; return d * d; });
  *mean_out = m;
  *var_out = sq / static_cast<double>(n);
}

template <int K, typename T>
__attribute__((always_inline)) static inline void rows(const T* x, int64_t b, int64_t e, int64_t n, T* mean,
                                                       T* var) {
  for (int64_t r = b; r < e; ++r) {
    double m, v;
    moments_of_row<K, T>(x + r * n, n, &m, &v);
    mean[r] = static_cast<T>(m);
    var[r] = static_cast<T>(v);
  }
}

D2NORM_CLONES static void rows_f32(const float* x, int64_t b, int64_t e, int64_t n, float* mean, float* var) {
  if (n >= 256) rows<32, float>(x, b, e, n, mean, var);
  else rows<8, float>(x, b, e, n, mean, var);
}

D2NORM_CLONES static void rows_f64(const double* x, int64_t b, int64_t e, int64_t n, double* mean, double* var) {
  if (n >= 256) rows<32, double>(x, b, e, n, mean, var);
  else rows<8, double>(x, b, e, n, mean, var);
}

template <typename T>
__attribute__((always_inline)) static inline void affine_rows(const T* x, int64_t b, int64_t e, int64_t n,
                                                              const T* scale, const T* shift, T* y) {
  for (int64_t r = b; r < e; ++r) {
    const T s = scale[r], t = shift[r];
    const T* p = x + r * n;
    T* q = y + r * n;
    for (int64_t i = 0; i < n; ++i) q[i] = p[i] * s + t;
  }
}

D2NORM_CLONES static void affine_f32(const float* x, int64_t b, int64_t e, int64_t n, const float* s,
                                     const float* t, float* y) {
  affine_rows<float>(x, b, e, n, s, t, y);
}

D2NORM_CLONES static void affine_f64(const double* x, int64_t b, int64_t e, int64_t n, const double* s,
                                     const double* t, double* y) {
  affine_rows<double>(x, b, e, n, s, t, y);
}

// y = x * scale[r] + shift[r] over the R = scale.numel() equal rows of the flat contiguous x; y has x's shape
// (the compiler may fuse it into one multiply-add: one rounding)
torch::Tensor row_affine(torch::Tensor x, torch::Tensor scale, torch::Tensor shift) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() > 0, "row_affine: contiguous CPU tensor");
  TORCH_CHECK(scale.is_contiguous() && shift.is_contiguous() && scale.numel() > 0 &&
              shift.numel() == scale.numel() && x.numel() % scale.numel() == 0,
              "row_affine: one contiguous scale and shift per row");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && shift.scalar_type() == x.scalar_type(),
              "row_affine: one dtype");
  const int64_t rows = scale.numel(), n = x.numel() / rows;
  auto y = torch::empty_like(x);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  if (x.scalar_type() == torch::kFloat) {
    const float *px = x.data_ptr<float>(), *ps = scale.data_ptr<float>(), *pt = shift.data_ptr<float>();
    float* py = y.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { affine_f32(px, b, e, n, ps, pt, py); });
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kDouble, "row_affine: float32 or float64 expected");
    const double *px = x.data_ptr<double>(), *ps = scale.data_ptr<double>(), *pt = shift.data_ptr<double>();
    double* py = y.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { affine_f64(px, b, e, n, ps, pt, py); });
  }
  return y;
}

// y = x − mean(x[r]) per row r of the (rows, n) view (mabn eq 18's weight centralization, and its backward,
// which is the same projection): the row's mean in double lanes, then the subtraction while the row is still in
// cache — one read of x from memory and one write, where torch's mean + sub reads it twice.
template <typename T>
__attribute__((always_inline)) static inline void center_rows(const T* x, int64_t b, int64_t e, int64_t n, T* y) {
  for (int64_t r = b; r < e; ++r) {
    const T* p = x + r * n;
    T* q = y + r * n;
    const T m = static_cast<T>((n >= 256 ? lane_sum<32>(p, n, [](double v) { return v; })
                                         : lane_sum<8>(p, n, [](double v) { return v; })) / static_cast<double>(n));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) q[i] = p[i] - m;
  }
}

D2NORM_CLONES static void center_f32(const float* x, int64_t b, int64_t e, int64_t n, float* y) {
  center_rows<float>(x, b, e, n, y);
}

D2NORM_CLONES static void center_f64(const double* x, int64_t b, int64_t e, int64_t n, double* y) {
  center_rows<double>(x, b, e, n, y);
}

torch::Tensor row_center(torch::Tensor x, int64_t rows) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() > 0, "row_center: contiguous CPU tensor");
  TORCH_CHECK(rows > 0 && x.numel() % rows == 0, "row_center: rows must divide the element count");
  const int64_t n = x.numel() / rows;
  auto y = torch::empty_like(x);
  const int64_t grain = std::max<int64_t>(1, 65536 / n);
  if (x.scalar_type() == torch::kFloat) {
    const float* px = x.data_ptr<float>();
    float* py = y.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { center_f32(px, b, e, n, py); });
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kDouble, "row_center: float32 or float64 expected");
    const double* px = x.data_ptr<double>();
    double* py = y.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { center_f64(px, b, e, n, py); });
  }
  return y;
}

// Per row r, with t = x·a[r] + b[r] and sign(0) = 0: Σ|t|, Σ sign(t), Σ sign(t)·x (evalnorm eq 9's L1 term and
// its gradient statistics) in double, one pass, nothing written but the three sums. `omp simd` allows the
// vectorized reduction (lane order fixed per instruction set).
template <typename T>
__attribute__((always_inline)) static inline void l1_rows(const T* x, int64_t b0, int64_t e0, int64_t n, const T* a,
                                                          const T* b, T* abs_sum, T* s1, T* s2) {
  for (int64_t r = b0; r < e0; ++r) {
    const double ar = a[r], br = b[r];
    const T* p = x + r * n;
    double su = 0, sv = 0, sw = 0;
#pragma omp simd reduction(+ : su, sv, sw)
    for (int64_t i = 0; i < n; ++i) {
      const double xv = static_cast<double>(p[i]);
      const double t = xv * ar + br;
      const double sg = static_cast<double>(t > 0) - static_cast<double>(t < 0);
      su += sg * t;
      sv += sg;
      sw += sg * xv;
    }
    abs_sum[r] = static_cast<T>(su);
    s1[r] = static_cast<T>(sv);
    s2[r] = static_cast<T>(sw);
  }
}

D2NORM_CLONES static void l1_f32(const float* x, int64_t b0, int64_t e0, int64_t n, const float* a, const float* b,
                                 float* o, float* s1, float* s2) {
  l1_rows<float>(x, b0, e0, n, a, b, o, s1, s2);
}

D2NORM_CLONES static void l1_f64(const double* x, int64_t b0, int64_t e0, int64_t n, const double* a,
                                 const double* b, double* o, double* s1, double* s2) {
  l1_rows<double>(x, b0, e0, n, a, b, o, s1, s2);
}

std::vector<torch::Tensor> row_affine_l1(torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "row_affine_l1: contiguous CPU (rows, n)");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.numel() == x.size(0) && b.numel() == x.size(0),
              "row_affine_l1: one contiguous a and b per row");
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(), "row_affine_l1: one dtype");
  const int64_t rows = x.size(0), n = x.size(1);
  auto o = torch::empty({rows}, x.options()), s1 = torch::empty({rows}, x.options()),
       s2 = torch::empty({rows}, x.options());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  if (x.scalar_type() == torch::kFloat) {
    const float *px = x.data_ptr<float>(), *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
    float *po = o.data_ptr<float>(), *p1 = s1.data_ptr<float>(), *p2 = s2.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) { l1_f32(px, b0, e0, n, pa, pb, po, p1, p2); });
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kDouble, "row_affine_l1: float32 or float64 expected");
    const double *px = x.data_ptr<double>(), *pa = a.data_ptr<double>(), *pb = b.data_ptr<double>();
    double *po = o.data_ptr<double>(), *p1 = s1.data_ptr<double>(), *p2 = s2.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) { l1_f64(px, b0, e0, n, pa, pb, po, p1, p2); });
  }
  return {o, s1, s2};
}

// Backward of a per-row affine y = x·s + t whose (s, t) came from the rows' own moments:
// row_dot_sums: per row Σg and Σg·x (the gradients of t and s); row_affine2: g·s + x·a + b per row (the input
// gradient, the moments' part folded into a and b). Double accumulation; one pass each.
// Σg and Σg·x over one row of n elements, in double
template <typename T>
__attribute__((always_inline)) static inline void dot_of_row(const T* pg, const T* px, int64_t n, double* su,
                                                             double* sv) {
  double u = 0, v = 0;
#pragma omp simd reduction(+ : u, v)
  for (int64_t i = 0; i < n; ++i) {
    const double gv = static_cast<double>(pg[i]);
    u += gv;
    v += gv * static_cast<double>(px[i]);
  }
  *su = u;
  *sv = v;
}

// q = g·s + (x·a + b) over one row of n elements
template <typename T>
__attribute__((always_inline)) static inline void affine2_of_row(const T* pg, T s, const T* px, T a, T b, int64_t n,
                                                                 T* q) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = pg[i] * s + (px[i] * a + b);
}

template <typename T>
__attribute__((always_inline)) static inline void dot_rows(const T* g, const T* x, int64_t b0, int64_t e0, int64_t n,
                                                           T* sg, T* sgx) {
  for (int64_t r = b0; r < e0; ++r) {
    double u, v;
    dot_of_row<T>(g + r * n, x + r * n, n, &u, &v);
    sg[r] = static_cast<T>(u);
    sgx[r] = static_cast<T>(v);
  }
}

template <typename T>
__attribute__((always_inline)) static inline void affine2_rows(const T* g, const T* s, const T* x, const T* a,
                                                               const T* b, int64_t b0, int64_t e0, int64_t n, T* y) {
  for (int64_t r = b0; r < e0; ++r) affine2_of_row<T>(g + r * n, s[r], x + r * n, a[r], b[r], n, y + r * n);
}

D2NORM_CLONES static void dot_f32(const float* g, const float* x, int64_t b0, int64_t e0, int64_t n, float* u,
                                  float* v) {
  dot_rows<float>(g, x, b0, e0, n, u, v);
}
D2NORM_CLONES static void dot_f64(const double* g, const double* x, int64_t b0, int64_t e0, int64_t n, double* u,
                                  double* v) {
  dot_rows<double>(g, x, b0, e0, n, u, v);
}
D2NORM_CLONES static void aff2_f32(const float* g, const float* s, const float* x, const float* a, const float* b,
                                   int64_t b0, int64_t e0, int64_t n, float* y) {
  affine2_rows<float>(g, s, x, a, b, b0, e0, n, y);
}
D2NORM_CLONES static void aff2_f64(const double* g, const double* s, const double* x, const double* a,
                                   const double* b, int64_t b0, int64_t e0, int64_t n, double* y) {
  affine2_rows<double>(g, s, x, a, b, b0, e0, n, y);
}

static void check_rows(const torch::Tensor& x, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() > 0, what, ": contiguous CPU tensor");
  TORCH_CHECK(like.sizes() == x.sizes() && like.is_contiguous() && like.scalar_type() == x.scalar_type(), what,
              ": operands of one shape, contiguous, one dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble, what,
              ": float32 or float64 expected");
}

static void check_coef(const torch::Tensor& c, int64_t rows, const torch::Tensor& x, const char* what) {
  TORCH_CHECK(c.is_contiguous() && c.numel() == rows && c.scalar_type() == x.scalar_type(), what,
              ": one contiguous coefficient per row, same dtype");
}

// per row of the (rows, n) view of the flat g and x
std::vector<torch::Tensor> row_dot_sums(torch::Tensor g, torch::Tensor x, int64_t rows) {
  check_rows(g, x, "row_dot_sums");
  TORCH_CHECK(rows > 0 && g.numel() % rows == 0, "row_dot_sums: rows must divide the element count");
  const int64_t n = g.numel() / rows;
  auto u = torch::empty({rows}, g.options()), v = torch::empty({rows}, g.options());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  if (g.scalar_type() == torch::kFloat) {
    const float *pg = g.data_ptr<float>(), *px = x.data_ptr<float>();
    float *pu = u.data_ptr<float>(), *pv = v.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) { dot_f32(pg, px, b0, e0, n, pu, pv); });
  } else {
    const double *pg = g.data_ptr<double>(), *px = x.data_ptr<double>();
    double *pu = u.data_ptr<double>(), *pv = v.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) { dot_f64(pg, px, b0, e0, n, pu, pv); });
  }
  return {u, v};
}

// g·s[r] + x·a[r] + b[r] over the R = s.numel() rows of the flat g and x; the result has g's shape
torch::Tensor row_affine2(torch::Tensor g, torch::Tensor s, torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  check_rows(g, x, "row_affine2");
  const int64_t rows = s.numel();
  TORCH_CHECK(rows > 0 && g.numel() % rows == 0, "row_affine2: one coefficient per row");
  check_coef(s, rows, g, "row_affine2");
  check_coef(a, rows, g, "row_affine2");
  check_coef(b, rows, g, "row_affine2");
  const int64_t n = g.numel() / rows;
  auto y = torch::empty_like(g);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
  if (g.scalar_type() == torch::kFloat) {
    const float *pg = g.data_ptr<float>(), *ps = s.data_ptr<float>(), *px = x.data_ptr<float>(),
                *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
    float* py = y.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) { aff2_f32(pg, ps, px, pa, pb, b0, e0, n, py); });
  } else {
    const double *pg = g.data_ptr<double>(), *ps = s.data_ptr<double>(), *px = x.data_ptr<double>(),
                 *pa = a.data_ptr<double>(), *pb = b.data_ptr<double>();
    double* py = y.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) { aff2_f64(pg, ps, px, pa, pb, b0, e0, n, py); });
  }
  return y;
}

// Inference of the layers that mix each sample's own statistics into the population's (four-things eq 3,
// evalnorm eqs 5-6): per (sample, channel) row r of channel c = r % C, with the row's mean / biased variance
// (m_i, v_i) and d = m_i - pm[c]: mu = pm + a_m·d, var = a_v·v_i + (1 - a_v)·pv + a_v·(1 - a_v)·d²,
// y = (x - mu) / sqrt(var + eps) · w[c] + b[c]. Three passes over the row, the last two from cache: the
// activation is read once from memory and written once, like BN inference.
template <typename T>
__attribute__((always_inline)) static inline void mix_rows(const T* x, int64_t b0, int64_t e0, int64_t L, int64_t G,
                                                           int64_t cpg, const T* pm, const T* pv, const T* w,
                                                           const T* bb, double am, double av, double eps, T* y) {
  const int64_t n = cpg * L;  // one row = one (sample, channel group): cpg channels of L positions
  for (int64_t r = b0; r < e0; ++r) {
    const int64_t g = r % G;
    const T* p = x + r * n;
    double mi, vi;
    if (n >= 256) moments_of_row<32, T>(p, n, &mi, &vi);
    else moments_of_row<8, T>(p, n, &mi, &vi);
    const double d = mi - static_cast<double>(pm[g]);
    const double mu = static_cast<double>(pm[g]) + am * d;
    const double var = av * vi + (1.0 - av) * static_cast<double>(pv[g]) + av * (1.0 - av) * d * d;
    const double rs = 1.0 / std::sqrt(var + eps);
    for (int64_t j = 0; j < cpg; ++j) {
      const int64_t c = g * cpg + j;
      const double sc = w != nullptr ? rs * static_cast<double>(w[c]) : rs;
      const double sh = (bb != nullptr ? static_cast<double>(bb[c]) : 0.0) - mu * sc;
      const T s = static_cast<T>(sc), t = static_cast<T>(sh);
      const T* pj = p + j * L;
      T* q = y + r * n + j * L;
#pragma omp simd
      for (int64_t i = 0; i < L; ++i) q[i] = pj[i] * s + t;
    }
  }
}

D2NORM_CLONES static void mix_f32(const float* x, int64_t b0, int64_t e0, int64_t L, int64_t G, int64_t cpg,
                                  const float* pm, const float* pv, const float* w, const float* b, double am,
                                  double av, double eps, float* y) {
  mix_rows<float>(x, b0, e0, L, G, cpg, pm, pv, w, b, am, av, eps, y);
}

D2NORM_CLONES static void mix_f64(const double* x, int64_t b0, int64_t e0, int64_t L, int64_t G, int64_t cpg,
                                  const double* pm, const double* pv, const double* w, const double* b, double am,
                                  double av, double eps, double* y) {
  mix_rows<double>(x, b0, e0, L, G, cpg, pm, pv, w, b, am, av, eps, y);
}

torch::Tensor mix_normalize(torch::Tensor x, torch::Tensor pm, torch::Tensor pv, torch::Tensor w, torch::Tensor b,
                            double am, double av, double eps, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2 && x.numel() > 0,
              "mix_normalize: contiguous CPU (N, C, ...) tensor");
  const int64_t C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "mix_normalize: groups must divide C");
  const int64_t G = groups, cpg = C / G, rows = x.size(0) * G, L = x.numel() / (x.size(0) * C);
  auto ok = [&](const torch::Tensor& t, int64_t k) {
    return t.is_contiguous() && t.numel() == k && t.scalar_type() == x.scalar_type();
  };
  TORCH_CHECK(ok(pm, G) && ok(pv, G), "mix_normalize: population mean / var of one element per group, x's dtype");
  TORCH_CHECK((w.numel() == 0 || ok(w, C)) && (b.numel() == 0 || ok(b, C)), "mix_normalize: weight / bias of C elements");
  auto y = torch::empty_like(x);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(cpg * L, 1));
  if (x.scalar_type() == torch::kFloat) {
    const float *px = x.data_ptr<float>(), *pm_ = pm.data_ptr<float>(), *pv_ = pv.data_ptr<float>();
    const float *pw = w.numel() ? w.data_ptr<float>() : nullptr, *pb = b.numel() ? b.data_ptr<float>() : nullptr;
    float* py = y.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) {
      mix_f32(px, b0, e0, L, G, cpg, pm_, pv_, pw, pb, am, av, eps, py);
    });
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kDouble, "mix_normalize: float32 or float64 expected");
    const double *px = x.data_ptr<double>(), *pm_ = pm.data_ptr<double>(), *pv_ = pv.data_ptr<double>();
    const double *pw = w.numel() ? w.data_ptr<double>() : nullptr, *pb = b.numel() ? b.data_ptr<double>() : nullptr;
    double* py = y.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b0, int64_t e0) {
      mix_f64(px, b0, e0, L, G, cpg, pm_, pv_, pw, pb, am, av, eps, py);
    });
  }
  return y;
}

// Per-channel mean / biased variance of a contiguous (N, C, L) tensor over its N·L elements (BN's batch
// statistics, rethinking §4.2 inference): two passes over each channel's N rows with the lanes kept across rows
// (no per-row reduction), the second pass from cache when a channel's N·L values fit in it. Parallel over C.
// Σ f(x) over channel c's N rows of L elements in K double lanes kept across the rows, then the tail (K = 32
// for long rows: several accumulator vectors hide the add latency, as in lane_sum)
template <int K, typename T, typename F>
__attribute__((always_inline)) static inline double channel_sum(const T* x, int64_t c, int64_t N, int64_t C,
                                                                int64_t L, F f) {
  double s[K];
  for (int j = 0; j < K; ++j) s[j] = 0.0;
  double tail = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T* p = x + (n * C + c) * L;
    int64_t i = 0;
    for (; i + K <= L; i += K)
      for (int j = 0; j < K; ++j) s[j] += f(static_cast<double>(p[i + j]));
    for (; i < L; ++i) tail += f(static_cast<double>(p[i]));
  }
  for (int j = 8; j < K; ++j) s[j % 8] += s[j];
  return (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) + tail;
}

template <int K, typename T>
__attribute__((always_inline)) static inline void channel_rows_k(const T* x, int64_t c0, int64_t c1, int64_t N,
                                                                 int64_t C, int64_t L, T* mean, T* var) {
  const double cnt = static_cast<double>(N * L);
  for (int64_t c = c0; c < c1; ++c) {
    const double m = channel_sum<K>(x, c, N, C, L, [](double v) { return v; }) / cnt;
    const double q = channel_sum<K>(x, c, N, C, L, [m](double v) { const double d = v - m; return d * d; });
    mean[c] = static_cast<T>(m);
    var[c] = static_cast<T>(q / cnt);
  }
}

template <typename T>
__attribute__((always_inline)) static inline void channel_rows(const T* x, int64_t c0, int64_t c1, int64_t N,
                                                               int64_t C, int64_t L, T* mean, T* var) {
  if (L >= 256) channel_rows_k<32, T>(x, c0, c1, N, C, L, mean, var);
  else channel_rows_k<8, T>(x, c0, c1, N, C, L, mean, var);
}

D2NORM_CLONES static void chan_f32(const float* x, int64_t c0, int64_t c1, int64_t N, int64_t C, int64_t L,
                                   float* m, float* v) {
  channel_rows<float>(x, c0, c1, N, C, L, m, v);
}

D2NORM_CLONES static void chan_f64(const double* x, int64_t c0, int64_t c1, int64_t N, int64_t C, int64_t L,
                                   double* m, double* v) {
  channel_rows<double>(x, c0, c1, N, C, L, m, v);
}

// Short rows (L < 256, e.g. RoI features of 7×7): the rows of one channel are scattered over the tensor, so the
// per-channel loops above read them strided, and per-row reductions cost more than the row's memory. Instead x is
// streamed once in memory order into 8 double lanes per channel of Σd and Σd², d = x − s_c, shifted by the mean
// s_c of the channel's first row: var = E[d²] − E[d]² on values centred near the channel mean, whose rounding
// error is eps_double · (μ − s_c)²/σ² ≤ eps_double · N (one sample's squared deviation is at most N·σ²).
// Rows are split into fixed chunks of samples (independent of the thread count), each with its own lanes,
// summed in chunk order at the end: deterministic.
template <typename T>
__attribute__((always_inline)) static inline void short_rows_chunk(const T* x, int64_t n0, int64_t n1, int64_t C,
                                                                   int64_t L, const double* shift, double* s1,
                                                                   double* s2) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const T* p = x + (n * C + c) * L;
      const double sh = shift[c];
      double* a1 = s1 + c * 8;
      double* a2 = s2 + c * 8;
      double l1[8], l2[8];
      for (int j = 0; j < 8; ++j) { l1[j] = a1[j]; l2[j] = a2[j]; }
      int64_t i = 0;
      for (; i + 8 <= L; i += 8) {
#pragma omp simd
        for (int j = 0; j < 8; ++j) {
          const double d = static_cast<double>(p[i + j]) - sh;
          l1[j] += d;
          l2[j] += d * d;
        }
      }
      for (int j = 0; i < L; ++i, ++j) {
        const double d = static_cast<double>(p[i]) - sh;
        l1[j] += d;
        l2[j] += d * d;
      }
      for (int j = 0; j < 8; ++j) { a1[j] = l1[j]; a2[j] = l2[j]; }
    }
  }
}

D2NORM_CLONES static void short_rows_f32(const float* x, int64_t n0, int64_t n1, int64_t C, int64_t L,
                                         const double* shift, double* s1, double* s2) {
  short_rows_chunk<float>(x, n0, n1, C, L, shift, s1, s2);
}
D2NORM_CLONES static void short_rows_f64(const double* x, int64_t n0, int64_t n1, int64_t C, int64_t L,
                                         const double* shift, double* s1, double* s2) {
  short_rows_chunk<double>(x, n0, n1, C, L, shift, s1, s2);
}

template <typename T>
static void channel_moments_short_rows(const T* x, int64_t N, int64_t C, int64_t L, T* mean_out, T* var_out) {
  const int64_t chunk = std::max<int64_t>(1, (65536 / std::max<int64_t>(C * L, 1)));
  const int64_t nchunks = (N + chunk - 1) / chunk;
  std::vector<double> shift(C), s1(nchunks * C * 8, 0.0), s2(nchunks * C * 8, 0.0);
  for (int64_t c = 0; c < C; ++c) shift[c] = lane_sum<8>(x + c * L, L, [](double v) { return v; }) / L;
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n0 = k * chunk, n1 = std::min(N, (k + 1) * chunk);
      double *p1 = s1.data() + k * C * 8, *p2 = s2.data() + k * C * 8;
      if constexpr (std::is_same<T, float>::value) short_rows_f32(x, n0, n1, C, L, shift.data(), p1, p2);
      else short_rows_f64(x, n0, n1, C, L, shift.data(), p1, p2);
    }
  });
  const double cnt = static_cast<double>(N * L);
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0.0, t2 = 0.0;
    for (int64_t k = 0; k < nchunks; ++k)
      for (int j = 0; j < 8; ++j) {
        t1 += s1[(k * C + c) * 8 + j];
        t2 += s2[(k * C + c) * 8 + j];
      }
    const double md = t1 / cnt;
    mean_out[c] = static_cast<T>(shift[c] + md);
    var_out[c] = static_cast<T>(std::max(0.0, t2 / cnt - md * md));
  }
}

std::vector<torch::Tensor> channel_moments(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2 && x.numel() > 0,
              "channel_moments: contiguous CPU (N, C, ...) tensor");
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  auto mean = torch::empty({C}, x.options()), var = torch::empty({C}, x.options());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(N * L, 1));
  if (x.scalar_type() == torch::kFloat) {
    const float* px = x.data_ptr<float>();
    float *pm = mean.data_ptr<float>(), *pv = var.data_ptr<float>();
    if (L < 256) channel_moments_short_rows<float>(px, N, C, L, pm, pv);
    else at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) { chan_f32(px, c0, c1, N, C, L, pm, pv); });
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kDouble, "channel_moments: float32 or float64 expected");
    const double* px = x.data_ptr<double>();
    double *pm = mean.data_ptr<double>(), *pv = var.data_ptr<double>();
    if (L < 256) channel_moments_short_rows<double>(px, N, C, L, pm, pv);
    else at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) { chan_f64(px, c0, c1, N, C, L, pm, pv); });
  }
  return {mean, var};
}

// ---- (example group × channel group) block normalization: GhostBN / BGN training (four-things eq 4, §3.4) ----
// x (N, C, L) contiguous; example groups [starts[e], starts[e+1]); channel group g = channels [g·cpg, (g+1)·cpg),
// which in example n is one contiguous span of cpg·L elements. One task per block (e, g): the block's spans are
// read from memory once and stay in cache for the second moments pass and the output pass.
template <typename T>
__attribute__((always_inline)) static inline void block_fwd(const T* x, const int64_t* starts, int64_t b0, int64_t b1,
                                                            int64_t G, int64_t C, int64_t L, const T* w, const T* bias,
                                                            double eps, T* y, T* mu, T* var, T* bmean, T* brstd) {
  const int64_t cpg = C / G, m = cpg * L;
  std::vector<double> ex;  // the block's per-example (mean, variance) in double
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t e = blk / G, g = blk % G, n0 = starts[e], n1 = starts[e + 1];
    ex.resize(2 * (n1 - n0));
    double mean_sum = 0.0;
    for (int64_t n = n0; n < n1; ++n) {
      double mm, vv;
      const T* p = x + (n * C + g * cpg) * L;
      if (m >= 256) moments_of_row<32, T>(p, m, &mm, &vv);
      else moments_of_row<8, T>(p, m, &mm, &vv);
      mu[n * G + g] = static_cast<T>(mm);
      var[n * G + g] = static_cast<T>(vv);
      ex[2 * (n - n0)] = mm;
      ex[2 * (n - n0) + 1] = vv;
      mean_sum += mm;
    }
    const double cnt = static_cast<double>(n1 - n0);
    const double me = mean_sum / cnt;
    double ve = 0.0;  // pooled exactly: mean of v_i + (μ_i − μ_e)² (no E[x²] − μ² cancellation)
    for (int64_t i = 0; i < n1 - n0; ++i) ve += ex[2 * i + 1] + (ex[2 * i] - me) * (ex[2 * i] - me);
    ve /= cnt;
    const double r = 1.0 / std::sqrt(ve + eps);
    bmean[blk] = static_cast<T>(me);
    brstd[blk] = static_cast<T>(r);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t ch = g * cpg + j;
        const double sd = r * (w ? static_cast<double>(w[ch]) : 1.0);
        const T s = static_cast<T>(sd), t = static_cast<T>((bias ? static_cast<double>(bias[ch]) : 0.0) - me * sd);
        const T* p = x + (n * C + ch) * L;
        T* q = y + (n * C + ch) * L;
#pragma omp simd
        for (int64_t i = 0; i < L; ++i) q[i] = p[i] * s + t;
      }
    }
  }
}

template <typename T>
__attribute__((always_inline)) static inline void block_bwd(const T* gy, const T* x, const int64_t* starts, int64_t b0,
                                                            int64_t b1, int64_t G, int64_t C, int64_t L, const T* w,
                                                            const T* bmean, const T* brstd, T* gx, T* sg, T* sgxh) {
  const int64_t cpg = C / G;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t e = blk / G, g = blk % G, n0 = starts[e], n1 = starts[e + 1];
    const double me = bmean[blk], r = brstd[blk];
    double A = 0.0, B = 0.0;  // Σ γ·gy and Σ γ·gy·x̂ over the block
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t ch = g * cpg + j, row = n * C + ch;
        double u, v;
        dot_of_row<T>(gy + row * L, x + row * L, L, &u, &v);
        const double xh = r * (v - me * u);  // Σ gy·x̂ of the row
        sg[row] = static_cast<T>(u);
        sgxh[row] = static_cast<T>(xh);
        const double wc = w ? static_cast<double>(w[ch]) : 1.0;
        A += wc * u;
        B += wc * xh;
      }
    }
    if (!gx) continue;
    const double M = static_cast<double>((n1 - n0) * cpg * L);
    // dx = r·(γ·gy − A/M − x̂·B/M) = (r·γ)·gy + x·(−r²B/M) + r·(r·μ·B − A)/M
    const T ax = static_cast<T>(-r * r * B / M), a1 = static_cast<T>(r * (r * me * B - A) / M);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t ch = g * cpg + j, row = n * C + ch;
        const T s = static_cast<T>(r * (w ? static_cast<double>(w[ch]) : 1.0));
        affine2_of_row<T>(gy + row * L, s, x + row * L, ax, a1, L, gx + row * L);
      }
    }
  }
}

D2NORM_CLONES static void block_fwd_f32(const float* x, const int64_t* st, int64_t b0, int64_t b1, int64_t G,
                                        int64_t C, int64_t L, const float* w, const float* b, double eps, float* y,
                                        float* mu, float* var, float* bm, float* br) {
  block_fwd<float>(x, st, b0, b1, G, C, L, w, b, eps, y, mu, var, bm, br);
}
D2NORM_CLONES static void block_fwd_f64(const double* x, const int64_t* st, int64_t b0, int64_t b1, int64_t G,
                                        int64_t C, int64_t L, const double* w, const double* b, double eps, double* y,
                                        double* mu, double* var, double* bm, double* br) {
  block_fwd<double>(x, st, b0, b1, G, C, L, w, b, eps, y, mu, var, bm, br);
}
D2NORM_CLONES static void block_bwd_f32(const float* gy, const float* x, const int64_t* st, int64_t b0, int64_t b1,
                                        int64_t G, int64_t C, int64_t L, const float* w, const float* bm,
                                        const float* br, float* gx, float* sg, float* sgxh) {
  block_bwd<float>(gy, x, st, b0, b1, G, C, L, w, bm, br, gx, sg, sgxh);
}
D2NORM_CLONES static void block_bwd_f64(const double* gy, const double* x, const int64_t* st, int64_t b0, int64_t b1,
                                        int64_t G, int64_t C, int64_t L, const double* w, const double* bm,
                                        const double* br, double* gx, double* sg, double* sgxh) {
  block_bwd<double>(gy, x, st, b0, b1, G, C, L, w, bm, br, gx, sg, sgxh);
}

static void check_blocks(const torch::Tensor& x, const torch::Tensor& starts, int64_t groups, const torch::Tensor& w,
                         const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && x.is_contiguous() && x.numel() > 0, what,
              ": contiguous non-empty CPU (N, C, ...) tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble, what,
              ": float32 or float64 expected");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, what, ": groups must divide C");
  TORCH_CHECK(starts.scalar_type() == torch::kLong && starts.dim() == 1 && starts.is_contiguous() &&
              starts.numel() >= 2, what, ": int64 group starts (k + 1)");
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[starts.numel() - 1] == x.size(0), what, ": group starts must span [0, N]");
  for (int64_t e = 0; e + 1 < starts.numel(); ++e) TORCH_CHECK(st[e + 1] > st[e], what, ": empty example group");
  TORCH_CHECK(w.numel() == 0 || (w.numel() == x.size(1) && w.is_contiguous() && w.scalar_type() == x.scalar_type()),
              what, ": per-channel coefficients of x's dtype (or empty)");
}

// returns y, μ_i, σ²_i (N·G each: per example, channel group), and the block mean and rstd (k·G) for the backward
std::vector<torch::Tensor> block_norm_forward(torch::Tensor x, torch::Tensor starts, int64_t groups,
                                              torch::Tensor weight, torch::Tensor bias, double eps) {
  check_blocks(x, starts, groups, weight, "block_norm_forward");
  check_blocks(x, starts, groups, bias, "block_norm_forward");
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), k = starts.numel() - 1;
  auto y = torch::empty_like(x);
  auto mu = torch::empty({N * groups}, x.options()), var = torch::empty({N * groups}, x.options());
  auto bm = torch::empty({k * groups}, x.options()), br = torch::empty({k * groups}, x.options());
  const int64_t per_block = std::max<int64_t>(1, (N / k) * (C / groups) * L);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_block);
  const int64_t* st = starts.data_ptr<int64_t>();
  if (x.scalar_type() == torch::kFloat) {
    const float* pw = weight.numel() ? weight.data_ptr<float>() : nullptr;
    const float* pb = bias.numel() ? bias.data_ptr<float>() : nullptr;
    at::parallel_for(0, k * groups, grain, [&](int64_t b0, int64_t b1) {
      block_fwd_f32(x.data_ptr<float>(), st, b0, b1, groups, C, L, pw, pb, eps, y.data_ptr<float>(),
                    mu.data_ptr<float>(), var.data_ptr<float>(), bm.data_ptr<float>(), br.data_ptr<float>());
    });
  } else {
    const double* pw = weight.numel() ? weight.data_ptr<double>() : nullptr;
    const double* pb = bias.numel() ? bias.data_ptr<double>() : nullptr;
    at::parallel_for(0, k * groups, grain, [&](int64_t b0, int64_t b1) {
      block_fwd_f64(x.data_ptr<double>(), st, b0, b1, groups, C, L, pw, pb, eps, y.data_ptr<double>(),
                    mu.data_ptr<double>(), var.data_ptr<double>(), bm.data_ptr<double>(), br.data_ptr<double>());
    });
  }
  return {y, mu, var, bm, br};
}

// returns gx (empty unless need_gx), Σgy and Σgy·x̂ per (example, channel) row (N·C each)
std::vector<torch::Tensor> block_norm_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor starts, int64_t groups,
                                               torch::Tensor weight, torch::Tensor bmean, torch::Tensor brstd,
                                               bool need_gx) {
  check_blocks(x, starts, groups, weight, "block_norm_backward");
  check_rows(gy, x, "block_norm_backward");
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), k = starts.numel() - 1;
  TORCH_CHECK(bmean.numel() == k * groups && brstd.numel() == k * groups && bmean.is_contiguous() &&
              brstd.is_contiguous() && bmean.scalar_type() == x.scalar_type() &&
              brstd.scalar_type() == x.scalar_type(), "block_norm_backward: block statistics (k·G) of x's dtype");
  auto gx = need_gx ? torch::empty_like(x) : torch::empty({0}, x.options());
  auto sg = torch::empty({N * C}, x.options()), sgxh = torch::empty({N * C}, x.options());
  const int64_t per_block = std::max<int64_t>(1, (N / k) * (C / groups) * L);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_block);
  const int64_t* st = starts.data_ptr<int64_t>();
  if (x.scalar_type() == torch::kFloat) {
    const float* pw = weight.numel() ? weight.data_ptr<float>() : nullptr;
    float* pgx = need_gx ? gx.data_ptr<float>() : nullptr;
    at::parallel_for(0, k * groups, grain, [&](int64_t b0, int64_t b1) {
      block_bwd_f32(gy.data_ptr<float>(), x.data_ptr<float>(), st, b0, b1, groups, C, L, pw, bmean.data_ptr<float>(),
                    brstd.data_ptr<float>(), pgx, sg.data_ptr<float>(), sgxh.data_ptr<float>());
    });
  } else {
    const double* pw = weight.numel() ? weight.data_ptr<double>() : nullptr;
    double* pgx = need_gx ? gx.data_ptr<double>() : nullptr;
    at::parallel_for(0, k * groups, grain, [&](int64_t b0, int64_t b1) {
      block_bwd_f64(gy.data_ptr<double>(), x.data_ptr<double>(), st, b0, b1, groups, C, L, pw,
                    bmean.data_ptr<double>(), brstd.data_ptr<double>(), pgx, sg.data_ptr<double>(),
                    sgxh.data_ptr<double>());
    });
  }
  return {gx, sg, sgxh};
}

std::vector<torch::Tensor> row_moments(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu(), "row_moments: CPU tensor expected");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "row_moments: contiguous (rows, n) tensor expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
              "row_moments: float32 or float64 expected");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "row_moments: rows must not be empty");
  auto mean = torch::empty({rows}, x.options());
  auto var = torch::empty({rows}, x.options());
  // about 64K elements per task: enough work per thread, rows stay whole
  const int64_t grain = std::max<int64_t>(1, 65536 / n);
  if (x.scalar_type() == torch::kFloat) {
    const float* px = x.data_ptr<float>();
    float* pm = mean.data_ptr<float>();
    float* pv = var.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { rows_f32(px, b, e, n, pm, pv); });
  } else {
    const double* px = x.data_ptr<double>();
    double* pm = mean.data_ptr<double>();
    double* pv = var.data_ptr<double>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { rows_f64(px, b, e, n, pm, pv); });
  }
  return {mean, var};
}
