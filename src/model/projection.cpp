#include "model/projection.h"

namespace vchat {

Projection::Projection(ParamStore& s, int64_t width, int64_t hidden, const ProjectionConfig& cfg)
    : linear_(s, "proj.linear", width, hidden, true), norm_(s, "proj.norm", hidden, cfg.ln_eps) {}

Tensor Projection::forward(const ExecContext& ex, const Tensor& f, ProjectionCache& c) const {
  return norm_.forward(ex, linear_.forward(ex, f, c.linear), c.norm);
}

void Projection::backward(const ExecContext& ex, const Tensor& dy, ProjectionCache& c, const Tensor& dfeatures) const {
  Tensor dl = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  norm_.backward(ex, dy, c.norm, dl);
  linear_.backward(ex, dl, c.linear, dfeatures);
}

}  // namespace vchat
