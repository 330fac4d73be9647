// Linear layer y = x Wᵀ + b, with an optional LoRA adapter y += s·(x Aᵀ) Bᵀ.
// Frozen weights get no weight-gradient GEMM; the input gradient always flows.
// (Issue 4 wraps this as ColumnParallelLinear / RowParallelLinear over a TP group.)
#pragma once
#include <string>

#include "model/params.h"

namespace vchat {

struct LinearCache {
  Tensor x;   // input, for dW = dyᵀ x
  Tensor xa;  // LoRA: x Aᵀ [N, r]
};

class Linear {
 public:
  Linear() = default;
  // Registers `<name>.weight` [out, in] (and `<name>.bias` [out] when bias).
  Linear(ParamStore& store, const std::string& name, int64_t in, int64_t out, bool bias);
  // Registers `<name>.lora_A` [r, in] and `<name>.lora_B` [out, r]; scale = alpha / r.
  void add_lora(ParamStore& store, int64_t rank, float alpha);

  Tensor forward(const Tensor& x, LinearCache& cache) const;
  // Weight gradients accumulate into the trainable params; dx is written (beta=0) or
  // accumulated (beta=1) when defined.
  void backward(const Tensor& dy, const LinearCache& cache, const Tensor& dx, float beta = 0.f) const;

  int64_t in() const { return in_; }
  int64_t out() const { return out_; }
  Param* weight() const { return w_; }

 private:
  Param *w_ = nullptr, *b_ = nullptr, *lora_a_ = nullptr, *lora_b_ = nullptr;
  std::string name_;
  int64_t in_ = 0, out_ = 0;
  float lora_scale_ = 0.f;
};

}  // namespace vchat
