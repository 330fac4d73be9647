// Parameters by name. Every weight lives in one ParamStore; layers hold pointers into it.
// Only trainable parameters own a gradient buffer, so frozen ones cost no gradient memory.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor.h"

namespace vchat {

struct Param {
  std::string name;
  Tensor value;
  Tensor grad;  // defined only while trainable
  bool trainable = false;
};

class ParamStore {
 public:
  Param& add(const std::string& name, Shape shape);
  Param* find(const std::string& name) const;
  Param& at(const std::string& name) const;  // throws naming the parameter
  const std::vector<std::unique_ptr<Param>>& all() const { return params_; }
  std::vector<Param*> trainable() const;
  void set_trainable(Param& p, bool on);  // allocates or drops the gradient
  void zero_grads();
  int64_t numel(bool trainable_only) const;

  // Moves every trainable parameter (value and gradient) into two flat buffers, in
  // registration order, padded with zeros to a multiple of `align` elements; each Param's
  // value/grad becomes a view into them. ZeRO shards these buffers over the DP group.
  struct Flat {
    Tensor values, grads;        // [padded]
    std::vector<int64_t> offset; // per trainable Param, in trainable() order
    int64_t numel = 0, padded = 0;
  };
  const Flat& flatten_trainable(int64_t align);
  const Flat* flat() const { return flat_.padded ? &flat_ : nullptr; }
  // Re-points the trainable grads at `grads` (same layout) or at nothing (undefined).
  void bind_flat_grads(const Tensor& grads);

 private:
  std::vector<std::unique_ptr<Param>> params_;
  Flat flat_;
};

// Deterministic initialisation from a seed (std 0.02 normal for matrices, ones for norm
// scales, zeros for biases and LoRA B) so tests and benchmarks get the same model twice.
void init_params(ParamStore& store, uint64_t seed);

}  // namespace vchat
