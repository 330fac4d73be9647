// Attention on the CPU: per (batch, head), S = QKᵀ/√d by sgemm, a row-wise masked softmax
// that implements the attention mode, and O = P V by sgemm. P is kept for backward.
//
// MMCA (DESIGN.md §3.2) fits this shape exactly: a text query's output is
// Σ_text softmax_T · v + Σ_image softmax_I · v = (P_T + P_I) V, and the two branches have
// disjoint supports, so one combined P holds both. An image query's row is the unit vector
// e_i (out_i = v_i); a pad query's row is zero. Backward differentiates each branch's
// softmax over its own key set; image rows get no score gradient (they ignore scores).
#include <cmath>
#include <limits>
#include <vector>

#include <cblas.h>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

using ops::kImage;
using ops::kPad;
using ops::kText;

namespace {

struct Dims {
  int64_t B, L, H, KV, hd;
};

Dims check_dims(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& probs) {
  VCHAT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, L, heads, hd]");
  Dims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  VCHAT_CHECK(k.shape() == v.shape() && k.size(0) == d.B && k.size(1) == d.L && k.size(3) == d.hd,
              "q " << shape_str(q.shape()) << " k " << shape_str(k.shape()) << " v " << shape_str(v.shape()));
  VCHAT_CHECK(d.KV > 0 && d.H % d.KV == 0, "n_heads " << d.H << " not a multiple of n_kv_heads " << d.KV);
  VCHAT_CHECK(probs.shape() == Shape({d.B, d.H, d.L, d.L}), "probs " << shape_str(probs.shape()));
  VCHAT_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "contiguous q, k, v expected");
  return d;
}

// Which keys query i may see, and in which branch. Returns the branch id (1 = text or the
// single set, 2 = image) of key j, or 0 when j is not attended.
inline int key_branch(AttnMode mode, const uint8_t* m, int64_t i, int64_t j) {
  switch (mode) {
    case AttnMode::full: return 1;
    case AttnMode::causal: return (j <= i && m[j] != kPad) ? 1 : 0;
    case AttnMode::mmca:
      if (j > i || m[j] == kPad) return 0;
      return m[j] == kText ? 1 : 2;
  }
  return 0;
}

// Turns the score row s (length L) into the combined probability row in place.
void probs_row(AttnMode mode, const uint8_t* m, int64_t i, int64_t L, float* s) {
  const uint8_t mi = mode == AttnMode::full ? uint8_t{kText} : m[i];
  if (mi == kPad || (mode == AttnMode::mmca && mi == kImage)) {
    for (int64_t j = 0; j < L; ++j) s[j] = 0.f;
    if (mi == kImage) s[i] = 1.f;
    return;
  }
  float mx[3] = {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                 -std::numeric_limits<float>::infinity()};
  for (int64_t j = 0; j < L; ++j) {
    const int br = key_branch(mode, m, i, j);
    if (br && s[j] > mx[br]) mx[br] = s[j];
  }
  float sum[3] = {0.f, 0.f, 0.f};
  for (int64_t j = 0; j < L; ++j) {
    const int br = key_branch(mode, m, i, j);
    s[j] = br ? std::exp(s[j] - mx[br]) : 0.f;
    sum[br] += s[j];
  }
  float inv[3] = {0.f, sum[1] > 0 ? 1.f / sum[1] : 0.f, sum[2] > 0 ? 1.f / sum[2] : 0.f};
  for (int64_t j = 0; j < L; ++j) s[j] *= inv[key_branch(mode, m, i, j)];
}

// dS_ij = P_ij (dP_ij - Σ_{j' in branch(j)} P_ij' dP_ij'), in place on the dP row.
void softmax_bwd_row(AttnMode mode, const uint8_t* m, int64_t i, int64_t L, const float* p, float* dp) {
  const uint8_t mi = mode == AttnMode::full ? uint8_t{kText} : m[i];
  if (mi == kPad || (mode == AttnMode::mmca && mi == kImage)) {
    for (int64_t j = 0; j < L; ++j) dp[j] = 0.f;
    return;
  }
  float dot[3] = {0.f, 0.f, 0.f};
  for (int64_t j = 0; j < L; ++j) dot[key_branch(mode, m, i, j)] += p[j] * dp[j];
  for (int64_t j = 0; j < L; ++j) {
    const int br = key_branch(mode, m, i, j);
    dp[j] = br ? p[j] * (dp[j] - dot[br]) : 0.f;
  }
}

const uint8_t* modality_row(AttnMode mode, const Tensor& modality, const Dims& d, int64_t b) {
  if (mode == AttnMode::full) return nullptr;
  VCHAT_CHECK(modality.shape() == Shape({d.B, d.L}) && modality.dtype() == DType::u8,
              "modality must be u8 [B, L], got " << shape_str(modality.shape()));
  return modality.data<uint8_t>() + b * d.L;
}

}  // namespace

void attention_fwd(AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& modality,
                   const Tensor& out, const Tensor& probs) {
  const Dims d = check_dims(q, k, v, probs);
  VCHAT_CHECK(out.shape() == q.shape() && out.is_contiguous(), "out " << shape_str(out.shape()));
  const float scale = 1.f / std::sqrt(static_cast<float>(d.hd));
  const int64_t group = d.H / d.KV, qs = d.H * d.hd, ks = d.KV * d.hd, LL = d.L * d.L;
  const float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
  float *op = out.data<float>(), *pp = probs.data<float>();
  for (int64_t b = 0; b < d.B; ++b) {
    const uint8_t* m = modality_row(mode, modality, d, b);
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / group;
      const float* Q = qp + b * d.L * qs + h * d.hd;  // rows of stride qs: one head's slice
      const float* K = kp + b * d.L * ks + g * d.hd;
      const float* V = vp + b * d.L * ks + g * d.hd;
      float* P = pp + (b * d.H + h) * LL;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d.L, d.L, d.hd, scale, Q, qs, K, ks, 0.f, P, d.L);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < d.L; ++i) probs_row(mode, m, i, d.L, P + i * d.L);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d.L, d.hd, d.L, 1.f, P, d.L, V, ks, 0.f,
                  op + b * d.L * qs + h * d.hd, qs);
    }
  }
}

void attention_decode(AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& modality,
                      int64_t position, const Tensor& out) {
  VCHAT_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.shape() == v.shape(),
              "q [n, H, hd], k/v [Lk, KV, hd] expected; q " << shape_str(q.shape()) << " k " << shape_str(k.shape()));
  const int64_t n = q.size(0), H = q.size(1), hd = q.size(2), Lk = k.size(0), KV = k.size(1);
  VCHAT_CHECK(k.size(2) == hd && KV > 0 && H % KV == 0, "heads " << H << " / kv heads " << KV << ", hd " << hd);
  VCHAT_CHECK(position >= 0 && position + n == Lk, "queries at " << position << ".." << position + n << " over " << Lk << " keys");
  VCHAT_CHECK(out.shape() == q.shape() && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
              "contiguous q, k, v, out expected");
  VCHAT_CHECK(mode == AttnMode::full || (modality.shape() == Shape({Lk}) && modality.dtype() == DType::u8),
              "modality must be u8 [Lk]");
  const uint8_t* m = mode == AttnMode::full ? nullptr : modality.data<uint8_t>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t group = H / KV, qs = H * hd, ks = KV * hd;
  std::vector<float> P(static_cast<size_t>(n * Lk));
  for (int64_t h = 0; h < H; ++h) {
    const float* Q = q.data<float>() + h * hd;
    const float* K = k.data<float>() + (h / group) * hd;
    const float* V = v.data<float>() + (h / group) * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, Lk, hd, scale, Q, qs, K, ks, 0.f, P.data(), Lk);
    // Query i of the new ones is row position + i of the whole sequence's score matrix.
    for (int64_t i = 0; i < n; ++i) probs_row(mode, m, position + i, Lk, P.data() + i * Lk);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, Lk, 1.f, P.data(), Lk, V, ks, 0.f,
                out.data<float>() + h * hd, qs);
  }
}

void attention_bwd(AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& modality, const Tensor& probs, const Tensor& dq, const Tensor& dk,
                   const Tensor& dv) {
  const Dims d = check_dims(q, k, v, probs);
  VCHAT_CHECK(dout.shape() == q.shape() && dq.shape() == q.shape() && dk.shape() == k.shape() &&
                  dv.shape() == v.shape(),
              "gradient shapes must match q, k, v");
  const float scale = 1.f / std::sqrt(static_cast<float>(d.hd));
  const int64_t group = d.H / d.KV, qs = d.H * d.hd, ks = d.KV * d.hd, LL = d.L * d.L;
  const float *qp = q.data<float>(), *kp = k.data<float>(), *vp = v.data<float>();
  const float *gp = dout.data<float>(), *pp = probs.data<float>();
  float *dqp = dq.data<float>(), *dkp = dk.data<float>(), *dvp = dv.data<float>();
  dk.zero_();  // heads of one kv group accumulate into the same dk/dv slice
  dv.zero_();
  std::vector<float> dS(LL);
  for (int64_t b = 0; b < d.B; ++b) {
    const uint8_t* m = modality_row(mode, modality, d, b);
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / group;
      const float* Q = qp + b * d.L * qs + h * d.hd;
      const float* K = kp + b * d.L * ks + g * d.hd;
      const float* V = vp + b * d.L * ks + g * d.hd;
      const float* dO = gp + b * d.L * qs + h * d.hd;
      const float* P = pp + (b * d.H + h) * LL;
      // dV += Pᵀ dO ; dP = dO Vᵀ
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d.L, d.hd, d.L, 1.f, P, d.L, dO, qs, 1.f,
                  dvp + b * d.L * ks + g * d.hd, ks);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d.L, d.L, d.hd, 1.f, dO, qs, V, ks, 0.f, dS.data(), d.L);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < d.L; ++i) softmax_bwd_row(mode, m, i, d.L, P + i * d.L, dS.data() + i * d.L);
      // dQ = dS K * scale ; dK += dSᵀ Q * scale
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d.L, d.hd, d.L, scale, dS.data(), d.L, K, ks, 0.f,
                  dqp + b * d.L * qs + h * d.hd, qs);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d.L, d.hd, d.L, scale, dS.data(), d.L, Q, qs, 1.f,
                  dkp + b * d.L * ks + g * d.hd, ks);
    }
  }
}

}  // namespace vchat::cpu
