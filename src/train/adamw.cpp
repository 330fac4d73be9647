#include "train/adamw.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace vchat {

AdamW::AdamW(const std::vector<Param*>& params, const AdamWConfig& cfg) : cfg_(cfg) {
  for (Param* p : params)
    slots_.push_back({p, Tensor::zeros(p->value.shape()), Tensor::zeros(p->value.shape()), p->value.dim() >= 2});
}

double AdamW::grad_norm() const {
  double ss = 0.0;
  for (const auto& s : slots_) ss += ops::sum_squares(s.p->grad);
  return std::sqrt(ss);
}

double AdamW::step(float lr) {
  const double norm = grad_norm();
  if (!std::isfinite(norm))  // checked before touching anything: parameters stay as they were
    throw std::runtime_error("gradient norm is " + std::to_string(norm) + " at update " + std::to_string(step_ + 1) +
                             ": training diverged; lower --lr, raise --warmup or check the data");
  if (cfg_.clip_grad > 0 && norm > cfg_.clip_grad) {
    const float k = static_cast<float>(cfg_.clip_grad / (norm + 1e-6));
    for (auto& s : slots_) ops::scale(s.p->grad, k);
  }
  ++step_;
  for (auto& s : slots_) {
    ops::AdamWParams a{lr, cfg_.beta1, cfg_.beta2, cfg_.eps, s.decay ? cfg_.weight_decay : 0.f, step_};
    ops::adamw_step(s.p->value, s.p->grad, s.m, s.v, a);
  }
  return norm;
}

}  // namespace vchat
