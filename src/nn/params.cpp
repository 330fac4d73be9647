#include "nn/params.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <random>
#include <stdexcept>

#include "ops.h"

namespace vchat {

Param& ParamStore::create(const std::string& name, const ShardSpec& shard) {
  if (find(name)) throw std::logic_error("parameter registered twice: " + name);
  auto p = std::make_unique<Param>();
  p->name = name;
  p->shard = shard;
  p->value = Tensor::zeros(shard.local());
  params_.push_back(std::move(p));
  bound_.push_back(!declared_);
  return *params_.back();
}

Param& ParamStore::bind(const std::string& name, const ShardSpec& want) {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i]->name != name) continue;
    const ShardSpec& have = params_[i]->shard;
    const bool same =
        have.full == want.full &&
        (have.dim < 0 ? want.dim < 0 : have.dim == want.dim && have.index == want.index && have.count == want.count);
    if (!same)
      throw std::logic_error("parameter " + name + ": the layer asks for " + shape_str(want.local()) + " of " +
                             shape_str(want.full) + ", the parameter table declares " + shape_str(have.local()) +
                             " of " + shape_str(have.full));
    if (bound_[i]) throw std::logic_error("parameter registered twice: " + name);
    bound_[i] = true;
    return *params_[i];
  }
  throw std::logic_error("parameter " + name + " is not in the parameter table (model/param_table.cpp)");
}

Param& ParamStore::add(const std::string& name, Shape shape) {
  ShardSpec whole;
  whole.full = std::move(shape);
  return declared_ ? bind(name, whole) : create(name, whole);
}

Param& ParamStore::add_sharded(const std::string& name, Shape full, int dim, int64_t index, int64_t count) {
  if (dim < 0 || dim >= static_cast<int>(full.size()) || count < 1 || index < 0 || index >= count ||
      full[dim] % count != 0)
    throw std::logic_error("parameter " + name + ": cannot take part " + std::to_string(index) + " of " +
                           std::to_string(count) + " along dim " + std::to_string(dim) + " of " + shape_str(full));
  const ShardSpec shard{dim, index, count, std::move(full)};
  return declared_ ? bind(name, shard) : create(name, shard);
}

Param& ParamStore::declare(const std::string& name, InitRule init, const ShardSpec& shard, const ParamSpec* spec) {
  if (!declared_ && !params_.empty())
    throw std::logic_error("declare(" + name + ") after layers registered parameters");
  declared_ = true;
  Param& p = create(name, shard);
  p.spec = spec;
  p.init = init;
  return p;
}

void ParamStore::check_all_bound() const {
  std::string missing;
  for (size_t i = 0; i < params_.size(); ++i)
    if (!bound_[i]) missing += (missing.empty() ? "" : ", ") + params_[i]->name;
  if (!missing.empty()) throw std::logic_error("declared in the parameter table but used by no layer: " + missing);
}

Param* ParamStore::find(const std::string& name) const {
  for (auto& p : params_)
    if (p->name == name) return p.get();
  return nullptr;
}

Param& ParamStore::at(const std::string& name) const {
  Param* p = find(name);
  if (!p) throw std::out_of_range("no parameter named '" + name + "'");
  return *p;
}

std::vector<Param*> ParamStore::trainable() const {
  std::vector<Param*> out;
  for (auto& p : params_)
    if (p->trainable) out.push_back(p.get());
  return out;
}

void ParamStore::set_trainable(Param& p, bool on) {
  p.trainable = on;
  p.grad = on ? Tensor::zeros(p.value.shape(), p.value.dtype(), p.value.device()) : Tensor();
}

void ParamStore::to(const ExecContext& ex, const Placement& where) {
  const Device device = ex.device();
  const DType compute = where.compute;
  if (flattened_) throw std::logic_error("ParamStore::to after flatten_trainable: move the parameters first");
  auto moved = [&](const Tensor& t) {
    if (!t.defined() || t.device() == device) return t;
    Tensor d = Tensor::empty(t.shape(), t.dtype(), device);
    d.copy_from(t);
    return d;
  };
  const bool working_copies = where.working_copies;
  if (compute != DType::f32 && !working_copies)
    throw std::logic_error(std::string("ParamStore::to: ") + dtype_name(compute) + " compute needs working copies");
  for (auto& p : params_) {
    // Under a bf16 policy a frozen weight is read only through its working copy: its fp32
    // master stays in host memory (checkpoints read it there), so a frozen 7B LLM costs the
    // GPU 2 bytes per weight, not 6.
    const bool master_stays = working_copies && (!p->trainable || where.trainable_masters_on_host);
    if (!master_stays) p->value = moved(p->value);
    p->grad = moved(p->grad);
    p->work = working_copies ? Tensor::empty(p->value.shape(), compute, device) : Tensor();
  }
  device_ = device;
  ex_ = ex;
  working_copies_ = working_copies;
  work_dtype_ = compute;
  refresh_working_copies();
}

void ParamStore::refresh_working_copies(bool trainable_only) {
  for (auto& p : params_) {
    if (!p->work.defined() || !p->value.defined() || (trainable_only && !p->trainable)) continue;
    if (p->value.device() == p->work.device()) {
      ops::cast(ex_, p->value, p->work);
    } else {  // a frozen master on the host: round there, then one copy
      const Tensor rounded = Tensor::empty(p->value.shape(), p->work.dtype(), p->value.device());
      ops::cast(ex_, p->value.is_contiguous() ? p->value : p->value.clone(), rounded);
      p->work.copy_from(rounded);
    }
  }
}

void ParamStore::zero_grads() {
  for (auto& p : params_)
    if (p->grad.defined()) p->grad.zero_();
}

int64_t ParamStore::numel(bool trainable_only) const {
  int64_t n = 0;
  for (auto& p : params_)
    if (!trainable_only || p->trainable) n += p->shard.local_numel();
  return n;
}

const ParamStore::Flat& ParamStore::flatten_trainable(int64_t align) {
  const std::vector<Param*> t = trainable();
  Flat f;
  for (Param* p : t) {
    f.offset.push_back(f.numel);
    f.numel += p->value.numel();
  }
  align = std::max<int64_t>(1, align);
  f.padded = (f.numel + align - 1) / align * align;
  // The masters where to() left them (the host, when they stay there); the rest on the device.
  f.values = Tensor::zeros({f.padded}, DType::f32, t.empty() ? device_ : t.front()->value.device());
  for (size_t i = 0; i < t.size(); ++i) {
    Tensor v = f.values.slice(0, f.offset[i], f.offset[i] + t[i]->value.numel()).reshape(t[i]->value.shape());
    v.copy_from(t[i]->value);
    t[i]->value = v;
  }
  // The gradients start at zero, and the working copies are casts of the masters: both are
  // dropped before their flat buffers exist, so the device never holds them twice (at a
  // 7B model's scale the difference between fitting and not at start-up).
  for (Param* p : t) {
    p->grad = Tensor();
    p->work = Tensor();
  }
  f.grads = Tensor::zeros({f.padded}, DType::f32, device_);
  flat_ = f;
  flattened_ = true;
  bind_flat_grads(f.grads);
  if (working_copies_ && !t.empty()) {
    flat_.work = Tensor::zeros({f.padded}, work_dtype_, device_);
    for (size_t i = 0; i < t.size(); ++i)
      t[i]->work =
          flat_.work.slice(0, f.offset[i], f.offset[i] + t[i]->shard.local_numel()).reshape(t[i]->shard.local());
    refresh_working_copies(/*trainable_only=*/true);
  }
  return flat_;
}

void ParamStore::release_trainable_masters() {
  if (!flattened_) throw std::logic_error("ParamStore::release_trainable_masters before flatten_trainable");
  for (Param* p : trainable()) {
    if (!p->work.defined())
      throw std::logic_error("ParamStore::release_trainable_masters: " + p->name + " has no working copy to read");
    p->value = Tensor();
  }
  flat_.values = Tensor();
}

void ParamStore::bind_flat_grads(const Tensor& grads) {
  const std::vector<Param*> t = trainable();
  for (size_t i = 0; i < t.size(); ++i)
    t[i]->grad =
        grads.defined()
            ? grads.slice(0, flat_.offset[i], flat_.offset[i] + t[i]->shard.local_numel()).reshape(t[i]->shard.local())
            : Tensor();
}

// Each parameter draws from its own stream, seeded by (seed, name): a rank that holds only
// some parameters, or slices of them (tensor and pipeline parallelism), draws exactly the
// numbers the one-rank model has there. The full tensor is drawn and the slice kept.
Tensor initial_value(const std::string& name, InitRule rule, const Shape& full_shape, uint64_t seed) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the name, mixed with the seed
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull ^ h);
  Tensor full = Tensor::zeros(full_shape);
  float* d = full.data<float>();
  const int64_t n = full.numel();
  switch (rule) {
    case InitRule::zeros:
      break;
    case InitRule::ones:
      for (int64_t i = 0; i < n; ++i) d[i] = 1.f;
      break;
    case InitRule::lora_a: {
      const float bound = 1.f / std::sqrt(static_cast<float>(full.size(1)));
      std::uniform_real_distribution<float> u(-bound, bound);
      for (int64_t i = 0; i < n; ++i) d[i] = u(rng);
      break;
    }
    case InitRule::normal: {
      std::normal_distribution<float> g(0.f, 0.02f);
      for (int64_t i = 0; i < n; ++i) d[i] = g(rng);
      break;
    }
  }
  return full;
}

// Parameters are drawn in parallel (a 1B model is 1.4e9 normal draws: half a minute on one
// core). Each has its own stream, so the values do not depend on the thread count. Device
// values are copied one at a time, from whichever thread drew them.
void init_params(ParamStore& store, uint64_t seed) {
  const auto& all = store.all();
  const int64_t n = static_cast<int64_t>(all.size());
  std::exception_ptr failed;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    Param& p = *all[static_cast<size_t>(i)];
    try {
      const Tensor full = initial_value(p.name, p.init, p.shard.full, seed);
      const Tensor mine = shard_of(full, p.shard).clone();  // contiguous, as copy_from wants
      if (p.value.device() == Device::cpu) {
        p.value.copy_from(mine);
      } else {
#pragma omp critical(vchat_init_params_device_copy)
        p.value.copy_from(mine);
      }
    } catch (...) {
#pragma omp critical(vchat_init_params_error)
      if (!failed) failed = std::current_exception();
    }
  }
  if (failed) std::rethrow_exception(failed);
}

Tensor shard_of(const Tensor& full, const ShardSpec& spec) {
  if (spec.dim < 0) return full;
  const int64_t part = full.size(spec.dim) / spec.count;
  return full.slice(spec.dim, spec.index * part, (spec.index + 1) * part);
}

}  // namespace vchat
