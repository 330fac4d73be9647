// Vocabulary-parallel embedding and cross-entropy (Megatron, DESIGN.md §5): each
// tensor-parallel rank holds rows [begin, begin + V/tp) of the embedding table and of
// lm_head, so the logits of a row are spread over the group. The loss needs, per row, the
// max logit, then the sum of exponentials and the target's logit: two small all-reduces
// (the latter two packed into one).
// On any device (the pieces are ops); with one rank the model uses the plain ops instead.
#pragma once
#include <cstdint>

#include "ops.h"
#include "tensor.h"

namespace vchat {

class Comm;

struct VocabSlice {
  int64_t begin = 0, size = 0;  // this rank's vocabulary rows
};

// out [N, H] = embedding rows for ids [N] (i32; -1: no token, row left zero), summed over
// the group: each rank fills the ids that fall in its slice.
void vocab_parallel_embedding_fwd(const ExecContext& ex, const Tensor& ids, const Tensor& table, VocabSlice slice,
                                  Comm& tp, const Tensor& out);
// dtable += dout rows of the ids in this rank's slice (dout is the same on every rank).
void vocab_parallel_embedding_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& ids,
                                  const ops::TokenGroups& groups, VocabSlice slice, const Tensor& dtable);

// logits [N, V/tp] this rank's columns; targets [N] (i32, global ids, < 0: no loss).
// Writes lse [N] (the full row's log-sum-exp) and adds the summed loss over supervised rows
// (the same on every rank) to loss_acc (f32 [1], where the logits are).
void vocab_parallel_ce_fwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, VocabSlice slice,
                           Comm& tp, const Tensor& lse, const Tensor& loss_acc);
// dlogits = scale · (softmax − onehot(target)) on this rank's columns for supervised rows,
// 0 on the others. dlogits may alias logits.
void vocab_parallel_ce_bwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, VocabSlice slice,
                           const Tensor& lse, float scale, const Tensor& dlogits);

}  // namespace vchat
