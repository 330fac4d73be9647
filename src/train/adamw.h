// AdamW over the trainable parameters, fp32 moments, with clipping by global grad norm.
// Weight decay applies to matrices only (not norms, biases or the CLS vector), as
// Megatron and DeepSpeed-VisualChat do.
#pragma once
#include <vector>

#include "model/params.h"
#include "ops.h"

namespace vchat {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.0f;
  float clip_grad = 1.0f;  // <= 0 disables clipping
};

class AdamW {
 public:
  AdamW(const std::vector<Param*>& params, const AdamWConfig& cfg);
  // Global L2 norm of all gradients (before clipping).
  double grad_norm() const;
  // Clips (if configured) and applies one update at learning rate lr. Returns the norm.
  // A non-finite norm throws before any parameter changes.
  double step(float lr);
  int64_t steps_taken() const { return step_; }

 private:
  struct Slot {
    Param* p;
    Tensor m, v;
    bool decay;
  };
  std::vector<Slot> slots_;
  AdamWConfig cfg_;
  int64_t step_ = 0;
};

}  // namespace vchat
