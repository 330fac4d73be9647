// Row movement: token embedding lookup, scatter/gather of image rows, ViT patch extraction.
#include <algorithm>
#include <cstring>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out) {
  const int64_t n = ids.numel(), V = table.size(0), D = table.size(1);
  VCHAT_CHECK(out.numel() == n * D && out.is_contiguous(), "out " << shape_str(out.shape()) << " for " << n << " ids");
  const int32_t* id = ids.data<int32_t>();
  const float* t = table.data<float>();
  float* o = out.data<float>();
  for (int64_t r = 0; r < n; ++r)
    VCHAT_CHECK(id[r] < V, "token id " << id[r] << " at position " << r << " is outside the vocabulary of " << V);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    if (id[r] < 0)
      std::memset(o + r * D, 0, D * sizeof(float));
    else
      std::memcpy(o + r * D, t + static_cast<int64_t>(id[r]) * D, D * sizeof(float));
  }
}

// Threads own column blocks of the table: repeated ids never race, and the summation order
// is the token order (deterministic).
void embedding_bwd(const Tensor& dout, const Tensor& ids, const Tensor& dtable) {
  const int64_t n = ids.numel(), D = dtable.size(1);
  const int32_t* id = ids.data<int32_t>();
  const float* g = dout.data<float>();
  float* t = dtable.data<float>();
  const int64_t block = 64;
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < D; c0 += block) {
    const int64_t c1 = std::min(D, c0 + block);
    for (int64_t r = 0; r < n; ++r) {
      if (id[r] < 0) continue;
      float* dst = t + static_cast<int64_t>(id[r]) * D;
      for (int64_t c = c0; c < c1; ++c) dst[c] += g[r * D + c];
    }
  }
}

void embedding_fwd_slice(const Tensor& ids, const Tensor& table, int64_t vocab_begin, const Tensor& out) {
  const int64_t N = ids.numel(), V = table.size(0), D = table.size(1);
  VCHAT_CHECK(out.numel() == N * D && out.is_contiguous(), "out " << shape_str(out.shape()) << " for " << N << " ids");
  const int32_t* id = ids.data<int32_t>();
  const float* w = table.data<float>();
  float* y = out.data<float>();
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = static_cast<int64_t>(id[i]) - vocab_begin;  // another rank's row when outside
    for (int64_t h = 0; h < D; ++h) y[i * D + h] = r >= 0 && r < V ? w[r * D + h] : 0.f;
  }
}

// Serial over rows: two rows with the same id add into the same table row, in position order.
void embedding_bwd_slice(const Tensor& dout, const Tensor& ids, int64_t vocab_begin, const Tensor& dtable) {
  const int64_t N = ids.numel(), V = dtable.size(0), D = dtable.size(1);
  const int32_t* id = ids.data<int32_t>();
  const float* dy = dout.data<float>();
  float* dw = dtable.data<float>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = static_cast<int64_t>(id[i]) - vocab_begin;
    if (r < 0 || r >= V) continue;
    for (int64_t h = 0; h < D; ++h) dw[r * D + h] += dy[i * D + h];
  }
}

void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const int64_t m = index.numel(), D = src.size(-1);
  VCHAT_CHECK(src.numel() == m * D && dst.size(-1) == D, "src " << shape_str(src.shape()) << " dst " << shape_str(dst.shape()));
  const int32_t* idx = index.data<int32_t>();
  const int64_t rows = dst.numel() / D;
  for (int64_t r = 0; r < m; ++r) VCHAT_CHECK(idx[r] >= 0 && idx[r] < rows, "row index " << idx[r] << " outside [0, " << rows << ")");
  const float* s = src.data<float>();
  float* d = dst.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < m; ++r) std::memcpy(d + static_cast<int64_t>(idx[r]) * D, s + r * D, D * sizeof(float));
}

void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const int64_t m = index.numel(), D = src.size(-1);
  VCHAT_CHECK(dst.numel() == m * D, "dst " << shape_str(dst.shape()) << " for " << m << " rows");
  const int32_t* idx = index.data<int32_t>();
  const int64_t rows = src.numel() / D;
  for (int64_t r = 0; r < m; ++r) VCHAT_CHECK(idx[r] >= 0 && idx[r] < rows, "row index " << idx[r] << " outside [0, " << rows << ")");
  const float* s = src.data<float>();
  float* d = dst.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < m; ++r) std::memcpy(d + r * D, s + static_cast<int64_t>(idx[r]) * D, D * sizeof(float));
}

void patchify(const Tensor& pixels, int64_t P, const Tensor& patches) {
  VCHAT_CHECK(pixels.dim() == 4 && pixels.size(1) == 3 && pixels.size(2) == pixels.size(3),
              "pixels must be [N, 3, S, S], got " << shape_str(pixels.shape()));
  const int64_t N = pixels.size(0), S = pixels.size(2), G = S / P;
  VCHAT_CHECK(S % P == 0, "image size " << S << " not a multiple of patch " << P);
  VCHAT_CHECK(patches.shape() == Shape({N * G * G, 3 * P * P}), "patches " << shape_str(patches.shape()));
  const float* px = pixels.data<float>();
  float* o = patches.data<float>();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t py = 0; py < G; ++py)
      for (int64_t pxi = 0; pxi < G; ++pxi) {
        float* row = o + ((n * G + py) * G + pxi) * 3 * P * P;
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t kh = 0; kh < P; ++kh)
            std::memcpy(row + (c * P + kh) * P, px + ((n * 3 + c) * S + py * P + kh) * S + pxi * P, P * sizeof(float));
      }
}

void vit_embed_fwd(const Tensor& patch_emb, const Tensor& cls, const Tensor& pos, const Tensor& out) {
  VCHAT_CHECK(out.dim() == 3, "out must be [N, T, W], got " << shape_str(out.shape()));
  const int64_t N = out.size(0), T = out.size(1), W = out.size(2);
  VCHAT_CHECK(patch_emb.numel() == N * (T - 1) * W && cls.numel() == W && pos.numel() == T * W,
              "patch_emb " << shape_str(patch_emb.shape()) << " pos " << shape_str(pos.shape()));
  const float *pe = patch_emb.data<float>(), *c = cls.data<float>(), *ps = pos.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t) {
      const float* src = t == 0 ? c : pe + (n * (T - 1) + t - 1) * W;
      float* dst = o + (n * T + t) * W;
      for (int64_t w = 0; w < W; ++w) dst[w] = src[w] + ps[t * W + w];
    }
}

void vit_embed_bwd(const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls, const Tensor& dpos) {
  const int64_t N = dout.size(0), T = dout.size(1), W = dout.size(2);
  const float* g = dout.data<float>();
  if (dpatch_emb.defined()) {
    float* d = dpatch_emb.data<float>();
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 1; t < T; ++t) std::memcpy(d + (n * (T - 1) + t - 1) * W, g + (n * T + t) * W, W * sizeof(float));
  }
  // Image order is the summation order: deterministic.
  if (dpos.defined()) {
    float* d = dpos.data<float>();
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t w = 0; w < W; ++w) d[t * W + w] += g[(n * T + t) * W + w];
  }
  if (dcls.defined()) {
    float* d = dcls.data<float>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t w = 0; w < W; ++w) d[w] += g[n * T * W + w];
  }
}

}  // namespace vchat::cpu
