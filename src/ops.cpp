// Device dispatch for ops.h: CPU tensors go to src/cpu/, CUDA tensors to src/cuda/.
// An op with no CUDA kernel yet says so by name instead of touching device memory.
#include "ops.h"

#include <stdexcept>
#include <string>

#include "check.h"
#include "cpu/cpu_ops.h"
#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vchat::ops {

namespace {
bool on_cuda(const Tensor& t) { return t.defined() && t.device() == Device::cuda; }
[[noreturn]] void no_cuda_kernel(const char* op) {
  throw std::runtime_error(std::string("ops::") + op + ": this op has no CUDA kernel yet; run it on CPU tensors");
}
}  // namespace

#define VCHAT_CPU_ONLY(op, t) \
  if (on_cuda(t)) no_cuda_kernel(op)

void gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, float alpha, float beta) {
  if (on_cuda(C)) {
#ifdef VCHAT_WITH_CUDA
    return cuda::gemm(A, ta, B, tb, C, alpha, beta);
#else
    no_cuda_kernel("gemm");
#endif
  }
  cpu::gemm(A, ta, B, tb, C, alpha, beta);
}

void linear_fwd(const Tensor& x, const Tensor& W, const Tensor& b, const Tensor& y) {
  gemm(x, false, W, true, y);
  if (b.defined()) {
    VCHAT_CPU_ONLY("linear bias", y);
    cpu::add_bias(y, b);
  }
}

void linear_bwd_input(const Tensor& dy, const Tensor& W, const Tensor& dx, float beta) {
  gemm(dy, false, W, false, dx, 1.f, beta);
}

void linear_bwd_weight(const Tensor& dy, const Tensor& x, const Tensor& dW, const Tensor& db) {
  if (dW.defined()) gemm(dy, true, x, false, dW, 1.f, 1.f);
  if (db.defined()) {
    VCHAT_CPU_ONLY("bias_grad", db);
    cpu::bias_grad(dy, db);
  }
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  VCHAT_CPU_ONLY("add", out);
  cpu::add(a, b, out);
}
void axpy(float alpha, const Tensor& x, const Tensor& y) {
  VCHAT_CPU_ONLY("axpy", y);
  cpu::axpy(alpha, x, y);
}
void scale(const Tensor& x, float alpha) {
  VCHAT_CPU_ONLY("scale", x);
  cpu::scale(x, alpha);
}
void fill(const Tensor& x, float value) {
  VCHAT_CPU_ONLY("fill", x);
  cpu::fill(x, value);
}

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd) {
  VCHAT_CPU_ONLY("rmsnorm_fwd", x);
  cpu::rmsnorm_fwd(x, w, eps, y, rstd);
}
void rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dx,
                 const Tensor& dw) {
  VCHAT_CPU_ONLY("rmsnorm_bwd", x);
  cpu::rmsnorm_bwd(dy, x, w, rstd, dx, dw);
}
void layernorm_fwd(const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd) {
  VCHAT_CPU_ONLY("layernorm_fwd", x);
  cpu::layernorm_fwd(x, w, b, eps, y, mean, rstd);
}
void layernorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                   const Tensor& dx, const Tensor& dw, const Tensor& db) {
  VCHAT_CPU_ONLY("layernorm_bwd", x);
  cpu::layernorm_bwd(dy, x, w, mean, rstd, dx, dw, db);
}

void rope_(const Tensor& x, double theta, bool inverse) {
  VCHAT_CPU_ONLY("rope", x);
  cpu::rope_(x, theta, inverse);
}

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  if (on_cuda(out)) {
#ifdef VCHAT_WITH_CUDA
    return cuda::swiglu_fwd(gate, up, out);
#else
    no_cuda_kernel("swiglu_fwd");
#endif
  }
  cpu::swiglu_fwd(gate, up, out);
}
void swiglu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate, const Tensor& dup) {
  VCHAT_CPU_ONLY("swiglu_bwd", gate);
  cpu::swiglu_bwd(dout, gate, up, dgate, dup);
}
void gelu_fwd(Activation act, const Tensor& x, const Tensor& y) {
  VCHAT_CPU_ONLY("gelu_fwd", x);
  cpu::gelu_fwd(act, x, y);
}
void gelu_bwd(Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  VCHAT_CPU_ONLY("gelu_bwd", x);
  cpu::gelu_bwd(act, dy, x, dx);
}

void attention_fwd(AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& modality,
                   const Tensor& out, const Tensor& probs) {
  VCHAT_CPU_ONLY("attention_fwd", q);
  cpu::attention_fwd(mode, q, k, v, modality, out, probs);
}
void attention_bwd(AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& modality, const Tensor& probs, const Tensor& dq, const Tensor& dk,
                   const Tensor& dv) {
  VCHAT_CPU_ONLY("attention_bwd", q);
  cpu::attention_bwd(mode, dout, q, k, v, modality, probs, dq, dk, dv);
}

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out) {
  VCHAT_CPU_ONLY("embedding_fwd", table);
  cpu::embedding_fwd(ids, table, out);
}
void embedding_bwd(const Tensor& dout, const Tensor& ids, const Tensor& dtable) {
  VCHAT_CPU_ONLY("embedding_bwd", dtable);
  cpu::embedding_bwd(dout, ids, dtable);
}
void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  VCHAT_CPU_ONLY("scatter_rows", dst);
  cpu::scatter_rows(src, index, dst);
}
void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  VCHAT_CPU_ONLY("gather_rows", dst);
  cpu::gather_rows(src, index, dst);
}
void patchify(const Tensor& pixels, int64_t patch, const Tensor& patches) {
  VCHAT_CPU_ONLY("patchify", pixels);
  cpu::patchify(pixels, patch, patches);
}

void vit_embed_fwd(const Tensor& patch_emb, const Tensor& cls, const Tensor& pos, const Tensor& out) {
  VCHAT_CPU_ONLY("vit_embed_fwd", out);
  cpu::vit_embed_fwd(patch_emb, cls, pos, out);
}
void vit_embed_bwd(const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls, const Tensor& dpos) {
  VCHAT_CPU_ONLY("vit_embed_bwd", dout);
  cpu::vit_embed_bwd(dout, dpatch_emb, dcls, dpos);
}

double cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& lse) {
  VCHAT_CPU_ONLY("cross_entropy_fwd", logits);
  return cpu::cross_entropy_fwd(logits, targets, lse);
}
void cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits) {
  VCHAT_CPU_ONLY("cross_entropy_bwd", logits);
  cpu::cross_entropy_bwd(logits, targets, lse, scale, dlogits);
}

double sum_squares(const Tensor& x) {
  VCHAT_CPU_ONLY("sum_squares", x);
  return cpu::sum_squares(x);
}
void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, const AdamWParams& p) {
  VCHAT_CPU_ONLY("adamw_step", param);
  cpu::adamw_step(param, grad, m, v, p);
}

}  // namespace vchat::ops
