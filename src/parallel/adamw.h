// AdamW settings. The optimizer itself is ZeroOptimizer (zero.h, beside it): AdamW
// (decoupled weight decay on matrices only, fp32 moments) with clipping by the global
// gradient norm, over the data-parallel group; one rank is its stage-0, dp=1 case.
#pragma once

namespace vchat {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.0f;
  float clip_grad = 1.0f;  // <= 0 disables clipping
};

}  // namespace vchat
