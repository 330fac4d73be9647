#include "model/params.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>

namespace vchat {

Param& ParamStore::add(const std::string& name, Shape shape) {
  if (find(name)) throw std::logic_error("parameter registered twice: " + name);
  auto p = std::make_unique<Param>();
  p->name = name;
  p->value = Tensor::zeros(std::move(shape));
  params_.push_back(std::move(p));
  return *params_.back();
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

void ParamStore::zero_grads() {
  for (auto& p : params_)
    if (p->grad.defined()) p->grad.zero_();
}

int64_t ParamStore::numel(bool trainable_only) const {
  int64_t n = 0;
  for (auto& p : params_)
    if (!trainable_only || p->trainable) n += p->value.numel();
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
  f.values = Tensor::zeros({f.padded});
  f.grads = Tensor::zeros({f.padded});
  for (size_t i = 0; i < t.size(); ++i) {
    const int64_t n = t[i]->value.numel();
    Tensor v = f.values.slice(0, f.offset[i], f.offset[i] + n).reshape(t[i]->value.shape());
    v.copy_from(t[i]->value);
    t[i]->value = v;
  }
  flat_ = f;
  bind_flat_grads(f.grads);
  return flat_;
}

void ParamStore::bind_flat_grads(const Tensor& grads) {
  const std::vector<Param*> t = trainable();
  for (size_t i = 0; i < t.size(); ++i)
    t[i]->grad = grads.defined()
                     ? grads.slice(0, flat_.offset[i], flat_.offset[i] + t[i]->value.numel()).reshape(t[i]->value.shape())
                     : Tensor();
}

static bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void init_params(ParamStore& store, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (auto& p : store.all()) {
    float* d = p->value.data<float>();
    const int64_t n = p->value.numel();
    const bool norm = p->name.find("norm") != std::string::npos || p->name.find("layrnorm") != std::string::npos ||
                      p->name.find("layer_norm") != std::string::npos;
    if (ends_with(p->name, ".bias") || ends_with(p->name, "lora_B")) {
      for (int64_t i = 0; i < n; ++i) d[i] = 0.f;
    } else if (norm) {
      for (int64_t i = 0; i < n; ++i) d[i] = 1.f;
    } else if (ends_with(p->name, "lora_A")) {
      const float bound = 1.f / std::sqrt(static_cast<float>(p->value.size(1)));
      std::uniform_real_distribution<float> u(-bound, bound);
      for (int64_t i = 0; i < n; ++i) d[i] = u(rng);
    } else {
      std::normal_distribution<float> g(0.f, 0.02f);
      for (int64_t i = 0; i < n; ++i) d[i] = g(rng);
    }
  }
}

}  // namespace vchat
