#include "model/linear.h"

#include "check.h"
#include "ops.h"

namespace vchat {

Linear::Linear(ParamStore& store, const std::string& name, int64_t in, int64_t out, bool bias)
    : name_(name), in_(in), out_(out) {
  w_ = &store.add(name + ".weight", {out, in});
  if (bias) b_ = &store.add(name + ".bias", {out});
}

void Linear::add_lora(ParamStore& store, int64_t rank, float alpha) {
  VCHAT_CHECK(rank > 0, "LoRA rank must be positive, got " << rank);
  lora_a_ = &store.add(name_ + ".lora_A", {rank, in_});
  lora_b_ = &store.add(name_ + ".lora_B", {out_, rank});
  lora_scale_ = alpha / static_cast<float>(rank);
}

Tensor Linear::forward(const Tensor& x, LinearCache& cache) const {
  VCHAT_CHECK(x.dim() == 2 && x.size(1) == in_, name_ << ": input " << shape_str(x.shape()) << ", expected [N, " << in_ << "]");
  Tensor y = Tensor::empty({x.size(0), out_}, x.dtype(), x.device());
  ops::linear_fwd(x, w_->value, b_ ? b_->value : Tensor(), y);
  cache.x = x;
  if (lora_a_) {
    cache.xa = Tensor::empty({x.size(0), lora_a_->value.size(0)}, x.dtype(), x.device());
    ops::gemm(x, false, lora_a_->value, true, cache.xa);
    ops::gemm(cache.xa, false, lora_b_->value, true, y, lora_scale_, 1.f);
  }
  return y;
}

void Linear::backward(const Tensor& dy, const LinearCache& cache, const Tensor& dx, float beta) const {
  ops::linear_bwd_weight(dy, cache.x, w_->trainable ? w_->grad : Tensor(),
                         b_ && b_->trainable ? b_->grad : Tensor());
  if (dx.defined()) ops::linear_bwd_input(dy, w_->value, dx, beta);
  if (lora_a_) {
    // dB += s·dyᵀ xa ; dxa = s·dy B ; dA += dxaᵀ x ; dx += dxa A
    if (lora_b_->trainable) ops::gemm(dy, true, cache.xa, false, lora_b_->grad, lora_scale_, 1.f);
    Tensor dxa = Tensor::empty(cache.xa.shape(), dy.dtype(), dy.device());
    ops::gemm(dy, false, lora_b_->value, false, dxa, lora_scale_, 0.f);
    if (lora_a_->trainable) ops::gemm(dxa, true, cache.x, false, lora_a_->grad, 1.f, 1.f);
    if (dx.defined()) ops::gemm(dxa, false, lora_a_->value, false, dx, 1.f, 1.f);
  }
}

}  // namespace vchat
