// Linear warmup then cosine decay to min_lr (Megatron's "cosine" with warmup).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace vchat {

struct LrSchedule {
  float max_lr = 1e-3f, min_lr = 0.f;
  int64_t warmup_steps = 0, total_steps = 1;

  // step is 0-based: the learning rate used by the (step+1)-th update.
  float at(int64_t step) const {
    if (warmup_steps > 0 && step < warmup_steps) return max_lr * static_cast<float>(step + 1) / warmup_steps;
    const int64_t decay = std::max<int64_t>(1, total_steps - warmup_steps);
    const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / decay);
    return static_cast<float>(min_lr + 0.5 * (max_lr - min_lr) * (1.0 + std::cos(M_PI * progress)));
  }
};

}  // namespace vchat
