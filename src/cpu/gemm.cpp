// GEMMs on OpenBLAS. Row-major throughout; the leading dimension is the row stride, so
// column slices of a wider tensor (one attention head) are GEMM operands without copies.
#include <cblas.h>

#include <algorithm>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

void gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, float alpha, float beta) {
  VCHAT_CHECK(A.dim() == 2 && B.dim() == 2 && C.dim() == 2, "2-D operands expected");
  VCHAT_CHECK(A.stride(1) == 1 && B.stride(1) == 1 && C.stride(1) == 1, "unit column stride expected");
  const int64_t m = ta ? A.size(1) : A.size(0), k = ta ? A.size(0) : A.size(1);
  const int64_t kb = tb ? B.size(1) : B.size(0), n = tb ? B.size(0) : B.size(1);
  VCHAT_CHECK(k == kb && C.size(0) == m && C.size(1) == n,
              "A" << shape_str(A.shape()) << (ta ? "^T" : "") << " x B" << shape_str(B.shape()) << (tb ? "^T" : "")
                  << " -> C" << shape_str(C.shape()));
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C untouched for k = 0; the math says C = beta * C
    float* c = C.data<float>();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) {
        float& x = c[r * C.stride(0) + j];
        x = beta == 0.f ? 0.f : beta * x;  // beta = 0 must not keep NaN from fresh memory
      }
    return;
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha,
              A.data<float>(), A.stride(0), B.data<float>(), B.stride(0), beta, C.data<float>(), C.stride(0));
}

// db += column sums of dy [N, out]. Threads own column blocks, so no reduction races
// and the sum order is fixed (bit-exact reruns).
void bias_grad(const Tensor& dy, const Tensor& db) {
  const int64_t n = dy.size(0), d = dy.size(1);
  VCHAT_CHECK(db.numel() == d, "bias grad " << shape_str(db.shape()) << " for dy " << shape_str(dy.shape()));
  const float* g = dy.data<float>();
  float* out = db.data<float>();
  const int64_t block = 64;
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < d; c0 += block) {
    const int64_t c1 = std::min(d, c0 + block);
    float acc[64] = {0};
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += g[r * d + c];
    for (int64_t c = c0; c < c1; ++c) out[c] += acc[c - c0];
  }
}

}  // namespace vchat::cpu
