#include "nn/linear.h"

#include "check.h"
#include "ops.h"

namespace vchat {

// A parameter split along `dim` per the layout (or whole when replicated).
static Param& add_param(ParamStore& s, const std::string& name, Shape full, int dim, const TpLayout& l) {
  if (l.count == 1 || dim < 0) return s.add(name, std::move(full));
  return s.add_sharded(name, std::move(full), dim, l.index, l.count);
}

Linear::Linear(ParamStore& store, const std::string& name, int64_t in, int64_t out, bool bias, TpLayout layout)
    : name_(name), full_in_(in), full_out_(out), layout_(layout) {
  const bool col = layout.kind == TpLayout::column, row = layout.kind == TpLayout::row;
  VCHAT_CHECK(!(row && bias), name << ": a row-parallel layer cannot have a bias");
  in_ = row ? in / layout.count : in;
  out_ = col ? out / layout.count : out;
  w_ = &add_param(store, name + ".weight", {out, in}, col ? 0 : row ? 1 : -1, layout);
  if (bias) b_ = &add_param(store, name + ".bias", {out}, col ? 0 : -1, layout);
}

void Linear::add_lora(ParamStore& store, int64_t rank, float alpha) {
  VCHAT_CHECK(rank > 0, "LoRA rank must be positive, got " << rank);
  const bool col = layout_.kind == TpLayout::column, row = layout_.kind == TpLayout::row;
  lora_a_ = &add_param(store, name_ + ".lora_A", {rank, full_in_}, row ? 1 : -1, layout_);
  lora_b_ = &add_param(store, name_ + ".lora_B", {full_out_, rank}, col ? 0 : -1, layout_);
  lora_scale_ = alpha / static_cast<float>(rank);
}

Tensor Linear::forward(const ExecContext& ex, const Tensor& x, LinearCache& cache) const {
  VCHAT_CHECK(x.dim() == 2 && x.size(1) == in_,
              name_ << ": input " << shape_str(x.shape()) << ", expected [N, " << in_ << "]");
  Tensor y = Tensor::empty({x.size(0), out_}, x.dtype(), x.device());
  ops::linear_fwd(ex, x, w_->compute(), b_ ? b_->compute() : Tensor(), y);
  cache.x = x;
  if (lora_a_) {
    cache.xa = Tensor::empty({x.size(0), lora_a_->compute().size(0)}, x.dtype(), x.device());
    ops::gemm(ex, x, false, lora_a_->compute(), true, cache.xa);  // row-parallel: a partial sum, completed with y below
    ops::gemm(ex, cache.xa, false, lora_b_->compute(), true, y, lora_scale_, 1.f);
  }
  // Row-parallel: y is this rank's partial sum (LoRA's included); the caller's "g" sums it.
  return y;
}

void Linear::backward(const ExecContext& ex, const Tensor& dy, const LinearCache& cache, const Tensor& dx,
                      float beta) const {
  ops::linear_bwd_weight(ex, dy, cache.x, w_->trainable ? w_->grad : Tensor(),
                         b_ && b_->trainable ? b_->grad : Tensor());
  if (dx.defined()) ops::linear_bwd_input(ex, dy, w_->compute(), dx, beta);
  if (lora_a_) {
    // dB += s·dyᵀ xa ; dxa = s·dy B ; dA += dxaᵀ x ; dx += dxa A
    if (lora_b_->trainable) ops::gemm(ex, dy, true, cache.xa, false, lora_b_->grad, lora_scale_, 1.f);
    Tensor dxa = Tensor::empty(cache.xa.shape(), dy.dtype(), dy.device());
    ops::gemm(ex, dy, false, lora_b_->compute(), false, dxa, lora_scale_, 0.f);
    if (lora_a_->trainable) ops::gemm(ex, dxa, true, cache.x, false, lora_a_->grad, 1.f, 1.f);
    if (dx.defined()) ops::gemm(ex, dxa, false, lora_a_->compute(), false, dx, 1.f, 1.f);
  }
}

}  // namespace vchat
