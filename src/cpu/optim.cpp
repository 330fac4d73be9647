// Optimizer kernels: squared norm for clipping, and the AdamW update (fp32 state).
#include <cmath>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

double sum_squares(const Tensor& x) {
  const float* p = x.data<float>();
  const int64_t n = x.numel();
  double s = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

float clip_scale(float grad_sq, float max_norm) {
  const double norm = std::sqrt(static_cast<double>(grad_sq));
  if (!std::isfinite(norm)) return NAN;
  return max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / (norm + 1e-6)) : 1.f;
}

// Decoupled weight decay (Loshchilov & Hutter): p -= lr * (m̂ / (√v̂ + eps) + wd * p), with
// g = grad · grad_scale (the clip coefficient, applied here so the gradient is read once).
void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                const ops::AdamWParams& a, float grad_scale) {
  if (!std::isfinite(grad_scale)) return;  // a diverged step: the caller reports it
  const int64_t n = param.numel();
  VCHAT_CHECK(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw state sizes differ");
  float *p = param.data<float>(), *mm = m.data<float>(), *vv = v.data<float>();
  const float* g = grad.data<float>();
  const float bc1 = 1.f - static_cast<float>(std::pow(a.beta1, static_cast<double>(a.step)));
  const float bc2 = 1.f - static_cast<float>(std::pow(a.beta2, static_cast<double>(a.step)));
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * grad_scale;
    mm[i] = a.beta1 * mm[i] + (1.f - a.beta1) * gi;
    vv[i] = a.beta2 * vv[i] + (1.f - a.beta2) * gi * gi;
    const float mhat = mm[i] / bc1, vhat = vv[i] / bc2;
    p[i] -= a.lr * (mhat / (std::sqrt(vhat) + a.eps) + a.weight_decay * p[i]);
  }
}

}  // namespace vchat::cpu
