// Masked cross-entropy over vocab rows; rows with target < 0 are not supervised.
#include <algorithm>
#include <cmath>
#include <limits>

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
                       const Tensor& dlogits, int64_t vocab_begin) {
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
    const int64_t col = static_cast<int64_t>(t[r]) - vocab_begin;  // another rank's column when outside
    if (col >= 0 && col < V) dr[col] -= scale;
  }
}

// ---- vocabulary-parallel pieces (each rank holds V columns starting at vocab_begin) ----

void ce_row_max(const Tensor& logits, const Tensor& targets, const Tensor& row_max) {
  const int64_t N = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(targets.numel() == N && row_max.numel() == N, "logits " << shape_str(logits.shape()));
  const float* x = logits.data<float>();
  const int32_t* t = targets.data<int32_t>();
  float* mx = row_max.data<float>();
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    mx[i] = 0.f;
    if (t[i] < 0) continue;  // no loss, no work (0 on every rank)
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < V; ++v) m = std::max(m, x[i * V + v]);
    mx[i] = m;
  }
}

void ce_row_sumexp(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t vocab_begin,
                   const Tensor& sumexp, const Tensor& target_logit) {
  const int64_t N = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(targets.numel() == N && row_max.numel() == N && sumexp.numel() == N && target_logit.numel() == N,
              "logits " << shape_str(logits.shape()));
  const float *x = logits.data<float>(), *mx = row_max.data<float>();
  const int32_t* t = targets.data<int32_t>();
  float *se = sumexp.data<float>(), *tl = target_logit.data<float>();
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    se[i] = tl[i] = 0.f;
    if (t[i] < 0) continue;
    double e = 0;
    for (int64_t v = 0; v < V; ++v) e += std::exp(static_cast<double>(x[i * V + v] - mx[i]));
    se[i] = static_cast<float>(e);
    const int64_t col = static_cast<int64_t>(t[i]) - vocab_begin;
    tl[i] = col >= 0 && col < V ? x[i * V + col] : 0.f;
  }
}

double ce_finish(const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit, const Tensor& targets,
                 const Tensor& lse) {
  const int64_t N = targets.numel();
  const float *mx = row_max.data<float>(), *se = sumexp.data<float>(), *tl = target_logit.data<float>();
  const int32_t* t = targets.data<int32_t>();
  float* l = lse.data<float>();
  double loss = 0;
  for (int64_t i = 0; i < N; ++i) {
    l[i] = t[i] >= 0 ? mx[i] + std::log(se[i]) : 0.f;
    if (t[i] >= 0) loss += static_cast<double>(l[i]) - tl[i];
  }
  return loss;
}

void argmax(const Tensor& logits, const Tensor& index, const Tensor& value) {
  const int64_t n = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(logits.dim() == 2 && logits.is_contiguous() && index.numel() == n && value.numel() == n,
              "logits " << shape_str(logits.shape()) << " index " << shape_str(index.shape()) << " value "
                        << shape_str(value.shape()));
  const float* x = logits.data<float>();
  int32_t* idx = index.data<int32_t>();
  float* val = value.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    // The first maximum, as torch.argmax, for which NaN is the maximum: a row holding one
    // (a diverged model) answers its first NaN on every device, not whatever follows it.
    int64_t best = 0;
    for (int64_t c = 1; c < V && !std::isnan(x[r * V + best]); ++c)
      if (x[r * V + c] > x[r * V + best] || std::isnan(x[r * V + c])) best = c;
    idx[r] = static_cast<int32_t>(best);
    val[r] = V ? x[r * V + best] : 0.f;
  }
}

}  // namespace vchat::cpu
