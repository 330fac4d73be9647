// Rotary embedding, HF rotate-half convention, so HF LLaMA weights load unchanged.
#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

void rope_(const Tensor& x, double theta, bool inverse, int64_t position_offset) {
  VCHAT_CHECK(x.dim() == 4 && x.is_contiguous(), "x [B, L, H, hd] expected, got " << shape_str(x.shape()));
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), hd = x.size(3), half = hd / 2;
  VCHAT_CHECK(hd % 2 == 0, "head dim must be even, got " << hd);
  VCHAT_CHECK(position_offset >= 0, "position offset " << position_offset << " is negative");
  // Angles in float64, then rounded once: both this and the PyTorch twin agree to fp32 ulp.
  std::vector<float> cs(L * half), sn(L * half);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k < half; ++k) {
      const double inv_freq = std::pow(theta, -2.0 * k / hd);
      const double a = static_cast<double>(position_offset + l) * inv_freq;
      cs[l * half + k] = static_cast<float>(std::cos(a));
      sn[l * half + k] = static_cast<float>(std::sin(a)) * (inverse ? -1.f : 1.f);
    }
  float* p = x.data<float>();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const float *c = cs.data() + l * half, *s = sn.data() + l * half;
      for (int64_t h = 0; h < H; ++h) {
        float* v = p + ((b * L + l) * H + h) * hd;
#pragma omp simd
        for (int64_t k = 0; k < half; ++k) {
          const float x1 = v[k], x2 = v[k + half];
          v[k] = x1 * c[k] - x2 * s[k];
          v[k + half] = x2 * c[k] + x1 * s[k];
        }
      }
    }
}

}  // namespace vchat::cpu
