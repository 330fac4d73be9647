#include "parallel/zero.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "check.h"  // ConfigError
#include "ops.h"

namespace vchat {

const char* state_kind_name(StateKind k) {
  switch (k) {
    case StateKind::value: return "value";
    case StateKind::adam_m: return "adam_m";
    case StateKind::adam_v: return "adam_v";
  }
  return "?";
}

void check_zero_stage(int stage) {
  if (stage < 0 || stage > 3) throw ConfigError("--zero=" + std::to_string(stage) + " is not a ZeRO stage (0, 1, 2 or 3)");
}

void clip_and_update(const ExecContext& ex, const std::vector<UpdateSegment>& segments, const UpdateGroups& groups,
                     const AdamWConfig& cfg, float lr, int64_t update,
                     const std::function<void(const std::function<void()>&)>& timed, const Tensor& grad_sq) {
  // 1. Partial gradients of replicated parameters: sum over the replicas.
  for (const UpdateSegment& s : segments)
    if (s.param->grad_sum && s.param->grad_sum->size() > 1)
      timed([&] { s.param->grad_sum->all_reduce(s.grad, ReduceOp::sum); });

  // 2. The global sum of squares: each element of the model counted once across all groups.
  std::vector<Tensor> counted;
  for (const UpdateSegment& s : segments)
    if (s.param->counts_in_norm) counted.push_back(s.grad);
  ops::sum_squares(ex, counted, grad_sq);
  if (groups.dp_for_norm && groups.dp_for_norm->size() > 1)
    timed([&] { groups.dp_for_norm->all_reduce(grad_sq, ReduceOp::sum); });
  if (groups.mp && groups.mp->size() > 1) timed([&] { groups.mp->all_reduce(grad_sq, ReduceOp::sum); });

  // 3. Clip and AdamW, one segment per parameter (decoupled decay on matrices only).
  const Tensor clip = Tensor::empty({1}, DType::f32, grad_sq.device());
  ops::clip_scale(ex, grad_sq, cfg.clip_grad, clip);
  for (const UpdateSegment& s : segments) {
    const bool decay = s.param->shard.full.size() >= 2;  // the full shape: a released ZeRO-3 value has none
    ops::AdamWParams p{lr, cfg.beta1, cfg.beta2, cfg.eps, decay ? cfg.weight_decay : 0.f, update};
    ops::adamw_step(ex, s.value, s.grad, s.m, s.v, p, s.work, clip);
  }
}

double gradient_norm(double grad_sq, int64_t update) {
  const double norm = std::sqrt(grad_sq);
  if (!std::isfinite(norm))
    throw std::runtime_error("gradient norm is " + std::to_string(norm) + " at update " + std::to_string(update) +
                             ": training diverged (no parameter was changed); lower --lr, raise --warmup or check the data");
  return norm;
}

double DataParallelOptimizer::step(float lr) {
  const Tensor grad_sq = Tensor::zeros({1}, DType::f32, device());
  update(lr, grad_sq);
  return gradient_norm(grad_sq.to_vector_f32()[0], updates());
}

ZeroOptimizer::ZeroOptimizer(ParamStore& store, Comm& dp, int stage, const AdamWConfig& cfg, Comm* mp)
    : store_(store), dp_(dp), mp_(mp), stage_(stage), cfg_(cfg) {
  check_zero_stage(stage);
  if (stage > 1)
    throw std::invalid_argument("ZeroOptimizer handles stages 0-1; stages 2-3 are Zero3Optimizer (zero3.h)");
  const ParamStore::Flat& f = store.flatten_trainable(dp.size());
  grads_ = f.grads;
  const bool sharded = stage >= 1;
  shard_size_ = sharded ? f.padded / dp.size() : f.padded;
  shard_begin_ = sharded ? shard_size_ * dp.rank() : 0;
  // Optimizer state lives where the parameters do (ParamStore::to moved them first).
  const Device dev = store.device();
  m_ = Tensor::zeros({shard_size_}, DType::f32, dev);
  v_ = Tensor::zeros({shard_size_}, DType::f32, dev);
  if (sharded) grad_shard_ = Tensor::zeros({shard_size_}, DType::f32, dev);
  // Record, per parameter, its part of the updated range.
  const std::vector<Param*> t = store.trainable();
  for (size_t i = 0; i < t.size(); ++i) {
    const int64_t b = std::max(f.offset[i], shard_begin_);
    const int64_t e = std::min(f.offset[i] + t[i]->shard.local_numel(), shard_begin_ + shard_size_);
    if (b < e) segments_.push_back({t[i], b, e, f.offset[i]});
  }
  // Stage 1 under working copies: the layers read the working copies and the update writes
  // them, so whole fp32 masters would only be read by the update of this rank's shard.
  // Keep that shard (on the device; the whole masters were left on the host for this) and
  // drop the rest: 4 bytes a trained parameter fewer, as DeepSpeed's ZeRO-1.
  if (sharded && f.work.defined()) {
    const Tensor mine = f.values.slice(0, shard_begin_, shard_begin_ + shard_size_);
    master_ = mine.device() == dev ? mine.clone() : mine.to(dev);  // its own buffer: the flat one goes
    store.release_trainable_masters();
  } else if (f.values.device() != dev) {
    throw std::logic_error("ZeroOptimizer: the trainable masters are on " +
                           std::string(device_name(f.values.device())) + ", the optimizer state on " +
                           device_name(dev) +
                           " (Placement::trainable_masters_on_host is for ZeRO-1 under working copies)");
  }
}

void ZeroOptimizer::set_micro_batches(int64_t m) {
  if (m < 1) throw std::invalid_argument("ZeroOptimizer::set_micro_batches: " + std::to_string(m) + " < 1");
  micro_batches_ = m;
}

void ZeroOptimizer::overlap_with_backward(const std::vector<ParamUnit>& units) {
  if (dp_.size() == 1) return;  // nothing to reduce
  const ParamStore::Flat& f = *store_.flat();
  const std::vector<Param*> t = store_.trainable();
  std::unordered_map<const Param*, size_t> flat_index;
  for (size_t i = 0; i < t.size(); ++i) flat_index[t[i]] = i;
  units_.assign(units.size(), UnitRanges{});
  for (size_t u = 0; u < units.size(); ++u) {
    std::vector<std::pair<int64_t, int64_t>> r;
    for (const Param* p : units[u].params) {
      const auto it = flat_index.find(p);
      if (it != flat_index.end()) r.push_back({f.offset[it->second], f.offset[it->second] + p->shard.local_numel()});
    }
    std::sort(r.begin(), r.end());
    for (const auto& [a, b] : r) {  // adjacent parameters: one range, one collective
      if (!units_[u].ranges.empty() && units_[u].ranges.back().second == a)
        units_[u].ranges.back().second = b;
      else
        units_[u].ranges.push_back({a, b});
    }
  }
  // A range reduced twice would be summed twice at stage 0 (in place): a parameter in two
  // units is a bug in the model's unit list, refused here rather than trained wrong.
  std::vector<std::pair<int64_t, int64_t>> all;
  for (const UnitRanges& u : units_) all.insert(all.end(), u.ranges.begin(), u.ranges.end());
  std::sort(all.begin(), all.end());
  for (size_t i = 1; i < all.size(); ++i)
    if (all[i].first < all[i - 1].second)
      throw std::logic_error("ZeroOptimizer::overlap_with_backward: a parameter belongs to two units (flat range [" +
                             std::to_string(all[i].first) + ", " + std::to_string(all[i].second) + "))");
  overlap_ = !all.empty();
  if (!overlap_) units_.clear();
}

void ZeroOptimizer::after_backward(int unit) {
  if (!overlapping()) return;
  if (unit < 0 || unit >= static_cast<int>(units_.size()))
    throw std::logic_error("ZeroOptimizer::after_backward: unit " + std::to_string(unit) + " of " +
                           std::to_string(units_.size()));
  UnitRanges& u = units_[unit];
  if (++u.seen < micro_batches_) return;  // more micro-batches still add to this unit's gradient
  if (u.seen > micro_batches_)
    throw std::logic_error("ZeroOptimizer: unit " + std::to_string(unit) + " ran backward " + std::to_string(u.seen) +
                           " times in a step of " + std::to_string(micro_batches_) +
                           " micro-batches (zero_grads() starts a step)");
  if (!grads_.defined()) throw std::logic_error("ZeroOptimizer: backward without zero_grads() first");
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& [a, b] : u.ranges) {
    inflight_.push_back(reduce_range(a, b));
    reduced_.push_back({a, b});
  }
  hook_comm_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::unique_ptr<CommRequest> ZeroOptimizer::reduce_range(int64_t begin, int64_t end) {
  if (stage_ == 0)  // every replica keeps the whole sum
    return dp_.all_reduce_async(grads_.data<float>() + begin, end - begin, DType::f32, ReduceOp::sum);
  return dp_.reduce_range_async(grads_.raw(), grad_shard_.raw(), shard_size_, begin, end, DType::f32, ReduceOp::sum);
}

void ZeroOptimizer::finish_reductions() {
  for (auto& r : inflight_) r->wait();
  inflight_.clear();
  reduced_.clear();
  for (UnitRanges& u : units_) u.seen = 0;
}

void ZeroOptimizer::zero_grads() {
  finish_reductions();  // a step that failed part-way leaves some
  hook_comm_seconds_ = 0;
  grads_.zero_();
}

void ZeroOptimizer::update(float lr, const Tensor& grad_sq) {
  const ParamStore::Flat& f = *store_.flat();
  if (!grads_.defined()) throw std::logic_error("ZeroOptimizer::update without zero_grads() before backward");

  using clock = std::chrono::steady_clock;
  comm_seconds_ = hook_comm_seconds_;  // the reductions the backward's hooks began
  hook_comm_seconds_ = 0;
  auto timed = [&](const std::function<void()>& collective) {
    const auto t0 = clock::now();
    collective();
    comm_seconds_ += std::chrono::duration<double>(clock::now() - t0).count();
  };

  // 1. Reduce the gradients over the DP group: the whole buffer, or into our shard. (A
  //    pipeline stage may train nothing, e.g. the paper's set beyond stage 0; its DP peers
  //    are the same stage, so they all skip together.)
  const bool any = f.padded > 0;
  Tensor g = grads_;
  if (any && overlapping()) {
    // The backward's hooks reduced whole units; what none covered (the padding, a unit
    // whose backward did not run) follows here, then everything is waited for. Every DP
    // peer runs the same units in the same order, so the ranges agree across the group.
    timed([&] {
      std::sort(reduced_.begin(), reduced_.end());
      int64_t at = 0;
      std::vector<std::pair<int64_t, int64_t>> rest;
      for (const auto& [a, b] : reduced_) {
        if (a > at) rest.push_back({at, a});
        at = std::max(at, b);
      }
      if (at < f.padded) rest.push_back({at, f.padded});
      for (const auto& [a, b] : rest) inflight_.push_back(reduce_range(a, b));
      finish_reductions();
    });
    if (stage_ >= 1) g = grad_shard_;
  } else if (any && stage_ == 0) {
    if (dp_.size() > 1) timed([&] { dp_.all_reduce(grads_, ReduceOp::sum); });
  } else if (any) {
    timed([&] { dp_.reduce_scatter(grads_.raw(), grad_shard_.raw(), shard_size_, DType::f32, ReduceOp::sum); });
    g = grad_shard_;
  }

  // 2. Clip by the global norm and update the owned range: the whole parameters (stage 0)
  //    or this rank's shard (stage 1; under working copies of its own master shard). The
  //    update writes the working copies of what it updates too.
  std::vector<UpdateSegment> segs;
  for (const Segment& s : segments_) {
    const int64_t a = s.begin - shard_begin_, b = s.end - shard_begin_;
    segs.push_back({s.param, shards_masters() ? master_.slice(0, a, b) : f.values.slice(0, s.begin, s.end),
                    g.slice(0, a, b), m_.slice(0, a, b), v_.slice(0, a, b),
                    f.work.defined() ? f.work.slice(0, s.begin, s.end) : Tensor()});
  }
  clip_and_update(store_.exec(), segs, {stage_ >= 1 ? &dp_ : nullptr, mp_}, cfg_, lr, ++step_, timed, grad_sq);

  // 3. Stage 1: everyone gets everyone's updated shard, in place (what the layers read:
  //    the working copies, or the fp32 values themselves).
  if (any && stage_ >= 1 && dp_.size() > 1) gather_shards(timed);
}

void ZeroOptimizer::gather_shards(const std::function<void(const std::function<void()>&)>& timed) {
  const ParamStore::Flat& f = *store_.flat();
  const Tensor& whole = shards_masters() ? f.work : f.values;
  const Tensor mine = whole.slice(0, shard_begin_, shard_begin_ + shard_size_);
  timed([&] { dp_.all_gather(mine.raw(), whole.raw(), shard_size_, whole.dtype()); });
}

void ZeroOptimizer::refresh_working_copies() {
  store_.refresh_working_copies();  // every copy whose master the store holds
  if (!shards_masters() || store_.flat()->padded == 0) return;
  // The trainable ones: this rank's shard from its masters, then everyone's.
  const ParamStore::Flat& f = *store_.flat();
  ops::cast(store_.exec(), master_, f.work.slice(0, shard_begin_, shard_begin_ + shard_size_));
  if (dp_.size() > 1) gather_shards([](const std::function<void()>& c) { c(); });
}

std::vector<StateSlice> ZeroOptimizer::state() {
  // Values: every rank holds every parameter whole (stage 1 all-gathers after the update),
  // except the trainable masters of shards_masters(): this rank's shard.
  // Moments: the whole buffer (stage 0, replicated) or this rank's shard.
  std::vector<StateSlice> out;
  const ParamStore::Flat& f = *store_.flat();
  size_t ti = 0;
  for (auto& p : store_.all()) {
    const int64_t n = p->shard.local_numel();
    if (!p->trainable) {
      out.push_back({p.get(), StateKind::value, 0, n, p->value.reshape({n}), true});
    } else if (!shards_masters()) {
      out.push_back({p.get(), StateKind::value, 0, n, f.values.slice(0, f.offset[ti], f.offset[ti] + n), true});
    }
    if (p->trainable) ++ti;
  }
  for (const Segment& s : segments_) {
    const int64_t a = s.begin - shard_begin_, b = s.end - shard_begin_, pa = s.begin - s.offset, pb = s.end - s.offset;
    if (shards_masters()) out.push_back({s.param, StateKind::value, pa, pb, master_.slice(0, a, b), false});
    out.push_back({s.param, StateKind::adam_m, pa, pb, m_.slice(0, a, b), stage_ == 0});
    out.push_back({s.param, StateKind::adam_v, pa, pb, v_.slice(0, a, b), stage_ == 0});
  }
  return out;
}

ZeroMemory ZeroOptimizer::memory() const {
  const ParamStore::Flat& f = *store_.flat();
  const int64_t n = f.padded, bytes = sizeof(float);
  const int64_t work = store_.working_copy_bytes();  // frozen ones have copies on a stage training nothing too
  ZeroMemory m;
  // The fp32 masters (whole, or this rank's shard) and the working copies (whole).
  m.params = (shards_masters() ? shard_size_ : n) * bytes + n * work;
  m.frozen = (store_.numel(false) - store_.numel(true)) * (bytes + work);
  m.grads = (stage_ == 0 ? n : n + shard_size_) * bytes;
  m.optimizer = 2 * shard_size_ * bytes;
  return m;
}

}  // namespace vchat
