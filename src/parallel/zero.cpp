#include "parallel/zero.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "model/config.h"
#include "ops.h"

namespace vchat {

void ZeroOptimizer::check_stage(int stage) {
  if (stage < 0 || stage > 2)
    throw ConfigError("--zero=" + std::to_string(stage) + " is not supported (0, 1 or 2; stage 3 is not implemented yet)");
}

ZeroOptimizer::ZeroOptimizer(ParamStore& store, Comm& dp, int stage, const AdamWConfig& cfg)
    : store_(store), dp_(dp), stage_(stage), cfg_(cfg) {
  check_stage(stage);
  const ParamStore::Flat& f = store.flatten_trainable(dp.size());
  grads_ = f.grads;
  const bool sharded = stage >= 1;
  shard_size_ = sharded ? f.padded / dp.size() : f.padded;
  shard_begin_ = sharded ? shard_size_ * dp.rank() : 0;
  m_ = Tensor::zeros({shard_size_});
  v_ = Tensor::zeros({shard_size_});
  if (sharded) grad_shard_ = Tensor::zeros({shard_size_});
  // Weight decay applies to matrices only: record, per parameter, its part of the range.
  const std::vector<Param*> t = store.trainable();
  for (size_t i = 0; i < t.size(); ++i) {
    const int64_t b = std::max(f.offset[i], shard_begin_);
    const int64_t e = std::min(f.offset[i] + t[i]->value.numel(), shard_begin_ + shard_size_);
    if (b < e) segments_.push_back({b, e, t[i]->value.dim() >= 2});
  }
  if (stage_ == 2) {  // no full gradient is held between steps
    grads_ = Tensor();
    store_.bind_flat_grads(Tensor());
  }
}

void ZeroOptimizer::zero_grads() {
  if (stage_ == 2) {
    grads_ = Tensor::zeros({store_.flat()->padded});
    store_.bind_flat_grads(grads_);
  } else {
    grads_.zero_();
  }
}

double ZeroOptimizer::step(float lr) {
  const ParamStore::Flat& f = *store_.flat();
  if (!grads_.defined()) throw std::logic_error("ZeroOptimizer::step without zero_grads() before backward");

  using clock = std::chrono::steady_clock;
  comm_seconds_ = 0;
  auto timed = [&](auto&& collective) {
    const auto t0 = clock::now();
    collective();
    comm_seconds_ += std::chrono::duration<double>(clock::now() - t0).count();
  };

  // 1. Reduce the gradients over the DP group: the whole buffer, or into our shard.
  Tensor g = grads_;
  if (stage_ == 0) {
    if (dp_.size() > 1) timed([&] { dp_.all_reduce(grads_, ReduceOp::sum); });
  } else {
    timed([&] { dp_.reduce_scatter(grads_.raw(), grad_shard_.raw(), shard_size_, DType::f32, ReduceOp::sum); });
    g = grad_shard_;
  }
  if (stage_ == 2) {  // give the full local gradient up until the next backward
    grads_ = Tensor();
    store_.bind_flat_grads(Tensor());
  }

  // 2. Global norm: every rank holds all of it (stage 0) or its shard (sum over shards).
  double ss = ops::sum_squares(g);
  if (stage_ >= 1) timed([&] { dp_.all_reduce_f64(&ss, 1, ReduceOp::sum); });
  const double norm = std::sqrt(ss);
  if (!std::isfinite(norm))
    throw std::runtime_error("gradient norm is " + std::to_string(norm) + " at update " + std::to_string(step_ + 1) +
                             ": training diverged; lower --lr, raise --warmup or check the data");
  if (cfg_.clip_grad > 0 && norm > cfg_.clip_grad) ops::scale(g, static_cast<float>(cfg_.clip_grad / (norm + 1e-6)));

  // 3. AdamW on the owned range, one segment per parameter (decay on matrices only).
  ++step_;
  for (const Segment& s : segments_) {
    const int64_t a = s.begin - shard_begin_, b = s.end - shard_begin_;
    ops::AdamWParams p{lr, cfg_.beta1, cfg_.beta2, cfg_.eps, s.decay ? cfg_.weight_decay : 0.f, step_};
    ops::adamw_step(f.values.slice(0, s.begin, s.end), g.slice(0, a, b), m_.slice(0, a, b), v_.slice(0, a, b), p);
  }

  // 4. Stages 1, 2: everyone gets everyone's updated shard.
  if (stage_ >= 1 && dp_.size() > 1) {
    Tensor mine = f.values.slice(0, shard_begin_, shard_begin_ + shard_size_).clone();
    timed([&] { dp_.all_gather(mine.raw(), f.values.raw(), shard_size_, DType::f32); });
  }
  return norm;
}

ZeroMemory ZeroOptimizer::memory() const {
  const int64_t n = store_.flat()->padded, bytes = sizeof(float);
  ZeroMemory m;
  m.params = n * bytes;
  m.grads = (stage_ == 0 ? n : stage_ == 1 ? n + shard_size_ : shard_size_) * bytes;
  m.optimizer = 2 * shard_size_ * bytes;
  return m;
}

}  // namespace vchat
