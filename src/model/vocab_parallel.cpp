#include "model/vocab_parallel.h"

#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "parallel/comm.h"

namespace vchat {

namespace {
// The id's row in this rank's slice, or -1 when another rank holds it.
inline int64_t local_row(int32_t id, VocabSlice s) { return id >= s.begin && id < s.begin + s.size ? id - s.begin : -1; }
}  // namespace

void vocab_parallel_embedding_fwd(const Tensor& ids, const Tensor& table, VocabSlice s, Comm& tp, const Tensor& out) {
  VCHAT_CHECK(table.size(0) == s.size && out.size(0) == ids.numel() && out.size(1) == table.size(1),
              "vocab_parallel_embedding_fwd: shapes");
  const int64_t N = ids.numel(), H = table.size(1);
  const int32_t* id = ids.data<int32_t>();
  const float* w = table.data<float>();
  float* y = out.data<float>();
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = local_row(id[i], s);
    for (int64_t h = 0; h < H; ++h) y[i * H + h] = r >= 0 ? w[r * H + h] : 0.f;
  }
  tp.all_reduce(out, ReduceOp::sum);
}

void vocab_parallel_embedding_bwd(const Tensor& dout, const Tensor& ids, VocabSlice s, const Tensor& dtable) {
  const int64_t N = ids.numel(), H = dtable.size(1);
  const int32_t* id = ids.data<int32_t>();
  const float* dy = dout.data<float>();
  float* dw = dtable.data<float>();
  // Serial over rows: two rows with the same id add into the same table row.
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = local_row(id[i], s);
    if (r < 0) continue;
    for (int64_t h = 0; h < H; ++h) dw[r * H + h] += dy[i * H + h];
  }
}

double vocab_parallel_ce_fwd(const Tensor& logits, const Tensor& targets, VocabSlice s, Comm& tp, const Tensor& lse) {
  const int64_t N = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(V == s.size && targets.numel() == N && lse.numel() == N, "vocab_parallel_ce_fwd: shapes");
  const float* x = logits.data<float>();
  const int32_t* t = targets.data<int32_t>();
  // Per row: [max] then [sum of exp(x - max), target logit], each all-reduced over the group.
  std::vector<float> mx(N, 0.f), st(2 * N, 0.f);
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] < 0) continue;  // no loss, no work (0 on every rank)
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < V; ++v) m = std::max(m, x[i * V + v]);
    mx[i] = m;
  }
  tp.all_reduce(mx.data(), N, DType::f32, ReduceOp::max);
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] < 0) continue;
    double e = 0;
    for (int64_t v = 0; v < V; ++v) e += std::exp(static_cast<double>(x[i * V + v] - mx[i]));
    st[2 * i] = static_cast<float>(e);
    const int64_t r = t[i] >= 0 ? local_row(t[i], s) : -1;
    st[2 * i + 1] = r >= 0 ? x[i * V + r] : 0.f;
  }
  tp.all_reduce(st.data(), 2 * N, DType::f32, ReduceOp::sum);
  float* l = lse.data<float>();
  double loss = 0;
  for (int64_t i = 0; i < N; ++i) {
    l[i] = t[i] >= 0 ? mx[i] + std::log(st[2 * i]) : 0.f;
    if (t[i] >= 0) loss += static_cast<double>(l[i]) - st[2 * i + 1];
  }
  return loss;
}

void vocab_parallel_ce_bwd(const Tensor& logits, const Tensor& targets, VocabSlice s, const Tensor& lse, float scale,
                           const Tensor& dlogits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const float* x = logits.data<float>();
  const int32_t* t = targets.data<int32_t>();
  const float* l = lse.data<float>();
  float* d = dlogits.data<float>();
#pragma omp parallel for
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] < 0) {
      for (int64_t v = 0; v < V; ++v) d[i * V + v] = 0.f;
      continue;
    }
    const int64_t r = local_row(t[i], s);
    for (int64_t v = 0; v < V; ++v) d[i * V + v] = scale * (std::exp(x[i * V + v] - l[i]) - (v == r ? 1.f : 0.f));
  }
}

}  // namespace vchat
