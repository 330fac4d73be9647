// Masked cross-entropy over vocab rows; rows with target < 0 are not supervised.
#include <cmath>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

double cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& lse) {
  const int64_t n = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(targets.numel() == n && lse.numel() == n, "logits " << shape_str(logits.shape()) << " targets "
                                                                 << shape_str(targets.shape()));
  const float* x = logits.data<float>();
  const int32_t* t = targets.data<int32_t>();
  float* l = lse.data<float>();
  for (int64_t r = 0; r < n; ++r)
    VCHAT_CHECK(t[r] < V, "target " << t[r] << " at row " << r << " outside the vocabulary of " << V);
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t r = 0; r < n; ++r) {
    if (t[r] < 0) {
      l[r] = 0.f;
      continue;
    }
    const float* row = x + r * V;
    float mx = row[0];
    for (int64_t c = 1; c < V; ++c) mx = std::max(mx, row[c]);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < V; ++c) s += std::exp(row[c] - mx);
    l[r] = mx + std::log(s);
    total += static_cast<double>(l[r]) - row[t[r]];
  }
  return total;
}

void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits) {
  const int64_t n = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(dlogits.shape() == logits.shape(), "dlogits " << shape_str(dlogits.shape()));
  const float* x = logits.data<float>();
  const int32_t* t = targets.data<int32_t>();
  const float* l = lse.data<float>();
  float* d = dlogits.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    float* dr = d + r * V;
    const float* row = x + r * V;
    if (t[r] < 0) {
      for (int64_t c = 0; c < V; ++c) dr[c] = 0.f;
      continue;
    }
#pragma omp simd
    for (int64_t c = 0; c < V; ++c) dr[c] = std::exp(row[c] - l[r]) * scale;
    dr[t[r]] -= scale;
  }
}

}  // namespace vchat::cpu
