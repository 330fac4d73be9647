// RMSNorm and LayerNorm over the last dim. Weight/bias gradients are reduced over rows in
// per-thread partial sums, then added in thread order: deterministic for a thread count.
#include <omp.h>

#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

namespace {
struct Rows {
  int64_t n, d;
};
Rows rows_of(const Tensor& x, const Tensor& w) {
  VCHAT_CHECK(x.is_contiguous(), "contiguous input expected");
  const int64_t d = x.size(-1);
  VCHAT_CHECK(w.numel() == d, "weight " << shape_str(w.shape()) << " for input " << shape_str(x.shape()));
  return {x.numel() / d, d};
}

// Sums per-thread partial rows [threads, k*d] into the k outputs (accumulating).
void reduce_partials(const std::vector<float>& part, int threads, int64_t d, std::initializer_list<float*> outs) {
  int64_t k = 0;
  for (float* o : outs) {
    if (o)
      for (int t = 0; t < threads; ++t)
        for (int64_t c = 0; c < d; ++c) o[c] += part[(t * outs.size() + k) * d + c];
    ++k;
  }
}
}  // namespace

// One row of RMSNorm: y = x rs w; returns rs.
inline float rmsnorm_row(const float* xr, const float* wp, int64_t d, float eps, float* yr) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < d; ++c) ss += xr[c] * xr[c];
  const float rs = 1.f / std::sqrt(ss / d + eps);
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) yr[c] = xr[c] * rs * wp[c];
  return rs;
}

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd) {
  const auto [n, d] = rows_of(x, w);
  const float *xp = x.data<float>(), *wp = w.data<float>();
  float *yp = y.data<float>(), *rp = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) rp[r] = rmsnorm_row(xp + r * d, wp, d, eps, yp + r * d);
}

// The same rows as add then rmsnorm_fwd: the sum's row is normalized while in cache.
void add_rmsnorm_fwd(const Tensor& x, const Tensor& residual, const Tensor& sum, const Tensor& w, float eps,
                     const Tensor& y, const Tensor& rstd) {
  const auto [n, d] = rows_of(x, w);
  VCHAT_CHECK(residual.is_contiguous() && sum.is_contiguous() && residual.numel() == n * d && sum.numel() == n * d,
              "residual " << shape_str(residual.shape()) << " and sum " << shape_str(sum.shape()) << " for input "
                          << shape_str(x.shape()) << ": contiguous, of its size");
  const float *xp = x.data<float>(), *res = residual.data<float>(), *wp = w.data<float>();
  float *sp = sum.data<float>(), *yp = y.data<float>(), *rp = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    float* sr = sp + r * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) sr[c] = xp[r * d + c] + res[r * d + c];
    rp[r] = rmsnorm_row(sr, wp, d, eps, yp + r * d);
  }
}

// dx = rs*(dy*w) - rs^3/d * x * sum(dy*w*x);  dw += sum_rows dy * x * rs.
// With residual_grad, dx += it in the same pass (residual_grad may alias dx).
void rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dx,
                 const Tensor& dw, const Tensor& residual_grad) {
  const auto [n, d] = rows_of(x, w);
  const float *g = dy.data<float>(), *xp = x.data<float>(), *wp = w.data<float>(), *rp = rstd.data<float>();
  const float* res = residual_grad.defined() ? residual_grad.data<float>() : nullptr;
  VCHAT_CHECK(!res || (residual_grad.is_contiguous() && residual_grad.numel() == n * d),
              "residual_grad " << shape_str(residual_grad.shape()) << " for input " << shape_str(x.shape()));
  float* dxp = dx.data<float>();
  const bool want_dw = dw.defined();
  const int threads = omp_get_max_threads();
  std::vector<float> part(want_dw ? threads * d : 0, 0.f);
#pragma omp parallel num_threads(threads)
  {
    float* my = want_dw ? part.data() + omp_get_thread_num() * d : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const float *gr = g + r * d, *xr = xp + r * d;
      const float rs = rp[r];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += gr[c] * wp[c] * xr[c];
      const float k = rs * rs * rs * dot / d;
      float* o = dxp + r * d;
      if (res) {  // read each residual element before the dx element it may share memory with is written
        const float* rr = res + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const float v = rs * gr[c] * wp[c] - k * xr[c];
          o[c] = v + rr[c];
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = rs * gr[c] * wp[c] - k * xr[c];
      }
      if (my)
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) my[c] += gr[c] * xr[c] * rs;
    }
  }
  if (want_dw) reduce_partials(part, threads, d, {dw.data<float>()});
}

void layernorm_fwd(const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd) {
  const auto [n, d] = rows_of(x, w);
  const float *xp = x.data<float>(), *wp = w.data<float>(), *bp = b.data<float>();
  float *yp = y.data<float>(), *mp = mean.data<float>(), *rp = rstd.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * d;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < d; ++c) s += xr[c];
    const float mu = s / d;
    float v = 0.f;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < d; ++c) v += (xr[c] - mu) * (xr[c] - mu);
    const float rs = 1.f / std::sqrt(v / d + eps);
    mp[r] = mu;
    rp[r] = rs;
    float* yr = yp + r * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) yr[c] = (xr[c] - mu) * rs * wp[c] + bp[c];
  }
}

// xhat = (x-mu)*rs, g = dy*w:  dx = rs * (g - mean(g) - xhat * mean(g*xhat)).
void layernorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                   const Tensor& dx, const Tensor& dw, const Tensor& db) {
  const auto [n, d] = rows_of(x, w);
  const float *g = dy.data<float>(), *xp = x.data<float>(), *wp = w.data<float>();
  const float *mp = mean.data<float>(), *rp = rstd.data<float>();
  float* dxp = dx.defined() ? dx.data<float>() : nullptr;
  const bool want_w = dw.defined() || db.defined();
  const int threads = omp_get_max_threads();
  std::vector<float> part(want_w ? threads * 2 * d : 0, 0.f);
#pragma omp parallel num_threads(threads)
  {
    float* my = want_w ? part.data() + omp_get_thread_num() * 2 * d : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const float *gr = g + r * d, *xr = xp + r * d;
      const float mu = mp[r], rs = rp[r];
      if (dxp) {
        float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t c = 0; c < d; ++c) {
          const float gg = gr[c] * wp[c];
          sg += gg;
          sgx += gg * (xr[c] - mu) * rs;
        }
        sg /= d;
        sgx /= d;
        float* o = dxp + r * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = rs * (gr[c] * wp[c] - sg - (xr[c] - mu) * rs * sgx);
      }
      if (my) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          my[c] += gr[c] * (xr[c] - mu) * rs;
          my[d + c] += gr[c];
        }
      }
    }
  }
  if (want_w) reduce_partials(part, threads, d, {dw.defined() ? dw.data<float>() : nullptr, db.defined() ? db.data<float>() : nullptr});
}

}  // namespace vchat::cpu
