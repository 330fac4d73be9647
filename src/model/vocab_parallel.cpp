#include "model/vocab_parallel.h"

#include "check.h"
#include "parallel/comm.h"

namespace vchat {

void vocab_parallel_embedding_fwd(const ExecContext& ex, const Tensor& ids, const Tensor& table, VocabSlice s, Comm& tp,
                                  const Tensor& out) {
  VCHAT_CHECK(table.size(0) == s.size && out.size(0) == ids.numel() && out.size(1) == table.size(1),
              "vocab_parallel_embedding_fwd: table " << shape_str(table.shape()) << " out " << shape_str(out.shape())
                                                     << " for " << ids.numel() << " ids, slice of " << s.size);
  ops::embedding_fwd_slice(ex, ids, table, s.begin, out);
  tp.all_reduce(out, ReduceOp::sum);
}

void vocab_parallel_embedding_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& ids,
                                  const ops::TokenGroups& groups, VocabSlice s, const Tensor& dtable) {
  ops::embedding_bwd_slice(ex, dout, ids, groups, s.begin, dtable);
}

// Per row: [max] then [sum of exp(x - max), target logit], each all-reduced over the group
// (the latter two packed into one [2, N] buffer).
void vocab_parallel_ce_fwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, VocabSlice s, Comm& tp,
                           const Tensor& lse, const Tensor& loss_acc) {
  const int64_t N = logits.size(0), V = logits.size(1);
  VCHAT_CHECK(V == s.size && targets.numel() == N && lse.numel() == N,
              "vocab_parallel_ce_fwd: logits " << shape_str(logits.shape()) << " for a slice of " << s.size);
  const Tensor mx = Tensor::empty({N}, DType::f32, logits.device());
  ops::ce_row_max(ex, logits, targets, mx);
  tp.all_reduce(mx, ReduceOp::max);
  const Tensor st = Tensor::empty({2, N}, DType::f32, logits.device());
  ops::ce_row_sumexp(ex, logits, targets, mx, s.begin, st[0], st[1]);
  tp.all_reduce(st, ReduceOp::sum);
  ops::ce_finish(ex, mx, st[0], st[1], targets, lse, loss_acc);
}

void vocab_parallel_ce_bwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, VocabSlice s,
                           const Tensor& lse, float scale, const Tensor& dlogits) {
  ops::cross_entropy_bwd(ex, logits, targets, lse, scale, dlogits, s.begin);
}

}  // namespace vchat
