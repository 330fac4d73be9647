// CPU fp32 kernels behind ops.h. Same signatures and conventions as ops.h; the dispatch
// in src/ops.cpp calls these when the tensors live on the CPU.
#pragma once
#include "ops.h"

namespace vchat::cpu {
using ops::Activation;
using ops::AttnMode;

void gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, float alpha, float beta);
void bias_grad(const Tensor& dy, const Tensor& db);

void add(const Tensor& a, const Tensor& b, const Tensor& out);
void axpy(float alpha, const Tensor& x, const Tensor& y);
void scale(const Tensor& x, float alpha);
void fill(const Tensor& x, float value);
void cast(const Tensor& src, const Tensor& dst);
void add_bias(const Tensor& y, const Tensor& b);

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd);
void add_rmsnorm_fwd(const Tensor& x, const Tensor& residual, const Tensor& sum, const Tensor& w, float eps,
                     const Tensor& y, const Tensor& rstd);
void rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dx,
                 const Tensor& dw, const Tensor& residual_grad);
void layernorm_fwd(const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd);
void layernorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                   const Tensor& dx, const Tensor& dw, const Tensor& db);

void rope_(const Tensor& x, double theta, bool inverse, int64_t position_offset);

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out);
void swiglu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate, const Tensor& dup);
void gelu_fwd(Activation act, const Tensor& x, const Tensor& y);
void gelu_bwd(Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx);

void attention_fwd(AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& modality,
                   const Tensor& out, const Tensor& probs);
void attention_decode(AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& modality,
                      int64_t position, const Tensor& out);
void attention_bwd(AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& modality, const Tensor& probs, const Tensor& dq, const Tensor& dk,
                   const Tensor& dv);

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out);
void embedding_bwd(const Tensor& dout, const Tensor& ids, const Tensor& dtable);
void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst);
void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst);
void patchify(const Tensor& pixels, int64_t patch, const Tensor& patches);
void vit_embed_fwd(const Tensor& patch_emb, const Tensor& cls, const Tensor& pos, const Tensor& out);
void vit_embed_bwd(const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls, const Tensor& dpos);

double cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& lse);
void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_begin);
void embedding_fwd_slice(const Tensor& ids, const Tensor& table, int64_t vocab_begin, const Tensor& out);
void embedding_bwd_slice(const Tensor& dout, const Tensor& ids, int64_t vocab_begin, const Tensor& dtable);
void ce_row_max(const Tensor& logits, const Tensor& targets, const Tensor& row_max);
void ce_row_sumexp(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t vocab_begin,
                   const Tensor& sumexp, const Tensor& target_logit);
double ce_finish(const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit, const Tensor& targets,
                 const Tensor& lse);

void argmax(const Tensor& logits, const Tensor& index, const Tensor& value);
double sum_squares(const Tensor& x);
// The clip coefficient (ops::clip_scale) from a sum of squares: shared by the CPU op and
// the tests' expectations.
float clip_scale(float grad_sq, float max_norm);
// grad_scale: the gradient's multiplier; not finite: nothing changes.
void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                const ops::AdamWParams& a, float grad_scale);

}  // namespace vchat::cpu
