#include "nn/norm.h"

#include "ops.h"

namespace vchat {

static Tensor per_row(const Tensor& x) { return Tensor::empty({x.numel() / x.size(-1)}, DType::f32, x.device()); }

RMSNorm::RMSNorm(ParamStore& store, const std::string& name, int64_t dim, float eps)
    : w_(&store.add(name + ".weight", {dim})), eps_(eps) {}

Tensor RMSNorm::forward(const ExecContext& ex, const Tensor& x, NormCache& c) const {
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  c.x = x;
  c.rstd = per_row(x);
  ops::rmsnorm_fwd(ex, x, w_->compute(), eps_, y, c.rstd);
  return y;
}

Tensor RMSNorm::add_forward(const ExecContext& ex, const Tensor& x, const Tensor& residual, NormCache& c) const {
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  c.x = x;
  c.rstd = per_row(x);
  ops::add_rmsnorm_fwd(ex, x, residual, x, w_->compute(), eps_, y, c.rstd);
  return y;
}

void RMSNorm::backward(const ExecContext& ex, const Tensor& dy, const NormCache& c, const Tensor& dx,
                       const Tensor& residual_grad) const {
  ops::rmsnorm_bwd(ex, dy, c.x, w_->compute(), c.rstd, dx, w_->trainable ? w_->grad : Tensor(), residual_grad);
}

LayerNorm::LayerNorm(ParamStore& store, const std::string& name, int64_t dim, float eps)
    : w_(&store.add(name + ".weight", {dim})), b_(&store.add(name + ".bias", {dim})), eps_(eps) {}

Tensor LayerNorm::forward(const ExecContext& ex, const Tensor& x, NormCache& c) const {
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  c.x = x;
  c.mean = per_row(x);
  c.rstd = per_row(x);
  ops::layernorm_fwd(ex, x, w_->compute(), b_->compute(), eps_, y, c.mean, c.rstd);
  return y;
}

void LayerNorm::backward(const ExecContext& ex, const Tensor& dy, const NormCache& c, const Tensor& dx) const {
  ops::layernorm_bwd(ex, dy, c.x, w_->compute(), c.mean, c.rstd, dx, w_->trainable ? w_->grad : Tensor(),
                     b_->trainable ? b_->grad : Tensor());
}

}  // namespace vchat
