// Every numerical op the model needs, dispatched on the tensors' device.
// CPU implementations live in src/cpu/ (fp32; OpenBLAS sgemm, OpenMP loops); CUDA ones in
// src/cuda/ behind the same calls. Conventions:
//  - activations are contiguous row-major [rows, features]; Linear weights are [out, in];
//  - "_bwd" functions OVERWRITE input gradients (dx) and ACCUMULATE weight gradients
//    (dw += ...), so gradient accumulation over micro-batches needs no extra buffers;
//  - an undefined Tensor (Tensor()) means "not wanted" (e.g. no bias, frozen weight);
//  - every op takes the execution context first (exec.h): CUDA operands are worked on with
//    its stream, cuBLASLt handle and workspace; CPU operands ignore it.
#pragma once
#include <cstdint>
#include <vector>

#include "exec.h"
#include "tensor.h"

namespace vchat::ops {

enum class AttnMode : uint8_t { causal, mmca, full };
enum class Activation : uint8_t { quick_gelu, gelu };
// Per-position modality of the token stream (DESIGN.md §3.2).
enum Modality : uint8_t { kPad = 0, kText = 1, kImage = 2 };

// C = alpha * op(A) @ op(B) + beta * C, all 2-D with unit column stride (row stride free).
void gemm(const ExecContext& ex, const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, const Tensor& C,
          float alpha = 1.f, float beta = 0.f);

// Linear: y = x W^T + b.  x [N, in], W [out, in], b [out] or undefined.
void linear_fwd(const ExecContext& ex, const Tensor& x, const Tensor& W, const Tensor& b, const Tensor& y);
// dx = dy W (beta=1 accumulates into dx instead).
void linear_bwd_input(const ExecContext& ex, const Tensor& dy, const Tensor& W, const Tensor& dx, float beta = 0.f);
// dW += dy^T x ; db += column sums of dy (db may be undefined).
void linear_bwd_weight(const ExecContext& ex, const Tensor& dy, const Tensor& x, const Tensor& dW, const Tensor& db);

// Elementwise.
void add(const ExecContext& ex, const Tensor& a, const Tensor& b, const Tensor& out);  // out may alias a or b
void axpy(const ExecContext& ex, float alpha, const Tensor& x, const Tensor& y);       // y += alpha * x
void scale(const ExecContext& ex, const Tensor& x, float alpha);                       // x *= alpha
void fill(const ExecContext& ex, const Tensor& x, float value);
// dst = src converted to dst's dtype (f32 <-> bf16 rounding to nearest even, or a copy),
// same number of elements, contiguous: the bf16 working copies of fp32 master weights.
void cast(const ExecContext& ex, const Tensor& src, const Tensor& dst);

// RMSNorm over the last dim: y = x * w / sqrt(mean(x^2) + eps); rstd [N] saved for backward.
void rmsnorm_fwd(const ExecContext& ex, const Tensor& x, const Tensor& w, float eps, const Tensor& y,
                 const Tensor& rstd);
// A pre-norm block's residual add and the norm that follows it, in one pass over the rows:
// sum = x + residual (in sum's dtype; sum may alias x or residual), then rmsnorm_fwd of sum.
// Unfused, the add reads two rows and writes one, and the norm reads that one back.
void add_rmsnorm_fwd(const ExecContext& ex, const Tensor& x, const Tensor& residual, const Tensor& sum, const Tensor& w,
                     float eps, const Tensor& y, const Tensor& rstd);
// dx = the input gradient; dw += the weight gradient (dw may be undefined). With
// residual_grad, dx = that input gradient + residual_grad (which may alias dx): the
// gradient the residual branch carries past the norm, added in the same pass.
void rmsnorm_bwd(const ExecContext& ex, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                 const Tensor& dx, const Tensor& dw, const Tensor& residual_grad = Tensor());
// LayerNorm over the last dim (biased variance); mean, rstd [N] saved for backward.
void layernorm_fwd(const ExecContext& ex, const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd);
void layernorm_bwd(const ExecContext& ex, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                   const Tensor& rstd, const Tensor& dx, const Tensor& dw, const Tensor& db);

// Rotary embedding, HF rotate-half, in place on x [B, L, H, hd], positions
// position_offset .. position_offset+L-1 (a KV cache appends at an offset).
// inverse=true applies the transposed rotation: that is the backward.
void rope_(const ExecContext& ex, const Tensor& x, double theta, bool inverse, int64_t position_offset = 0);

// SwiGLU: out = silu(gate) * up.
void swiglu_fwd(const ExecContext& ex, const Tensor& gate, const Tensor& up, const Tensor& out);
void swiglu_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate,
                const Tensor& dup);
// GELU family for the vision MLP.
void gelu_fwd(const ExecContext& ex, Activation act, const Tensor& x, const Tensor& y);
void gelu_bwd(const ExecContext& ex, Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx);

// Attention over q [B, L, H, hd], k/v [B, L, KV, hd] (GQA: head h reads kv head h/(H/KV)),
// modality [B, L] u8 (unused for full). out [B, L, H, hd]. Returns what backward needs
// besides q, k, v and out, opaque to callers: the CPU keeps the combined attention weights
// [B, H, L, L] (text branch + image branch); CUDA's flash kernels keep two log-sum-exps per
// query [B, H, L, 2] (text or the single branch, image branch) and no L x L matrix.
Tensor attention_fwd(const ExecContext& ex, AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& modality, const Tensor& out);
// Generation (KV cache): the n new queries q [n, H, hd] at positions position .. position+n-1
// of one sequence attend over every key so far, k/v [Lk, KV, hd] with Lk = position + n
// (the new keys already appended), modality [Lk] u8: exactly what attention_fwd computes
// for those rows of the whole sequence. Forward only. out [n, H, hd].
void attention_decode(const ExecContext& ex, AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, int64_t position, const Tensor& out);
// dq, dk, dv are overwritten.
void attention_bwd(const ExecContext& ex, AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& saved, const Tensor& dq,
                   const Tensor& dk, const Tensor& dv);

// Embedding: out[n] = table[ids[n]]; ids < 0 (image sentinel) give a zero row and no grad.
void embedding_fwd(const ExecContext& ex, const Tensor& ids, const Tensor& table, const Tensor& out);
// The positions of a batch grouped by token id, built with the batch on the host (Batch):
// group k holds id ids[k] at positions order[offsets[k] .. offsets[k+1]), increasing. The
// CUDA embedding backward sums each group in that order (deterministic, no atomics).
struct TokenGroups {
  Tensor ids, offsets, order;  // i32 [G], [G + 1], [n text positions]
  static TokenGroups build(const std::vector<int32_t>& embed_ids);  // ids < 0 are left out
};
// dtable += rows of dout at each id (deterministic). The CPU walks `ids`; CUDA walks `groups`.
void embedding_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& ids, const TokenGroups& groups,
                   const Tensor& dtable);

// Row scatter/gather: dst[index[m]] = src[m] (scatter) and dst[m] = src[index[m]] (gather).
void scatter_rows(const ExecContext& ex, const Tensor& src, const Tensor& index, const Tensor& dst);
void gather_rows(const ExecContext& ex, const Tensor& src, const Tensor& index, const Tensor& dst);

// ViT patch extraction: pixels [N, 3, S, S] -> patches [N * (S/P)^2, 3*P*P], (c, kh, kw) order.
void patchify(const ExecContext& ex, const Tensor& pixels, int64_t patch, const Tensor& patches);

// ViT embeddings: out[n, 0] = cls + pos[0]; out[n, 1+p] = patch_emb[n*np + p] + pos[1+p].
// out [N, np+1, W]. Backward accumulates dcls/dpos and writes dpatch_emb (each may be undefined).
void vit_embed_fwd(const ExecContext& ex, const Tensor& patch_emb, const Tensor& cls, const Tensor& pos,
                   const Tensor& out);
void vit_embed_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls,
                   const Tensor& dpos);

// Masked cross-entropy. Rows with target < 0 carry no loss. Adds the summed loss over
// supervised rows to loss_acc (f32 [1], where the logits are: no host copy, so a device
// step reads its loss back once, with the gradient norm); lse [N] (log-sum-exp) is saved
// for backward.
void cross_entropy_fwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                       const Tensor& loss_acc);
// The same, returning the summed loss on the host (evaluation, tests: a copy back).
double cross_entropy_fwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& lse);
// dlogits = (softmax(logits) - onehot(target)) * scale on supervised rows, 0 elsewhere.
// dlogits may alias logits (saves a [N, V] buffer). With vocab_begin (vocabulary-parallel)
// logits hold columns [vocab_begin, vocab_begin + V) and lse is the full row's.
void cross_entropy_bwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                       float scale, const Tensor& dlogits, int64_t vocab_begin = 0);

// Vocabulary-parallel pieces (model/vocab_parallel.h): this rank holds vocabulary rows
// [vocab_begin, vocab_begin + V_local) of the embedding table and of the logits' columns.
// out[n] = table[ids[n] - vocab_begin] for ids in the slice, a zero row otherwise.
void embedding_fwd_slice(const ExecContext& ex, const Tensor& ids, const Tensor& table, int64_t vocab_begin,
                         const Tensor& out);
// dtable += the rows of dout whose id falls in the slice (deterministic: in position order).
void embedding_bwd_slice(const ExecContext& ex, const Tensor& dout, const Tensor& ids, const TokenGroups& groups,
                         int64_t vocab_begin, const Tensor& dtable);
// Per supervised row, the max of this rank's logits (0 on unsupervised rows).
void ce_row_max(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& row_max);
// Per supervised row, with the group's max: Σ exp(x − max) over this rank's columns, and the
// target's logit where this rank holds it (else 0); both 0 on unsupervised rows.
void ce_row_sumexp(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& row_max,
                   int64_t vocab_begin, const Tensor& sumexp, const Tensor& target_logit);
// From the group's sums: lse = max + log(sumexp) on supervised rows (0 elsewhere); adds
// the summed loss Σ (lse − target logit) over them to loss_acc (f32 [1]).
void ce_finish(const ExecContext& ex, const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit,
               const Tensor& targets, const Tensor& lse, const Tensor& loss_acc);

// Row argmax (first index of the maximum, NaN counting as the maximum, as torch.argmax):
// index i32 [N], value f32 [N] (greedy decoding, teacher-forced accuracy).
void argmax(const ExecContext& ex, const Tensor& logits, const Tensor& index, const Tensor& value);

// Optimizer pieces. Scalars (the sum of squares, the clip coefficient) stay where the
// gradients are, so a device step never waits on the host between backward and update.
// out (f32 [1]) = Σ over the tensors of Σ x², in a fixed order (deterministic).
void sum_squares(const ExecContext& ex, const std::vector<Tensor>& xs, const Tensor& out);
double sum_squares(const ExecContext& ex, const Tensor& x);  // one tensor, read back to the host (tests)
// Gradient clipping's coefficient from the global sum of squares (f32 [1]): with
// norm = √grad_sq, scale = max_norm / (norm + 1e-6) when max_norm > 0 and norm > max_norm,
// else 1; NaN when the norm is not finite, which adamw_step takes as "change nothing".
void clip_scale(const ExecContext& ex, const Tensor& grad_sq, float max_norm, const Tensor& scale);
struct AdamWParams {
  float lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // 1-based, for bias correction
};
// AdamW on f32 param/grad/m/v with the gradient multiplied by grad_scale[0] (f32 [1];
// undefined: 1) on the fly, leaving grad as it was. A non-finite grad_scale changes nothing
// (the caller reports the divergence). `working` (the compute-dtype copy, CUDA only; may
// be undefined) receives the updated weights: no separate cast pass.
void adamw_step(const ExecContext& ex, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                const AdamWParams& p, const Tensor& working = Tensor(), const Tensor& grad_scale = Tensor());

}  // namespace vchat::ops
